"""The allocating-write queue: allocations in flight, the requests that depend on them, and plugging.

This is QEMU's model for both formats that allocate clusters: qcow2's in-flight cluster allocations with their
``dependent_requests`` queues, and QED's ``allocating_write_reqs`` queue with its single ``allocating_acb``.

**Allocations.** An :class:`Allocation` claims a run of guest *units* (clusters) ``[first, first + count)``: while
it is in flight it is the only request that may change their mapping. A request that needs to change the
mapping of a claimed unit waits in that allocation's queue (FIFO); when the allocation finishes, its waiters
wake in the order they came, and each looks its mapping up again (the cluster is usually allocated now, and
the waiter writes into it in place, as QEMU's dependent requests do). Requests on other units never wait.
Readers never wait either: the mapping changes only when an allocation is linked, so a reader sees the old
contents before that and the new ones after.

**States** (one table, ``_NEXT``; an illegal move raises :class:`AllocationStateError` and changes nothing)::

    STARTED --> FILLING --> WRITTEN --> LINKED
       |           |           |
       +-----------+-----------+------> ABORTED

* ``STARTED``: registered; the owner has reserved its new space (qcow2: host clusters with refcount 1).
* ``FILLING``: the owner is writing the new space: copy-on-write of the old contents or zeroes, and the guest's
  data. Entered once, by the owner only, so each new cluster is filled exactly once.
* ``WRITTEN``: every byte of the new space is written; nothing maps it yet.
* ``LINKED``: the mapping now points at the new space (terminal).
* ``ABORTED``: given up before linking; the mapping is unchanged (terminal). The owner releases what it
  reserved, after the engines have finished every write into it (cancellation.py rule 4).

**Completion** (:meth:`AllocationQueue.finish`) is synchronous: it moves to LINKED or ABORTED, releases the
units and wakes the waiters. The owner calls it in a ``finally``: it always runs, whatever happened (errors,
cancellations), so no waiter is ever left waiting for an allocation that is gone.

**Modes.** Per unit (qcow2): allocations of disjoint units run at once; the owner registers with
:meth:`AllocationQueue.try_start`, which never suspends, right after the lookup that found the units
unallocated (so nothing can come between). Serial (QED): one allocation at a time; :meth:`AllocationQueue.start`
waits its turn (FIFO, handed over by the previous owner's ``finish``), and the new owner then redoes its lookup.
An allocation waiting for its turn already claims its units, so that a request on one of them waits for that
allocation (``wait_for``) instead of queueing for a turn of its own: the 16 sequential 4 KiB writes into one new
64 KiB cluster cost one turn, not 16.

**Plugging**: ``async with queue.plugged():`` waits until no allocation is in flight and keeps new ones from
starting until it exits (QED's need-check clear, snapshots, check); requests wanting to allocate meanwhile wait
(``wait_unplugged``, or ``start``'s queue) and go on in order afterwards.

**Cancellation** (:mod:`aioblock.cancellation`): every wait here is a wait with nothing changed, so an
uncommitted request cancelled in it leaves no trace (it leaves the queue; a turn handed to it is passed on);
a committed one goes on waiting. Registering an allocation commits the request: from then on it runs to its
end, through ``finish``.

State is touched only from the event loop's thread, and no method suspends between a check and the change it
guards: no lock is needed.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from . import cancellation

__all__ = ["AllocState", "Allocation", "AllocationQueue", "AllocationStateError", "AllocationStatistics"]


class AllocState(enum.IntEnum):
    STARTED = 0
    FILLING = 1
    WRITTEN = 2
    LINKED = 3
    ABORTED = 4


_S = AllocState
_STARTED, _WRITTEN, _LINKED, _ABORTED = _S.STARTED, _S.WRITTEN, _S.LINKED, _S.ABORTED
#: The legal moves: every state change of an allocation is checked against this table.
_NEXT: dict[AllocState, frozenset[AllocState]] = {
    _S.STARTED: frozenset({_S.FILLING, _S.ABORTED}),
    _S.FILLING: frozenset({_S.WRITTEN, _S.ABORTED}),
    _S.WRITTEN: frozenset({_S.LINKED, _S.ABORTED}),
    _S.LINKED: frozenset(),
    _S.ABORTED: frozenset(),
}
#: the same table as one bit mask of allowed next states per state (the check on the hot path)
_ALLOWED: tuple[int, ...] = tuple(sum(1 << n for n in _NEXT[state]) for state in AllocState)


class AllocationStateError(RuntimeError):
    """An allocation was asked to make a move the state table does not allow (a driver bug)."""


class Allocation:
    """One allocating write in flight over guest units ``[first, first + count)``.

    Format drivers subclass it to carry their own plan (qcow2: host offset, copy-on-write region, the entries it
    replaces). ``state`` changes only through ``advance`` and ``AllocationQueue.finish``."""

    __slots__ = ("_waiters", "count", "first", "state")

    def __init__(self, first: int, count: int) -> None:
        if count < 1:
            raise ValueError(f"an allocation claims at least one unit, not {count}")
        self.first = first
        self.count = count
        self.state = _STARTED
        self._waiters: deque[asyncio.Future[None]] | None = None

    @property
    def end(self) -> int:
        return self.first + self.count

    @property
    def done(self) -> bool:
        return self.state >= _LINKED

    def advance(self, state: AllocState) -> None:
        """Move to ``state`` (FILLING or WRITTEN; terminal states go through ``AllocationQueue.finish``)."""
        if not _ALLOWED[self.state] >> state & 1 or state >= _LINKED:
            if state >= _LINKED:
                raise AllocationStateError(f"{state.name} is entered through AllocationQueue.finish()")
            self._move(state)               # raises
        self.state = state

    def _move(self, state: AllocState) -> None:
        if not _ALLOWED[self.state] >> state & 1:
            raise AllocationStateError(f"allocation of units {self.first}+{self.count}: "
                                       f"{self.state.name} -> {state.name} is not allowed")
        self.state = state

    def __repr__(self) -> str:
        return f"<{type(self).__name__} units {self.first}+{self.count} {self.state.name}>"


@dataclass(frozen=True, slots=True)
class AllocationStatistics:
    """Counters of one queue: allocations started, linked and aborted; in flight now and at most; waits (by
    requests depending on an allocation, for a turn or for an unplug) and the nanoseconds spent in them;
    plugs."""

    started: int
    linked: int
    aborted: int
    in_flight: int
    max_in_flight: int
    waits: int
    wait_ns: int
    plugs: int

    def to_dict(self) -> dict[str, int]:
        return {"started": self.started, "linked": self.linked, "aborted": self.aborted,
                "in_flight": self.in_flight, "max_in_flight": self.max_in_flight, "waits": self.waits,
                "wait_ns": self.wait_ns, "plugs": self.plugs}


class AllocationQueue:
    """The allocations in flight on one format node (see the module docstring).

    ``serial``: at most one allocation at a time (QED); otherwise one per unit (qcow2).
    """

    def __init__(self, *, serial: bool = False) -> None:
        self.serial = serial
        self._units: dict[int, Allocation] = {}
        self._in_flight = 0
        #: how many plugs are active (read-only for callers)
        self.plugs = 0
        #: requests waiting to start: serial mode, for their turn, with the allocation they will register; per-unit
        #: mode, for an unplug (allocation None). Woken in order.
        self._starters: deque[tuple[asyncio.Future[None], Allocation | None]] = deque()
        #: plugs waiting for the allocations in flight to finish
        self._drained: list[asyncio.Future[None]] = []
        self._started = self._linked = self._aborted = 0
        self._max_in_flight = 0
        self._waits = 0
        self._wait_ns = 0
        self._plug_count = 0

    # ---- queries ---------------------------------------------------------------------------------------------

    @property
    def in_flight(self) -> int:
        """How many allocations are in flight."""
        return self._in_flight

    @property
    def units(self) -> dict[int, Allocation]:
        """Claimed unit -> its allocation (in flight, or in serial mode also waiting for its turn); read-only
        for callers (the one-unit check of a hot path)."""
        return self._units

    def blocker(self, first: int, end: int) -> Allocation | None:
        """The in-flight allocation claiming the lowest unit of ``[first, end)``, or None."""
        units = self._units
        if not units:
            return None
        if end - first == 1:
            return units.get(first)
        if end - first > len(units):
            found = [a for u, a in units.items() if first <= u < end]
            return min(found, key=lambda a: a.first) if found else None
        for u in range(first, end):
            a = units.get(u)
            if a is not None:
                return a
        return None

    def claimed(self, unit: int) -> bool:
        """Whether an allocation in flight claims ``unit`` (the fast check of a one-unit request)."""
        return unit in self._units

    def statistics(self) -> AllocationStatistics:
        return AllocationStatistics(self._started, self._linked, self._aborted, self._in_flight,
                                    self._max_in_flight, self._waits, self._wait_ns, self._plug_count)

    # ---- starting ---------------------------------------------------------------------------------------------

    def try_start(self, alloc: Allocation) -> bool:
        """Register ``alloc`` (STARTED, nothing else changed) if no allocation in flight claims one of its units
        and the queue is not plugged (serial mode: and no allocation is in flight or waiting to start). Never
        suspends. Commits the current request when it registers."""
        if self.plugs or alloc.state != _STARTED:
            return False
        units, first, count = self._units, alloc.first, alloc.count
        if self.serial:
            if self._in_flight or self._starters:
                return False
        elif units and (units.get(first) is not None if count == 1
                        else self.blocker(first, first + count) is not None):
            return False
        self._register(alloc)
        cancellation.commit()
        return True

    async def start(self, alloc: Allocation) -> None:
        """Serial mode: register ``alloc`` when its turn comes (FIFO; the previous owner's ``finish`` registers
        it and wakes it). The caller then redoes its lookup, and either fills the allocation or, with nothing
        left to allocate, finishes it with ``linked=False``. Commits the current request once registered."""
        if not self.serial:
            raise RuntimeError("start() is for serial queues; per-unit queues use try_start()")
        if self.try_start(alloc):
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        units = self._units
        for u in range(alloc.first, alloc.end):
            units.setdefault(u, alloc)
        try:
            await self._wait_in(self._starters, (fut, alloc), fut)
        except BaseException:
            if fut.done() and not fut.cancelled():
                self.finish(alloc, linked=False)        # the turn was handed to us: pass it on
            else:
                self._withdraw(alloc)
            raise
        cancellation.commit()

    def _withdraw(self, alloc: Allocation) -> None:
        """A serial starter leaves before its turn: ABORTED, its claims dropped, its waiters woken (nothing was
        registered, so nothing else changes)."""
        alloc.state = _ABORTED
        units = self._units
        for u in range(alloc.first, alloc.end):
            if units.get(u) is alloc:
                del units[u]
        waiters, alloc._waiters = alloc._waiters, None
        for fut in waiters or ():
            if not fut.done():
                fut.set_result(None)

    def _register(self, alloc: Allocation) -> None:
        units = self._units
        for u in range(alloc.first, alloc.first + alloc.count):
            units[u] = alloc
        self._in_flight += 1
        self._started += 1
        if self._in_flight > self._max_in_flight:
            self._max_in_flight = self._in_flight

    # ---- waiting -------------------------------------------------------------------------------------------

    async def wait_for(self, alloc: Allocation) -> None:
        """Wait (FIFO with the other waiters) until ``alloc`` has finished; at once if it has."""
        if alloc.done:
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if alloc._waiters is None:
            alloc._waiters = deque()
        await self._wait_in(alloc._waiters, fut, fut)

    async def wait_clear(self, first: int, end: int) -> None:
        """Wait until no allocation in flight claims a unit of ``[first, end)`` (each blocker in turn). Another
        allocation may start as soon as this returns: check again without suspending before relying on it."""
        while (a := self.blocker(first, end)) is not None:
            await self.wait_for(a)

    async def wait_unplugged(self) -> None:
        """Per-unit mode: wait until the queue is not plugged (at once if it is not)."""
        if not self.plugs:
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        await self._wait_in(self._starters, (fut, None), fut)

    async def _wait_in(self, queue: deque[Any], item: object, fut: asyncio.Future[None]) -> None:
        """Wait for ``fut`` as ``item`` at the end of ``queue`` (counted and timed); if the wait ends in an
        exception (a cancellation), the item is taken out of the queue first."""
        queue.append(item)
        t0 = time.perf_counter_ns()
        self._waits += 1
        try:
            await cancellation.wait(fut)
        except BaseException:
            with contextlib.suppress(ValueError):
                queue.remove(item)
            raise
        finally:
            self._wait_ns += time.perf_counter_ns() - t0

    # ---- finishing -----------------------------------------------------------------------------------------

    def finish(self, alloc: Allocation, *, linked: bool) -> None:
        """The completion step: LINKED (the mapping points at the new space) or ABORTED (it does not), the units
        released, the waiters woken in FIFO order. Synchronous; call it in a ``finally`` so that it always runs.
        Finishing an allocation that is already finished does nothing."""
        state = alloc.state
        if state >= _LINKED:
            return
        if linked and state != _WRITTEN:
            alloc._move(_LINKED)                   # raises: only a written allocation is linked
        alloc.state = _LINKED if linked else _ABORTED
        units = self._units
        for u in range(alloc.first, alloc.first + alloc.count):
            if units.get(u) is alloc:
                del units[u]
        self._in_flight -= 1
        if linked:
            self._linked += 1
        else:
            self._aborted += 1
        waiters, alloc._waiters = alloc._waiters, None
        if waiters:
            for fut in waiters:
                if not fut.done():
                    fut.set_result(None)
        if not self._in_flight:
            drained, self._drained = self._drained, []
            for d in drained:
                if not d.done():
                    d.set_result(None)
        if self.serial and not self.plugs:
            self._hand_over()

    def _hand_over(self) -> None:
        """Serial mode, nothing in flight: register the first live starter's allocation and wake it."""
        while self._starters and not self._in_flight:
            fut, alloc = self._starters.popleft()
            if fut.done() or alloc is None:
                continue
            self._register(alloc)
            fut.set_result(None)

    # ---- plugging ------------------------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def plugged(self) -> AsyncIterator[None]:
        """Keep new allocations from starting, wait until none is in flight, and run the block; then let the
        waiting requests go on, in order. Cancelled while waiting for the drain, it unplugs and raises."""
        self.plugs += 1
        self._plug_count += 1
        try:
            while self._in_flight:
                fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
                self._drained.append(fut)
                await cancellation.wait(fut)
            yield
        finally:
            self.plugs -= 1
            if not self.plugs:
                if self.serial:
                    self._hand_over()
                else:
                    starters, self._starters = self._starters, deque()
                    for fut, _ in starters:
                        if not fut.done():
                            fut.set_result(None)
