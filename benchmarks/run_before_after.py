#!/usr/bin/env python3
"""Before/after of a core change on qcow2: ``qemu-img bench``, the old aioblock and the current one, alternating.

Workloads (4 KiB requests, depth 32, page cache hot, default options everywhere):

* ``read``: reads of a fully allocated 1 GiB qcow2 image (64 KiB clusters; random data), step 4 KiB;
* ``overwrite``: writes over the same image's allocated clusters, step 4 KiB (qemu-img bench's default);
* ``alloc-4k``: allocating writes into a new empty 1 GiB image, step 4 KiB (qemu-img bench's default: 16
  requests per new cluster, most of them waiting for the cluster's allocation);
* ``alloc-64k``: allocating writes with a 64 KiB step (every request allocates a cluster).

Each repetition runs qemu-img, then the old tree, then the current one, on the same file; a new image is made
before every allocating run. ``--before DIR`` is a directory holding an ``aioblock`` package, e.g. exported with
``git archive <rev> aioblock | tar -x -C DIR``. Results (every run, medians, ratios) go to ``--out``.

Usage: ``python benchmarks/run_before_after.py --before /tmp/before [-r 4] [--out results/x.json]``
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

from _harness import machine_info, parse_bench_output, run_cmd

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
WORKLOADS: dict[str, dict[str, Any]] = {
    "read": {"step": 4096, "count": 200_000, "write": False, "image": "full"},
    "overwrite": {"step": 4096, "count": 100_000, "write": True, "image": "full"},
    "alloc-4k": {"step": 4096, "count": 65_536, "write": True, "image": "new"},
    "alloc-64k": {"step": 65536, "count": 16_384, "write": True, "image": "new"},
}


def make_full_image(path: Path) -> None:
    raw = path.with_suffix(".raw")
    with open(raw, "wb") as f:
        for _ in range(1024):
            f.write(os.urandom(1 << 20))
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(path)], check=True)
    raw.unlink()


def tools(before: Path) -> dict[str, tuple[list[str], dict[str, str]]]:
    env = dict(os.environ)
    return {
        "qemu-img (aio=threads)": (["qemu-img", "bench"], env),
        "aioblock before": ([sys.executable, "-m", "aioblock", "bench"], {**env, "PYTHONPATH": str(before)}),
        "aioblock after": ([sys.executable, "-m", "aioblock", "bench"], {**env, "PYTHONPATH": str(REPO)}),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--before", required=True, type=Path, help="directory holding the old aioblock package")
    ap.add_argument("--dir", default="/tmp/aioblock-bench", type=Path)
    ap.add_argument("-r", "--repeat", type=int, default=4)
    ap.add_argument("--workloads", default=",".join(WORKLOADS))
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    args.dir.mkdir(parents=True, exist_ok=True)
    full, scratch = args.dir / "full-1g.qcow2", args.dir / "scratch.qcow2"
    if not full.exists():
        make_full_image(full)
    table = tools(args.before.resolve())
    data: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": machine_info(), "before": str(args.before), "repeat": args.repeat,
        "settings": "qcow2 64 KiB clusters, -d 32 -s 4096, page cache hot, each tool's defaults",
        "workloads": {},
    }
    for name in args.workloads.split(","):
        wl = WORKLOADS[name]
        runs: dict[str, list[float]] = {label: [] for label in table}
        for rep in range(args.repeat):
            for label, (argv0, env) in table.items():
                path = full
                if wl["image"] == "new":
                    scratch.unlink(missing_ok=True)
                    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(scratch), "1G"], check=True)
                    path = scratch
                argv = [*argv0, "-f", "qcow2", "-c", str(wl["count"]), "-d", "32", "-s", "4096",
                        "-S", str(wl["step"]), *(["-w"] if wl["write"] else []), str(path)]
                proc = subprocess.run(argv, capture_output=True, text=True, env=env, cwd="/", timeout=900)
                if proc.returncode != 0:
                    raise RuntimeError(f"{label}: {proc.stderr.strip()}")
                if wl["write"]:
                    check = run_cmd(["qemu-img", "check", str(path)])
                    if check.returncode != 0:
                        raise RuntimeError(f"{label}: qemu-img check: {check.stdout}")
                ops = parse_bench_output(proc.stdout, wl["count"])["ops_per_s"]
                runs[label].append(ops)
                print(f"  [{name} {rep + 1}/{args.repeat}] {label:<24} {ops:>10.0f} ops/s", flush=True)
        med = {label: statistics.median(v) for label, v in runs.items()}
        q, b, a = med["qemu-img (aio=threads)"], med["aioblock before"], med["aioblock after"]
        data["workloads"][name] = {"step": wl["step"], "count": wl["count"], "runs_ops_per_s": runs,
                                   "median_ops_per_s": med, "before_vs_qemu": b / q, "after_vs_qemu": a / q,
                                   "after_vs_before": a / b}
    lines = ["| workload | qemu-img | before | after | before/qemu | after/qemu | after/before |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for name, w in data["workloads"].items():
        m = w["median_ops_per_s"]
        lines.append(f"| {name} | {m['qemu-img (aio=threads)']:,.0f} | {m['aioblock before']:,.0f} | "
                     f"{m['aioblock after']:,.0f} | {w['before_vs_qemu']:.2f} | {w['after_vs_qemu']:.2f} | "
                     f"{w['after_vs_before']:.2f} |")
    data["table"] = lines
    out = args.out or HERE / "results" / f"before-after-{datetime.date.today().isoformat()}.json"
    out.write_text(json.dumps(data, indent=2) + "\n")
    print("\n".join(lines))
    print(f"results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
