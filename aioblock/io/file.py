"""The ``file`` protocol node: a regular file or block device, read and written through an I/O engine.

Semantics follow QEMU's file-posix driver where users can see them:

* reads past the end of the file return zeroes (the file may be shorter than a format driver's view);
* writes past the end grow the file;
* ``cache="writeback"`` uses the page cache; ``cache="none"`` opens with O_DIRECT, probes the required
  alignment (512 or 4096 bytes) and moves data through page-aligned bounce buffers. Requests of any offset and
  length are accepted either way: with O_DIRECT the node reads the covering blocks and does read-modify-write
  of partial ones itself, serialised per block (``aioblock.tracking``), for every node above it (QEMU's generic
  request layer), so neither the backend nor a format driver aligns anything;
* a failed fsync is sticky (``flush``): every later flush of the file fails until it is reopened;
* ``pwrite_zeroes`` uses fallocate (PUNCH_HOLE when unmapping is allowed, else ZERO_RANGE); ``pdiscard`` punches
  a hole; ``block_status`` answers from SEEK_DATA / SEEK_HOLE.

``size`` is the file's length rounded up to a whole 512-byte sector, as QEMU reports it (the tail of a partial
last sector reads as zeroes). The length is kept in memory after open: the node is the only writer while open.

Cancellation (:mod:`aioblock.cancellation`): every request that changes the file (write, write-zeroes, discard,
truncate) commits the request it belongs to before it reaches the engine. The file's length is updated before a
write is issued (a write that is then cancelled or fails may have grown the file; a length too large only means
zeroes read past the real end); write-zeroes and truncate run in a scope of their own when they belong to no
request, so that their bookkeeping follows the syscall.
"""

from __future__ import annotations

import ctypes
import errno as _errno
import mmap
import os
import stat
import sys
from typing import Any, ClassVar

from .. import cancellation
from ..driver import BlockDriver, Extent, Limits
from ..errors import BlockIOError, ImageOpenError, InvalidOptionError, NotSupportedError, ReadOnlyError
from ..tracking import RangeTracker
from .engine import (
    ENGINES,
    FALLOC_FL_KEEP_SIZE,
    FALLOC_FL_PUNCH_HOLE,
    FALLOC_FL_ZERO_RANGE,
    Engine,
    SyncEngine,
    ThreadsEngine,
    in_thread,
)
from .hybrid import HybridEngine, on_memory_fs
from .uring import UringEngine, uring_available

__all__ = ["CACHE_MODES", "FileNode", "available_engines", "make_engine"]

#: ``writeback``: the page cache; ``none``: O_DIRECT; ``unsafe``: the page cache, and flushes (also close's)
#: do nothing, as QEMU's cache=unsafe: for scratch images and conversions (qemu-img convert's default for its
#: target), where a crash means starting again
CACHE_MODES = ("writeback", "none", "unsafe")
_BOUNCE_CHUNK = 1 << 20          # O_DIRECT bounce buffers are at most this large; bigger requests loop


def make_engine(name: str | None, *, direct: bool = False) -> Engine:
    """Create an engine for the running loop. ``None`` picks the default: ``hybrid`` (inline where the kernel
    will not block, io_uring where it might) for page-cache files, ``uring`` for O_DIRECT ones; where io_uring
    does not work, ``threads`` takes its place (it never blocks the loop on a cold read either), with a one-line
    notice on stderr. Measurements behind the choice: benchmarks/README.md. ``direct``: the engine's file is
    opened with O_DIRECT on a disk (no page-cache copies to offload, nothing to try inline; O_DIRECT on tmpfs
    is a plain copy, which the hybrid engine does inline: the caller passes False then)."""
    if name is None:
        if uring_available():
            ring: Engine = UringEngine(offload=not direct)
        else:
            print("aioblock: io_uring is unavailable here; using the 'threads' engine", file=sys.stderr)
            ring = ThreadsEngine()
        return ring if direct else HybridEngine(ring)
    if name in ("uring", "hybrid"):
        if not uring_available():
            raise InvalidOptionError(f"engine '{name}' is unavailable: io_uring is not supported here")
        ring = UringEngine(offload=not direct)
        return ring if name == "uring" or direct else HybridEngine(ring)
    if name == "sync":
        return SyncEngine()
    if name == "threads":
        return ThreadsEngine()
    raise InvalidOptionError(f"unknown I/O engine '{name}' (choose from {', '.join(ENGINES)})")


