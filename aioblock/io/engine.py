"""The I/O engine interface used by the ``file`` protocol node, and the two simple engines.

An engine performs positioned syscalls on a file descriptor for one event loop:

* ``sync``: the syscalls run directly in the event loop. Fastest for page-cache-hot data and tests; a slow
  disk blocks the loop.
* ``threads``: each syscall runs in the loop's default executor. Portable; a thread hop costs ~50-130 us per
  request.
* ``uring`` (:mod:`aioblock.io.uring`): io_uring; everything queued during one loop tick is submitted at once.
* ``hybrid`` (:mod:`aioblock.io.hybrid`), the default for page-cache I/O: inline where the kernel can answer
  without blocking, io_uring (or threads) where it cannot.

Engines return byte counts like the syscalls (short reads at end of file are the caller's business) and raise
``OSError`` on failure; the file node turns those into :class:`aioblock.errors.BlockIOError`.

Cancellation (:mod:`aioblock.cancellation`, rule 4): a syscall that has started is waited for even when the caller
is cancelled, so its buffer is never touched after the engine returned; then the engine raises
``CancelledError``, or returns the result when the request has committed (the cancellation comes at its end).
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import ctypes
import ctypes.util
import os
from collections.abc import Callable
from typing import Any, ClassVar, TypeVar

from .. import cancellation

__all__ = ["ENGINES", "Engine", "SyncEngine", "ThreadsEngine", "fallocate", "in_thread", "libc"]

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10

libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
libc.fallocate.restype = ctypes.c_int
libc.fstatfs.argtypes = [ctypes.c_int, ctypes.c_char_p]
libc.fstatfs.restype = ctypes.c_int


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """fallocate(2) with a mode (Python's os module only has posix_fallocate). Raises OSError."""
    if libc.fallocate(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


T = TypeVar("T")


class Engine(abc.ABC):
    """Positioned I/O on file descriptors for one event loop. Owned by one file node; ``aclose`` is
    idempotent and waits for nothing the engine has not finished."""

    name: ClassVar[str]

    @abc.abstractmethod
    async def pread(self, fd: int, buf: memoryview, offset: int) -> int: ...

    @abc.abstractmethod
    async def pwrite(self, fd: int, buf: memoryview, offset: int) -> int: ...

    @abc.abstractmethod
    async def fsync(self, fd: int) -> None:
        """fdatasync(2): data and the metadata needed to read it back."""

    @abc.abstractmethod
    async def fallocate(self, fd: int, mode: int, offset: int, length: int) -> None: ...

    def statistics(self) -> dict[str, Any]:
        """The engine's counters (how requests were served), as plain data."""
        return {"name": self.name}

    async def aclose(self) -> None:
        """Release the engine's resources."""


class SyncEngine(Engine):
    """Syscalls straight from the event loop: no hop, no batching; blocks the loop while the disk works."""

    name = "sync"

    async def pread(self, fd: int, buf: memoryview, offset: int) -> int:
        return os.preadv(fd, [buf], offset)

    async def pwrite(self, fd: int, buf: memoryview, offset: int) -> int:
        return os.pwritev(fd, [buf], offset)

    async def fsync(self, fd: int) -> None:
        os.fdatasync(fd)

    async def fallocate(self, fd: int, mode: int, offset: int, length: int) -> None:
        fallocate(fd, mode, offset, length)


async def in_thread(fn: Callable[..., T], *args: object) -> T:
    """``fn(*args)`` in the loop's default executor. A cancelled caller still waits for the thread to finish
    (the module docstring), which is why this calls ``run_in_executor`` itself instead of going through a
    wrapper such as aiofiles': those give the caller no way to wait for a thread it stopped waiting for."""
    fut = asyncio.get_running_loop().run_in_executor(None, fn, *args)
    try:
        return await asyncio.shield(fut)
    except asyncio.CancelledError:
        pass
    while not fut.done():               # still in its thread: wait until it is done with the buffer
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait([fut])
    if not cancellation.deferred():
        raise asyncio.CancelledError
    return fut.result()


class ThreadsEngine(Engine):
    """Each syscall in the loop's default thread pool (``in_thread``): the loop never blocks on the disk."""

    name = "threads"

    async def pread(self, fd: int, buf: memoryview, offset: int) -> int:
        return await in_thread(os.preadv, fd, [buf], offset)

    async def pwrite(self, fd: int, buf: memoryview, offset: int) -> int:
        return await in_thread(os.pwritev, fd, [buf], offset)

    async def fsync(self, fd: int) -> None:
        await in_thread(os.fdatasync, fd)

    async def fallocate(self, fd: int, mode: int, offset: int, length: int) -> None:
        await in_thread(fallocate, fd, mode, offset, length)


#: Engine names (the default is ``hybrid`` over ``uring``; see README "I/O engines").
ENGINES = ("hybrid", "uring", "threads", "sync")
