"""Tracked requests: serialising read-modify-writes of aligned blocks (QEMU's tracked requests, block/io.c).

When a file needs aligned I/O (O_DIRECT) and a write does not cover whole blocks, it reads the covering blocks,
patches its bytes in and writes the blocks back. Two such read-modify-writes of one block, or one and a plain
write of that block, must not run at once, or the later write-back puts back bytes the other changed. Every
write therefore registers its aligned range here first; a *serialising* one (a read-modify-write) waits for
every earlier overlapping request, and every later overlapping request waits for it. Plain aligned writes
that overlap only each other do not wait (they are the caller's own overlap, ordered by the caller).

State is touched only from the event loop, between awaits: no lock. The list is short (requests in flight).
Waiting to be admitted is a wait with nothing changed (:mod:`aioblock.cancellation`): an uncommitted request
cancelled there is untracked and raises; a committed one goes on waiting.
"""

from __future__ import annotations

import asyncio

from . import cancellation

__all__ = ["RangeTracker", "TrackedRange"]


class TrackedRange:
    """One in-flight request's aligned byte range."""

    __slots__ = ("done", "end", "serialising", "start")

    def __init__(self, start: int, end: int, serialising: bool) -> None:
        self.start, self.end, self.serialising = start, end, serialising
        self.done = asyncio.Event()


class RangeTracker:
    """The in-flight requests of one node (or one driver's file), by aligned range."""

    def __init__(self) -> None:
        self._tracked: list[TrackedRange] = []
        self._serialising = 0                   # how many of them are serialising

    async def track(self, start: int, end: int, serialising: bool) -> TrackedRange:
        """Register ``[start, end)``; wait for the earlier overlapping requests it must not overtake. The caller
        must ``untrack`` the result when its request is done (also on failure)."""
        me = TrackedRange(start, end, serialising)
        if not serialising and not self._serialising:       # the common case: nothing to wait for
            self._tracked.append(me)
            return me
        earlier = [t for t in self._tracked if t.start < end and start < t.end and (serialising or t.serialising)]
        self._tracked.append(me)
        self._serialising += serialising
        try:
            for other in earlier:
                await cancellation.wait_event(other.done)
        except BaseException:
            self.untrack(me)
            raise
        return me

    def untrack(self, me: TrackedRange) -> None:
        self._tracked.remove(me)
        self._serialising -= me.serialising
        me.done.set()
