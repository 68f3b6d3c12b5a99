"""One ublk queue: a thread that owns the queue's kernel channel, and the loop side that serves its requests.

The kernel binds a queue to the thread that fetched its tags: that thread must send every later command and
wait for completions in ``io_uring_enter``. The BlockBackend belongs to one event loop. So each queue has a
thread that does nothing but move requests between the two, in batches:

    kernel ──CQEs──> queue thread ──call_soon_threadsafe(batch)──> loop: each request started at once
    kernel <─COMMIT_AND_FETCH── queue thread <──eventfd wake (once per loop tick)── loop: results

- Thread to loop: every ``wait`` returns all the completions the kernel had ready; their descriptors are read
  and the whole batch goes to the loop in one ``call_soon_threadsafe`` (one write to the loop's self-pipe).
- Loop to thread: a finished request appends ``(tag, result)`` to a deque; the first one in a loop tick
  schedules one eventfd write at the end of the tick, which completes the thread's pending eventfd read; the
  thread then commits everything in the deque with one ``io_uring_enter``.
- Requests: each one's coroutine runs its first step inside the batch's callback (:mod:`..eager`); a page-cache
  hit completes there, and only a request that waits (for the disk, a lock, an allocation) becomes a task.
- Buffers: one anonymous mapping of ``depth * max_io`` bytes per queue (page-aligned, touched only where
  used); tag ``t`` owns ``[t * max_io, (t + 1) * max_io)``. In the kernel's copy mode, the driver copies a
  WRITE's data into it before the fetch completes and a READ's data out of it when the commit arrives.

Cost per request (one queue, hot raw image, the simulated kernel of :mod:`aioblock.testing.ublk`): see
benchmarks/README.md, "ublk server path". The thread's share is a descriptor unpack and an SQE fill; the loop's
is a coroutine, the backend request and an append.

Lifetime: the thread runs until every tag has ended in the kernel (each tag's last command completed with
-ENODEV, as STOP_DEV does to all of them) or until :meth:`Queue.abandon`; it then closes its channel (which
cancels what is still pending) and resolves :attr:`Queue.stopped`. Tags being served when the thread ends
are dropped: their results go nowhere.
"""

from __future__ import annotations

import asyncio
import ctypes
import errno as _errno
import logging
import mmap
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from ...backend import BlockBackend
from ...errors import AioblockError
from .. import eager
from . import uapi
from .kernel import DeviceChannel, QueueChannel

__all__ = ["Queue", "QueueStatistics"]

_log = logging.getLogger("aioblock.ublk")


@dataclass
class QueueStatistics:
    """Counters of one queue. ``batches``: thread-to-loop hand-offs (``requests / batches`` is the batch);
    ``wakes``: loop-to-thread hand-offs; ``ops``: requests served per operation; ``errors``: requests that
    completed with a negative errno."""

    q_id: int
    requests: int = 0
    batches: int = 0
    max_batch: int = 0
    wakes: int = 0
    errors: int = 0
    in_flight: int = 0
    ops: dict[str, int] = field(default_factory=dict)


