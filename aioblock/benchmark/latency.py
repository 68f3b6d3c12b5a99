"""Per-request latency histograms: HDR histograms of nanoseconds, encoded as hdrh's base64 strings.

``aioblock bench --json`` records its latency list into one histogram after the run and stores the encoded
string; the harness decodes the repetitions of a cell, merges them (exact: HDR buckets add up) and reads
percentiles and a CDF from the merged histogram.

Invariants: every histogram covers 1 ns .. ``HIGHEST_NS`` with ``SIGNIFICANT_DIGITS`` digits (so any two can
be merged); a value above the range is recorded as ``HIGHEST_NS`` (never dropped, so counts stay exact).
hdrh has no type annotations: it is wrapped here and nowhere else.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

__all__ = ["HIGHEST_NS", "PERCENTILES", "SIGNIFICANT_DIGITS", "LatencyHistogram"]

HIGHEST_NS = 3600 * 10**9          # one hour
SIGNIFICANT_DIGITS = 3
#: the percentiles every record reports, and their keys
PERCENTILES: tuple[tuple[float, str], ...] = ((50.0, "p50"), (90.0, "p90"), (99.0, "p99"), (99.9, "p99.9"))


def _new() -> Any:
    from hdrh.histogram import HdrHistogram
    return HdrHistogram(1, HIGHEST_NS, SIGNIFICANT_DIGITS)


class LatencyHistogram:
    """An HDR histogram of latencies in nanoseconds."""

    def __init__(self, hist: Any = None) -> None:
        self._h = hist if hist is not None else _new()

    @classmethod
    def of(cls, latencies_ns: Iterable[int]) -> LatencyHistogram:
        """A histogram holding every value of ``latencies_ns`` (clamped to 1 .. HIGHEST_NS)."""
        h = cls()
        record = h._h.record_value
        for v in latencies_ns:
            record(1 if v < 1 else HIGHEST_NS if v > HIGHEST_NS else v)
        return h

    @classmethod
    def decode(cls, encoded: str) -> LatencyHistogram:
        """The histogram ``encode`` returned (ValueError if the string is not one)."""
        from hdrh.histogram import HdrHistogram
        try:
            hist = HdrHistogram.decode(encoded.encode("ascii"))
        except Exception as exc:  # hdrh raises a mix of zlib, struct and its own errors
            raise ValueError(f"not an encoded HDR histogram: {exc}") from None
        return cls(hist)

    @classmethod
    def merge(cls, encoded: Sequence[str]) -> LatencyHistogram:
        """One histogram holding the values of every encoded histogram in ``encoded``."""
        out = cls()
        for e in encoded:
            out._h.add(cls.decode(e)._h)
        return out

    def encode(self) -> str:
        return str(self._h.encode().decode("ascii"))

    @property
    def count(self) -> int:
        return int(self._h.get_total_count())

    def percentiles_us(self) -> dict[str, float] | None:
        """p50/p90/p99/p99.9 in microseconds; None for an empty histogram."""
        if not self.count:
            return None
        return {name: int(self._h.get_value_at_percentile(p)) / 1000 for p, name in PERCENTILES}

    def max_us(self) -> float:
        return int(self._h.get_max_value()) / 1000

    def cdf_us(self, points: int = 200) -> list[tuple[float, float]]:
        """(latency us, fraction of requests at or below it), ascending, about ``points`` points spread
        over percentiles 0..99.99 plus the maximum; empty for an empty histogram."""
        if not self.count:
            return []
        out: list[tuple[float, float]] = []
        # denser towards the tail: percentile 100 * (1 - 10**-x) for x from 0 to 4
        for i in range(points):
            x = 4 * i / (points - 1) if points > 1 else 4
            pct = 100.0 * (1 - 10 ** -x) if x > 0 else 0.0
            value = int(self._h.get_value_at_percentile(max(pct, 0.0001)))
            out.append((value / 1000, pct / 100))
        out.append((self.max_us(), 1.0))
        return out
