"""Markdown tables of a results document (``aioblock benchmark report``) and of a comparison (``compare``).

Per workload, one throughput table (a row per cell and target: median ops/s, MiB/s, the spread of the
repetitions, the ratios against qemu-img's default aio, qemu-img's io_uring and fio's io_uring, latency
percentiles, CPU per request, peak RSS), then one table of aioblock's block-layer statistics of the median
repetition (requests in flight, metadata cache hit rate and evictions, metadata lock waits, allocating-write
queue waits, background flusher runs, the I/O engine's own counters). Missing values print as empty cells.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from ..sizes import format_size
from .results import Comparison, Record, records_of

__all__ = ["compare_table", "engine_counters", "report", "statistics_summary"]


def _n(value: float | None, digits: int = 0) -> str:
    if value is None:
        return ""
    return f"{value:,.{digits}f}"


def _size(value: int) -> str:
    return format_size(value).replace(" ", "").replace("iB", "")


def _ratio(value: float | None) -> str:
    return "" if value is None else f"{value:.2f}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], right: set[int]) -> list[str]:
    out = ["| " + " | ".join(header) + " |",
           "|" + "|".join("---:" if i in right else "---" for i in range(len(header))) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return out


def engine_counters(engine: Mapping[str, Any], prefix: str = "") -> list[str]:
    """``name: key value, ...`` parts of an engine's counters (nested dicts flattened, zeroes left out)."""
    parts = []
    for k, v in engine.items():
        if k == "name":
            continue
        if isinstance(v, Mapping):
            sub = engine_counters(v, f"{prefix}{v.get('name', k)}.")
            parts += sub
        elif isinstance(v, int | float) and not isinstance(v, bool) and v:
            parts.append(f"{prefix}{k} {v:,}")
    return parts


def statistics_summary(st: Mapping[str, Any] | None) -> dict[str, str]:
    """The compact columns of the statistics table from one ``BackendStatistics`` dict (empty if None)."""
    if not st:
        return {}
    drv: Mapping[str, Any] = st.get("driver") or {}
    out = {"max in flight": str(st.get("max_in_flight", ""))}
    l2 = drv.get("l2_cache")
    if isinstance(l2, Mapping):
        looked = l2.get("hits", 0) + l2.get("misses", 0)
        out["L2 hit rate"] = f"{l2.get('hits', 0) / looked:.1%}" if looked else ""
        out["L2 evictions"] = _n(l2.get("evictions"))
    lock = drv.get("metadata_lock")
    if isinstance(lock, Mapping):
        out["lock waits (ms)"] = f"{lock.get('waited', 0):,} ({lock.get('wait_ns', 0) / 1e6:,.1f})"
    allocs = drv.get("allocations")
    if isinstance(allocs, Mapping):
        out["allocations"] = _n(allocs.get("started"))
        out["alloc waits (ms)"] = f"{allocs.get('waits', 0):,} ({allocs.get('wait_ns', 0) / 1e6:,.1f})"
    if "flusher_runs" in drv:
        out["flusher runs"] = _n(drv.get("flusher_runs"))
    file = drv.get("file")
    engine = file.get("engine") if isinstance(file, Mapping) else None
    if isinstance(engine, Mapping):
        parts = engine_counters(engine)
        out["engine"] = f"{engine.get('name', '?')}: " + ", ".join(parts) if parts else str(engine.get("name", ""))
    return out


_STAT_COLUMNS = ("max in flight", "L2 hit rate", "L2 evictions", "lock waits (ms)", "allocations",
                 "alloc waits (ms)", "flusher runs", "engine")


def _cell_cols(r: Record) -> list[str]:
    return [r.format, r.cache, r.location, _size(r.block_size), str(r.depth)]


