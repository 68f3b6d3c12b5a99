"""Format drivers, looked up by name (``-f``/``fmt``) or found by probing the image's first bytes."""

from __future__ import annotations

import importlib

from ..driver import BlockDriver
from ..errors import InvalidOptionError

__all__ = ["FORMATS", "QEMU_FORMAT_NAMES", "driver_class", "probe_format"]

#: format name -> "module:Class"; imported on first use so that opening a raw image loads nothing else.
FORMATS: dict[str, str] = {
    "raw": "aioblock.drivers.raw:RawDriver",
    "qcow2": "aioblock.drivers.qcow2:Qcow2Driver",
    "qed": "aioblock.drivers.qed:QedDriver",
}

#: The format names QEMU 7.2's qemu-img accepts for a backing file (-F; its BlockdevDriver enumeration as built
#: by Debian), whether aioblock opens them or not. "copy-before-write" is left out: qcow2 keeps the name in a
#: header extension that must be shorter than 16 bytes, and QEMU writes it but then cannot open the image.
QEMU_FORMAT_NAMES = frozenset({
    "blkdebug", "blklogwrites", "blkreplay", "blkverify", "bochs", "cloop", "compress", "copy-on-read",
    "dmg", "file", "ftp", "ftps", "gluster", "host_cdrom", "host_device", "http", "https", "iscsi", "luks", "nbd",
    "nfs", "null-aio", "null-co", "nvme", "parallels", "preallocate", "qcow", "qcow2", "qed", "quorum", "raw",
    "rbd", "replication", "snapshot-access", "ssh", "throttle", "vdi", "vhdx", "vmdk", "vpc", "vvfat",
})

#: Bytes of the image given to every driver's ``probe``.
PROBE_BYTES = 4096


def driver_class(name: str) -> type[BlockDriver]:
    """The driver class for a format name; InvalidOptionError names the known formats."""
    try:
        target = FORMATS[name]
    except KeyError:
        raise InvalidOptionError(f"Unknown file format '{name}' (known: {', '.join(sorted(FORMATS))})") from None
    module, _, attr = target.partition(":")
    cls: type[BlockDriver] = getattr(importlib.import_module(module), attr)
    return cls


def probe_format(head: bytes, filename: str) -> str:
    """The format whose ``probe`` scores highest for an image starting with ``head`` (raw as the fallback)."""
    best, best_score = "raw", 0
    for name in FORMATS:
        score = driver_class(name).probe(head, filename)
        if score > best_score:
            best, best_score = name, score
    return best
