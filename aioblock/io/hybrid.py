"""The default engine for page-cache I/O: each request inline when the kernel can serve it without blocking,
handed to an asynchronous engine (io_uring, or threads where io_uring is unavailable) when it cannot.

Why (benchmarks/README.md, "Which engine should be the default"): a page-cache hit costs ~1 us as a plain
syscall, less than io_uring's future, wake-up and reap (~3-5 us in Python), and far less than a thread hop; but a
plain syscall on cold data blocks the event loop for the whole disk access. So, per request:

* **Reads**: ``preadv2(RWF_NOWAIT)``. The kernel copies what is cached and answers EAGAIN instead of blocking
  on anything else; on EAGAIN (or a short read, whose rest then comes here again) the request goes to the
  fallback engine, unless SEEK_DATA shows the range is a hole of a sparse file (then it reads as zeroes
  inline: no disk access to wait for). On memory filesystems (tmpfs, ramfs), which reject RWF_NOWAIT with
  EOPNOTSUPP but never wait for a disk, reads are plain ``preadv``. Other filesystems without RWF_NOWAIT
  always use the fallback.
* **Writes**: Linux has no RWF_NOWAIT for buffered writes on most filesystems (EOPNOTSUPP on ext4 and tmpfs
  here), and io_uring punts them to io-wq workers that serialise on the inode lock (0.3-0.6x of inline). A
  buffered write normally only copies into the page cache, so it runs inline, unless the kernel is about to
  throttle writers: when dirty and writeback pages exceed ``DIRTY_NEAR`` of the point where
  balance_dirty_pages starts pausing writers (``(dirty threshold + background threshold) / 2``, from
  /proc/vmstat and the vm.dirty_* sysctls: ``dirty_headroom``), writes go to the fallback engine, whose
  workers take the pauses instead of the loop. The headroom is read again every ``DIRTY_REFRESH_S``, or
  sooner (at most every ``DIRTY_REFRESH_MIN_S``) once the engine's own inline writes have used it up.
  Inline writes are also timed: one slower than ``SLOW_WRITE_NS`` (a pause the global counters did not
  predict: a cgroup's limit, a journal wait) sends that file's writes to the fallback for ``HOLDOFF_S``
  (doubling while they stay slow, up to ``HOLDOFF_MAX_S``).
  Memory filesystems always write inline.
* Large requests (``uring.OFFLOAD_MIN`` bytes or more): their copy (~70 us per hot MiB) is worth running on
  other cores when several are in flight, and not worth a hand-off when one is. So a large request runs
  inline (by the rules above) only in a **lone stream**: no other large request in progress, and none
  started while another was in the last ``LARGE_CONCURRENT_S``; at most one per loop iteration, and a task
  whose large request ran inline yields once before its next one. Otherwise it goes to the fallback, which
  flags reads for io-wq's workers (uring.py, ``offload``). Depth 1: 1 MiB reads 0.60-0.76x of qemu-img's
  thread pool through the ring, 1.5-1.7x inline (benchmarks/results/large-2026-12-03). Depth 32: inline for
  the first request of each wave of completions delayed the submission of the other 31 behind its copy
  (0.44-0.61x against 0.66-0.82x with all of them on the ring).
* Large writes that do not run inline go to a thread pool (``large_writes``, the ``threads`` engine), not to
  io_uring: io-wq serves large buffered writes on ext4 far slower than a thread's ``pwritev`` (2 MiB writes at
  depth 8 into a new file: 1.74 s through the ring, 0.19 s in threads, 0.13 s for qemu-img's thread pool;
  256 KiB at depth 32: 1.4-3.1 s against 0.4-0.9 s), while small ones are cheaper through the ring (4 KiB:
  0.13 s against 0.33 s). Large reads stay on the ring (1 MiB at depth 8: 0.25 s against 0.41 s).
* Flushes and fallocate always go to the fallback engine: their wait is worth moving off the loop.

Fairness: a task whose requests all complete inline never suspends, so without care one task would run every
request of a depth-32 workload while the other tasks wait, and the loop would serve nothing else meanwhile.
After ``YIELD_EVERY`` inline completions in a row, and once one loop iteration has spent ``TICK_BUDGET_NS``
on inline requests, the engine yields to the loop before the next one (before the syscall, so that nothing
has happened if the request is cancelled there; inside a committed request the cancellation is deferred,
cancellation.py rule 1).

O_DIRECT files on disks do not use this engine (``make_engine`` gives them the fallback directly): their
requests always wait for the device. On tmpfs O_DIRECT is a plain copy, served inline like any tmpfs request
(through io_uring, tmpfs requests are punted to io-wq workers: 0.4-0.6x of qemu-img's thread pool).

Cancellation: an inline syscall cannot be interrupted, so rule 4 (kernel I/O is never abandoned) holds
trivially; requests handed on follow the fallback engine's rules.

State is touched from the event loop's thread only.
"""

