"""Cancellation: the rules every request path keeps, and the one mechanism that keeps them.

A caller may cancel a request at any time (``task.cancel()``, ``asyncio.timeout``, a TaskGroup failing). The rules
(DESIGN.md points here):

1. **A cancelled request either completes or leaves no trace.** While it has changed nothing (it waits for the
   metadata lock, for an allocation in flight, for a free I/O slot, for a read to come back), a cancellation
   stops it at once: it raises ``CancelledError`` and nothing happened. From its first change on (a write handed
   to an I/O engine, an allocation registered, a metadata lock taken) it is *committed*: it runs to its end, and
   the cancellation is raised when it returns (its result is dropped). A multi-cluster write is therefore never
   left half done by a cancellation, and metadata is never left half updated.
2. **Cleanup that must run is synchronous, or runs inside a committed request**, so it always runs to the end: a
   second cancellation is absorbed like the first.
3. **No lock is released by hand.** :class:`Lock` is used with ``async with`` only; a section holding it is
   committed, so it is never left halfway, and nothing waits for anything else while holding it except I/O.
4. **Kernel I/O is never abandoned.** An engine waits for the kernel to complete a request before it returns or
   raises, even when cancelled: a buffer, and the cluster it targets, stay owned until then, and the request
   stays in flight for ``drain()`` until then.
5. **``close()``** cancelled while it waits for requests in flight raises and leaves the disk open (close it
   again); once they have drained, the flush and the closing of the nodes run to the end. It never reports the
   disk closed with acknowledged writes lost. A disk never closed gives a ``ResourceWarning``.
6. **Cancellations are counted apart from errors** (``OpStatistics.cancelled``).

The mechanism: a *scope* per request (``enter``/``leave``, opened by BlockBackend around each request, by
the file node around each of its requests and by :class:`Lock` when there is none). ``commit`` marks the
scope committed. Every wait that can happen inside a request goes through ``wait`` / ``wait_event`` /
:class:`Lock` (or, for kernel I/O, the engines' own completion waits, which use ``deferred``): uncommitted, a
cancellation propagates; committed, it is recorded on the scope and the wait goes on; ``leave`` raises it.

A scope belongs to the task that opened it. Tasks copy their creator's context, so a task created inside a request
would share the request's scope: the library never creates one there (its background tasks start from fresh
contexts). Nested scopes are one scope: the outermost raises. Everything here is touched from the event loop's
thread only.
"""

from __future__ import annotations

import asyncio
import contextvars
import time
from asyncio import CancelledError
from dataclasses import dataclass
from typing import TypeVar

__all__ = [
    "CancelledError",
    "Lock",
    "LockStatistics",
    "Scope",
    "commit",
    "committed",
    "deferred",
    "enter",
    "leave",
    "wait",
    "wait_event",
]

T = TypeVar("T")


class Scope:
    """One request's cancellation state: ``committed`` (it has changed something), ``cancelled`` (a
    cancellation arrived after that and waits for ``leave``)."""

    __slots__ = ("cancelled", "committed")

    def __init__(self) -> None:
        self.committed = False
        self.cancelled = False


_current: contextvars.ContextVar[Scope | None] = contextvars.ContextVar("aioblock_cancel_scope", default=None)
_current_task = asyncio.current_task


def enter() -> tuple[Scope, contextvars.Token[Scope | None] | None]:
    """Open a scope for a request (the current one when a request is already in progress). Pass the result to
    ``leave`` in a ``finally``."""
    s = _current.get()
    if s is not None:
        return s, None
    s = Scope()
    return s, _current.set(s)


def leave(scope: Scope, token: contextvars.Token[Scope | None] | None) -> None:
    """Close what ``enter`` opened; for the outermost scope, raise the cancellation it deferred (if any)."""
    if token is None:
        return
    _current.reset(token)
    if scope.cancelled:
        raise CancelledError("cancelled while the request was committed; it completed first")


def commit() -> None:
    """The current request is about to change something: from now on it runs to its end (rule 1)."""
    s = _current.get()
    if s is not None:
        s.committed = True


