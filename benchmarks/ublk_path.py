#!/usr/bin/env python3
"""The ublk server path's cost per request, outside the kernel: ``aioblock.frontends.ublk.serve`` on the
simulated kernel side of :mod:`aioblock.testing.ublk`, in-process, one queue.

A driver thread plays the block layer: it keeps ``depth`` 4 KiB requests in flight on queue 0, each at a random
4 KiB-aligned offset (seeded), submitting the next one as each completes; the queue thread, the hand-offs and
the loop's tasks are the server's own code, unchanged. The image is page-cache hot: a 256 MiB raw file of
random data, and its ``qemu-img convert`` to qcow2 (every cluster allocated, so writes are overwrites).

In the same run, on the same files, for scale: ``aioblock bench`` (the backend alone, no server, same
depth, random offsets are not available there, so the 4 KiB scatter step of run_raw.py) and ``qemu-img bench``
(the same step).

The simulated kernel is Python too: its submit, dispatch and completion run on the driver and queue threads
and take their share of the GIL, and on this 2-vCPU machine the driver, queue and loop threads wake one another,
so wall-clock ops/s is a floor for the server on a real kernel. The server's own cost is therefore also measured
as CPU time per request of its two threads (the loop's and the queue's, with per-thread clocks); 1 / that is
the rate one core could sustain if the wake-ups cost nothing, an upper bound. The queue thread's figure includes
the simulated kernel's completion side, which runs on it.

Usage: ``python benchmarks/ublk_path.py [--requests 100000] [--depths 1,32,128] [--repeat 3] [--update-readme]``
Results: ``benchmarks/results/ublk-path-<date>.json`` and, with ``--update-readme``, the table in
benchmarks/README.md ("ublk server path").
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import queue as _queue
import random
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import uvloop
from _harness import machine_info, make_hot_file, parse_bench_output, run_cmd, update_readme_section

import aioblock
from aioblock.benchmark.images import warm
from aioblock.frontends import ublk
from aioblock.frontends.ublk import uapi
from aioblock.testing.ublk import SimulatedKernel

HERE = Path(__file__).resolve().parent
SIZE = 256 << 20
BLOCK = 4096
SCATTER_STEP = 25013 * BLOCK
TARGETS = {"reads": (115_000, 31_000), "writes": (104_000, 25_000)}   # ublk-qcow2, qemu-nbd (published)


def drive(kernel: SimulatedKernel, dev_id: int, op: int, depth: int, requests: int, seed: int) -> float:
    """Run ``requests`` requests at ``depth`` on queue 0 from this thread; return the seconds they took."""
    dev = kernel.device(dev_id)
    rng = random.Random(seed)
    sectors = SIZE // 512
    data = os.urandom(BLOCK) if op == uapi.OP_WRITE else None
    offsets = [rng.randrange(sectors // 8) * 8 for _ in range(requests)]
    done: _queue.SimpleQueue[tuple[int, bytes]] = _queue.SimpleQueue()
    failures = 0
    send, sectors_per_request, put = dev.send, BLOCK // 512, done.put

    def submit(i: int) -> None:
        send(0, op, offsets[i], sectors_per_request, data, 0, put)

    start = time.perf_counter()
    sent = min(depth, requests)
    for i in range(sent):
        submit(i)
    for _ in range(requests):
        result, _data = done.get()
        if result != BLOCK:
            failures += 1
        if sent < requests:
            submit(sent)
            sent += 1
    elapsed = time.perf_counter() - start
    if failures:
        raise RuntimeError(f"{failures} requests failed")
    return elapsed


async def server_run(path: str, fmt: str, op: int, depth: int, requests: int, seed: int) -> dict[str, float]:
    """One run: wall-clock ops/s, and the CPU time per request of the server's two threads (the event loop's,
    which is this one, and the queue's), measured with per-thread clocks."""
    kernel = SimulatedKernel(cpus=1)
    async with aioblock.open(path, fmt) as disk, ublk.serve(disk, kernel=kernel, queues=1, depth=depth) as dev:
        queue_thread = next(t for t in threading.enumerate() if t.name == f"ublk{dev.dev_id}-q0")
        assert queue_thread.ident is not None
        queue_clock = time.pthread_getcpuclockid(queue_thread.ident)
        loop0, queue0 = time.thread_time(), time.clock_gettime(queue_clock)
        elapsed = await asyncio.to_thread(drive, kernel, dev.dev_id, op, depth, requests, seed)
        loop_cpu, queue_cpu = time.thread_time() - loop0, time.clock_gettime(queue_clock) - queue0
        stats = dev.statistics()
    q = stats.queues[0]
    return {"ops": requests / elapsed, "loop_us": loop_cpu / requests * 1e6,
            "queue_us": queue_cpu / requests * 1e6, "batch": q.requests / max(q.batches, 1)}