from __future__ import annotations

import asyncio
import ctypes
import errno as _errno
import os
import re
import time
from collections.abc import Coroutine
from typing import Any, ClassVar

from .. import cancellation
from .engine import Engine, ThreadsEngine, libc
from .uring import OFFLOAD_MIN

__all__ = ["DIRTY_NEAR", "DIRTY_REFRESH_MIN_S", "DIRTY_REFRESH_S", "HOLDOFF_MAX_S", "HOLDOFF_S", "LARGE_CONCURRENT_S",
           "SLOW_WRITE_NS",
           "TICK_BUDGET_NS", "YIELD_EVERY", "HybridEngine", "dirty_headroom", "on_memory_fs"]

#: an inline write slower than this (ns, plus 0.5 ns per byte for the copy) means the kernel blocked: later
#: writes of the file go to the fallback
SLOW_WRITE_NS = 500_000
#: for this long after a slow write (s); doubled after each slow write that follows, up to HOLDOFF_MAX_S
HOLDOFF_S = 0.1
HOLDOFF_MAX_S = 3.2
#: inline completions in a row before the engine yields to the event loop once, and the inline time one loop
#: iteration may spend before every task with an inline request yields first. Each loop iteration runs up to
#: YIELD_EVERY requests of every ready task, so without the time budget a depth-32 workload of 64 KiB requests
#: makes iterations of ~3 ms; with it, timers run within ~1 ms at p99 (a 1 ms ticker task next to
#: ``aioblock bench -d 32``, raw, hot: 4 KiB reads 263k ops/s, ticker late p99 0.9 ms; 64 KiB reads 176k,
#: 1.2 ms; without yielding at all: 340k ops/s, one task doing every request, the ticker starved).
YIELD_EVERY = 8
TICK_BUDGET_NS = 500_000
#: writes go to the fallback above this fraction of the dirty-page throttling point
DIRTY_NEAR = 0.75
DIRTY_REFRESH_S = 0.02
#: ... and at most this often when the engine's own writes used the headroom up (a reading costs ~60-90 us)
DIRTY_REFRESH_MIN_S = 0.002
#: a large request that starts while another is in progress marks them concurrent for this long (s): until
#: then none runs inline (the module docstring)
LARGE_CONCURRENT_S = 0.05

_current_task = asyncio.current_task
_perf_ns = time.perf_counter_ns
_MEMORY_FS = (0x01021994, 0x858458F6)       # TMPFS_MAGIC, RAMFS_MAGIC
_RWF_NOWAIT: int = getattr(os, "RWF_NOWAIT", 0)

# per-file modes
_READ_NOWAIT, _READ_PLAIN, _READ_FALLBACK = 0, 1, 2


class _FileState:
    """How one file descriptor's requests are served."""

    __slots__ = ("holdoff", "memory", "read_mode", "ring_writes_until")

    def __init__(self, memory: bool) -> None:
        self.memory = memory
        self.read_mode = _READ_NOWAIT if _RWF_NOWAIT else (_READ_PLAIN if memory else _READ_FALLBACK)
        self.ring_writes_until = 0.0        # time.monotonic() before which writes go to the fallback
        self.holdoff = HOLDOFF_S


