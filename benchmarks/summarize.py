#!/usr/bin/env python3
"""The summary table of a recorded ``aioblock benchmark run``: one row per cell with aioblock's default
configuration, its ops/s and its ratios against the peers, cells below 1.0x qemu-img bench's default first
marked. ``--update-readme`` puts it into benchmarks/README.md (between the ``default-suite`` markers).

Usage: ``python benchmarks/summarize.py benchmarks/results/default-<date> [--update-readme]``
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from _harness import update_readme_section

TARGET = "aioblock-default-uvloop"


def _size(n: int) -> str:
    return f"{n >> 20}M" if n >= 1 << 20 else f"{n >> 10}K"


def _ratio(r: dict[str, Any], peer: str) -> str:
    v = (r.get("ratios") or {}).get(peer)
    return f"{v:.2f}" if v is not None else ""


def table(results: dict[str, Any]) -> str:
    rows = [r for r in results["records"] if r["target"] == TARGET]
    short = sum(1 for r in rows if (r.get("ratio_vs_peer") or 0) < 1.0)
    m = results["machine"]
    head = (f"{results.get('started', '')[:10]}, {m.get('cores')} cores, kernel {m.get('kernel')}, "
            f"{results['suite']['name']} suite, {results['suite'].get('repetitions')} repetitions alternating "
            f"with the peers; {len(rows)} cells, {short} below 1.0x qemu-img bench's default (**bold**).")
    out = [head, "",
           "| workload | format | cache | location | bs | depth | ops/s | vs qemu-img | vs qemu-img io_uring | "
           "vs fio io_uring |", "|---|---|---|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        ratio = r.get("ratio_vs_peer")
        mark = f"**{ratio:.2f}**" if ratio is not None and ratio < 1.0 else (f"{ratio:.2f}" if ratio else "")
        out.append(f"| {r['workload']} | {r['format']} | {r['cache']} | {r['location']} | {_size(r['block_size'])} "
                   f"| {r['depth']} | {r['median_ops_per_s']:,.0f} | {mark} | {_ratio(r, 'qemu-img-io_uring')} | "
                   f"{_ratio(r, 'fio-io_uring')} |")
    return "\n".join(out) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", help="a run's directory (or its results.json)")
    ap.add_argument("--update-readme", action="store_true")
    args = ap.parse_args()
    path = Path(args.run)
    results = json.loads((path / "results.json" if path.is_dir() else path).read_text())
    text = table(results)
    print(text)
    if args.update_readme:
        update_readme_section("<!-- default-suite:start -->\n", "<!-- default-suite:end -->", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