def bench_cmd(tool: list[str], path: str, fmt: str, write: bool, depth: int, count: int) -> list[str]:
    argv = [*tool, "bench", "-f", fmt, "-c", str(count), "-d", str(depth), "-s", str(BLOCK),
            "-S", str(SCATTER_STEP)]
    if write:
        argv += ["-w", "--pattern=165"]
    return [*argv, path]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=100_000)
    ap.add_argument("--depths", default="1,32,128")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--update-readme", action="store_true")
    args = ap.parse_args()
    depths = [int(d) for d in args.depths.split(",")]
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(dir="/var/tmp") as tmp:
        raw = os.path.join(tmp, "hot.raw")
        make_hot_file(raw, SIZE)
        qcow2 = os.path.join(tmp, "hot.qcow2")
        run_cmd(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, qcow2])
        warm(qcow2)
        for fmt, path in (("raw", raw), ("qcow2", qcow2)):
            for kind, op in (("reads", uapi.OP_READ), ("writes", uapi.OP_WRITE)):
                for depth in depths:
                    runs: dict[str, list[float]] = {"server": [], "loop_us": [], "queue_us": [], "batch": [],
                                                    "aioblock_bench": [], "qemu_img_bench": []}
                    for rep in range(args.repeat):
                        r = uvloop.run(server_run(path, fmt, op, depth, args.requests, rep))
                        runs["server"].append(r["ops"])
                        for key in ("loop_us", "queue_us", "batch"):
                            runs[key].append(r[key])
                        for name, tool in (("aioblock_bench", [sys.executable, "-m", "aioblock"]),
                                           ("qemu_img_bench", ["qemu-img"])):
                            done = run_cmd(bench_cmd(tool, path, fmt, kind == "writes", depth, args.requests))
                            if done.returncode != 0:
                                raise RuntimeError(f"{name}: {done.stderr.strip()}")
                            runs[name].append(parse_bench_output(done.stdout, args.requests)["ops_per_s"])
                    row: dict[str, Any] = {"format": fmt, "kind": kind, "depth": depth,
                           **{k: statistics.median(v) for k, v in runs.items()}, "runs": runs}
                    row["server_cpu_us"] = row["loop_us"] + row["queue_us"]
                    row["capacity"] = 1e6 / row["server_cpu_us"]
                    results.append(row)
                    print(f"{fmt:5} {kind:6} depth {depth:3}: server {row['server']:8.0f}/s (CPU loop "
                          f"{row['loop_us']:.1f} + queue {row['queue_us']:.1f} us = {row['capacity']:.0f}/s, "
                          f"batch {row['batch']:.1f}), backend alone "
                          f"{row['aioblock_bench']:8.0f}/s, qemu-img bench {row['qemu_img_bench']:8.0f}/s",
                          flush=True)
    date = datetime.date.today().isoformat()
    out_path = HERE / "results" / f"ublk-path-{date}.json"
    out_path.write_text(json.dumps({"machine": machine_info(), "requests": args.requests, "repeat": args.repeat,
                                    "results": results}, indent=2) + "\n")
    if args.update_readme:
        update_readme_section("<!-- ublk-path:begin -->", "<!-- ublk-path:end -->", table(results, date, args))
    print(f"results: {out_path}")
    return 0


def table(results: list[dict[str, Any]], date: str, args: argparse.Namespace) -> str:
    lines = [f"Recorded {date} (`results/ublk-path-{date}.json`; {args.requests} requests per run, median of "
             f"{args.repeat}, uvloop, default engine, page-cache-hot 256 MiB images in /var/tmp).", "",
             "| format | 4 KiB | depth | server ops/s | batch | CPU us/req: loop + queue | 1 / server CPU | "
             "backend alone ops/s | qemu-img bench ops/s | target ops/s | server / target | "
             "1 / server CPU / target |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        target = TARGETS[r["kind"]][0]
        lines.append(f"| {r['format']} | {r['kind']} | {r['depth']} | {r['server']:.0f} | {r['batch']:.1f} | "
                     f"{r['loop_us']:.1f} + {r['queue_us']:.1f} | {r['capacity']:.0f} | "
                     f"{r['aioblock_bench']:.0f} | {r['qemu_img_bench']:.0f} | {target} | "
                     f"{r['server'] / target:.2f} | {r['capacity'] / target:.2f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