_VMSTAT = re.compile(rb"^(nr_free_pages|nr_inactive_file|nr_active_file|nr_dirty|nr_writeback) (\d+)$", re.M)


def _sysctl(name: str) -> int:
    with open(f"/proc/sys/vm/{name}", "rb") as f:
        return int(f.read())


def dirty_headroom() -> int | None:
    """Bytes that can still be dirtied before dirty + writeback pages reach ``DIRTY_NEAR`` of the point where
    the kernel starts pausing buffered writers (mm/page-writeback.c's "freerun" ceiling, global limits only;
    negative when beyond it). None where /proc cannot tell (the write timing still catches pauses)."""
    try:
        with open("/proc/vmstat", "rb") as f:
            v = {k: int(n) for k, n in _VMSTAT.findall(f.read())}
        dirtyable = v[b"nr_free_pages"] + v[b"nr_inactive_file"] + v[b"nr_active_file"]
        page = os.sysconf("SC_PAGE_SIZE")
        dirty_bytes, bg_bytes = _sysctl("dirty_bytes"), _sysctl("dirty_background_bytes")
        thresh = dirty_bytes // page if dirty_bytes else dirtyable * _sysctl("dirty_ratio") // 100
        bg = bg_bytes // page if bg_bytes else dirtyable * _sysctl("dirty_background_ratio") // 100
        if bg >= thresh:
            bg = thresh // 2
        return int((DIRTY_NEAR * (thresh + bg) / 2 - v[b"nr_dirty"] - v[b"nr_writeback"]) * page)
    except (OSError, KeyError, ValueError):
        return None


def _hole_read(fd: int, buf: memoryview, offset: int) -> int | None:
    """Serve a read that lies wholly in a hole of a sparse file (or past its end) without I/O: zeroes, and the
    byte count a read would return. None when the range holds data (or the file system cannot tell). A hole's
    pages can be missing or held by readahead (RWF_NOWAIT answers EAGAIN) though no disk access is needed;
    this costs one or two syscalls instead of a trip through the ring (sequential 4 KiB reads of a sparse
    file at depth 64: 0.85 s through the ring, 0.23 s here, for 75,000 requests)."""
    n = len(buf)
    try:
        data = os.lseek(fd, offset, os.SEEK_DATA)
    except OSError as exc:
        if exc.errno != _errno.ENXIO:        # ENXIO: no data at or after offset
            return None
        n = max(0, min(n, os.fstat(fd).st_size - offset))
    else:
        if data < offset + n:
            return None
    buf[:n] = bytes(n)
    return n


def on_memory_fs(fd: int) -> bool:
    """Whether ``fd`` is on tmpfs or ramfs (fstatfs's f_type, the first field of struct statfs)."""
    buf = ctypes.create_string_buffer(256)
    if libc.fstatfs(fd, buf) != 0:
        return False
    return int.from_bytes(buf.raw[:ctypes.sizeof(ctypes.c_long)], "little") in _MEMORY_FS


