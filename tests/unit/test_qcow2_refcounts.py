"""Counting a refcount block's nonzero entries in bulk, against the per-entry reader, for every entry width."""

from __future__ import annotations

import random

import pytest

from aioblock.drivers.qcow2.layout import count_nonzero_refcounts, get_refcount, set_refcount


@pytest.mark.parametrize("order", range(7))
def test_count_nonzero_refcounts_agrees_with_get_refcount(order: int) -> None:
    rnd = random.Random(order)
    entries = 4096 * 8 >> order
    for _ in range(40):
        block = bytearray(4096)
        for _ in range(rnd.randrange(80)):
            set_refcount(block, rnd.randrange(entries), order, rnd.randrange(1, 1 << min(1 << order, 30)))
        n = rnd.randrange(entries + 1)
        assert count_nonzero_refcounts(block, n, order) == sum(1 for i in range(n) if get_refcount(block, i, order))
