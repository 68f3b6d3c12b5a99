#!/usr/bin/env python3
"""How much each engine blocks the event loop: a 1 ms ticker task runs next to ``aioblock bench``'s request
loop and records how late each tick is. A request path that blocks the loop (the ``sync`` engine on data that
is not in the page cache) makes every other task of the program wait.

For each engine: scattered 4 KiB reads at depth 32 on the 1 GiB test file, once page-cache hot and once cold
(the page cache is dropped first; needs root, else the cold rows are skipped), then 4 KiB sequential writes at
depth 32 over the same file under dirty-page throttling (``vm.dirty_bytes`` lowered to 32 MiB for the run and
restored after; root only): the case where a buffered write blocks in the kernel. Prints ops/s and the
ticker's lateness (p50 / p99 / max, in ms).

Usage: ``python benchmarks/loop_stall.py [--file PATH] [--count N] [--loop uvloop|asyncio] [--json OUT]``
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from _harness import drop_caches, make_hot_file

import aioblock
from aioblock.cli.bench import BenchSettings, run_bench

SCATTER_STEP = 25013 * 4096


async def _measure(path: str, engine: str, count: int, write: bool = False) -> dict[str, Any]:
    lateness: list[float] = []
    stop = False

    async def ticker() -> None:
        while not stop:
            t0 = time.perf_counter()
            await asyncio.sleep(0.001)
            lateness.append(max(0.0, time.perf_counter() - t0 - 0.001))   # timers may fire a bit early

    disk = await aioblock.open(path, "raw", read_only=not write, engine=engine)
    try:
        tick = asyncio.get_running_loop().create_task(ticker())
        await asyncio.sleep(0.01)
        lateness.clear()
        settings = (BenchSettings(count=count * 4, depth=32, write=True) if write
                    else BenchSettings(count=count, depth=32, step=SCATTER_STEP))
        result = await run_bench(disk, settings)
        stop = True
        await tick
    finally:
        await disk.close()
    lat = sorted(lateness)

    def pct(p: float) -> float:
        return lat[min(len(lat) - 1, int(len(lat) * p / 100))] * 1000 if lat else 0.0

    return {"engine": engine, "ops_per_s": result.ops_per_second, "ticks": len(lat),
            "tick_late_ms": {"p50": pct(50), "p99": pct(99), "max": lat[-1] * 1000 if lat else 0.0}}




ENGINES = ("hybrid", "uring", "threads", "sync")
_DIRTY = ("/proc/sys/vm/dirty_bytes", "/proc/sys/vm/dirty_background_bytes")


@contextlib.contextmanager
def _dirty_throttling() -> Iterator[bool]:
    """Lower the dirty-page limits so that buffered writes are throttled (root only; restored on exit)."""
    try:
        saved = [Path(p).read_text() for p in (*_DIRTY, "/proc/sys/vm/dirty_ratio",
                                               "/proc/sys/vm/dirty_background_ratio")]
        Path(_DIRTY[0]).write_text(str(32 << 20))
        Path(_DIRTY[1]).write_text(str(8 << 20))
    except OSError:
        yield False
        return
    try:
        yield True
    finally:
        # writing a *_ratio resets the matching *_bytes to 0, which is how they were (ratios in force)
        if saved[0].strip() == "0":
            Path("/proc/sys/vm/dirty_ratio").write_text(saved[2])
            Path("/proc/sys/vm/dirty_background_ratio").write_text(saved[3])
        else:
            Path(_DIRTY[0]).write_text(saved[0])
            Path(_DIRTY[1]).write_text(saved[1])


def _run_one(path: str, engine: str, count: int, loop_name: str, write: bool) -> dict[str, Any]:
    if loop_name == "uvloop":
        import uvloop
        return uvloop.run(_measure(path, engine, count, write))
    return asyncio.run(_measure(path, engine, count, write))


def _print(row: dict[str, Any]) -> None:
    late = row["tick_late_ms"]
    print(f"{row['cache']:<9} {row['engine']:<8} {row['ops_per_s']:>9.0f} ops/s   ticker late p50 "
          f"{late['p50']:.2f} p99 {late['p99']:.2f} max {late['max']:.2f} ms ({row['ticks']} ticks)", flush=True)


def run(path: str, count: int, loop_name: str) -> list[dict[str, Any]]:
    rows = []
    for state in ("hot", "cold"):
        for engine in ENGINES:
            if state == "hot":
                make_hot_file(path, 1 << 30)
            elif not drop_caches():
                continue
            row = _run_one(path, engine, count, loop_name, False)
            row["cache"] = state
            rows.append(row)
            _print(row)
    for engine in ENGINES:
        make_hot_file(path, 1 << 30)
        with _dirty_throttling() as throttled:
            if not throttled:
                break
            row = _run_one(path, engine, count, loop_name, True)
        row["cache"] = "throttled"
        row["workload"] = "write"
        rows.append(row)
        _print(row)
    make_hot_file(path, 1 << 30)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--file", default="/tmp/aioblock-bench/raw-1g.raw")
    ap.add_argument("--count", type=int, default=20_000)
    ap.add_argument("--loop", default="uvloop", choices=("uvloop", "asyncio"))
    ap.add_argument("--json", help="also write the rows as JSON to this file")
    args = ap.parse_args()
    make_hot_file(args.file, 1 << 30)
    rows = run(args.file, args.count, args.loop)
    if args.json:
        Path(args.json).write_text(json.dumps({"loop": args.loop, "count": args.count, "rows": rows},
                                              indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
