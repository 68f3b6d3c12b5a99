"""Benchmark records: medians and spread, ratios against the peers, compare's regression rule, the tables."""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import pytest

from aioblock.benchmark.latency import LatencyHistogram
from aioblock.benchmark.report import compare_table, report, statistics_summary
from aioblock.benchmark.results import (
    SCHEMA,
    Record,
    add_ratios,
    build_record,
    compare,
    load_results,
    median,
    records_of,
    spread,
)
from aioblock.benchmark.suite import Cell
from aioblock.benchmark.targets import Measurement
from aioblock.errors import InvalidOptionError

CELL = Cell(workload="read-4k", family="read", kind="read", pattern="sequential", format="qcow2", block_size=4096,
            step=4096, depth=32, cache="writeback", location="tmpfs", size=1 << 30,
            targets=("aioblock-default-uvloop", "qemu-img-threads", "qemu-img-io_uring"), requests=1000)

STATS: dict[str, Any] = {
    "read": {"ops": 1000}, "in_flight": 0, "max_in_flight": 32,
    "driver": {"file": {"engine": {"name": "hybrid", "inline": 900, "handed_on": 100, "yields": 0,
                                   "fallback": {"name": "uring", "submits": 7, "sqes": 100}}},
               "l2_cache": {"hits": 750, "misses": 250, "evictions": 200, "writes": 0, "flushes": 0},
               "allocations": {"started": 0, "waits": 3, "wait_ns": 2_500_000},
               "metadata_lock": {"acquired": 250, "waited": 12, "wait_ns": 1_000_000},
               "flusher_runs": 2},
}


def m(ops: float, *, latencies: list[int] | None = None, latency_us: dict[str, float] | None = None,
      statistics: dict[str, Any] | None = None) -> Measurement:
    hist = LatencyHistogram.of(latencies).encode() if latencies else None
    return Measurement(requests=1000, elapsed_s=1000 / ops, ops_per_s=ops, mib_per_s=ops / 256, wall_s=0.5,
                       cpu_s=0.01, max_rss_kib=30000, latency_us=latency_us, histogram=hist,
                       statistics=statistics)


def test_median_and_spread() -> None:
    assert median([3.0, 1.0, 2.0]) == 2.0
    assert median([4.0, 1.0, 2.0, 3.0]) == 2.5
    assert spread([3.0, 1.0, 2.0]) == (1.0, 3.0)
    with pytest.raises(ValueError):
        median([])
    with pytest.raises(ValueError):
        spread([])


def test_build_record_merges_histograms_and_keeps_every_repetition() -> None:
    runs = [m(100.0, latencies=[1000] * 90 + [10_000] * 10, statistics={"n": 1}),
            m(300.0, latencies=[2000] * 100, statistics={"n": 3}),
            m(200.0, latencies=[1000] * 100, statistics={"n": 2})]
    r = build_record(CELL, "aioblock-default-uvloop", runs)
    assert r.ops_per_s == [100.0, 300.0, 200.0] and r.median_ops_per_s == 200.0
    assert r.spread == {"min": 100.0, "max": 300.0}
    assert r.mib_per_s == pytest.approx(200.0 / 256)
    assert r.latency_source == "hdr" and r.latency_us is not None
    assert r.latency_us["p50"] == pytest.approx(1.0, rel=0.01)        # 190 of 300 values are 1 us
    assert r.latency_us["p90"] == pytest.approx(2.0, rel=0.01)
    assert r.latency_us["p99.9"] == pytest.approx(10.0, rel=0.01)
    assert r.histogram is not None and LatencyHistogram.decode(r.histogram).count == 300
    assert r.statistics == {"n": 2}                                    # the median repetition's counters
    assert r.cpu_us_per_op == pytest.approx(10.0) and r.max_rss_kib == 30000
    assert len(r.repetitions) == 3 and r.failures == []


def test_build_record_latency_sources() -> None:
    fio = build_record(CELL, "fio-io_uring", [m(1.0, latency_us={"p50": 1.0}), m(2.0, latency_us={"p50": 3.0})])
    assert fio.latency_source == "median of repetitions" and fio.latency_us == {"p50": 2.0}
    qemu = build_record(CELL, "qemu-img-threads", [m(1.0), m(2.0)])
    assert qemu.latency_us is None and qemu.latency_source is None and qemu.histogram is None
    failed = build_record(CELL, "qemu-img-threads", [], ["repetition 1: boom"])
    assert failed.median_ops_per_s is None and failed.spread is None and failed.failures == ["repetition 1: boom"]


def records(values: dict[str, list[float]], cell: Cell = CELL) -> list[Record]:
    out = [build_record(cell, t, [m(v) for v in vs]) for t, vs in values.items()]
    add_ratios(out)
    return out


def test_ratio_vs_peer() -> None:
    recs = {r.target: r for r in records({"aioblock-default-uvloop": [150.0], "qemu-img-threads": [100.0],
                                          "qemu-img-io_uring": [300.0]})}
    a = recs["aioblock-default-uvloop"]
    assert a.ratio_vs_peer == pytest.approx(1.5)
    assert a.ratios == pytest.approx({"qemu-img-threads": 1.5, "qemu-img-io_uring": 0.5})
    assert "qemu-img-threads" not in recs["qemu-img-threads"].ratios      # never a ratio to itself
    assert recs["qemu-img-threads"].ratio_vs_peer is None
    assert recs["qemu-img-io_uring"].ratio_vs_peer == pytest.approx(3.0)


