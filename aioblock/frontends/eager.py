"""Start a request at once, and make it a task only if it has to wait.

A frontend serves each request in a coroutine. Most of them never wait: a page-cache read through the default
engine completes inside its first step. A task per request then costs more than the request's own work, in
creating it (plus registering it in asyncio's task set), in a loop iteration before it starts and in a
hand-off when it ends. :func:`start` runs the coroutine's first step at once, in a context of its own, and only
when that step suspends does it wrap the rest in a task (Python 3.12's eager tasks do the same; this works
on 3.11 too, and creates no task at all for a request that does not wait).

During the first step the current task is the caller's, none when a frontend starts requests from a loop
callback as ublk's queue does (``asyncio.current_task()`` is None): code below the frontend must not depend on
one. Nothing in aioblock does: the metadata lock asks the lock whether it is held, and the default engine's
fairness counts a first step outside a task as a run of its own.
"""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Coroutine, Generator
from typing import Any

__all__ = ["start"]

_copy_context = contextvars.copy_context
_HANDED = object()            # what _Resumed holds once it has given the task its first wait


def start(loop: asyncio.AbstractEventLoop, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None] | None:
    """Run ``coro`` until it first suspends; return None if it finished there, else the task that runs the rest
    (in the same context). Exceptions of the first step propagate to the caller."""
    ctx = _copy_context()
    try:
        waiting_for = ctx.run(coro.send, None)
    except StopIteration:
        return None
    return loop.create_task(_Resumed(coro, waiting_for), context=ctx)


class _Resumed(Coroutine[Any, Any, None]):
    """A coroutine suspended outside a task, as a coroutine a task can run: its first ``send`` gives the task
    what the coroutine is waiting for (a future, or None for a bare yield); everything after goes straight to
    the coroutine, so results, exceptions and cancellation reach it as if a task had run it from the start
    (a cancellation before the first ``send`` too: it is thrown into the coroutine where it waits)."""

    __slots__ = ("_coro", "_waiting_for")

    def __init__(self, coro: Coroutine[Any, Any, None], waiting_for: Any) -> None:
        self._coro, self._waiting_for = coro, waiting_for

    def send(self, value: Any) -> Any:
        waiting_for = self._waiting_for
        if waiting_for is not _HANDED:
            self._waiting_for = _HANDED
            return waiting_for
        return self._coro.send(value)

    def throw(self, typ: Any, val: Any = None, tb: Any = None) -> Any:
        waiting_for, self._waiting_for = self._waiting_for, _HANDED
        if isinstance(typ, asyncio.CancelledError) and isinstance(waiting_for, asyncio.Future):
            waiting_for.cancel()                # as Task.cancel() does to the future its coroutine waits for
        if val is None and tb is None:
            return self._coro.throw(typ)
        return self._coro.throw(typ, val, tb)

    def close(self) -> None:
        self._coro.close()

    def __await__(self) -> Generator[Any, None, None]:
        raise TypeError("a resumed request is run by its task, not awaited")
