#!/usr/bin/env python3
"""Raw-image benchmark: ``aioblock bench`` side by side with ``qemu-img bench`` in the same run.

On one fully allocated, page-cache-hot 1 GiB raw file, for each workload and queue depth:

* ``qemu-img bench -f raw`` with its default aio (a thread pool), and with ``-i io_uring``;
* ``aioblock bench -f raw -i ENGINE`` for ENGINE in uring, threads, sync, under asyncio and uvloop.

Workloads (the same ``-c/-s/-S`` for every tool):

* ``4k-seq``: 4 KiB reads, step 4 KiB;
* ``4k-scatter``: 4 KiB reads, step 25013 * 4 KiB (an odd multiple of 4 KiB, ~98 MiB: consecutive requests
  land far apart and every 4 KiB block of the file is visited before any repeats; qemu-img bench only has a
  fixed step, so this is its closest thing to random reads);
* ``1m-seq``: 1 MiB reads, step 1 MiB;
* ``4k-scatter-cold`` (unless ``--no-cold``; needs root): the scattered 4 KiB reads again, after dropping the
  page cache before every run, so that every read goes to the device (depth 32 only).

Every measurement is repeated (``--repeat``, default 3) with the repetitions interleaved, and the median is
kept. Then the request path is profiled layer by layer (``profile_layers.py``) for the default engine.
Results go to ``benchmarks/results/raw-<date>.json``; ``--update-readme`` rewrites the results table in
``benchmarks/README.md``.

Usage: ``python benchmarks/run_raw.py [--repeat 3] [--file PATH] [--no-cold] [--update-readme]``
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
from pathlib import Path
from typing import Any

from _harness import drop_caches, machine_info, make_hot_file, parse_bench_output, run_cmd, update_readme_section
from profile_layers import profile

HERE = Path(__file__).resolve().parent
SIZE = 1 << 30
SCATTER_STEP = 25013 * 4096
WORKLOADS: dict[str, dict[str, int]] = {
    "4k-seq": {"bufsize": 4096, "step": 4096, "count": 100_000},
    "4k-scatter": {"bufsize": 4096, "step": SCATTER_STEP, "count": 100_000},
    "1m-seq": {"bufsize": 1 << 20, "step": 1 << 20, "count": 4_000},
}
COLD = {"bufsize": 4096, "step": SCATTER_STEP, "count": 20_000}
DEPTHS = (1, 32)
ENGINES = ("uring", "threads", "sync")
LOOPS = ("uvloop", "asyncio")
#: threads at depth 1 manage ~10k ops/s: fewer requests keep the run short (ops/s are compared, not times)
THREADS_COUNT_DIVISOR = 4
README_START, README_END = "<!-- raw-results:start -->", "<!-- raw-results:end -->"


def _configs(depths: tuple[int, ...]) -> list[tuple[str, dict[str, Any]]]:
    out: list[tuple[str, dict[str, Any]]] = [("qemu-img (aio=threads)", {"tool": "qemu-img", "aio": None}),
                                             ("qemu-img -i io_uring", {"tool": "qemu-img", "aio": "io_uring"})]
    for loop in LOOPS:
        for engine in ENGINES:
            out.append((f"aioblock {engine}/{loop}", {"tool": "aioblock", "engine": engine, "loop": loop}))
    return [(f"{name} d{d}", {**cfg, "depth": d}) for d in depths for name, cfg in out]


def _argv(cfg: dict[str, Any], wl: dict[str, int], path: str, count: int, cache: str) -> list[str]:
    common = ["-f", "raw", "-c", str(count), "-d", str(cfg["depth"]), "-s", str(wl["bufsize"]),
              "-S", str(wl["step"]), "-t", cache]
    if cfg["tool"] == "qemu-img":
        aio = ["-i", cfg["aio"]] if cfg["aio"] else []
        return ["qemu-img", "bench", *common, *aio, path]
    return [sys.executable, "-m", "aioblock", "--loop", cfg["loop"], "bench", *common, "-i", cfg["engine"], path]


def _count(cfg: dict[str, Any], wl: dict[str, int]) -> int:
    if cfg.get("engine") == "threads":
        return max(wl["count"] // THREADS_COUNT_DIVISOR, 1000)
    return wl["count"]




def run_workload(name: str, wl: dict[str, int], path: str, depths: tuple[int, ...], repeat: int,
                 cold: bool) -> dict[str, Any]:
    configs = _configs(depths)
    runs: dict[str, list[dict[str, Any]]] = {label: [] for label, _ in configs}
    for rep in range(repeat):
        if not cold:
            make_hot_file(path, SIZE)
        for label, cfg in configs:
            count = _count(cfg, wl)
            if cold:
                drop_caches()
            proc = run_cmd(_argv(cfg, wl, path, count, "writeback"))
            if proc.returncode != 0:
                raise RuntimeError(f"{label}: exit {proc.returncode}: {proc.stderr.strip()}")
            res = parse_bench_output(proc.stdout, count)
            res["count"] = count
            runs[label].append(res)
            print(f"  [{name} {rep + 1}/{repeat}] {label:<34} {res['ops_per_s']:>10.0f} ops/s", flush=True)
    results = {}
    for label, cfg in configs:
        ops = [r["ops_per_s"] for r in runs[label]]
        med = statistics.median(ops)
        median_run = min(runs[label], key=lambda r: abs(r["ops_per_s"] - med))
        results[label] = {**cfg, "ops_per_s": med, "mib_per_s": med * wl["bufsize"] / (1 << 20),
                          "runs_ops_per_s": ops, "latency_us": median_run.get("latency_us"),
                          "count": runs[label][0]["count"]}
    for d in depths:
        base = results[f"qemu-img (aio=threads) d{d}"]["ops_per_s"]
        uring = results[f"qemu-img -i io_uring d{d}"]["ops_per_s"]
        for r in results.values():
            if r["depth"] == d:
                r["vs_qemu_default"] = r["ops_per_s"] / base
                r["vs_qemu_io_uring"] = r["ops_per_s"] / uring
    return {"settings": {**wl, "depths": list(depths), "cold": cold}, "results": results}


def markdown_tables(data: dict[str, Any]) -> str:
    """One table per workload: ops/s, MiB/s, ratios, aioblock's latency percentiles."""
    out = []
    for name, wdata in data["workloads"].items():
        s = wdata["settings"]
        out.append(f"**{name}**: -s {s['bufsize']} -S {s['step']} -c {s['count']}"
                   + (" (page cache dropped before each run)" if s["cold"] else "") + "\n")
        out.append("| tool | depth | ops/s | MiB/s | vs qemu-img default | vs qemu-img io_uring | p50 / p99 us |")
        out.append("|---|---:|---:|---:|---:|---:|---:|")
        for label, r in wdata["results"].items():
            lat = r.get("latency_us") or {}
            lat_s = f"{lat['p50']:.1f} / {lat['p99']:.1f}" if lat else ""
            tool = label.rsplit(" d", 1)[0]
            bold = "**" if tool == "aioblock uring/uvloop" and r["depth"] == 32 else ""
            out.append(f"| {bold}{tool}{bold} | {r['depth']} | {r['ops_per_s']:,.0f} | {r['mib_per_s']:,.0f} | "
                       f"{r['vs_qemu_default']:.2f} | {r['vs_qemu_io_uring']:.2f} | {lat_s} |")
        out.append("")
    return "\n".join(out)


