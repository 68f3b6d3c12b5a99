"""Helpers shared by the benchmark scripts: the test file, the machine description, subprocess runs."""

from __future__ import annotations

import os
import platform
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

__all__ = ["drop_caches", "machine_info", "make_hot_file", "parse_bench_output", "run_cmd", "update_readme_section"]

_CHUNK = 1 << 20


def make_hot_file(path: str, size: int) -> None:
    """Make ``path`` a fully allocated file of ``size`` bytes (random data, not zeroes: no file system can
    skip it), unless it already is one, then read it once so that every page is in the page cache."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    st = os.stat(path) if os.path.exists(path) else None
    if st is None or st.st_size != size or st.st_blocks * 512 < size:
        block = os.urandom(_CHUNK)
        with open(path, "wb") as f:
            for _ in range(size // _CHUNK):
                f.write(block)
            f.write(block[:size % _CHUNK])
            f.flush()
            os.fsync(f.fileno())
    fd = os.open(path, os.O_RDONLY)
    try:
        buf = bytearray(_CHUNK)
        while os.readv(fd, [buf]):
            pass
    finally:
        os.close(fd)


def _first_line_with(path: str, prefix: str) -> str | None:
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(prefix):
                    return line.split(":", 1)[1].strip()
    except OSError:
        return None
    return None


def machine_info() -> dict[str, Any]:
    """CPU model, cores, memory, kernel, Python, event loop and QEMU versions."""
    qemu = run_cmd(["qemu-img", "--version"]).stdout.splitlines()
    mem = _first_line_with("/proc/meminfo", "MemTotal")
    try:
        import uvloop
        uvloop_version: str | None = uvloop.__version__
    except ImportError:
        uvloop_version = None
    return {
        "cpu": _first_line_with("/proc/cpuinfo", "model name") or platform.processor(),
        "cores": os.cpu_count(),
        "memory": mem,
        "kernel": platform.release(),
        "python": sys.version.split()[0],
        "uvloop": uvloop_version,
        "qemu": qemu[0] if qemu else None,
    }


def run_cmd(argv: list[str], timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)


_RUN = re.compile(r"^Run completed in ([0-9.]+) seconds\.$", re.MULTILINE)
_TPUT = re.compile(r"^Throughput: ([0-9.]+) ops/s", re.MULTILINE)
_LAT = re.compile(r"^Latency \(us\): (.*)$", re.MULTILINE)


def parse_bench_output(text: str, count: int) -> dict[str, Any]:
    """Seconds, ops/s (from qemu-img's "Run completed" line, the same way for both tools) and, for
    aioblock, its latency percentiles."""
    m = _RUN.search(text)
    if m is None:
        raise RuntimeError(f"no 'Run completed' line in output:\n{text}")
    seconds = float(m.group(1))
    out: dict[str, Any] = {"seconds": seconds}
    tput = _TPUT.search(text)
    # qemu-img prints 3 decimals only; aioblock's own ops/s line is exact, use it when present
    out["ops_per_s"] = float(tput.group(1)) if tput else (count / seconds if seconds > 0 else float("inf"))
    lat = _LAT.search(text)
    if lat:
        out["latency_us"] = {k: float(v) for k, v in (item.split() for item in lat.group(1).split(", "))}
    return out


def drop_caches() -> bool:
    """Drop the page cache (root only); False where not allowed."""
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("1\n")
        return True
    except OSError:
        return False


def update_readme_section(start_marker: str, end_marker: str, table: str) -> None:
    """Replace what lies between two marker comments of benchmarks/README.md with ``table``."""
    readme = Path(__file__).resolve().parent / "README.md"
    text = readme.read_text()
    start, end = text.index(start_marker) + len(start_marker), text.index(end_marker)
    readme.write_text(text[:start] + "\n" + table + "\n" + text[end:])