def committed() -> bool:
    """Whether the current request has committed (its waits must not be interrupted)."""
    s = _current.get()
    return s is not None and s.committed


def deferred() -> bool:
    """In an ``except CancelledError`` handler: True if the current request has committed, in which case the
    cancellation is recorded for ``leave`` and the handler must go on with the work; False if it must
    propagate."""
    s = _current.get()
    if s is None or not s.committed:
        return False
    s.cancelled = True
    return True


async def wait(fut: asyncio.Future[T]) -> T:
    """Wait for a future that someone else resolves. Uncommitted: a plain await (a cancellation cancels ``fut``,
    which its owner must treat as a waiter gone). Committed: a cancellation is deferred and the wait goes on."""
    if not committed():
        return await fut
    while True:
        try:
            return await asyncio.shield(fut)
        except CancelledError:
            if fut.cancelled() or not deferred():
                raise


async def wait_event(event: asyncio.Event) -> None:
    """``event.wait()`` under the same rule as ``wait``."""
    while True:
        try:
            await event.wait()
            return
        except CancelledError:
            if not deferred():
                raise


@dataclass(frozen=True, slots=True)
class LockStatistics:
    """Counters of one :class:`Lock`: acquisitions, how many had to wait, and the time spent waiting."""

    acquired: int
    waited: int
    wait_ns: int

    def to_dict(self) -> dict[str, int]:
        return {"acquired": self.acquired, "waited": self.waited, "wait_ns": self.wait_ns}


class Lock:
    """A metadata lock (QEMU's CoMutex ``s->lock``) with the cancellation rules built in.

    Waiting for it may be cancelled while the request has not committed (nothing happened). Once held, the
    section is committed: a cancellation arriving while it runs is raised only after the lock is released, so
    the section always runs to its end and the lock is released exactly once, by the task that took it. A
    request that has already committed waits for the lock without being interrupted. Use it with ``async with``
    only; it is not reentrant.

    ``owner`` is the task holding it, for diagnostics (None while it is held by a request's first step, which
    a frontend may run outside a task: ublk's queue.py); ``locked`` asks the lock itself."""

    __slots__ = ("_acquired", "_lock", "_scope", "_token", "_wait_ns", "_waited", "_waiting", "owner")

    def __init__(self) -> None:
        self._lock = asyncio.Lock()
        self.owner: asyncio.Task[object] | None = None
        self._scope: Scope | None = None
        self._token: contextvars.Token[Scope | None] | None = None
        self._waiting = 0                 # tasks inside __aenter__, not yet holding the lock
        self._acquired = 0
        self._waited = 0
        self._wait_ns = 0

    def locked(self) -> bool:
        """Whether a task holds the lock: a locked section is in progress (the lock-free fast paths of a
        driver run only when none is)."""
        return self._lock.locked()

    def statistics(self) -> LockStatistics:
        return LockStatistics(self._acquired, self._waited, self._wait_ns)

    async def __aenter__(self) -> None:
        lock = self._lock
        contended = lock.locked() or self._waiting > 0
        t0 = time.perf_counter_ns() if contended else 0
        self._waiting += 1
        try:
            if committed():
                # asyncio.Lock may suspend even when it is not locked (a released waiter has not run yet): a
                # committed request must not be interrupted at any of those suspensions
                while True:
                    try:
                        await lock.acquire()
                        break
                    except CancelledError:
                        if not deferred():
                            raise
            else:
                await lock.acquire()
        finally:
            self._waiting -= 1
        if contended:
            self._waited += 1
            self._wait_ns += time.perf_counter_ns() - t0
        assert self._scope is None, "metadata lock held twice"
        self.owner = _current_task()
        self._acquired += 1
        scope, token = enter()
        scope.committed = True
        self._scope, self._token = scope, token

    async def __aexit__(self, *exc_info: object) -> None:
        scope, token = self._scope, self._token
        self._scope = self._token = None
        self.owner = None
        self._lock.release()
        assert scope is not None
        leave(scope, token)