class HybridEngine(Engine):
    """Inline syscalls where they cannot block, ``fallback`` where they might (the module docstring)."""

    name: ClassVar[str] = "hybrid"

    def __init__(self, fallback: Engine, large_writes: Engine | None = None) -> None:
        self.fallback = fallback
        self.large_writes = large_writes or ThreadsEngine()
        self._files: dict[int, _FileState] = {}
        self._loop = asyncio.get_running_loop()
        self._run = 0                        # inline completions in a row by task _runner, since it yielded
        self._runner: object = None
        self._tick_deadline = 0              # perf_counter_ns() when this loop iteration's budget ends; 0: none
        self._inline = 0
        self._handed_on = 0
        self._nowait_misses = 0
        self._holes = 0
        self._slow_writes = 0
        self._dirty_handoffs = 0
        self._yields = 0
        self._headroom = 0                     # bytes that may be dirtied inline before dirty_headroom() again
        self._dirty_checked = 0.0              # time.monotonic() of the last dirty_headroom()
        self._large_owner: object = None       # task whose large request ran inline in this loop iteration
        self._large_active = 0                 # large requests between their start and their end
        self._large_concurrent_until = 0.0     # time.monotonic() before which large requests count as concurrent

    def _state(self, fd: int) -> _FileState:
        st = self._files.get(fd)
        if st is None:
            st = self._files[fd] = _FileState(on_memory_fs(fd))
        return st

    def _must_yield(self) -> bool:
        """Before an inline request: whether the task has run ``YIELD_EVERY`` of them in a row (a task that
        suspended in between, e.g. waiting for an allocation, starts a new run) or the loop iteration's
        budget is spent."""
        task = _current_task(self._loop)
        if task is not self._runner or task is None:    # None: a request's first step, run outside a task
            self._runner = task
            self._run = 0
        return self._run >= YIELD_EVERY or self._over_budget()

    def _over_budget(self) -> bool:
        """Whether this loop iteration has spent ``TICK_BUDGET_NS`` on inline requests (then the caller yields).
        The budget opens with the iteration's first inline request and closes with a callback that runs in the
        next iteration."""
        now = _perf_ns()
        if not self._tick_deadline:
            self._tick_deadline = now + TICK_BUDGET_NS
            self._loop.call_soon(self._next_tick)
            return False
        return now >= self._tick_deadline

    def _next_tick(self) -> None:
        self._tick_deadline = 0

    async def _large_inline(self) -> bool:
        """Before a large request (counted in ``_large_active``): whether it runs inline (the module docstring).
        A task whose large request already ran inline in this iteration yields first, then asks again."""
        task = _current_task(self._loop)
        if self._large_owner is task:
            await self._yield()
        if (self._large_owner is not None or self._large_active > 1 or self._over_budget()
                or time.monotonic() < self._large_concurrent_until):
            return False
        self._large_owner = task
        self._loop.call_soon(self._next_large)
        return True

    def _next_large(self) -> None:
        self._large_owner = None

    async def _yield(self) -> None:
        self._run = 0
        self._yields += 1
        try:
            await asyncio.sleep(0)
        except asyncio.CancelledError:
            if not cancellation.deferred():
                raise

    async def pread(self, fd: int, buf: memoryview, offset: int) -> int:
        st = self._files.get(fd) or self._state(fd)
        if buf.nbytes >= OFFLOAD_MIN:
            return await self._large(self._pread_large(st, fd, buf, offset))
        if st.read_mode != _READ_FALLBACK:
            if self._must_yield():
                await self._yield()
            n = self._read_now(st, fd, buf, offset)
            if n is not None:
                return n
        self._handed_on += 1
        return await self.fallback.pread(fd, buf, offset)

    async def _pread_large(self, st: _FileState, fd: int, buf: memoryview, offset: int) -> int:
        if st.read_mode != _READ_FALLBACK and await self._large_inline():
            n = self._read_now(st, fd, buf, offset)
            if n is not None:
                return n
        self._handed_on += 1
        return await self.fallback.pread(fd, buf, offset)

    def _read_now(self, st: _FileState, fd: int, buf: memoryview, offset: int) -> int | None:
        """The inline read: bytes read, or None when the kernel would block (the caller hands it on)."""
        mode = st.read_mode
        try:
            n = os.preadv(fd, [buf], offset, _RWF_NOWAIT) if mode == _READ_NOWAIT else os.preadv(fd, [buf], offset)
        except BlockingIOError:
            self._nowait_misses += 1
            zeroes = _hole_read(fd, buf, offset)
            if zeroes is None:
                return None
            self._holes += 1
            self._run += 1
            return zeroes
        except OSError as exc:
            if exc.errno not in (_errno.EOPNOTSUPP, _errno.EINVAL) or mode != _READ_NOWAIT:
                raise
            st.read_mode = _READ_PLAIN if st.memory else _READ_FALLBACK     # no RWF_NOWAIT here
            return self._read_now(st, fd, buf, offset) if st.memory else None
        self._run += 1
        self._inline += 1
        return n

    async def pwrite(self, fd: int, buf: memoryview, offset: int) -> int:
        st = self._files.get(fd) or self._state(fd)
        if buf.nbytes >= OFFLOAD_MIN:
            return await self._large(self._pwrite_large(st, fd, buf, offset))
        if st.memory or self._inline_write_ok(st, buf.nbytes):
            if self._must_yield():
                await self._yield()
            return self._write_now(st, fd, buf, offset)
        self._handed_on += 1
        return await self.fallback.pwrite(fd, buf, offset)

    async def _pwrite_large(self, st: _FileState, fd: int, buf: memoryview, offset: int) -> int:
        if (st.memory or self._inline_write_ok(st, buf.nbytes)) and await self._large_inline():
            return self._write_now(st, fd, buf, offset)
        self._handed_on += 1
        return await self.large_writes.pwrite(fd, buf, offset)

    def _write_now(self, st: _FileState, fd: int, buf: memoryview, offset: int) -> int:
        """The inline write, timed on disk file systems (a slow one holds later writes off: module docstring)."""
        if st.memory:                    # nothing to time: a memory file system never waits for a disk
            n = os.pwritev(fd, [buf], offset)
        else:
            t0 = _perf_ns()
            n = os.pwritev(fd, [buf], offset)
            if _perf_ns() - t0 > SLOW_WRITE_NS + n // 2:        # (2 GB/s for the copy)
                self._slow_writes += 1
                st.ring_writes_until = time.monotonic() + st.holdoff
                st.holdoff = min(st.holdoff * 2, HOLDOFF_MAX_S)
            elif st.holdoff != HOLDOFF_S:
                st.holdoff = HOLDOFF_S
        self._run += 1
        self._inline += 1
        return n

    async def _large(self, request: Coroutine[Any, Any, int]) -> int:
        """Run a large request, counted in ``_large_active`` meanwhile; one that starts while another is active
        marks large requests concurrent for ``LARGE_CONCURRENT_S`` (``_large_inline``)."""
        self._large_active += 1
        if self._large_active > 1:
            self._large_concurrent_until = time.monotonic() + LARGE_CONCURRENT_S
        try:
            return await request
        finally:
            self._large_active -= 1

    def _inline_write_ok(self, st: _FileState, length: int) -> bool:
        """Whether a buffered write to a disk file system can run inline now (the module docstring)."""
        now = time.monotonic()
        room = self._headroom = self._headroom - length
        age = now - self._dirty_checked
        if age >= DIRTY_REFRESH_S or (room <= 0 and age >= DIRTY_REFRESH_MIN_S):   # stale, or used up
            self._dirty_checked = now
            fresh = dirty_headroom()
            self._headroom = (1 << 62) if fresh is None else fresh
        if self._headroom <= 0:
            self._dirty_handoffs += 1
            return False
        return now >= st.ring_writes_until

    async def fsync(self, fd: int) -> None:
        await self.fallback.fsync(fd)

    async def fallocate(self, fd: int, mode: int, offset: int, length: int) -> None:
        await self.fallback.fallocate(fd, mode, offset, length)

    def statistics(self) -> dict[str, Any]:
        return {"name": self.name, "inline": self._inline, "handed_on": self._handed_on,
                "nowait_misses": self._nowait_misses, "holes": self._holes, "slow_writes": self._slow_writes,
                "dirty_handoffs": self._dirty_handoffs, "yields": self._yields,
                "fallback": self.fallback.statistics(), "large_writes": self.large_writes.statistics()}

    async def aclose(self) -> None:
        self._files.clear()
        await self.large_writes.aclose()
        await self.fallback.aclose()
