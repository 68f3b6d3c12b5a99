"""``aioblock benchmark``: run a benchmark suite, print its tables, compare two runs.

* ``run [--suite FILE] [--quick] [--out DIR] [--dry-run] [--keep-images] [--no-progress]``: runs the suite
  (default ``benchmarks/suites/default.toml``) into DIR (default ``benchmark-results/<UTC timestamp>``):
  ``results.json`` and PNG plots; a progress bar on stderr. ``--dry-run`` lists the cells, the number of
  runs and an estimate of the wall time, and runs nothing. Exit 0, or 1 if any run failed (recorded).
* ``report DIR [--plots]``: the markdown tables of DIR/results.json (``--plots``: redraw the PNGs too).
* ``compare A B [--min-drop F]``: B against A, record by record; exit 1 if a regression beyond the spread
  of the two runs is flagged (rule: ``aioblock/benchmark/results.py``), else 0; 2 on an error (a missing or
  unreadable results file, no record in common).

The work is in ``aioblock/benchmark/``; this module only parses the command line.
"""

from __future__ import annotations

import argparse
import datetime
import sys
from pathlib import Path
from typing import Any

from ..errors import AioblockError, InvalidOptionError

__all__ = ["add_parser", "default_suite"]


def default_suite() -> Path:
    """``benchmarks/suites/default.toml`` of the source tree this package belongs to, else of the current
    directory."""
    here = Path(__file__).resolve().parents[2] / "benchmarks" / "suites" / "default.toml"
    return here if here.exists() else Path("benchmarks/suites/default.toml")


def add_parser(sub: Any) -> None:
    p = sub.add_parser("benchmark", help="run benchmark suites against qemu-img and fio, report, compare",
                       description="Concurrency benchmarking harness: aioblock's engines and loops next to "
                                   "qemu-img bench and fio, on the same files, alternating repetitions.")
    cmds = p.add_subparsers(dest="benchmark_command", metavar="ACTION", required=True)

    r = cmds.add_parser("run", help="run a suite into a directory (results.json, PNG plots)")
    r.add_argument("--suite", default=None, metavar="FILE",
                   help="suite file (TOML; default benchmarks/suites/default.toml)")
    r.add_argument("--quick", action="store_true", help="run the suite's [quick] subset")
    r.add_argument("--out", default=None, metavar="DIR",
                   help="output directory (default benchmark-results/<timestamp>)")
    r.add_argument("--dry-run", dest="dry_run", action="store_true",
                   help="list the cells, the number of runs and the estimated time; run nothing")
    r.add_argument("--keep-images", dest="keep_images", action="store_true",
                   help="do not delete the test images at the end")
    r.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    r.set_defaults(run=run_cmd)

    rep = cmds.add_parser("report", help="print the markdown tables of a recorded run")
    rep.add_argument("directory", metavar="DIR", help="a run's directory (or its results.json)")
    rep.add_argument("--plots", action="store_true", help="redraw the PNG plots into DIR too")
    rep.set_defaults(run=report_cmd)

    c = cmds.add_parser("compare", help="ratios of run B against run A; exit 1 on a regression")
    c.add_argument("a", metavar="A", help="the reference run's directory")
    c.add_argument("b", metavar="B", help="the run compared with it")
    c.add_argument("--min-drop", dest="min_drop", type=float, default=0.0, metavar="F",
                   help="also ignore drops smaller than this fraction (default 0: the spreads decide alone)")
    c.set_defaults(run=compare_cmd)


async def run_cmd(args: argparse.Namespace) -> int:
    from ..benchmark.runner import describe_plan, run_suite
    from ..benchmark.suite import load_suite

    suite = load_suite(args.suite or default_suite(), quick=args.quick)
    if args.dry_run:
        describe_plan(suite, print)
        return 0
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%d-%H%M%S")
    out = Path(args.out or f"benchmark-results/{stamp}")
    if (out / "results.json").exists():
        raise InvalidOptionError(f"{out}/results.json exists already (choose another --out)")
    doc, failed = run_suite(suite, out, progress=args.progress, keep_images=args.keep_images)
    print(f"aioblock benchmark: {len(doc['records'])} records in {doc['elapsed_s']} s -> {out}/results.json "
          f"({len(doc.get('plots', []))} plots)", file=sys.stderr)
    if failed:
        print(f"aioblock benchmark: {failed} runs failed (see 'failures' in results.json)", file=sys.stderr)
        return 1
    return 0


async def report_cmd(args: argparse.Namespace) -> int:
    from ..benchmark.report import report
    from ..benchmark.results import load_results

    doc = load_results(args.directory)
    sys.stdout.write(report(doc))
    if args.plots:
        from ..benchmark.plots import write_plots
        d = Path(args.directory)
        for path in write_plots(doc, d if d.is_dir() else d.parent):
            print(f"wrote {path}", file=sys.stderr)
    return 0


async def compare_cmd(args: argparse.Namespace) -> int:
    from ..benchmark.report import compare_table
    from ..benchmark.results import compare, load_results, records_of

    try:
        if not 0 <= args.min_drop < 1:
            raise InvalidOptionError("--min-drop must be a fraction between 0 and 1")
        a, b = load_results(args.a), load_results(args.b)
        comp = compare(records_of(a), records_of(b), min_drop=args.min_drop)
        if not comp.rows:
            raise InvalidOptionError("the two runs have no record in common")
    except AioblockError as exc:
        exc.exit_status = 2             # as qemu-img compare: 1 is the answer "regression", 2 an error
        raise
    sys.stdout.write(compare_table(comp, args.a, args.b))
    return 1 if comp.regressions else 0
