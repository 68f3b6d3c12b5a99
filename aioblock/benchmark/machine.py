"""What a benchmark ran on: CPU, cores, memory, kernel, the file system behind each image location, and the
versions of Python, uvloop, aioblock, qemu-img and fio.

``machine_info`` never fails: anything it cannot find is None (a missing tool, an unreadable /proc file).
``benchmarks/_harness.py`` uses it for the older scripts' JSON (same keys, plus the new ones).
"""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
import sys
from collections.abc import Mapping
from typing import Any

__all__ = ["filesystem_type", "machine_info", "tool_version"]


def _first_line_with(path: str, prefix: str) -> str | None:
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(prefix):
                    return line.split(":", 1)[1].strip()
    except OSError:
        return None
    return None


def tool_version(argv: list[str]) -> str | None:
    """The first line ``argv`` (e.g. ``["fio", "--version"]``) prints, or None if it cannot run."""
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    lines = (proc.stdout or proc.stderr).splitlines()
    return lines[0].strip() if proc.returncode == 0 and lines else None


def filesystem_type(path: str) -> str | None:
    """The type of the file system ``path`` lives on (ext4, tmpfs...), from the longest matching mount point
    in /proc/self/mounts; None if unknown."""
    try:
        target = os.path.realpath(path)
        with open("/proc/self/mounts") as f:
            mounts = [line.split()[:3] for line in f]
    except OSError:
        return None
    best: tuple[int, str] | None = None
    for _dev, mnt, fstype in mounts:
        mnt = mnt.replace("\\040", " ")
        inside = target == mnt or target.startswith(mnt.rstrip("/") + "/")
        if inside and (best is None or len(mnt) >= best[0]):
            best = (len(mnt), fstype)
    return best[1] if best else None


def machine_info(locations: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The host description stored at the top of every results file; ``locations`` maps a location name
    ("disk", "tmpfs") to the directory its images live in, whose file system type is recorded."""
    try:
        import uvloop
        uvloop_version: str | None = getattr(uvloop, "__version__", None)
    except ImportError:
        uvloop_version = None
    from importlib.metadata import PackageNotFoundError, version
    try:
        aioblock_version: str | None = version("aioblock")
    except PackageNotFoundError:
        aioblock_version = None
    return {
        "cpu": _first_line_with("/proc/cpuinfo", "model name") or platform.processor(),
        "cores": os.cpu_count(),
        "memory": _first_line_with("/proc/meminfo", "MemTotal"),
        "kernel": platform.release(),
        "python": sys.version.split()[0],
        "uvloop": uvloop_version,
        "aioblock": aioblock_version,
        "qemu": tool_version(["qemu-img", "--version"]),
        "fio": tool_version(["fio", "--version"]),
        "locations": {name: {"path": path, "filesystem": filesystem_type(path)}
                      for name, path in (locations or {}).items()},
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }
