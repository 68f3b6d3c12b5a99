"""PNG plots of a results document (matplotlib with the Agg backend, imported only when plotting).

* ``ops-<family>.png``: median ops/s against depth, one line per target and peer (error bars: min..max of
  the repetitions), one panel per workload x format x block size x cache x location of the family;
* ``latency-<family>.png``: p50 (solid), p99 (dashed) and p99.9 (dotted) latency against depth for every
  target that reports latencies, same panels;
* ``latency-cdf.png``: the latency CDF of one representative cell (the suite's ``[cdf]`` selection, or the
  first 4 KiB read cell at the depth nearest 32): merged HDR histograms as lines, fio's percentiles as points.

A target keeps its colour in every figure. ``write_plots`` returns the paths it wrote.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..sizes import format_size, parse_size
from .latency import LatencyHistogram
from .results import Record, records_of

__all__ = ["representative_cell", "write_plots"]

_Panel = tuple[str, str, int, str, str]       # workload, format, block size, cache, location


def _panel(r: Record) -> _Panel:
    return (r.workload, r.format, r.block_size, r.cache, r.location)


def _title(p: _Panel) -> str:
    return f"{p[0]}\n{p[1]}, {format_size(p[2]).replace(' ', '')}, cache={p[3]}, {p[4]}"


def representative_cell(records: Sequence[Record], selector: Mapping[str, Any] | None = None) \
        -> tuple[str, str, int, int, str, str] | None:
    """The cell key of the CDF plot: the first record matching ``selector`` (keys workload, format,
    block_size, depth, cache, location), else the first 4 KiB read at the depth nearest 32, else the first."""
    if not records:
        return None
    if selector:
        def ok(r: Record) -> bool:
            for k, v in selector.items():
                have = getattr(r, k)
                want = parse_size(v) if k == "block_size" else v
                if have not in (want if isinstance(want, list) else [want]):
                    return False
            return True
        hit = [r for r in records if ok(r)]
        if hit:
            return hit[0].cell_key
    reads = [r for r in records if r.kind == "read" and r.block_size == 4096] or list(records)
    best = min(reads, key=lambda r: abs(r.depth - 32))
    return best.cell_key


def _depth_axis(ax: Any, depths: Sequence[int]) -> None:
    """A log2 x axis labelled with the depths that were measured."""
    ticks = sorted(set(depths))
    ax.set_xscale("log", base=2)
    ax.set_xticks(ticks, [str(d) for d in ticks])
    ax.minorticks_off()
    ax.set_xlabel("depth", fontsize=8)
    ax.tick_params(labelsize=7)


def _log_y(ax: Any) -> None:
    """A log y axis with plain numbers (12,000 rather than 1.2 x 10^4)."""
    from matplotlib.ticker import FuncFormatter
    ax.set_yscale("log")
    plain = FuncFormatter(lambda v, _pos: f"{v:,.0f}" if v >= 10 else f"{v:g}")
    ax.yaxis.set_major_formatter(plain)
    ax.tick_params(axis="y", which="both", labelsize=7)
    ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _pos: plain(v) if f"{v:e}"[0] in "25" else ""))


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", name)


def write_plots(doc: Mapping[str, Any], out_dir: Path) -> list[Path]:
    """Draw every plot of ``doc`` into ``out_dir``; returns the files written."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [r for r in records_of(doc) if r.median_ops_per_s is not None]
    order = list(dict.fromkeys([*doc.get("suite", {}).get("targets", []), *(r.target for r in records)]))
    cmap = plt.get_cmap("tab10")
    colour = {t: cmap(i % 10) for i, t in enumerate(order)}
    out: list[Path] = []

    def grid(n: int) -> tuple[Any, list[Any]]:
        cols = min(4, n)
        rows = -(-n // cols)
        fig, axes = plt.subplots(rows, cols, figsize=(4.4 * cols, 3.4 * rows), squeeze=False)
        flat = [ax for row in axes for ax in row]
        for ax in flat[n:]:
            ax.set_visible(False)
        return fig, flat[:n]

    def save(fig: Any, name: str) -> None:
        path = out_dir / name
        fig.tight_layout()
        fig.savefig(path, dpi=90)
        plt.close(fig)
        out.append(path)

    for family in dict.fromkeys(r.family for r in records):
        fam = [r for r in records if r.family == family]
        panels = list(dict.fromkeys(_panel(r) for r in fam))
        # throughput against depth
        fig, axes = grid(len(panels))
        for ax, p in zip(axes, panels, strict=True):
            for target in order:
                pts = sorted((r for r in fam if _panel(r) == p and r.target == target), key=lambda r: r.depth)
                if not pts:
                    continue
                xs = [r.depth for r in pts]
                ys = [r.median_ops_per_s or 0.0 for r in pts]
                lo = [y - (r.spread or {}).get("min", y) for y, r in zip(ys, pts, strict=True)]
                hi = [(r.spread or {}).get("max", y) - y for y, r in zip(ys, pts, strict=True)]
                ax.errorbar(xs, ys, yerr=[lo, hi], marker="o", ms=3, capsize=2, color=colour[target],
                            label=target, lw=2.2 if target.startswith("aioblock-") else 1.2)
            _depth_axis(ax, [r.depth for r in fam if _panel(r) == p])
            _log_y(ax)
            ax.set_title(_title(p), fontsize=8)
            ax.set_ylabel("ops/s (log)", fontsize=8)
            ax.grid(alpha=0.3, which="both")
        axes[0].legend(fontsize=6)
        fig.suptitle(f"{family}: median ops/s vs depth (bars: min..max of repetitions)", fontsize=10)
        save(fig, f"ops-{_safe(family)}.png")
        # latency percentiles against depth
        with_lat = [r for r in fam if r.latency_us]
        if with_lat:
            lpanels = list(dict.fromkeys(_panel(r) for r in with_lat))
            fig, axes = grid(len(lpanels))
            for ax, p in zip(axes, lpanels, strict=True):
                for target in order:
                    pts = sorted((r for r in with_lat if _panel(r) == p and r.target == target),
                                 key=lambda r: r.depth)
                    for key, style in (("p50", "-"), ("p99", "--"), ("p99.9", ":")):
                        vals = [(r.depth, (r.latency_us or {}).get(key)) for r in pts]
                        xs2 = [d for d, v in vals if v]
                        ys2 = [v for _, v in vals if v]
                        if xs2:
                            ax.plot(xs2, ys2, style, marker=".", color=colour[target],
                                    label=target if key == "p50" else None)
                _depth_axis(ax, [r.depth for r in with_lat if _panel(r) == p])
                _log_y(ax)
                ax.set_title(_title(p), fontsize=8)
                ax.set_ylabel("latency (us, log)", fontsize=8)
                ax.grid(alpha=0.3, which="both")
            axes[0].legend(fontsize=6)
            fig.suptitle(f"{family}: latency percentiles vs depth (p50 solid, p99 dashed, p99.9 dotted)",
                         fontsize=10)
            save(fig, f"latency-{_safe(family)}.png")

    cdf_key = representative_cell(records, doc.get("cdf") or None)
    cell = [r for r in records if r.cell_key == cdf_key and r.latency_us]
    if cell:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for r in cell:
            if r.histogram:
                curve = LatencyHistogram.decode(r.histogram).cdf_us()
                ax.plot([x for x, _ in curve], [y for _, y in curve], color=colour[r.target], label=r.target)
            elif r.latency_us:
                pct = {"p50": 0.5, "p90": 0.9, "p99": 0.99, "p99.9": 0.999}
                ax.plot([r.latency_us[k] for k in pct if k in r.latency_us],
                        [v for k, v in pct.items() if k in r.latency_us], "o--", color=colour[r.target],
                        label=f"{r.target} (percentiles)")
        ax.set_xscale("log")
        ax.set_xlabel("latency (us)")
        ax.set_ylabel("fraction of requests")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
        w, fmt, bs, depth, cache, loc = cell[0].cell_key
        ax.set_title(f"latency CDF: {w}, {fmt}, {format_size(bs).replace(' ', '')}, depth {depth}, "
                     f"cache={cache}, {loc}", fontsize=9)
        save(fig, "latency-cdf.png")
    return out