def criterion(data: dict[str, Any]) -> list[str]:
    """The acceptance check: aioblock bench (default engine and loop) vs qemu-img bench default, 4 KiB, d32."""
    lines = []
    for name in ("4k-seq", "4k-scatter"):
        res = data["workloads"].get(name, {}).get("results", {})
        r = res.get("aioblock uring/uvloop d32")
        if r is None:
            continue
        verdict = "PASS" if r["vs_qemu_default"] >= 1.0 else "FAIL"
        lines.append(f"{verdict}: {name} depth 32: aioblock {r['ops_per_s']:,.0f} ops/s = "
                     f"{r['vs_qemu_default']:.2f}x qemu-img default, {r['vs_qemu_io_uring']:.2f}x qemu-img io_uring")
    return lines


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--file", default="/tmp/aioblock-bench/raw-1g.raw", help="the 1 GiB test file")
    ap.add_argument("-r", "--repeat", type=int, default=3)
    ap.add_argument("--no-cold", action="store_true", help="skip the cold-cache workload")
    ap.add_argument("--no-profile", action="store_true", help="skip the per-layer profile")
    ap.add_argument("--workloads", default=",".join(WORKLOADS), help="comma-separated subset of workloads")
    ap.add_argument("--out", help="JSON output (default: benchmarks/results/raw-<date>.json)")
    ap.add_argument("--update-readme", action="store_true", help="rewrite the table in benchmarks/README.md")
    args = ap.parse_args()

    make_hot_file(args.file, SIZE)
    data: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "file": {"path": args.file, "size": SIZE, "format": "raw", "allocation": "full, random data",
                 "cache": "writeback (page cache), hot unless the workload says cold"},
        "repeat": args.repeat,
        "statistic": "median of the repetitions; ops/s from each tool's own timing (qemu-img: 'Run completed')",
        "workloads": {},
    }
    print(json.dumps(data["machine"]))
    for name in args.workloads.split(","):
        print(f"workload {name}", flush=True)
        data["workloads"][name] = run_workload(name, WORKLOADS[name], args.file, DEPTHS, args.repeat, cold=False)
    if not args.no_cold:
        if drop_caches():
            print("workload 4k-scatter-cold", flush=True)
            data["workloads"]["4k-scatter-cold"] = run_workload("4k-scatter-cold", COLD, args.file, (32,),
                                                                args.repeat, cold=True)
        else:
            print("cannot drop the page cache (not root?): cold workload skipped", flush=True)
        make_hot_file(args.file, SIZE)
    if not args.no_profile:
        data["profile"] = {}
        for loop in LOOPS:
            print(f"profile uring/{loop}", flush=True)
            data["profile"][f"uring/{loop}"] = profile(args.file, "uring", loop, 200_000, 32, 4096, 4096,
                                                       args.repeat)
    table = markdown_tables(data)
    data["criterion"] = criterion(data)
    out = Path(args.out) if args.out else HERE / "results" / f"raw-{datetime.date.today().isoformat()}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=2) + "\n")
    print(table)
    print("\n".join(data["criterion"]))
    if "profile" in data:
        for key, prof in data["profile"].items():
            print(f"profile {key}: " + ", ".join(f"{k} {v:.2f} us" for k, v in prof["layer_cost_us"].items()))
    if args.update_readme:
        update_readme_section(README_START, README_END, table)
    print(f"results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
