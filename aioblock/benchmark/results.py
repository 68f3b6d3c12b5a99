"""Result records: one per (cell, target), built from its repetitions; ratios against the peers; reading
``results.json`` back; comparing two runs.

A record keeps every repetition's ops/s and reports their median and spread (min, max). Latency percentiles
come from the merged HDR histogram of all repetitions where the tool gives per-request latencies (aioblock),
from the median of each percentile over the repetitions for fio (which reports percentiles only), and are
None for qemu-img (which reports none). ``ratio_vs_peer`` is the record's median over the median of
``qemu-img-threads`` (qemu-img bench's default aio) in the same cell; ``ratios`` holds it and the ratios
against ``qemu-img-io_uring`` and ``fio-io_uring`` where those ran (a target's ratio to itself is left out).

``compare`` matches the records of two runs (A, then B) by target and cell (workload, format, block size,
depth, cache, location) and flags a **regression** when B's median is below A's by more than both
spreads together allow::

    A.median - B.median > (A.max - A.min) + (B.max - B.min)   and   B.median < A.median * (1 - min_drop)

(symmetrically an improvement). With the spreads of both runs taken as the noise, a drop inside them is
never flagged; ``min_drop`` (default 0) additionally ignores drops smaller than that fraction. Each row also
carries both runs' ``ratio_vs_peer``: when the peers moved as much as aioblock did, the host changed, not
aioblock.
"""

from __future__ import annotations

import dataclasses
import json
import statistics as stats
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import InvalidOptionError
from .latency import LatencyHistogram
from .suite import Cell
from .targets import Measurement

__all__ = [
    "PRIMARY_PEER", "REFERENCE_PEERS", "SCHEMA", "CompareRow", "Comparison", "Record", "add_ratios",
    "build_record", "compare", "load_results", "median", "records_of", "spread",
]

SCHEMA = "aioblock-benchmark/1"
PRIMARY_PEER = "qemu-img-threads"
REFERENCE_PEERS = ("qemu-img-threads", "qemu-img-io_uring", "fio-io_uring")


def median(values: Sequence[float]) -> float:
    """The median (the mean of the two middle values for an even count); ValueError if empty."""
    if not values:
        raise ValueError("median of no values")
    return float(stats.median(values))


def spread(values: Sequence[float]) -> tuple[float, float]:
    """(min, max) of the repetitions; ValueError if empty."""
    if not values:
        raise ValueError("spread of no values")
    return float(min(values)), float(max(values))


@dataclass
class Record:
    """What one target measured in one cell over all repetitions (the JSON keys of results.json).

    Invariants: ``ops_per_s`` has one entry per successful repetition, in run order, and ``median_ops_per_s``,
    ``spread`` are of those; they are None only when every repetition failed (``failures`` says why)."""

    target: str
    workload: str
    family: str
    format: str
    kind: str
    pattern: str
    depth: int
    block_size: int
    step: int
    cache: str
    location: str
    size: int
    options: dict[str, str] = field(default_factory=dict)
    requests: list[int] = field(default_factory=list)
    ops_per_s: list[float] = field(default_factory=list)
    median_ops_per_s: float | None = None
    mib_per_s: float | None = None
    spread: dict[str, float] | None = None
    latency_us: dict[str, float] | None = None
    latency_source: str | None = None
    cpu_s: list[float] = field(default_factory=list)
    cpu_us_per_op: float | None = None
    max_rss_kib: int | None = None
    ratio_vs_peer: float | None = None
    ratios: dict[str, float] = field(default_factory=dict)
    statistics: dict[str, Any] | None = None
    histogram: str | None = None
    repetitions: list[dict[str, Any]] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    @property
    def cell_key(self) -> tuple[str, str, int, int, str, str]:
        return (self.workload, self.format, self.block_size, self.depth, self.cache, self.location)

    @property
    def key(self) -> tuple[str, str, str, int, int, str, str]:
        return (self.target, *self.cell_key)

    @property
    def is_aioblock(self) -> bool:
        return self.target.startswith("aioblock-")

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Record:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


