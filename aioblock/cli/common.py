"""Helpers shared by the CLI commands: option parsing and qemu-img's output conventions."""

from __future__ import annotations

import json
from typing import Any

from ..errors import InvalidOptionError

__all__ = ["dump_json", "parse_options"]


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
    """JSON as qemu-img prints it: 4-space indent."""
    return json.dumps(value, indent=4)
