"""The allocating-write queue (aioblock.allocation): the state table, dependent waiters in FIFO order, plugging,
serial mode's hand-over, statistics, and cancellation leaving no trace."""

from __future__ import annotations

import asyncio

import pytest

from aioblock import cancellation
from aioblock.allocation import Allocation, AllocationQueue, AllocationStateError, AllocState


async def ticks(n: int) -> None:
    for _ in range(n):
        await asyncio.sleep(0)


def link(q: AllocationQueue, a: Allocation) -> None:
    """Fill and link ``a`` (the owner's path through the states)."""
    a.advance(AllocState.FILLING)
    a.advance(AllocState.WRITTEN)
    q.finish(a, linked=True)


# ---- the state table -----------------------------------------------------------------------------------------

def test_legal_moves_only() -> None:
    q = AllocationQueue()
    a = Allocation(0, 2)
    assert q.try_start(a) and a.state is AllocState.STARTED
    with pytest.raises(AllocationStateError):
        a.advance(AllocState.WRITTEN)              # must fill first
    assert a.state is AllocState.STARTED         # an illegal move changes nothing
    with pytest.raises(AllocationStateError):
        a.advance(AllocState.LINKED)               # terminal states only through finish()
    a.advance(AllocState.FILLING)
    with pytest.raises(AllocationStateError):
        a.advance(AllocState.FILLING)              # filled exactly once
    a.advance(AllocState.WRITTEN)
    q.finish(a, linked=True)
    assert a.state is AllocState.LINKED and a.done
    q.finish(a, linked=False)                      # finishing twice does nothing
    assert a.state is AllocState.LINKED
    with pytest.raises(AllocationStateError):
        a.advance(AllocState.FILLING)


@pytest.mark.parametrize("at", [AllocState.STARTED, AllocState.FILLING, AllocState.WRITTEN])
def test_abort_from_any_live_state(at: AllocState) -> None:
    q = AllocationQueue()
    a = Allocation(5, 1)
    q.try_start(a)
    for state in (AllocState.FILLING, AllocState.WRITTEN):
        if a.state is at:
            break
        a.advance(state)
    q.finish(a, linked=False)
    assert a.state is AllocState.ABORTED and not q.claimed(5)
    s = q.statistics()
    assert (s.started, s.linked, s.aborted, s.in_flight) == (1, 0, 1, 0)


# ---- claims and dependent requests --------------------------------------------------------------------------

def test_claims_block_only_their_units() -> None:
    q = AllocationQueue()
    a = Allocation(10, 3)
    assert q.try_start(a)
    assert q.blocker(12, 13) is a and q.blocker(0, 100) is a and q.blocker(13, 20) is None
    assert not q.try_start(Allocation(12, 2))      # overlaps
    b = Allocation(13, 2)
    assert q.try_start(b)                          # unrelated units never wait
    assert q.in_flight == 2 and q.statistics().max_in_flight == 2


async def test_waiters_wake_in_fifo_order_when_the_allocation_finishes() -> None:
    q = AllocationQueue()
    a = Allocation(0, 1)
    q.try_start(a)
    order: list[int] = []

    async def waiter(i: int) -> None:
        await q.wait_for(a)
        order.append(i)

    tasks = [asyncio.create_task(waiter(i)) for i in range(5)]
    await ticks(2)
    assert order == []
    link(q, a)
    await asyncio.gather(*tasks)
    assert order == [0, 1, 2, 3, 4]
    stats = q.statistics()
    assert stats.waits == 5 and stats.wait_ns > 0


async def test_a_cancelled_waiter_leaves_no_trace() -> None:
    q = AllocationQueue()
    a = Allocation(0, 1)
    q.try_start(a)
    t = asyncio.create_task(q.wait_for(a))
    await ticks(1)
    t.cancel()
    await ticks(1)
    assert t.cancelled()
    assert not a._waiters
    q.finish(a, linked=False)


async def test_a_committed_waiter_waits_on_and_raises_at_its_end() -> None:
    q = AllocationQueue()
    a = Allocation(0, 1)
    q.try_start(a)
    after = []

    async def committed_request() -> None:
        scope, token = cancellation.enter()
        scope.committed = True
        try:
            await q.wait_for(a)
            after.append("woke")
        finally:
            cancellation.leave(scope, token)

    t = asyncio.create_task(committed_request())
    await ticks(1)
    t.cancel()
    await ticks(2)
    assert not t.done()
    link(q, a)
    with pytest.raises(asyncio.CancelledError):
        await t
    assert after == ["woke"]


