#!/usr/bin/env python3
"""qcow2 benchmark: ``aioblock bench -f qcow2`` side by side with ``qemu-img bench -f qcow2`` in the same run.

Workloads (the same ``-c/-d/-s/-S`` for every tool; page cache hot; default cache options on both sides):

* ``read-4k-seq`` / ``read-4k-scatter``: 4 KiB reads at depth 32 on a fully allocated 1 GiB qcow2 image
  (64 KiB clusters, filled by qemu-io with random data); scatter steps 25013 * 4 KiB as in run_raw.py;
* ``read-1m-seq``: 1 MiB reads at depth 8 on the same image;
* ``write-4k-alloc``: 4 KiB writes at depth 32 with a 64 KiB step on a new empty image (re-created before every
  run), so that every write allocates a cluster (and every 8192th an L2 table): the allocating-write path,
  refcount updates and metadata write-back, including the final flush at close;
* ``memory``: RSS of a process that opens a new 1 TiB qcow2 image and reads 4 KiB at 200,000 scattered offsets
  that all have L2 tables (the image is first given one cluster per 512 MiB so that every L2 table exists):
  the L2 cache is capped at its default 32 MiB, so RSS growth must stay within that plus a small constant.

Tools: ``qemu-img bench`` with its default aio (thread pool) and with ``-i io_uring``; ``aioblock bench`` with
its defaults (uring engine, uvloop). Each measurement is repeated (``--repeat``, default 5), interleaved; the
median is kept. Results go to ``benchmarks/results/qcow2-<date>.json``; ``--update-readme`` rewrites the table
in ``benchmarks/README.md``.

Usage: ``python benchmarks/run_qcow2.py [--repeat 5] [--dir DIR] [--update-readme]``
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

from _harness import machine_info, parse_bench_output, run_cmd, update_readme_section

HERE = Path(__file__).resolve().parent
SIZE = 1 << 30
SCATTER_STEP = 25013 * 4096
WORKLOADS: dict[str, dict[str, Any]] = {
    "read-4k-seq": {"bufsize": 4096, "step": 4096, "count": 200_000, "depth": 32, "write": False},
    "read-4k-scatter": {"bufsize": 4096, "step": SCATTER_STEP, "count": 200_000, "depth": 32, "write": False},
    "read-1m-seq": {"bufsize": 1 << 20, "step": 1 << 20, "count": 16_000, "depth": 8, "write": False},
    "write-4k-alloc": {"bufsize": 4096, "step": 65536, "count": 16_384, "depth": 32, "write": True},
}
CONFIGS: dict[str, list[str]] = {
    "qemu-img (aio=threads)": ["qemu-img", "bench"],
    "qemu-img -i io_uring": ["qemu-img", "bench", "-i", "io_uring"],
    "aioblock (uring/uvloop)": [sys.executable, "-m", "aioblock", "bench"],
}
README_START, README_END = "<!-- qcow2-results:start -->", "<!-- qcow2-results:end -->"


def make_full_image(path: Path) -> None:
    """A 1 GiB qcow2 image with every cluster allocated (random data, written by qemu-io)."""
    raw = path.with_suffix(".raw")
    with open(raw, "wb") as f:
        for _ in range(SIZE >> 20):
            f.write(os.urandom(1 << 20))
    run_cmd(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(path)])
    raw.unlink()


def new_image(path: Path, size: str = "1G") -> None:
    path.unlink(missing_ok=True)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), size], check=True)


def run_workload(name: str, wl: dict[str, Any], full: Path, scratch: Path, repeat: int) -> dict[str, Any]:
    runs: dict[str, list[float]] = {label: [] for label in CONFIGS}
    lat: dict[str, Any] = {}
    for rep in range(repeat):
        for label, argv0 in CONFIGS.items():
            path = full
            if wl["write"]:
                new_image(scratch)
                path = scratch
            argv = [*argv0, "-f", "qcow2", "-c", str(wl["count"]), "-d", str(wl["depth"]), "-s", str(wl["bufsize"]),
                    "-S", str(wl["step"]), *(["-w"] if wl["write"] else []), str(path)]
            proc = run_cmd(argv)
            if proc.returncode != 0:
                raise RuntimeError(f"{label}: exit {proc.returncode}: {proc.stderr.strip()}")
            if wl["write"]:
                check = subprocess.run(["qemu-img", "check", str(path)], capture_output=True, text=True)
                if check.returncode != 0:
                    raise RuntimeError(f"{label}: qemu-img check exit {check.returncode}: {check.stdout}")
            res = parse_bench_output(proc.stdout, wl["count"])
            runs[label].append(res["ops_per_s"])
            if res.get("latency_us"):
                lat[label] = res["latency_us"]
            print(f"  [{name} {rep + 1}/{repeat}] {label:<26} {res['ops_per_s']:>10.0f} ops/s", flush=True)
    results: dict[str, Any] = {}
    for label in CONFIGS:
        med = statistics.median(runs[label])
        results[label] = {"ops_per_s": med, "mib_per_s": med * wl["bufsize"] / (1 << 20), "runs_ops_per_s": runs[label],
                          "latency_us": lat.get(label)}
    base = results["qemu-img (aio=threads)"]["ops_per_s"]
    uring = results["qemu-img -i io_uring"]["ops_per_s"]
    for r in results.values():
        r["vs_qemu_default"] = r["ops_per_s"] / base
        r["vs_qemu_io_uring"] = r["ops_per_s"] / uring
    return {"settings": {k: v for k, v in wl.items()}, "results": results}


MEMORY_PROBE = r"""
import asyncio, resource, sys, aioblock
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096
async def main(path):
    async with aioblock.open(path) as disk:
        await disk.read(0, 4096)
        before = rss()
        step, n = 25013 * 65536 + 4096, 200_000
        for i in range(n):
            await disk.read((i * step) % disk.size // 4096 * 4096, 4096)
        after = rss()
        stats = disk.statistics()
    print(before, after)
asyncio.run(main(sys.argv[1]))
"""


def memory_workload(scratch: Path) -> dict[str, Any]:
    """RSS growth while reading a 1 TiB image with an L2 table for every 512 MiB."""
    new_image(scratch, "1T")
    cmds: list[str] = []
    for i in range(0, 1 << 40, 512 << 20):
        cmds += ["-c", f"write -q -P 1 {i} 512"]
    run_cmd(["qemu-io", "-f", "qcow2", *cmds, str(scratch)], timeout=3600)
    proc = run_cmd([sys.executable, "-c", MEMORY_PROBE, str(scratch)], timeout=3600)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr)
    before, after = (int(x) for x in proc.stdout.split())
    scratch.unlink()
    return {"image": "1 TiB qcow2, 64 KiB clusters, 2048 L2 tables (one cluster each per 512 MiB)",
            "reads": 200_000, "l2_cache_limit_bytes": 32 << 20, "rss_before": before, "rss_after": after,
            "rss_growth_mib": (after - before) / (1 << 20)}


def markdown_tables(data: dict[str, Any]) -> str:
    out = ["| workload | tool | ops/s | MiB/s | vs qemu-img default | vs qemu-img io_uring |",
           "|---|---|---:|---:|---:|---:|"]
    for name, wdata in data["workloads"].items():
        for label, r in wdata["results"].items():
            bold = "**" if label.startswith("aioblock") else ""
            out.append(f"| {name} | {bold}{label}{bold} | {r['ops_per_s']:,.0f} | {r['mib_per_s']:,.0f} | "
                       f"{r['vs_qemu_default']:.2f} | {r['vs_qemu_io_uring']:.2f} |")
    mem = data.get("memory")
    if mem:
        out.append("")
        out.append(f"Memory ({mem['image']}, {mem['reads']:,} scattered 4 KiB reads): RSS grew by "
                   f"{mem['rss_growth_mib']:.1f} MiB (L2 cache limit {mem['l2_cache_limit_bytes'] >> 20} MiB).")
    return "\n".join(out)


def criterion(data: dict[str, Any]) -> list[str]:
    """The issue's targets: reads and allocating writes >= 1.0x qemu-img default, 1 MiB reads >= 0.9x."""
    lines = []
    for name, target in (("read-4k-seq", 1.0), ("read-4k-scatter", 1.0), ("write-4k-alloc", 1.0),
                         ("read-1m-seq", 0.9)):
        r = data["workloads"].get(name, {}).get("results", {}).get("aioblock (uring/uvloop)")
        if r is None:
            continue
        verdict = "PASS" if r["vs_qemu_default"] >= target else "FAIL"
        lines.append(f"{verdict}: {name}: {r['ops_per_s']:,.0f} ops/s = {r['vs_qemu_default']:.2f}x qemu-img default "
                     f"(target {target}x), {r['vs_qemu_io_uring']:.2f}x qemu-img io_uring")
    return lines


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default="/tmp/aioblock-bench", help="where the test images go")
    ap.add_argument("-r", "--repeat", type=int, default=5)
    ap.add_argument("--workloads", default=",".join(WORKLOADS), help="comma-separated subset of workloads")
    ap.add_argument("--no-memory", action="store_true", help="skip the 1 TiB memory workload")
    ap.add_argument("--out", help="JSON output (default: benchmarks/results/qcow2-<date>.json)")
    ap.add_argument("--update-readme", action="store_true", help="rewrite the table in benchmarks/README.md")
    args = ap.parse_args()

    d = Path(args.dir)
    d.mkdir(parents=True, exist_ok=True)
    full, scratch = d / "full-1g.qcow2", d / "scratch.qcow2"
    if not full.exists():
        make_full_image(full)
    data: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "images": {"read": "1 GiB qcow2 v3, 64 KiB clusters, fully allocated (qemu-img convert of random data)",
                   "write": "new empty 1 GiB qcow2 v3 per run, 64 KiB clusters"},
        "repeat": args.repeat,
        "statistic": "median of the repetitions; ops/s from each tool's 'Run completed' time",
        "workloads": {},
    }
    print(json.dumps(data["machine"]))
    for name in args.workloads.split(","):
        print(f"workload {name}", flush=True)
        data["workloads"][name] = run_workload(name, WORKLOADS[name], full, scratch, args.repeat)
    if not args.no_memory:
        print("workload memory", flush=True)
        data["memory"] = memory_workload(scratch)
    table = markdown_tables(data)
    data["criterion"] = criterion(data)
    out = Path(args.out) if args.out else HERE / "results" / f"qcow2-{datetime.date.today().isoformat()}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=2) + "\n")
    print(table)
    print("\n".join(data["criterion"]))
    if args.update_readme:
        update_readme_section(README_START, README_END, table)
    print(f"results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