def report(doc: Mapping[str, Any]) -> str:
    """The markdown report of a results document."""
    records = records_of(doc)
    suite, machine = doc.get("suite", {}), doc.get("machine", {})
    lines = [f"# aioblock benchmark: {suite.get('name', '?')}{' (quick)' if suite.get('quick') else ''}", ""]
    locs = ", ".join(f"{k} {v.get('filesystem')}" for k, v in (machine.get("locations") or {}).items())
    lines.append(f"{machine.get('date', '')}; {machine.get('cpu')}, {machine.get('cores')} cores, "
                 f"{machine.get('memory')}; Linux {machine.get('kernel')}; Python {machine.get('python')}, "
                 f"uvloop {machine.get('uvloop')}, aioblock {machine.get('aioblock')}; {machine.get('qemu')}; "
                 f"{machine.get('fio')}; locations: {locs}. {suite.get('repetitions')} repetitions, "
                 f"{doc.get('elapsed_s', '?')} s{'' if doc.get('complete', True) else ' (INCOMPLETE)'}.")
    for workload in dict.fromkeys(r.workload for r in records):
        recs = [r for r in records if r.workload == workload]
        first = recs[0]
        step = "" if first.step == first.block_size else f", step {_size(first.step)}"
        opts = "".join(f", {k}={v}" for k, v in first.options.items())
        lines += ["", f"## {workload} ({first.kind}, {first.pattern}{step}{opts})", ""]
        rows = []
        for r in recs:
            lat = r.latency_us or {}
            sp = r.spread or {}
            p = f"{_n(lat.get('p50'), 1)} / {_n(lat.get('p99'), 1)} / {_n(lat.get('p99.9'), 1)}" if lat else ""
            target = f"**{r.target}**" if r.is_aioblock else r.target
            rows.append([*_cell_cols(r), target, _n(r.median_ops_per_s), _n(r.mib_per_s, 1),
                         f"{_n(sp.get('min'))}..{_n(sp.get('max'))}" if sp else "FAILED",
                         _ratio(r.ratios.get("qemu-img-threads")), _ratio(r.ratios.get("qemu-img-io_uring")),
                         _ratio(r.ratios.get("fio-io_uring")), p, _n(r.cpu_us_per_op, 1),
                         _n(r.max_rss_kib / 1024 if r.max_rss_kib else None, 0)])
        lines += _table(["format", "cache", "location", "bs", "depth", "target", "ops/s", "MiB/s",
                         "spread (min..max)", "vs qemu-img", "vs qemu-img io_uring", "vs fio io_uring",
                         "p50 / p99 / p99.9 us", "CPU us/op", "RSS MiB"], rows, {4, 6, 7, 8, 9, 10, 11, 13, 14})
        stat_rows = []
        for r in recs:
            s = statistics_summary(r.statistics)
            if s:
                stat_rows.append([*_cell_cols(r), r.target, *(s.get(c, "") for c in _STAT_COLUMNS)])
        if stat_rows:
            lines += ["", f"Block-layer statistics ({workload}, median repetition):", ""]
            lines += _table(["format", "cache", "location", "bs", "depth", "target", *_STAT_COLUMNS], stat_rows,
                            {4, 6, 7, 8, 9, 10, 11, 12})
        failed = [(r, f) for r in recs for f in r.failures]
        if failed:
            lines += ["", "Failures:", ""] + [f"- {r.target} {r.format} d{r.depth}: {f}" for r, f in failed]
    return "\n".join(lines) + "\n"


def compare_table(comp: Comparison, a_name: str, b_name: str) -> str:
    """The markdown table of ``compare``: every matched record, B/A, each run's ratio against qemu-img's
    default aio (same-run ratios, which the host's drift does not move), the verdict; then a summary line."""
    rows = []
    for row in comp.rows:
        target, workload, fmt, bs, depth, cache, loc = row.key
        v = {"regression": "**REGRESSION**", "improvement": "improvement", "same": "within spread"}[row.verdict]
        rows.append([target, workload, fmt, _size(bs), str(depth), cache, loc,
                     f"{_n(row.a_median)} ({_n(row.a_spread[0])}..{_n(row.a_spread[1])})",
                     f"{_n(row.b_median)} ({_n(row.b_spread[0])}..{_n(row.b_spread[1])})", f"{row.ratio:.3f}",
                     f"{_ratio(row.a_vs_peer)} -> {_ratio(row.b_vs_peer)}" if row.a_vs_peer or row.b_vs_peer else "",
                     v])
    lines = [f"B = {b_name} vs A = {a_name} (median ops/s, min..max of the repetitions)", ""]
    lines += _table(["target", "workload", "format", "bs", "depth", "cache", "location", "A ops/s", "B ops/s",
                     "B/A", "vs qemu-img A -> B", "verdict"], rows, {4, 7, 8, 9, 10})
    if comp.only_a or comp.only_b:
        lines += ["", f"Unmatched: {len(comp.only_a)} records only in A, {len(comp.only_b)} only in B."]
    n = len(comp.regressions)
    lines += ["", f"{n} regression{'s' if n != 1 else ''} beyond the spread of the two runs"
                  f" ({len(comp.rows)} records compared)."]
    return "\n".join(lines) + "\n"
