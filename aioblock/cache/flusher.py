"""The background flusher: batched write-back of a driver's dirty metadata, and the periodic idle clean.

A format driver owns one :class:`Flusher`. Whenever metadata becomes dirty the driver (usually through
``SliceCache.on_dirty``) calls ``notify``; once no notify has come for ``delay`` seconds (the image is idle), or
at the latest ``max_age`` seconds after the first one, the flusher runs the driver's full ordered write-back
(``flush_fn``: caches in dependency order, then a sync) with the driver's metadata lock held. Every notify that
arrives before that flush starts is served by it, so a burst of writes costs one flush, and a busy image is not
stalled by write-back (the flush holds the lock through its syncs) more than once per ``max_age``.

Idleness is checked without a clock read per notify: ``notify`` only sets a flag, and the timer, armed for
``delay``, re-arms itself while the flag was set during the last period. So the flush comes between ``delay``
and ``2 * delay`` after the last notify.

Ownership: the flusher's timers and its task are created by ``notify`` (and by ``__init__`` for the clean
timer) and never outlive ``aclose``. Suspension: ``notify`` and ``take_error`` are sync and never suspend
(safe with the metadata lock held, and from sync code running in the loop); ``aclose`` suspends. Timer callbacks
and the task run in a fresh ``contextvars.Context``, so they never inherit context-tracked state (such as the
locks a notifying task holds); each gets a new, empty one.

Errors: a failing background flush never reaches the loop's exception handler; it is kept in ``error`` until
``take_error``, and the driver reports it (e.g. from its next FLUSH request). The dirty slices stay dirty and
are retried by the next flush.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
from collections.abc import Awaitable, Callable

__all__ = ["Flusher"]


class Flusher:
    """Background write-back task owned by a driver.

    ``flush_fn``: the owner's full ordered write-back; the flusher holds ``lock`` (the owner's metadata lock)
    around each call. ``delay``: idle seconds (no ``notify``) before the flush; ``max_age``: seconds from the
    first ``notify`` after which the flush comes even if notifies go on (default ``10 * delay``).
    ``clean_fn``: called synchronously, with no lock, every ``clean_interval`` seconds when that is > 0 (qcow2's
    cache-clean-interval: e.g. ``SliceCache.shrink_idle`` of each cache); then the flusher must be created in
    the running loop.

    State (touched only from the loop's thread; no lock needed since nothing here suspends between a check
    and its update): ``_timer`` the pending delayed flush, first armed at loop time ``_since`` (for
    ``max_age``); ``_active`` a notify came since the timer was (re-)armed; ``_task`` the flush task while it
    runs, waiting for the lock or flushing; ``_flushing`` True while ``flush_fn`` runs (the task must not be
    cancelled then); ``_again`` a delay ran out while the task was flushing: flush once more right after.
    ``runs``: calls of ``flush_fn`` completed by the background task, successful or not.
    """

    def __init__(self, lock: contextlib.AbstractAsyncContextManager[object], flush_fn: Callable[[], Awaitable[None]],
                 *, delay: float = 0.5, max_age: float | None = None, clean_fn: Callable[[], object] | None = None,
                 clean_interval: float = 0.0) -> None:
        if delay < 0:
            raise ValueError(f"flush delay must not be negative, not {delay}")
        max_age = 10 * delay if max_age is None else max_age
        if max_age < delay:
            raise ValueError(f"flush max_age must be at least the delay ({delay}), not {max_age}")
        if clean_interval < 0:
            raise ValueError(f"clean interval must not be negative, not {clean_interval}")
        self.runs = 0
        self._lock = lock
        self._flush_fn = flush_fn
        self._delay = delay
        self._max_age = max_age
        self._since = 0.0
        self._active = False
        self._clean_fn = clean_fn
        self._clean_interval = clean_interval
        self._timer: asyncio.TimerHandle | None = None
        self._task: asyncio.Task[None] | None = None
        self._flushing = False
        self._again = False
        self._error: BaseException | None = None
        self._closed = False
        self._clean_timer: asyncio.TimerHandle | None = None
        if clean_fn is not None and clean_interval > 0:
            self._schedule_clean(asyncio.get_running_loop())

    @property
    def error(self) -> BaseException | None:
        """The last error of a background flush (or of ``clean_fn``), kept until ``take_error``."""
        return self._error

    def take_error(self) -> BaseException | None:
        """Return the stored error and forget it."""
        err, self._error = self._error, None
        return err

    def notify(self) -> None:
        """Something became dirty: flush once idle for ``delay`` seconds (or ``max_age`` from now).

        While a delayed flush is pending this only records activity (cheap: drivers call it on every
        metadata change). No-op after ``aclose`` and while the flush task waits for the lock (it has not
        looked at the caches yet). While the task is flushing, a new delayed flush is scheduled: what became
        dirty meanwhile may have been missed. Must be called from the loop's thread."""
        if self._timer is not None:
            self._active = True
            return
        if self._closed or (self._task is not None and not self._flushing):
            return
        loop = asyncio.get_running_loop()
        self._since = loop.time()
        self._active = False
        self._timer = loop.call_later(self._delay, self._on_timer, context=contextvars.Context())

    def _on_timer(self) -> None:
        self._timer = None
        if self._closed:
            return
        loop = asyncio.get_running_loop()
        if self._active and loop.time() - self._since + self._delay <= self._max_age:
            self._active = False        # still busy: look again after another idle period
            self._timer = loop.call_later(self._delay, self._on_timer, context=contextvars.Context())
            return
        if self._task is not None:
            # Flushing: flush again right after. Still waiting for the lock: that flush serves this too.
            self._again = self._again or self._flushing
            return
        self._task = loop.create_task(self._run(), name="aioblock-flusher", context=contextvars.Context())

    async def _run(self) -> None:
        """Flush until no delay ran out during the last flush. Never ends with an exception but cancellation."""
        try:
            while True:
                self._again = False
                async with self._lock:
                    self._flushing = True
                    try:
                        await self._flush_fn()
                    except Exception as exc:
                        self._error = exc
                    finally:
                        self._flushing = False
                    self.runs += 1
                if not self._again or self._closed:
                    return
        finally:
            self._task = None

    def _schedule_clean(self, loop: asyncio.AbstractEventLoop) -> None:
        self._clean_timer = loop.call_later(self._clean_interval, self._on_clean, context=contextvars.Context())

    def _on_clean(self) -> None:
        self._clean_timer = None
        if self._closed or self._clean_fn is None:
            return
        try:
            self._clean_fn()
        except Exception as exc:
            self._error = exc
        self._schedule_clean(asyncio.get_running_loop())

    async def aclose(self) -> None:
        """Stop: cancel the timers; cancel the task if it is still waiting for the lock, or wait for the flush
        it is running (never cancelled mid-write). Does not flush what is still dirty: the owner does that
        after ``aclose``. Idempotent; if the caller is cancelled while waiting, the flush goes on and a later
        ``aclose`` waits for it again. May be called with the lock held: then no flush can be running."""
        self._closed = True
        for timer in (self._timer, self._clean_timer):
            if timer is not None:
                timer.cancel()
        self._timer = self._clean_timer = None
        task = self._task
        if task is None:
            return
        if not self._flushing:
            task.cancel()
        # asyncio.wait neither raises the task's outcome nor cancels the task if our caller is cancelled.
        await asyncio.wait([task])
