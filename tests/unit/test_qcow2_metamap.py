"""qcow2's MetadataMap (compact ranges and one-cluster blocks) against a per-cluster model: random adds, bulk
adds, removes; every lookup and every overlap check must agree with the model, conflicts included."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from aioblock.drivers.qcow2.metaio import (
    CONFLICT,
    HEADER,
    L1,
    L2,
    REFBLOCK,
    REFTABLE,
    SNAPSHOT_L1,
    MetadataMap,
    OverlapError,
)

CS = 512
TABLE_KINDS = [HEADER, L1, REFTABLE, SNAPSHOT_L1]
BLOCK_KINDS = [L2, REFBLOCK]
SPAN = 64

cluster = st.integers(0, SPAN - 1)
op = st.one_of(
    st.tuples(st.just("add"), cluster, st.integers(1, 8), st.sampled_from(TABLE_KINDS + BLOCK_KINDS),
              st.integers(0, CS - 1)),
    st.tuples(st.just("blocks"), st.lists(cluster, max_size=12), st.sampled_from(BLOCK_KINDS)),
    st.tuples(st.just("tables"), st.lists(st.tuples(cluster, st.integers(1, 6), st.sampled_from(TABLE_KINDS)),
                                          max_size=4)),
    st.tuples(st.just("remove"), cluster, st.integers(1, 8)),
)


def _claim(model: dict[int, str], first: int, end: int, kind: str) -> None:
    for c in range(first, end):
        old = model.get(c)
        model[c] = kind if old in (None, kind) else CONFLICT


@settings(max_examples=300, deadline=None)
@given(st.lists(op, min_size=1, max_size=25))
def test_metadata_map_matches_a_per_cluster_model(ops: list[tuple[Any, ...]]) -> None:
    mm = MetadataMap(9)
    model: dict[int, str] = {}
    for o in ops:
        if o[0] == "add":
            _, first, n, kind, short = o
            n = 1 if kind in BLOCK_KINDS else n
            mm.add(first * CS, n * CS - short, kind)          # a partial last cluster counts whole
            _claim(model, first, first + n, kind)
        elif o[0] == "blocks":
            _, clusters, kind = o
            mm.add_blocks(iter(clusters), kind)
            for c in clusters:
                _claim(model, c, c + 1, kind)
        elif o[0] == "tables":
            mm.add_tables([(first * CS, n * CS, kind) for first, n, kind in o[1]])
            for first, n, kind in o[1]:
                _claim(model, first, first + n, kind)
        else:
            _, first, n = o
            mm.remove(first * CS, n * CS)
            for c in range(first, first + n):
                model.pop(c, None)
        for c in range(SPAN + 8):
            assert mm.kind_at(c * CS + 7) == model.get(c), c
        for first in range(0, SPAN + 8, 3):
            for n in (1, 4):
                for kind in (L1, L2, REFBLOCK, "data"):
                    clash = any(model.get(c) not in (None, kind) for c in range(first, first + n))
                    try:
                        mm.check(first * CS + 1, n * CS - 2, kind)
                    except OverlapError:
                        assert clash, (first, n, kind)
                    else:
                        assert not clash, (first, n, kind)
    assert sorted(set(mm.clusters())) == sorted(model)