def available_engines() -> list[str]:
    """The engine names that work on this machine (``uring`` and ``hybrid`` need io_uring)."""
    return [e for e in ENGINES if uring_available() or e not in ("uring", "hybrid")]


class FileNode(BlockDriver):
    """Protocol node over one file descriptor. Owns its fd and its engine; both are released by ``close``."""

    format_name: ClassVar[str] = "file"
    is_format: ClassVar[bool] = False

    def __init__(self, filename: str, fd: int, engine: Engine, *, read_only: bool, direct: bool,
                 alignment: int, size: int, is_block_device: bool, no_flush: bool = False) -> None:
        self.filename = filename
        self.read_only = read_only
        self.no_flush = no_flush                # cache=unsafe: flush does nothing
        self.fd = fd
        self.engine = engine
        self.direct = direct
        self.is_block_device = is_block_device
        #: O_DIRECT's block size (1 when buffered): requests need not be aligned, but aligned ones avoid a
        #: read-modify-write here
        self.alignment = alignment
        self.limits = Limits(opt_alignment=alignment)
        self._tracker = RangeTracker()          # O_DIRECT only: read-modify-writes serialised per block
        self._pool = _BouncePool()
        self._size = size
        self._closed = False
        self._fsync_error: int | None = None     # errno of the first failed fsync (sticky: see flush)
        self._unflushed = False                  # changed since the last successful fsync (close syncs)

    @classmethod
    async def open_file(cls, filename: str, *, read_only: bool = False, engine: str | None = None,
                        cache: str = "writeback", create: bool = False) -> FileNode:
        """Open (or with ``create``, create/truncate) ``filename``. ImageOpenError says why it failed."""
        if cache not in CACHE_MODES:
            raise InvalidOptionError(f"invalid cache mode '{cache}' (choose from {', '.join(CACHE_MODES)})")
        flags = os.O_RDONLY if read_only else os.O_RDWR
        flags |= os.O_CLOEXEC
        if create:
            flags |= os.O_CREAT | os.O_TRUNC
        direct = cache == "none"
        if direct:
            flags |= os.O_DIRECT
        try:
            fd = os.open(filename, flags, 0o644)
        except OSError as exc:
            if exc.errno == _errno.EINVAL and direct:
                raise ImageOpenError(f"Could not open '{filename}': the filesystem does not support "
                                     "O_DIRECT (cache=none)", filename=filename) from None
            if exc.errno == _errno.EISDIR:
                raise ImageOpenError(f"'file' driver requires '{filename}' to be a regular file",
                                     filename=filename) from None
            raise ImageOpenError(f"Could not open '{filename}': {exc.strerror}", filename=filename) from None
        try:
            st = os.fstat(fd)
            if stat.S_ISBLK(st.st_mode):
                size, is_blk = os.lseek(fd, 0, os.SEEK_END), True
            elif stat.S_ISREG(st.st_mode):
                size, is_blk = st.st_size, False
            else:
                raise ImageOpenError(f"'file' driver requires '{filename}' to be a regular file",
                                     filename=filename)
            alignment = _probe_direct_alignment(fd, size) if direct else 1
            eng = make_engine(engine, direct=direct and not on_memory_fs(fd))
        except BaseException:
            os.close(fd)
            raise
        return cls(filename, fd, eng, read_only=read_only, direct=direct, alignment=alignment, size=size,
                   is_block_device=is_blk, no_flush=cache == "unsafe")

    @property
    def size(self) -> int:
        return (self._size + 511) & ~511

    async def close(self) -> None:
        """Make what was written durable (as QEMU's close does: a closed image is on disk), then release the
        engine and the fd. A failed flush, or an earlier one (sticky), is raised after the fd is closed."""
        if self._closed:
            return
        self._closed = True
        try:
            if self._unflushed or self._fsync_error is not None:
                await self.flush()
        finally:
            try:
                await self.engine.aclose()
            finally:
                os.close(self.fd)

    async def actual_size(self) -> int | None:
        return os.fstat(self.fd).st_blocks * 512

    def statistics(self) -> dict[str, Any]:
        """The engine's counters (hybrid: requests served inline and handed on; uring: submissions)."""
        return {"engine": self.engine.statistics()}

    # ---- I/O path ---------------------------------------------------------------------------------------------

    async def pread(self, offset: int, buf: memoryview) -> None:
        if self.direct:
            await self._direct_read(offset, buf)
            return
        pos, end, engine, fd = 0, len(buf), self.engine, self.fd
        while pos < end:
            try:
                n = await engine.pread(fd, buf[pos:] if pos else buf, offset + pos)
            except OSError as exc:
                raise BlockIOError.from_os_error(exc, filename=self.filename) from None
            if n == 0:                                   # end of file: the rest reads as zeroes
                buf[pos:] = bytes(end - pos)
                return
            pos += n

    async def pwrite(self, offset: int, buf: memoryview, *, fua: bool = False) -> None:
        if self.read_only:
            raise ReadOnlyError("Block node is read-only", filename=self.filename)
        cancellation.commit()
        self._unflushed = True
        end = offset + len(buf)
        if self.direct:
            await self._direct_write(offset, buf)
        else:
            if end > self._size:         # before the write: a cancelled or failed one may have grown the file
                self._size = end
            pos, engine, fd = 0, self.engine, self.fd
            while pos < len(buf):
                try:
                    n = await engine.pwrite(fd, buf[pos:] if pos else buf, offset + pos)
                except OSError as exc:
                    raise BlockIOError.from_os_error(exc, filename=self.filename) from None
                if n == 0:
                    raise BlockIOError(_errno.ENOSPC, filename=self.filename)
                pos += n
        if fua:
            await self.flush()

    # ---- O_DIRECT: aligned bounce buffers, read-modify-write of partial blocks ------------------------------

    def _block_range(self, offset: int, length: int) -> tuple[int, int]:
        a = self.alignment
        return offset - offset % a, -(-(offset + length) // a) * a

    def _aligned(self, offset: int, buf: memoryview) -> bool:
        """Whether ``buf`` can go to the kernel as it is: offset, length and memory address on block
        boundaries (then no bounce copy; callers that use O_DIRECT can allocate such buffers, e.g. with
        mmap, as ``aioblock bench`` does)."""
        a = self.alignment
        if offset % a or len(buf) % a or buf.readonly:
            return False
        try:
            return ctypes.addressof(ctypes.c_char.from_buffer(buf)) % a == 0
        except (TypeError, ValueError):
            return False

    async def _read_blocks(self, offset: int, view: memoryview) -> int:
        """One aligned read; bytes past the end of the file read as zeroes. Returns the bytes the file had."""
        try:
            got = await self.engine.pread(self.fd, view, offset)
        except OSError as exc:
            raise BlockIOError.from_os_error(exc, filename=self.filename) from None
        if got < len(view):
            view[got:] = bytes(len(view) - got)
        return got

    async def _direct_read(self, offset: int, buf: memoryview) -> None:
        """Read the covering aligned blocks, through a bounce buffer unless ``buf`` is aligned (tracked: an
        overlapping read-modify-write finishes first, so a read never sees a block halfway through one)."""
        start, end = self._block_range(offset, len(buf))
        me = await self._tracker.track(start, end, False)
        try:
            if self._aligned(offset, buf):
                await self._read_blocks(offset, buf)
                return
            size = min(end - start, _BOUNCE_CHUNK)
            bounce = self._pool.take(size)
            try:
                pos = start                               # file offset of the next chunk
                while pos < end:
                    n = min(size, end - pos)
                    got = await self._read_blocks(pos, bounce[:n])
                    lo, hi = max(pos, offset), min(pos + n, offset + len(buf))
                    buf[lo - offset:hi - offset] = bounce[lo - pos:hi - pos]
                    if got < n:                           # end of file: the rest reads as zeroes
                        buf[hi - offset:] = bytes(len(buf) - (hi - offset))
                        return
                    pos += n
            finally:
                self._pool.give(bounce)
        finally:
            self._tracker.untrack(me)

    async def _direct_write(self, offset: int, buf: memoryview) -> None:
        """Write through aligned bounce buffers. A write that does not cover whole blocks reads its edge blocks,
        patches its bytes in and writes the blocks back; it is *serialising* in the tracker (it waits for every
        earlier overlapping request and every later one waits for it), so that two read-modify-writes of one
        block, from any node above, never put back each other's old bytes (QEMU's tracked requests)."""
        a = self.alignment
        start, end = self._block_range(offset, len(buf))
        rmw = start != offset or end != offset + len(buf)
        me = await self._tracker.track(start, end, rmw)
        try:
            if end > self._size:
                self._size = end
            if rmw:
                view = _aligned_buffer(end - start)
                await self._read_blocks(start, view[:a])
                if end - a > start:
                    await self._read_blocks(end - a, view[-a:])
                view[offset - start:offset - start + len(buf)] = buf
                await self._bounce_write(start, view, aligned=True)
            else:
                await self._bounce_write(offset, buf, aligned=self._aligned(offset, buf))
        finally:
            self._tracker.untrack(me)

    async def _bounce_write(self, offset: int, buf: memoryview, *, aligned: bool) -> None:
        """Write whole blocks ``buf`` at block offset ``offset``: as it is when ``aligned``, else through a
        bounce buffer in chunks of at most ``_BOUNCE_CHUNK``."""
        if aligned:
            await self._write_blocks(offset, buf)
            return
        size = min(len(buf), _BOUNCE_CHUNK)
        bounce = self._pool.take(size)
        try:
            for pos in range(0, len(buf), size):
                n = min(size, len(buf) - pos)
                bounce[:n] = buf[pos:pos + n]
                await self._write_blocks(offset + pos, bounce[:n])
        finally:
            self._pool.give(bounce)

    async def _write_blocks(self, offset: int, view: memoryview) -> None:
        try:
            done = await self.engine.pwrite(self.fd, view, offset)
        except OSError as exc:
            raise BlockIOError.from_os_error(exc, filename=self.filename) from None
        if done != len(view):
            raise BlockIOError(_errno.EIO, "short O_DIRECT write", filename=self.filename)

    async def pwrite_zeroes(self, offset: int, length: int, *, may_unmap: bool = False,
                            fua: bool = False) -> None:
        if self.read_only:
            raise ReadOnlyError("Block node is read-only", filename=self.filename)
        if self.is_block_device:
            raise NotSupportedError("write zeroes not supported on block devices")
        end = offset + length
        modes = [FALLOC_FL_ZERO_RANGE]
        if may_unmap and end <= self._size:
            modes.insert(0, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE)
        scope, token = cancellation.enter()
        scope.committed = True
        self._unflushed = True
        me = await self._tracker.track(*self._block_range(offset, length), False) if self.direct else None
        try:
            for mode in modes:
                try:
                    await self.engine.fallocate(self.fd, mode, offset, length)
                    break
                except OSError as exc:
                    if exc.errno not in (_errno.EOPNOTSUPP, _errno.ENOTSUP, _errno.EINVAL):
                        raise BlockIOError.from_os_error(exc, filename=self.filename) from None
            else:
                raise NotSupportedError("write zeroes not supported by this filesystem")
            if end > self._size:
                self._size = end
            if fua:
                await self.flush()
        finally:
            if me is not None:
                self._tracker.untrack(me)
            cancellation.leave(scope, token)

    async def pdiscard(self, offset: int, length: int) -> None:
        if self.read_only:
            raise ReadOnlyError("Block node is read-only", filename=self.filename)
        if self.is_block_device or offset >= self._size:
            return
        length = min(length, self._size - offset)
        me = await self._tracker.track(*self._block_range(offset, length), False) if self.direct else None
        cancellation.commit()
        self._unflushed = True
        try:
            await self.engine.fallocate(self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)
        except OSError as exc:
            if exc.errno not in (_errno.EOPNOTSUPP, _errno.ENOTSUP, _errno.EINVAL):
                raise BlockIOError.from_os_error(exc, filename=self.filename) from None
        finally:
            if me is not None:
                self._tracker.untrack(me)

    async def flush(self) -> None:
        """fdatasync. A failure is sticky: once one fsync of this file failed, every later flush fails with the
        same error until the file is reopened. The kernel reports a writeback error once and may then drop
        the dirty pages that failed, so a later fsync that succeeds would claim data durable that is gone
        (QEMU's file-posix does the same). With cache=unsafe, nothing."""
        if self.read_only or self.no_flush:
            return
        if self._fsync_error is not None:
            raise BlockIOError(self._fsync_error, f"{os.strerror(self._fsync_error)}: an earlier flush failed, "
                               "data written before it may be lost (reopen the image to clear)",
                               filename=self.filename)
        unflushed, self._unflushed = self._unflushed, False    # changes from now on need another fsync
        try:
            await self.engine.fsync(self.fd)
        except OSError as exc:
            self._fsync_error = exc.errno or _errno.EIO
            self._unflushed = unflushed
            raise BlockIOError.from_os_error(exc, filename=self.filename) from None

    async def block_status(self, offset: int, length: int) -> Extent:
        """Data or hole, from SEEK_DATA/SEEK_HOLE. Holes read as zeroes; past EOF is a hole."""
        end = offset + length
        if self.is_block_device:
            return Extent(offset, length, True, True, False, offset, self)
        try:
            data = os.lseek(self.fd, offset, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == _errno.ENXIO:             # no data at or after offset
                return Extent(offset, length, True, False, True, offset, self)
            return Extent(offset, length, True, True, False, offset, self)   # cannot tell: data
        if data > offset:
            return Extent(offset, min(data, end) - offset, True, False, True, offset, self)
        try:
            hole = os.lseek(self.fd, offset, os.SEEK_HOLE)
        except OSError:
            hole = end
        return Extent(offset, min(max(hole, offset + 1), end) - offset, True, True, False, offset, self)

    async def truncate(self, size: int) -> None:
        if self.read_only:
            raise ReadOnlyError("Block node is read-only", filename=self.filename)
        if self.is_block_device:
            raise NotSupportedError("cannot resize a block device")
        scope, token = cancellation.enter()
        scope.committed = True
        try:
            self._unflushed = True
            try:
                await in_thread(os.ftruncate, self.fd, size)
            except OSError as exc:
                raise BlockIOError.from_os_error(exc, filename=self.filename) from None
            self._size = size
        finally:
            cancellation.leave(scope, token)


def _aligned_buffer(size: int) -> memoryview:
    """A page-aligned buffer for O_DIRECT. Freed by GC: an engine may still hold a slice of it."""
    return memoryview(mmap.mmap(-1, size))


class _BouncePool:
    """Page-aligned bounce buffers for O_DIRECT, reused: a fresh mmap per request costs a page fault and a
    munmap (with its TLB shootdown) each time. Sizes are powers of two from 4 KiB up to ``_BOUNCE_CHUNK``;
    at most ``KEEP`` free buffers are kept per size. A buffer is given back only after the engine has
    returned, i.e. after the kernel is done with it (cancellation.py rule 4)."""

    KEEP = 64

    def __init__(self) -> None:
        self._free: dict[int, list[memoryview]] = {}

    def take(self, size: int) -> memoryview:
        size = max(4096, 1 << (size - 1).bit_length())
        free = self._free.get(size)
        return free.pop() if free else _aligned_buffer(size)

    def give(self, view: memoryview) -> None:
        free = self._free.setdefault(len(view), [])
        if len(free) < self.KEEP:
            free.append(view)


def _probe_direct_alignment(fd: int, size: int) -> int:
    """The smallest O_DIRECT alignment (512 or 4096) a read accepts; 4096 when the file is too short."""
    if size >= 4096:
        with mmap.mmap(-1, 4096) as probe:
            view = memoryview(probe)
            try:
                for align in (512, 4096):
                    try:
                        os.preadv(fd, [view[:align]], 0)
                        return align
                    except OSError as exc:
                        if exc.errno != _errno.EINVAL:
                            raise
            finally:
                view.release()
    return 4096