class Queue:
    """One queue of a device: its thread, buffers and in-flight requests (see the module docstring)."""

    def __init__(self, device: DeviceChannel, disk: BlockBackend, q_id: int, depth: int, max_io: int,
                 ioctl: bool, name: str) -> None:
        self.q_id, self.depth, self.max_io = q_id, depth, max_io
        self._device, self._disk, self._ioctl = device, disk, ioctl
        self._loop = asyncio.get_running_loop()
        self._buffers = mmap.mmap(-1, depth * max_io)
        self._pin: Any = (ctypes.c_char * (depth * max_io)).from_buffer(self._buffers)
        base = ctypes.addressof(self._pin)
        self._addrs = [base + tag * max_io for tag in range(depth)]
        whole = memoryview(self._buffers)
        self._views = [whole[tag * max_io:(tag + 1) * max_io] for tag in range(depth)]
        self._channel: QueueChannel | None = None
        self._done: deque[tuple[int, int]] = deque()        # loop -> thread: (tag, result)
        self._wake_scheduled = False
        self._abandoned = False
        self._tasks: list[asyncio.Task[None] | None] = [None] * depth
        self.ready: asyncio.Future[None] = self._loop.create_future()
        self.stopped: asyncio.Future[None] = self._loop.create_future()
        self.error: int = 0                                 # first unexpected negative result of a command
        self.failure: BaseException | None = None           # why the thread ended early (a failed ring, a bug)
        self._stats = QueueStatistics(q_id)
        self._op_counts = [0] * 6
        self._thread = threading.Thread(target=self._run, name=f"{name}-q{q_id}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    # ---- the queue thread -------------------------------------------------------------------------------------

    def _run(self) -> None:
        loop = self._loop
        try:
            channel = self._device.queue(self.q_id, self.depth, self._ioctl)
        except BaseException as exc:
            loop.call_soon_threadsafe(_settle, self.ready, exc)
            loop.call_soon_threadsafe(_settle, self.stopped, None)
            return
        self._channel = channel
        try:
            self._serve_kernel(channel)
        except BaseException as exc:                       # a bug or a failed ring: end the queue, say why
            _log.debug("ublk queue %d failed", self.q_id, exc_info=True)
            self.failure = exc
            loop.call_soon_threadsafe(_settle, self.ready, exc)
        finally:
            channel.close()
            self._release_buffers_later()
            loop.call_soon_threadsafe(_settle, self.stopped, None)

    def _serve_kernel(self, channel: QueueChannel) -> None:
        loop, addrs, done = self._loop, self._addrs, self._done
        batch: list[tuple[int, int, int, int]] = []
        live = self.depth                                   # tags whose commands have not ended
        descriptor = channel.descriptor

        def handle(tag: int, res: int) -> None:
            nonlocal live
            if res == uapi.IO_RES_OK:
                op_flags, nr_sectors, start = descriptor(tag)
                batch.append((tag, op_flags, nr_sectors, start))
            else:                                           # -ENODEV: aborted (stop); anything else: refused
                live -= 1
                if res != uapi.IO_RES_ABORT and not self.error:
                    self.error = res

        for tag in range(self.depth):
            channel.fetch(tag, addrs[tag])
        channel.wait(handle, block=False)                   # a FETCH the kernel refuses fails at once
        if self.error:
            raise OSError(-self.error, f"ublk FETCH_REQ on queue {self.q_id}: {_strerror(self.error)}")
        loop.call_soon_threadsafe(_settle, self.ready, None)
        while live and not self._abandoned:
            if batch:
                loop.call_soon_threadsafe(self._dispatch, batch)
                batch = []
            while done:
                tag, result = done.popleft()
                channel.commit(tag, result, addrs[tag])
            channel.wait(handle)

    def abandon(self) -> None:
        """End the thread now, whatever the kernel still holds (teardown after a failed start, or a stop that
        the kernel does not complete). Thread-safe."""
        self._abandoned = True
        if self._channel is not None:
            self._channel.wake()

    def _release_buffers_later(self) -> None:
        def release() -> None:
            for view in self._views:
                view.release()
            self._pin = None
            self._buffers.close()
        self._loop.call_soon_threadsafe(self._release_when_idle, release)

    def _release_when_idle(self, release: Any) -> None:
        if any(self._tasks):                                # requests still writing into the buffers
            self._loop.call_later(0.01, self._release_when_idle, release)
        else:
            release()

    # ---- the loop side ----------------------------------------------------------------------------------------

    def _dispatch(self, batch: list[tuple[int, int, int, int]]) -> None:
        s = self._stats
        s.batches += 1
        s.requests += len(batch)
        if len(batch) > s.max_batch:
            s.max_batch = len(batch)
        loop, serve, tasks = self._loop, self._serve, self._tasks
        for tag, op_flags, nr_sectors, start in batch:
            tasks[tag] = eager.start(loop, serve(tag, op_flags, nr_sectors, start))

    async def _serve(self, tag: int, op_flags: int, nr_sectors: int, start: int) -> None:
        """Serve one request; its result (bytes done, or -errno) goes back to the thread. A failure fails this
        request alone."""
        op = op_flags & 0xFF
        offset, length = start << 9, nr_sectors << 9
        disk = self._disk
        try:
            if op == uapi.OP_READ:
                res = self._check_length(length) or length
                if res > 0:
                    await disk.readinto(offset, self._views[tag][:length])
            elif op == uapi.OP_WRITE:
                res = self._check_length(length) or length
                if res > 0:
                    await disk.write(offset, self._views[tag][:length], fua=bool(op_flags & uapi.IO_F_FUA))
            elif op == uapi.OP_FLUSH:
                await disk.flush()
                res = 0
            elif op == uapi.OP_DISCARD:
                await disk.discard(offset, length)
                res = 0
            elif op == uapi.OP_WRITE_ZEROES:
                await disk.write_zeroes(offset, length, may_unmap=not op_flags & uapi.IO_F_NOUNMAP,
                                        fua=bool(op_flags & uapi.IO_F_FUA))
                res = 0
            else:
                res = -_errno.EOPNOTSUPP
        except AioblockError as exc:
            res = -exc.errno
        except OSError as exc:
            res = -(exc.errno or _errno.EIO)
        except asyncio.CancelledError:
            self._complete(tag, op, -_errno.EIO)
            raise
        except Exception:
            _log.exception("ublk request %s %d+%d failed", uapi.OP_NAMES.get(op, op), offset, length)
            res = -_errno.EIO
        self._complete(tag, op, res)

    def _check_length(self, length: int) -> int:
        return -_errno.EINVAL if length > self.max_io else 0

    def _complete(self, tag: int, op: int, res: int) -> None:
        self._tasks[tag] = None
        if op < 6:
            self._op_counts[op] += 1
        if res < 0:
            self._stats.errors += 1
        self._done.append((tag, res))
        if not self._wake_scheduled:
            self._wake_scheduled = True
            self._loop.call_soon(self._wake)

    def _wake(self) -> None:
        self._wake_scheduled = False
        self._stats.wakes += 1
        if self._channel is not None:
            self._channel.wake()

    async def drain(self) -> None:
        """Wait for the requests being served (after the thread has ended: their results are dropped)."""
        tasks = [t for t in self._tasks if t is not None]
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    def cancel(self) -> None:
        for task in self._tasks:
            if task is not None:
                task.cancel()

    def statistics(self) -> QueueStatistics:
        s = self._stats
        ops = {uapi.OP_NAMES[op]: n for op, n in enumerate(self._op_counts) if n}
        return QueueStatistics(self.q_id, s.requests, s.batches, s.max_batch, s.wakes, s.errors,
                               sum(t is not None for t in self._tasks), ops)


def _settle(fut: asyncio.Future[None], exc: BaseException | None) -> None:
    if fut.done():
        return
    if exc is None:
        fut.set_result(None)
    else:
        fut.set_exception(exc)


def _strerror(res: int) -> str:
    import os

    return os.strerror(-res)
