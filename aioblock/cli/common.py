"""Helpers shared by the CLI commands: option parsing and qemu-img's output conventions."""

from __future__ import annotations

import json
from typing import Any

from ..errors import InvalidOptionError

__all__ = ["CACHE_MODES", "cache_mode", "dump_json", "parse_options", "qdict_order"]

#: qemu's cache modes -> (aioblock.open's cache, write with FUA, the tool's own flushes are no-ops)
CACHE_MODES = {
    "writeback": ("writeback", False, False),
    "none": ("none", False, False),
    "off": ("none", False, False),
    "writethrough": ("writeback", True, False),
    "directsync": ("none", True, False),
    "unsafe": ("unsafe", False, True),
}


def cache_mode(name: str) -> tuple[str, bool, bool]:
    """A qemu cache mode (``-t``/``-T``) as ``CACHE_MODES`` maps it; qemu-img's message for others."""
    try:
        return CACHE_MODES[name]
    except KeyError:
        raise InvalidOptionError(f"Invalid cache option: {name}") from None


def parse_options(specs: list[str] | None) -> dict[str, str]:
    """``-o a=1,b=2 -o c=3`` -> {"a": "1", "b": "2", "c": "3"} (qemu's ``,,`` escapes a comma)."""
    out: dict[str, str] = {}
    for spec in specs or []:
        for item in spec.replace(",,", "\0").split(","):
            if not item:
                continue
            key, sep, value = item.partition("=")
            if not sep:
                raise InvalidOptionError(f"Invalid option '{item.replace(chr(0), ',')}': expected key=value")
            out[key.strip()] = value.replace("\0", ",")
    return out


def dump_json(value: Any) -> str:
    """JSON as qemu-img prints its QAPI objects (``info``, ``check``): 4-space indent, keys in QDict order."""
    return json.dumps(qdict_order(value), indent=4)


def qdict_order(value: Any) -> Any:
    """``value`` with the keys of every object in the order qemu-img prints them.

    qemu-img turns its QAPI objects into a QDict, a hash table of 512 buckets, and prints the buckets in order,
    the key added last first within one (none of the keys it prints share a bucket). The hash is TDB's string
    hash; this reproduces the order of qemu-img 7.2's ``info`` and ``check`` output key for key."""
    if isinstance(value, dict):
        keys = list(value)
        rank = {k: i for i, k in enumerate(keys)}
        keys.sort(key=lambda k: (_qdict_bucket(k), -rank[k]))
        return {k: qdict_order(value[k]) for k in keys}
    if isinstance(value, list):
        return [qdict_order(v) for v in value]
    return value


def _qdict_bucket(key: str) -> int:
    h = 0x238F13AF * len(key) & 0xFFFFFFFF
    for i, c in enumerate(key.encode()):
        h = h + (c << (i * 5 % 24)) & 0xFFFFFFFF
    return (1103515243 * h + 12345) % (1 << 32) % 512