async def test_registering_commits_the_request() -> None:
    q = AllocationQueue()
    scope, token = cancellation.enter()
    try:
        assert not scope.committed
        q.try_start(Allocation(0, 1))
        assert scope.committed
    finally:
        cancellation.leave(scope, token)


# ---- plugging ----------------------------------------------------------------------------------------------------

async def test_plug_waits_for_the_drain_and_holds_new_allocations() -> None:
    q = AllocationQueue()
    a = Allocation(0, 1)
    q.try_start(a)
    inside = asyncio.Event()
    leave = asyncio.Event()

    async def plugger() -> None:
        async with q.plugged():
            inside.set()
            await leave.wait()

    p = asyncio.create_task(plugger())
    await ticks(2)
    assert not inside.is_set()                     # waits for the allocation in flight
    assert not q.try_start(Allocation(7, 1))       # already plugged: nothing new starts
    link(q, a)
    await inside.wait()
    w = asyncio.create_task(q.wait_unplugged())
    await ticks(2)
    assert not w.done()
    leave.set()
    await p
    await w
    assert q.try_start(Allocation(7, 1))
    assert q.statistics().plugs == 1


# ---- serial mode (QED) -------------------------------------------------------------------------------------------

async def test_serial_mode_hands_the_turn_over_in_order() -> None:
    q = AllocationQueue(serial=True)
    first = Allocation(0, 1)
    await q.start(first)
    started: list[int] = []

    async def writer(i: int) -> None:
        a = Allocation(100 + i, 1)
        await q.start(a)
        started.append(i)
        assert q.in_flight == 1
        await ticks(1)
        q.finish(a, linked=False)                  # redid its lookup: nothing left to allocate

    tasks = [asyncio.create_task(writer(i)) for i in range(4)]
    await ticks(2)
    assert not q.try_start(Allocation(50, 1))      # someone waits: no overtaking
    link(q, first)
    await asyncio.gather(*tasks)
    assert started == [0, 1, 2, 3]


async def test_serial_turn_handed_to_a_cancelled_starter_is_passed_on() -> None:
    q = AllocationQueue(serial=True)
    owner = Allocation(0, 1)
    await q.start(owner)
    a, b = Allocation(1, 1), Allocation(2, 1)
    ta = asyncio.create_task(q.start(a))
    tb = asyncio.create_task(q.start(b))
    await ticks(1)
    link(q, owner)                                 # hands the turn to a, which has not run yet
    ta.cancel()
    with pytest.raises(asyncio.CancelledError):
        await ta
    await tb                                       # a passed it on to b
    assert a.state is AllocState.ABORTED and q.claimed(2)
    link(q, b)
    assert q.in_flight == 0


async def test_serial_starters_claim_their_units_while_they_wait() -> None:
    """A request on a unit whose allocation waits for its turn waits for that allocation, not for a turn of
    its own; a starter cancelled before its turn drops its claim and wakes those waiting for it."""
    q = AllocationQueue(serial=True)
    owner = Allocation(0, 1)
    await q.start(owner)
    a, b = Allocation(5, 1), Allocation(6, 1)
    ta = asyncio.create_task(q.start(a))
    tb = asyncio.create_task(q.start(b))
    await ticks(1)
    assert q.units[5] is a and q.units[6] is b and q.in_flight == 1
    behind_a = asyncio.create_task(q.wait_for(a))
    behind_b = asyncio.create_task(q.wait_for(b))
    await ticks(1)
    tb.cancel()                                    # b leaves before its turn
    with pytest.raises(asyncio.CancelledError):
        await tb
    await behind_b
    assert b.state is AllocState.ABORTED and 6 not in q.units and q.in_flight == 1
    link(q, owner)                                 # the turn goes to a
    await ta
    assert q.in_flight == 1 and not behind_a.done()
    link(q, a)
    await behind_a
    assert q.in_flight == 0 and not q.units
    assert q.statistics().started == 2             # owner and a: b never started


async def test_start_is_for_serial_queues() -> None:
    with pytest.raises(RuntimeError):
        await AllocationQueue().start(Allocation(0, 1))