def test_ratio_only_within_the_same_cell() -> None:
    other = Cell(**{**{f: getattr(CELL, f) for f in CELL.__dataclass_fields__}, "depth": 1})
    recs = records({"aioblock-default-uvloop": [150.0]}) + records({"qemu-img-threads": [100.0]}, other)
    add_ratios(recs)
    assert recs[0].ratio_vs_peer is None and recs[0].ratios == {}


def test_compare_flags_a_regression_beyond_the_spread_only() -> None:
    a = records({"aioblock-default-uvloop": [100.0, 104.0, 96.0]})        # median 100, spread 8
    within = records({"aioblock-default-uvloop": [90.0, 94.0, 86.0]})     # median 90, spread 8: 10 <= 16
    beyond = records({"aioblock-default-uvloop": [80.0, 81.0, 79.0]})     # median 80, spread 2: 20 > 10
    better = records({"aioblock-default-uvloop": [130.0, 131.0, 129.0]})
    assert [r.verdict for r in compare(a, within).rows] == ["same"]
    (row,) = compare(a, beyond).rows
    assert row.verdict == "regression" and row.ratio == pytest.approx(0.8)
    assert compare(a, beyond).regressions == [row]
    assert [r.verdict for r in compare(a, better).rows] == ["improvement"]
    assert [r.verdict for r in compare(a, beyond, min_drop=0.25).rows] == ["same"]
    # single repetitions have no spread: any drop is beyond it
    assert [r.verdict for r in compare(records({"x-1": [100.0]}), records({"x-1": [99.0]})).rows] == ["regression"]


def test_compare_matches_by_target_and_cell() -> None:
    a = records({"aioblock-default-uvloop": [100.0], "qemu-img-threads": [50.0]})
    b = records({"aioblock-default-uvloop": [100.0], "qemu-img-io_uring": [50.0]})
    comp = compare(a, b)
    assert [r.key[0] for r in comp.rows] == ["aioblock-default-uvloop"]
    assert [k[0] for k in comp.only_a] == ["qemu-img-threads"] and [k[0] for k in comp.only_b] == \
        ["qemu-img-io_uring"]
    text = compare_table(comp, "A", "B")
    assert "| aioblock-default-uvloop | read-4k | qcow2 | 4K | 32 |" in text and "1.000" in text
    assert "0 regressions" in text and "1 records only in A" in text


def doc_of(recs: list[Record]) -> dict[str, Any]:
    return {"schema": SCHEMA, "suite": {"name": "t", "repetitions": 3, "targets": []},
            "machine": {"cores": 2, "locations": {"tmpfs": {"filesystem": "tmpfs"}}}, "complete": True,
            "records": [r.to_json() for r in recs]}


def test_report_tables() -> None:
    recs = [build_record(CELL, "aioblock-default-uvloop", [m(150.0, latencies=[1000, 2000], statistics=STATS)]),
            build_record(CELL, "qemu-img-threads", [m(100.0)]),
            build_record(CELL, "qemu-img-io_uring", [], ["repetition 1: qemu-img exited with 1: boom"])]
    add_ratios(recs)
    text = report(doc_of(recs))
    assert text.startswith("# aioblock benchmark: t")
    assert "## read-4k (read, sequential)" in text
    assert "| qcow2 | writeback | tmpfs | 4K | 32 | **aioblock-default-uvloop** | 150 |" in text
    assert "| 1.50 |" in text                       # vs qemu-img
    assert "FAILED" in text and "boom" in text
    assert "Block-layer statistics" in text
    assert "| 75.0% | 200 | 12 (1.0) |" in text
    assert "hybrid: inline 900, handed_on 100, uring.submits 7, uring.sqes 100" in text


def test_statistics_summary_of_raw_and_missing() -> None:
    assert statistics_summary(None) == {}
    raw = statistics_summary({"max_in_flight": 4, "driver": {"file": {"engine": {"name": "sync"}}}})
    assert raw == {"max in flight": "4", "engine": "sync"}


def test_results_round_trip_and_errors(tmp_path: Path) -> None:
    recs = records({"aioblock-default-uvloop": [150.0, 160.0]})
    (tmp_path / "results.json").write_text(json.dumps(doc_of(recs)))
    back = records_of(load_results(tmp_path))
    assert back[0].key == recs[0].key and back[0].ops_per_s == [150.0, 160.0]
    with pytest.raises(InvalidOptionError, match="cannot read results"):
        load_results(tmp_path / "missing")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(InvalidOptionError, match="not a JSON file"):
        load_results(tmp_path / "bad.json")
    (tmp_path / "other.json").write_text("{}")
    with pytest.raises(InvalidOptionError, match="not an aioblock benchmark results file"):
        load_results(tmp_path / "other.json")


def test_histogram_cdf_is_monotonic() -> None:
    h = LatencyHistogram.of(range(1000, 101_000, 100))
    cdf = h.cdf_us(50)
    assert cdf[-1] == (pytest.approx(h.max_us()), 1.0)
    assert all(a[0] <= b[0] and a[1] <= b[1] for a, b in itertools.pairwise(cdf))
    assert LatencyHistogram().percentiles_us() is None and LatencyHistogram().cdf_us() == []
    with pytest.raises(ValueError):
        LatencyHistogram.decode("not a histogram")
