"""Helpers shared by the benchmark scripts: the test file, the machine description, subprocess runs.

The test file and the machine description live in the package (``aioblock.benchmark.images`` and
``aioblock.benchmark.machine``, shared with ``aioblock benchmark``); they are re-exported here for the scripts.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path
from typing import Any

from aioblock.benchmark.images import make_hot_file
from aioblock.benchmark.machine import machine_info

__all__ = ["drop_caches", "machine_info", "make_hot_file", "parse_bench_output", "run_cmd", "update_readme_section"]


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
