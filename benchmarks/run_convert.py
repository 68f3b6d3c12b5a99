#!/usr/bin/env python3
"""``aioblock convert`` next to ``qemu-img convert``: raw->qcow2, qcow2->raw, qcow2->qcow2 and ``-c``.

The source is a 1 GiB image half allocated (every other 1 MiB holds random data, the rest is a hole; the
qcow2 source is ``qemu-img convert`` of the raw one), page-cache hot. Each repetition runs qemu-img, then
aioblock, with the same arguments (default options on both sides) into a new file (which of the two goes
first alternates), after a ``sync``, following one warm-up round that is not kept; the outputs must compare
identical (``qemu-img compare``). Wall-clock seconds per run, medians, and qemu-img's time / ours (above 1:
aioblock faster). Results (every run) go to ``--out``.

Usage: ``python benchmarks/run_convert.py [-r 3] [--dir /var/tmp/aioblock-convert] [--out results/x.json]``
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from _harness import machine_info

CASES: dict[str, tuple[str, str, list[str]]] = {     # name: (source format, output format, extra options)
    "raw->qcow2": ("raw", "qcow2", []),
    "qcow2->raw": ("qcow2", "raw", []),
    "qcow2->qcow2": ("qcow2", "qcow2", []),
    "qcow2->qcow2 -c": ("qcow2", "qcow2", ["-c"]),
}


def fs_type(d: Path) -> str:
    out = subprocess.run(["stat", "-f", "-c", "%T", str(d)], capture_output=True, text=True, check=False)
    return out.stdout.strip() or "unknown"


def make_sources(d: Path) -> dict[str, Path]:
    raw, qcow2 = d / "src.raw", d / "src.qcow2"
    if not raw.exists():
        with open(raw, "wb") as f:
            f.truncate(1 << 30)
            for i in range(0, 1024, 2):
                f.seek(i << 20)
                f.write(os.urandom(1 << 20))
    if not qcow2.exists():
        subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(qcow2)], check=True)
    for p in (raw, qcow2):
        with open(p, "rb") as f:
            while f.read(8 << 20):
                pass
    return {"raw": raw, "qcow2": qcow2}


def timed(argv: list[str]) -> float:
    """Seconds ``argv`` takes, after a sync (the previous run's dirty pages are not this run's to write back).
    Python may write bytecode (PYTHONDONTWRITEBYTECODE unset): the startup a user's installation has."""
    os.sync()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    t0 = time.perf_counter()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, env=env)
    return time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-r", "--repeat", type=int, default=3)
    ap.add_argument("--dir", default="/var/tmp/aioblock-convert")
    ap.add_argument("--out")
    args = ap.parse_args()
    d = Path(args.dir)
    d.mkdir(parents=True, exist_ok=True)
    src = make_sources(d)
    tools = {"qemu-img": ["qemu-img", "convert"], "aioblock": [sys.executable, "-m", "aioblock", "convert"]}
    runs: dict[str, dict[str, list[float]]] = {c: {t: [] for t in tools} for c in CASES}
    for rep in range(-1, args.repeat):            # repetition -1 warms up (caches, bytecode) and is not kept
        for case, (ifmt, ofmt, extra) in CASES.items():
            outs = {}
            order = list(tools.items()) if rep % 2 == 0 else list(tools.items())[::-1]
            for tool, argv in order:
                out = d / f"out-{tool}.{ofmt}"
                out.unlink(missing_ok=True)
                secs = timed([*argv, "-f", ifmt, "-O", ofmt, *extra, str(src[ifmt]), str(out)])
                if rep >= 0:
                    runs[case][tool].append(secs)
                outs[tool] = out
            if rep < 0:
                continue
            cmp = subprocess.run(["qemu-img", "compare", "-f", ofmt, "-F", ofmt, str(outs["qemu-img"]),
                                  str(outs["aioblock"])], capture_output=True, text=True, check=False)
            if cmp.returncode != 0:
                raise RuntimeError(f"{case}: outputs differ: {cmp.stdout}{cmp.stderr}")
            print(f"rep {rep + 1} {case:<16} " + "  ".join(f"{t} {runs[case][t][-1]:.2f} s" for t in tools),
                  flush=True)
    table = ["| conversion | qemu-img s | aioblock s | qemu-img / aioblock |", "|---|---:|---:|---:|"]
    result: dict[str, Any] = {"date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                              "machine": machine_info(), "repeat": args.repeat,
                              "settings": "1 GiB source, every other MiB allocated, page cache hot, defaults; "
                                          f"directory {d} ({fs_type(d)}); sync before each run; one warm-up",
                              "cases": {}}
    for case, per in runs.items():
        med = {t: statistics.median(v) for t, v in per.items()}
        ratio = med["qemu-img"] / med["aioblock"]
        result["cases"][case] = {"runs_s": per, "median_s": med, "ratio": ratio}
        table.append(f"| `{case}` | {med['qemu-img']:.2f} | {med['aioblock']:.2f} | {ratio:.2f} |")
    result["table"] = table
    print("\n".join(table))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