def build_record(cell: Cell, target: str, runs: Sequence[Measurement], failures: Sequence[str] = ()) -> Record:
    """The record of ``target`` in ``cell`` from its successful runs (in order) and its failures."""
    rec = Record(target=target, workload=cell.workload, family=cell.family, format=cell.format, kind=cell.kind,
                 pattern=cell.pattern, depth=cell.depth, block_size=cell.block_size, step=cell.step,
                 cache=cell.cache, location=cell.location, size=cell.size, options=dict(cell.options),
                 failures=list(failures))
    if not runs:
        return rec
    ops = [m.ops_per_s for m in runs]
    rec.requests = [m.requests for m in runs]
    rec.ops_per_s = ops
    rec.median_ops_per_s = median(ops)
    rec.mib_per_s = median([m.mib_per_s for m in runs])
    lo, hi = spread(ops)
    rec.spread = {"min": lo, "max": hi}
    rec.cpu_s = [m.cpu_s for m in runs]
    rec.cpu_us_per_op = median([m.cpu_s / m.requests * 1e6 for m in runs if m.requests])
    rss = [m.max_rss_kib for m in runs if m.max_rss_kib is not None]
    rec.max_rss_kib = max(rss) if rss else None
    rec.repetitions = [m.to_json() for m in runs]
    hists = [m.histogram for m in runs if m.histogram]
    if hists:
        merged = LatencyHistogram.merge(hists)
        rec.latency_us = merged.percentiles_us()
        rec.latency_source = "hdr"
        rec.histogram = merged.encode()
    elif any(m.latency_us for m in runs):
        per_key: dict[str, list[float]] = {}
        for m in runs:
            for k, v in (m.latency_us or {}).items():
                per_key.setdefault(k, []).append(v)
        rec.latency_us = {k: median(v) for k, v in per_key.items()}
        rec.latency_source = "median of repetitions"
    # the counters of the median repetition (the lower middle one for an even count)
    order = sorted(range(len(runs)), key=lambda i: ops[i])
    rec.statistics = runs[order[(len(order) - 1) // 2]].statistics
    return rec


def add_ratios(records: Iterable[Record]) -> None:
    """Fill ``ratios`` and ``ratio_vs_peer`` of every record from the peers' medians in the same cell."""
    recs = list(records)
    by_cell: dict[tuple[Any, ...], dict[str, Record]] = {}
    for r in recs:
        by_cell.setdefault(r.cell_key, {})[r.target] = r
    for r in recs:
        r.ratios = {}
        r.ratio_vs_peer = None
        if r.median_ops_per_s is None:
            continue
        for peer in REFERENCE_PEERS:
            p = by_cell[r.cell_key].get(peer)
            if peer != r.target and p is not None and p.median_ops_per_s:
                r.ratios[peer] = r.median_ops_per_s / p.median_ops_per_s
        r.ratio_vs_peer = r.ratios.get(PRIMARY_PEER)


# ---- reading results back ---------------------------------------------------------------------------------

def load_results(directory: str | Path) -> dict[str, Any]:
    """The results document in ``directory`` (or a results.json path itself); InvalidOptionError if it is
    missing or not a results file."""
    path = Path(directory)
    if path.is_dir():
        path = path / "results.json"
    try:
        doc = json.loads(path.read_text())
    except OSError as exc:
        raise InvalidOptionError(f"cannot read results: {exc.strerror or exc}", filename=str(path)) from None
    except ValueError as exc:
        raise InvalidOptionError(f"not a JSON file: {exc}", filename=str(path)) from None
    if not isinstance(doc, dict) or doc.get("schema") != SCHEMA or not isinstance(doc.get("records"), list):
        raise InvalidOptionError(f"not an aioblock benchmark results file (schema {SCHEMA})", filename=str(path))
    return doc


def records_of(doc: Mapping[str, Any]) -> list[Record]:
    return [Record.from_json(r) for r in doc["records"]]


# ---- comparing two runs -----------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class CompareRow:
    """One target in one cell measured in both runs; ``verdict``: regression | improvement | same."""

    key: tuple[str, str, str, int, int, str, str]
    a_median: float
    b_median: float
    a_spread: tuple[float, float]
    b_spread: tuple[float, float]
    verdict: str
    #: each run's ratio_vs_peer (informational: the host's drift cancels out of a same-run ratio)
    a_vs_peer: float | None = None
    b_vs_peer: float | None = None

    @property
    def ratio(self) -> float:
        return self.b_median / self.a_median if self.a_median else float("inf")


@dataclass(frozen=True, slots=True)
class Comparison:
    rows: list[CompareRow]
    only_a: list[tuple[Any, ...]]
    only_b: list[tuple[Any, ...]]

    @property
    def regressions(self) -> list[CompareRow]:
        return [r for r in self.rows if r.verdict == "regression"]


def verdict(a: tuple[float, float, float], b: tuple[float, float, float], min_drop: float = 0.0) -> str:
    """``a``/``b``: (median, min, max). See the module docstring for the rule."""
    allowance = (a[2] - a[1]) + (b[2] - b[1])
    diff = b[0] - a[0]
    if -diff > allowance and b[0] < a[0] * (1 - min_drop):
        return "regression"
    if diff > allowance and b[0] > a[0] * (1 + min_drop):
        return "improvement"
    return "same"


def compare(a: Iterable[Record], b: Iterable[Record], *, min_drop: float = 0.0) -> Comparison:
    """B against A, record by record (records without a median, every repetition failed, count as missing)."""
    amap = {r.key: r for r in a if r.median_ops_per_s is not None and r.spread is not None}
    bmap = {r.key: r for r in b if r.median_ops_per_s is not None and r.spread is not None}
    rows = []
    for key, ra in amap.items():
        rb = bmap.get(key)
        if rb is None:
            continue
        assert ra.median_ops_per_s is not None and rb.median_ops_per_s is not None
        assert ra.spread is not None and rb.spread is not None
        sa = (ra.median_ops_per_s, ra.spread["min"], ra.spread["max"])
        sb = (rb.median_ops_per_s, rb.spread["min"], rb.spread["max"])
        rows.append(CompareRow(key, sa[0], sb[0], sa[1:], sb[1:], verdict(sa, sb, min_drop), ra.ratio_vs_peer,
                               rb.ratio_vs_peer))
    return Comparison(rows, [k for k in amap if k not in bmap], [k for k in bmap if k not in amap])
