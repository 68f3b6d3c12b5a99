"""Sizes as qemu-img reads and prints them."""

from __future__ import annotations

import math
import re

from .errors import InvalidOptionError

__all__ = ["format_size", "parse_size"]

_SUFFIX = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40, "p": 1 << 50, "e": 1 << 60}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([bkmgtpe]?)\s*$", re.IGNORECASE)


def parse_size(text: str | int) -> int:
    """``"64k"``, ``"1.5G"``, ``"4096"`` -> bytes (binary suffixes k/M/G/T/P/E, as qemu-img)."""
    if isinstance(text, int):
        if text < 0:
            raise InvalidOptionError(f"Invalid size {text}")
        return text
    match = _SIZE.match(text)
    if not match:
        raise InvalidOptionError(f"Invalid size specified: '{text}'. You may use k, M, G, T, P or E suffixes "
                                 "for kilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes.")
    number, suffix = match.groups()
    value = float(number) * _SUFFIX[suffix.lower()] if "." in number else int(number) * _SUFFIX[suffix.lower()]
    if value >= 1 << 63:
        raise InvalidOptionError(f"Invalid size specified: '{text}' is too large")
    return int(value)


def format_size(value: int) -> str:
    """Human size as qemu-img prints it: three significant digits, binary units, switching unit at 1000
    (``1 MiB``, ``0.977 KiB``, ``12 KiB``)."""
    if value <= 0:
        return "0 B"
    _, exp = math.frexp(value / (1000.0 / 1024.0))
    index = min(max((exp - 1) // 10, 0), 6)
    unit = ("", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei")[index]
    return f"{value / (1 << (10 * index)):0.3g} {unit}B"
