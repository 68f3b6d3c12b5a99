"""Running a suite: images, request counts, alternating repetitions, records, results.json and plots.

Order of work (``run_suite``):

1. make the shared images (``images.py``) of every read/overwrite cell;
2. for each repetition, for each cell in suite order, run every target of the cell once, on the same file,
   the targets' order rotated by one per repetition (so that no target always runs first or right after an
   overwrite): measurements of one target are spread over the whole run, and drift on a shared host shows up
   as spread instead of as a difference between targets. An allocating run gets a fresh image of its own;
3. in duration mode, the first time a target meets a cell it first runs a short calibration (not recorded;
   repeated with 8x the requests while it lasts under ``MIN_CALIBRATION_S``, since qemu-img and fio time
   in milliseconds), and gets ``ceil(ops/s * duration)`` requests for every repetition (clamped to ``4 * depth`` ..
   ``max_requests``, and for allocating writes to the number of steps the fresh image has);
4. after every repetition, results.json is rewritten (``"complete": false`` until the end), so an
   interrupted run keeps what it measured; at the end the records get their ratios and the PNGs are drawn.

A failed run is recorded in its record's ``failures`` (the others go on); ``run_suite`` returns the
number of failures.
"""

from __future__ import annotations

import datetime
import json
import math
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

from ..errors import AioblockError
from .images import ImageStore
from .machine import machine_info
from .results import SCHEMA, add_ratios, build_record
from .suite import Cell, Suite
from .targets import Measurement, RunFailed, Target, make_target

__all__ = ["calibration_count", "estimate_seconds", "run_suite", "runs_per_repetition"]

#: rough child start-up cost (seconds) per tool, for ``estimate_seconds`` (measured on a 2-vCPU VM)
_STARTUP = {"aioblock": 0.40, "qemu-img": 0.03, "fio": 0.30}
#: the harness's own work per child run (GNU time, fork, reading the output, cleaning up)
_PER_RUN = 0.05
#: a calibration run shorter than this is repeated with more requests (the tools time with 1 ms resolution)
MIN_CALIBRATION_S = 0.02


def _tool(target: str) -> str:
    return "aioblock" if target.startswith("aioblock-") else "fio" if target.startswith("fio-") else "qemu-img"


def calibration_count(cell: Cell, suite: Suite) -> int:
    """Requests of the calibration run: about 32 MiB worth, 64 .. 4096, at least two per worker."""
    n = suite.calibration_requests or min(4096, max(64, (32 << 20) // cell.block_size))
    n = max(n, 2 * cell.depth)
    cap = cell.max_requests
    return min(n, cap) if cap is not None else n


def requests_for(cell: Cell, suite: Suite, ops_per_s: float) -> int:
    """The request count that makes a run of ``cell`` at ``ops_per_s`` last about its duration."""
    assert cell.duration is not None
    n = max(4 * cell.depth, math.ceil(ops_per_s * cell.duration))
    n = min(n, suite.max_requests)
    cap = cell.max_requests
    return min(n, cap) if cap is not None else n


def runs_per_repetition(suite: Suite) -> int:
    return sum(len(c.targets) for c in suite.cells)


def _guess_rate(cell: Cell) -> float:
    """A deliberately rough ops/s guess for the estimate: 10 us per request plus copying at 2 GiB/s."""
    return 1 / (10e-6 + cell.block_size / (2 << 30))


def estimate_seconds(suite: Suite) -> float:
    """A rough estimate of ``run_suite``'s wall time (images, calibrations, runs, start-up of every child)."""
    total = 0.0
    images = {c.image() for c in suite.cells if c.kind != "alloc"}
    for spec in images:
        if spec.fill == "sparse" and spec.allocate_every:    # one small write per allocated cluster
            total += 1 + spec.size // spec.allocate_every * 0.002
        else:                                                 # write, (convert,) read once
            total += spec.size / (1 << 30) * (5.0 if spec.format != "raw" else 2.5)
    for c in suite.cells:
        for t in c.targets:
            # a fresh image per allocating run; deleting the last one (dirty pages) is slow on a real disk
            start = _PER_RUN + _STARTUP[_tool(t)] + (0.02 + (0.2 if c.location == "disk" else 0.0) if c.kind == "alloc"
                                          else 0.0)
            if c.duration is not None:
                calib = calibration_count(c, suite) / _guess_rate(c)
                total += start + calib + suite.repetitions * (start + c.duration)
            else:
                assert c.requests is not None
                total += suite.repetitions * (start + c.requests / _guess_rate(c))
    families = {(c.family) for c in suite.cells}
    return total + 1.5 * len(families) + 3           # plots (two per family and a CDF), matplotlib import


def _iso(t: float) -> str:
    return datetime.datetime.fromtimestamp(t, datetime.UTC).isoformat(timespec="seconds")


def run_suite(suite: Suite, out_dir: Path, *, progress: bool = True, keep_images: bool = False,
              plots: bool = True, log: TextIO | None = None) -> tuple[dict[str, Any], int]:
    """Run ``suite``, writing ``out_dir/results.json`` (and PNGs); returns (the results document, failed runs).
    """
    from tqdm import tqdm

    log = log or sys.stderr
    out_dir.mkdir(parents=True, exist_ok=True)
    store = ImageStore(suite)
    locations = sorted({c.location for c in suite.cells})
    scratch = Path(tempfile.mkdtemp(prefix="aioblock-benchmark-"))
    targets: dict[str, Target] = {t: make_target(t) for t in suite.targets}
    started = time.time()
    doc: dict[str, Any] = {
        "schema": SCHEMA, "machine": machine_info({loc: str(store.directory(loc)) for loc in locations}),
        "suite": suite.to_json(), "cdf": dict(suite.cdf), "started": _iso(started), "complete": False,
        "records": [],
    }
    measured: dict[tuple[Any, ...], list[Measurement]] = {}
    failures: dict[tuple[Any, ...], list[str]] = {}
    counts: dict[tuple[Any, ...], int | None] = {}      # None: calibration failed, skip the target
    calibrations = sum(len(c.targets) for c in suite.cells if c.duration is not None)
    bar = tqdm(total=runs_per_repetition(suite) * suite.repetitions + calibrations, file=log, unit="run",
               disable=not progress, dynamic_ncols=True, mininterval=0.5)
    failed = 0

    def say(message: str) -> None:
        if progress:
            bar.write(message, file=log)

    def timeout(cell: Cell) -> float:
        return 600.0 if cell.duration is None else max(120.0, 40 * cell.duration)

    def image_for(cell: Cell) -> str:
        return store.fresh(cell.image()) if cell.kind == "alloc" else store.shared(cell.image())

    def attempt(cell: Cell, target: Target, requests: int) -> Measurement:
        try:
            return target.run(cell, image_for(cell), requests, scratch / "run", timeout=timeout(cell))
        finally:
            shutil.rmtree(scratch / "run", ignore_errors=True)

    def count_for(cell: Cell, target: Target) -> int | None:
        key = (target.name, *cell.key)
        if key not in counts:
            if cell.requests is not None:
                counts[key] = cell.requests
            else:
                bar.set_postfix_str(f"calibrating {cell.label} {target.name}", refresh=False)
                try:
                    n = calibration_count(cell, suite)
                    for _ in range(4):      # too short to time (1 ms clocks): again with 8x the requests
                        m = attempt(cell, target, n)
                        bigger = min(8 * n, suite.max_requests, cell.max_requests or suite.max_requests)
                        if m.elapsed_s >= MIN_CALIBRATION_S or bigger == n:
                            break
                        n = bigger
                    counts[key] = requests_for(cell, suite, m.ops_per_s)
                except (RunFailed, AioblockError) as exc:
                    counts[key] = None
                    failures.setdefault(key, []).append(f"calibration: {exc}")
                    say(f"aioblock benchmark: {cell.label}: {exc}")
                bar.update(1)
        return counts[key]

    def save(complete: bool) -> None:
        recs = [build_record(c, t, measured.get((t, *c.key), []), failures.get((t, *c.key), []))
                for c in suite.cells for t in c.targets]
        add_ratios(recs)
        doc["records"] = [r.to_json() for r in recs]
        doc["complete"] = complete
        finished = time.time()
        doc["finished"], doc["elapsed_s"] = _iso(finished), round(finished - started, 1)
        tmp = out_dir / "results.json.tmp"
        tmp.write_text(json.dumps(doc, indent=1))
        tmp.replace(out_dir / "results.json")

    try:
        say(f"aioblock benchmark: suite {suite.name}{' (quick)' if suite.quick else ''}: {len(suite.cells)} "
            f"cells, {suite.repetitions} repetitions; preparing images")
        for cell in suite.cells:
            if cell.kind != "alloc":
                store.shared(cell.image())
        for rep in range(suite.repetitions):
            for cell in suite.cells:
                names = list(cell.targets)
                shift = rep % len(names)
                for name in names[shift:] + names[:shift]:
                    target = targets[name]
                    n = count_for(cell, target)
                    key = (name, *cell.key)
                    if n is None:
                        bar.update(1)
                        continue
                    bar.set_postfix_str(f"rep {rep + 1}/{suite.repetitions} {cell.label} {name}", refresh=False)
                    try:
                        measured.setdefault(key, []).append(attempt(cell, target, n))
                    except (RunFailed, AioblockError) as exc:
                        failed += 1
                        failures.setdefault(key, []).append(f"repetition {rep + 1}: {exc}")
                        say(f"aioblock benchmark: {cell.label}: {exc}")
                    bar.update(1)
            save(complete=False)
        save(complete=True)
    finally:
        bar.close()
        shutil.rmtree(scratch, ignore_errors=True)
        if not keep_images:
            store.cleanup()
    if plots:
        from .plots import write_plots
        doc["plots"] = [p.name for p in write_plots(doc, out_dir)]
        (out_dir / "results.json").write_text(json.dumps(doc, indent=1))
    failed += sum(1 for v in counts.values() if v is None)
    return doc, failed


def describe_plan(suite: Suite, write: Callable[[str], object]) -> None:
    """The cells (one line each), the number of runs and the estimated wall time, for ``--dry-run``."""
    for c in suite.cells:
        length = f"{c.requests} requests" if c.requests is not None else f"{c.duration:g} s"
        write(f"{c.label:<58} {length:>14}  {' '.join(c.targets)}")
    runs = runs_per_repetition(suite) * suite.repetitions
    calib = sum(len(c.targets) for c in suite.cells if c.duration is not None)
    est = estimate_seconds(suite)
    write(f"suite {suite.name}{' (quick)' if suite.quick else ''}: {len(suite.cells)} cells, "
          f"{suite.repetitions} repetitions, {runs} runs + {calib} calibration runs; "
          f"estimated {est / 60:.1f} minutes")
