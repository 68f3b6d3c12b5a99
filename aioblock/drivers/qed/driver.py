"""The QED format node: open/close, lookups, reads, flush, block status, resize, create (QEMU's qed.c).

Writes live in ``alloc.py`` (in place, allocating through the serial allocating-write queue, write-zeroes, the
need-check protocol), check and repair in ``check.py``.

**State and locks.** ``lock`` (the metadata lock, QEMU's ``s->table_lock``) guards the L1 table, the L2 slice
cache (every method but ``peek``), ``tables``, ``file_end`` and the header. Lookups read a cached slice without
it (``peek`` and a scan that never suspends); a miss takes it to load the slice. ``allocs`` is the allocating-write
queue in serial mode: one allocating write at a time, the others wait their turn and redo their lookup (QEMU's
``allocating_write_reqs``); in-place writes to allocated clusters and reads never wait for it.

**Runtime guard.** Every table entry is validated before use: an L2 table offset must be cluster-aligned, after
the header, inside the file and clear of the L1 table; a data offset must be cluster-aligned, inside the file,
and clear of the header, the L1 table and every live L2 table (``tables``, sorted). A bad entry fails the request
with EIO; nothing is ever written through it (QEMU's QED writes through an L2 entry that points at its own L1).

**L2 tables** live in the shared slice cache (4 KiB slices) and reach the disk through the background flusher,
``flush`` or eviction: only the slices holding changed entries are written, never the whole table. A new L2 table
is written whole and synced before the L1 entry that links it (written at once, one sector).
"""

from __future__ import annotations

import asyncio
import bisect
import dataclasses
import errno
import logging
import struct
from array import array
from collections.abc import Mapping
from typing import Any, ClassVar, Self

from ... import cancellation
from ...allocation import AllocationQueue
from ...cache import Flusher, SliceCache
from ...driver import BlockDriver, CheckResult, Extent, Limits, read_backing
from ...errors import BlockIOError, CorruptImageError, InvalidOptionError, NotSupportedError, ReadOnlyError
from ...sizes import parse_size
from . import layout as L
from .alloc import stop_need_check_timer, write, write_zeroes
from .check import check_image
from .layout import DATA, SLICE, ZERO

__all__ = ["QedDriver"]

log = logging.getLogger("aioblock.qed")

DEFAULT_L2_CACHE_MAX = 32 << 20
FLUSH_DELAY = 0.5
FLUSH_MAX_AGE = 5.0
_ENTRY = struct.Struct("<Q")


class QedDriver(BlockDriver):
    """QED format node."""

    format_name: ClassVar[str] = "qed"
    supports_backing: ClassVar[bool] = True
    has_check: ClassVar[bool] = True
    open_options: ClassVar[frozenset[str]] = frozenset({"l2-cache-size"})
    create_options: ClassVar[frozenset[str]] = frozenset({"cluster_size", "table_size", "backing_file",
                                                          "backing_fmt"})
    #: seconds after the last allocating write before NEED_CHECK is cleared (QEMU: QED_NEED_CHECK_TIMEOUT)
    need_check_timeout: ClassVar[float] = 5.0

    file: BlockDriver

    def __init__(self, file: BlockDriver, header: L.Header, l1: array[int], *, read_only: bool) -> None:
        self.file = file
        self.filename = file.filename
        self.read_only = read_only
        self.h = header
        self.backing_filename = header.backing_filename
        self.backing_format = header.backing_format
        self.limits = Limits(opt_alignment=file.limits.opt_alignment)
        self.l1 = l1
        self.cs = header.cluster_size
        self.cb = header.cluster_bits
        self.entries_bits = header.table_entries.bit_length() - 1
        #: guest bytes one L2 table maps
        self.l1_shift = self.cb + self.entries_bits
        self.lock = cancellation.Lock()
        self.allocs = AllocationQueue(serial=True)
        #: where the next cluster is allocated (the file's length rounded down to a cluster at open)
        self.file_end = L.allocated_end(header, file.size)
        #: offsets of the live L2 tables (named by the L1 table), sorted
        self.tables = array("q", sorted({e for e in l1 if e and self.table_ok(e)}))
        self.l2cache: SliceCache = SliceCache("l2", self, slice_size=SLICE, capacity=2)
        self.flusher: Flusher | None = None
        #: the need-check timer and the task it starts (alloc.py)
        self.need_check_timer: asyncio.TimerHandle | None = None
        self.need_check_task: asyncio.Task[None] | None = None
        self.last_alloc = 0.0
        #: a check found damage it could not repair: close keeps NEED_CHECK set (QEMU clears it regardless)
        self.damaged = False
        self._closed = False

    # ---- open / close -------------------------------------------------------------------------------------

    @classmethod
    def probe(cls, head: bytes, filename: str) -> int:
        return 100 if len(head) >= 4 and struct.unpack_from("<I", head)[0] == L.MAGIC else 0

    @classmethod
    async def open(cls, file: BlockDriver, *, read_only: bool, options: Mapping[str, Any]) -> Self:
        return await cls._open(file, read_only=read_only, options=options, for_check=False)

    @classmethod
    async def open_for_check(cls, file: BlockDriver, *, read_only: bool, options: Mapping[str, Any]) -> Self:
        return await cls._open(file, read_only=read_only, options=options, for_check=True)

    @classmethod
    async def _open(cls, file: BlockDriver, *, read_only: bool, options: Mapping[str, Any],
                    for_check: bool) -> Self:
        head = bytearray(min(file.size, L.HEADER_BYTES))
        if head:
            await file.pread(0, memoryview(head))
        h = L.parse_header(bytes(head), file.size)
        if h.features & L.F_BACKING_FILE:
            raw = bytearray(h.backing_filename_size)
            if h.backing_filename_offset + len(raw) > file.size:
                raise CorruptImageError("QED backing filename offset is invalid")
            await file.pread(h.backing_filename_offset, memoryview(raw))
            h.backing_filename = L.decode_backing_name(bytes(raw))
        buf = bytearray(h.table_bytes)
        await file.pread(h.l1_table_offset, memoryview(buf))
        drv = cls(file, h, L.load_table(buf), read_only=read_only)
        drv._setup_cache(options)
        try:
            if not read_only and not for_check:
                await drv._open_rw()
        except BaseException:
            await drv._stop()
            raise
        return drv

    def _setup_cache(self, options: Mapping[str, Any]) -> None:
        h = self.h
        covering = -(-h.image_size // self.cs) * 8
        value = options.get("l2-cache-size")
        if value is None:
            nbytes = max(min(covering, DEFAULT_L2_CACHE_MAX), 2 * SLICE)
        else:
            try:
                nbytes = parse_size(value) if isinstance(value, str) else int(value)
            except (ValueError, InvalidOptionError):
                raise InvalidOptionError("Parameter 'l2-cache-size' expects a size") from None
        self.l2cache = SliceCache("l2", self, slice_size=SLICE, capacity=max(2, nbytes // SLICE))
        if not self.read_only:
            self.flusher = Flusher(self.lock, self.flush_caches, delay=FLUSH_DELAY, max_age=FLUSH_MAX_AGE)
            self.l2cache.on_dirty = self.flusher.notify

    async def _open_rw(self) -> None:
        """A read-write open: an image left with NEED_CHECK is checked and repaired first; unknown autoclear
        bits are cleared."""
        h = self.h
        if h.need_check:
            log.warning("qed: %s was not closed cleanly; checking and repairing it", self.filename)
            res = await check_image(self, "all")
            if res.corruptions or res.check_errors or res.failed:
                raise CorruptImageError("Image corrupted")
        if h.autoclear_features:
            h.autoclear_features = 0
            await self.write_header()

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        scope, token = cancellation.enter()
        scope.committed = True
        try:
            await stop_need_check_timer(self)
            if not self.read_only:
                async with self.lock:
                    await self.flush_caches()
                    if self.h.need_check and not self.damaged:
                        self.h.features &= ~L.F_NEED_CHECK
                        await self.write_header()
        finally:
            try:
                await self._stop()
            finally:
                cancellation.leave(scope, token)

    async def _stop(self) -> None:
        if self.flusher is not None:
            await self.flusher.aclose()

    # ---- header and metadata I/O (lock held for writes) --------------------------------------------------

    async def write_header(self) -> None:
        """Rewrite the header's first sector (fields and backing name) and sync."""
        data = L.build_header(self.h)
        self.file.event("header_update")
        await self.file.pwrite(0, memoryview(data))
        await self.sync()

    async def sync(self) -> None:
        self.file.event("flush_to_disk")
        await self.file.flush()

    async def flush_caches(self) -> None:
        """Write the dirty L2 slices and sync. Lock held."""
        earlier = self.flusher.take_error() if self.flusher is not None else None
        await self.l2cache.flush()
        await self.sync()
        if earlier is not None:
            raise BlockIOError(getattr(earlier, "errno", None) or errno.EIO,
                               f"background metadata write-back failed: {earlier}", filename=self.filename)

    # CacheIO of the L2 cache
    async def read_slice(self, cache: SliceCache, offset: int, buf: memoryview) -> None:
        self.file.event("l2_load")
        await self.file.pread(offset, buf)

    async def write_slice(self, cache: SliceCache, offset: int, data: memoryview) -> None:
        self.file.event("l2_update")
        await self.file.pwrite(offset, data)

    # ---- validation -----------------------------------------------------------------------------------------

    def table_ok(self, offset: int) -> bool:
        """An L2 table offset: aligned, after the header, inside the file, clear of the L1 table."""
        h = self.h
        tb = h.table_bytes
        if offset & (self.cs - 1) or offset < h.header_bytes or offset + tb > self.file_end:
            return False
        return not (offset < h.l1_table_offset + tb and h.l1_table_offset < offset + tb)

    def data_ok(self, offset: int) -> bool:
        """A data cluster offset: aligned, inside the file, clear of the header, the L1 and every live L2."""
        h = self.h
        cs, tb = self.cs, h.table_bytes
        if offset & (cs - 1) or offset < h.header_bytes or offset + cs > self.file_end:
            return False
        if h.l1_table_offset <= offset < h.l1_table_offset + tb:
            return False
        tables = self.tables
        i = bisect.bisect_right(tables, offset) - 1
        return i < 0 or tables[i] + tb <= offset

    def bad_entry(self, what: str, value: int) -> BlockIOError:
        return BlockIOError(errno.EIO, f"QED: invalid {what} entry {value:#x}", filename=self.filename)

    # ---- lookups ----------------------------------------------------------------------------------------------

    def l2_position(self, offset: int) -> tuple[int, int]:
        """(L1 index, L2 index) of a guest offset."""
        return offset >> self.l1_shift, (offset >> self.cb) & ((1 << self.entries_bits) - 1)

    async def slice_for(self, l2_offset: int, l2i: int) -> tuple[bytearray, int]:
        """The cached data of the slice holding entry ``l2i`` of the L2 table at ``l2_offset`` (loaded under
        the lock on a miss) and the entry's index in it. Use it before the next await."""
        soff = l2_offset + ((l2i * 8) & ~(SLICE - 1))
        s = self.l2cache.peek(soff)
        if s is None:
            async with self.lock:
                s = await self.l2cache.get(soff)
                self.l2cache.put(s)
        return s.data, l2i & (SLICE // 8 - 1)

    def mapped(self, offset: int, length: int) -> int | None:
        """The host offset of ``[offset, offset + length)`` when it is one run of data clusters in a cached
        slice (the hot path: no await, no lock), else None (then ``lookup``). Raises EIO for an invalid entry."""
        l1e = self.l1[offset >> self.l1_shift]
        if not l1e or not self.table_ok(l1e):
            return None
        l2i = (offset >> self.cb) & ((1 << self.entries_bits) - 1)
        s = self.l2cache.peek(l1e + ((l2i * 8) & ~(SLICE - 1)))
        if s is None:
            return None
        kind, host, n = self.scan(s.data, l2i & (SLICE // 8 - 1), offset & (self.cs - 1), length)
        return host if kind == DATA and n == length else None

    async def lookup(self, offset: int, length: int) -> tuple[int, int, int]:
        """(kind, host offset of ``offset`` for DATA, bytes) of the run of clusters at ``offset`` that read
        alike: unallocated, zero, or data at consecutive host offsets. The run stays in one slice of one L2
        table and is at most ``length`` bytes. Raises EIO for an invalid entry."""
        l1i, l2i = self.l2_position(offset)
        within = offset & (self.cs - 1)
        l1e = self.l1[l1i]
        if l1e == 0:
            return L.UNALLOC, 0, min(length, ((l1i + 1) << self.l1_shift) - offset)
        if not self.table_ok(l1e):
            raise self.bad_entry("L1", l1e)
        data, i = await self.slice_for(l1e, l2i)
        return self.scan(data, i, within, length)

    def scan(self, data: bytearray, i: int, within: int, length: int) -> tuple[int, int, int]:
        """The run starting at entry ``i`` of a slice, ``within`` bytes into its cluster (see ``lookup``)."""
        cs = self.cs
        e = _ENTRY.unpack_from(data, i * 8)[0]
        kind = L.UNALLOC if e == 0 else ZERO if e == L.ZERO_CLUSTER else DATA
        if kind == DATA and not self.data_ok(e):
            raise self.bad_entry("L2", e)
        n = cs - within
        end = len(data) // 8
        expect = e + cs
        i += 1
        while n < length and i < end:
            f = _ENTRY.unpack_from(data, i * 8)[0]
            if kind == DATA:
                if f != expect or not self.data_ok(f):
                    break
                expect += cs
            elif f != e:
                break
            n += cs
            i += 1
        return kind, (e + within if kind == DATA else 0), min(n, length)

    # ---- properties and info ------------------------------------------------------------------------------

    @property
    def size(self) -> int:
        return self.h.image_size

    @property
    def cluster_size(self) -> int | None:
        return self.cs

    @property
    def dirty(self) -> bool:
        return self.h.need_check

    def statistics(self) -> dict[str, Any]:
        """The L2 cache, the allocating-write queue, the metadata lock and the background flusher."""
        return {**super().statistics(), "l2_cache": self.l2cache.stats.to_dict(),
                "allocations": self.allocs.statistics().to_dict(),
                "metadata_lock": self.lock.statistics().to_dict(),
                "flusher_runs": self.flusher.runs if self.flusher is not None else 0}

    # ---- requests -----------------------------------------------------------------------------------------

    async def pread(self, offset: int, buf: memoryview) -> None:
        host = self.mapped(offset, len(buf))
        if host is not None:
            await self.file.pread(host, buf)
            return
        pos, total = 0, len(buf)
        while pos < total:
            kind, host, n = await self.lookup(offset + pos, total - pos)
            view = buf[pos:pos + n] if pos or n != total else buf
            if kind == DATA:
                self.file.event("read_aio")
                await self.file.pread(host, view)
            elif kind == ZERO:
                view[:] = bytes(n)
            else:
                await self.read_backing(offset + pos, view)
            pos += n

    async def read_backing(self, offset: int, view: memoryview) -> None:
        await read_backing(self.backing, offset, view)

    async def pwrite(self, offset: int, buf: memoryview, *, fua: bool = False) -> None:
        if self.read_only:
            raise ReadOnlyError("Block node is read-only")
        await write(self, offset, buf)
        if fua:
            await self.flush()

    async def pwrite_zeroes(self, offset: int, length: int, *, may_unmap: bool = False, fua: bool = False) -> None:
        if self.read_only:
            raise ReadOnlyError("Block node is read-only")
        await write_zeroes(self, offset, length)
        if fua:
            await self.flush()

    async def flush(self) -> None:
        if self.read_only:
            return
        async with self.lock:
            await self.flush_caches()

    async def block_status(self, offset: int, length: int) -> Extent:
        kind, host, n = await self.lookup(offset, length)
        if kind == DATA:
            return Extent(offset, n, True, True, False, host, self.file)
        if kind == ZERO:
            return Extent(offset, n, True, False, True)
        return Extent(offset, n, False, False, False)

    async def truncate(self, size: int) -> None:
        """Grow only (QED cannot free what lies past a smaller size); the header records the new size."""
        if self.read_only:
            raise ReadOnlyError("Block node is read-only")
        if size < self.h.image_size:
            raise NotSupportedError("Cannot shrink QED images")
        if not L.image_size_valid(size, self.cs, self.h.table_size):
            raise InvalidOptionError("Invalid image size specified")
        async with self.lock:
            old = self.h.image_size
            self.h.image_size = size
            try:
                await self.write_header()
            except BaseException:
                self.h.image_size = old
                raise

    def check_backing_file(self, name: str, fmt: str) -> None:
        L.set_backing(dataclasses.replace(self.h), name, fmt == "raw")

    async def change_backing_file(self, name: str | None, fmt: str | None) -> None:
        """QED stores no format name: a raw backing file gets the no-probe flag, others are probed on open.
        The header is rewritten through the end of the old name (zeroed where the new one is shorter)."""
        if self.read_only:
            raise ReadOnlyError("Block node is read-only")
        h = self.h
        async with self.lock:                  # the need-check timer rewrites the header under it too
            old = (h.features, h.backing_filename_offset, h.backing_filename_size, h.backing_filename)
            old_end = h.backing_filename_offset + h.backing_filename_size if h.features & L.F_BACKING_FILE else 0
            L.set_backing(h, name, fmt == "raw")
            try:
                data = L.build_header(h)
                self.file.event("header_update")
                await self.file.pwrite(0, memoryview(data + bytes(max(0, old_end - len(data)))))
                await self.sync()
            except BaseException:
                h.features, h.backing_filename_offset, h.backing_filename_size, h.backing_filename = old
                raise
        self.backing_filename, self.backing_format = name, h.backing_format

    async def check(self, repair: str | None = None) -> CheckResult:
        return await check_image(self, repair)

    @classmethod
    async def create(cls, file: BlockDriver, size: int, *, backing: str | None, backing_fmt: str | None,
                     options: Mapping[str, str]) -> None:
        cluster = _size_option(options, "cluster_size", L.DEFAULT_CLUSTER)
        table = _size_option(options, "table_size", L.DEFAULT_TABLE)
        backing = options.get("backing_file", backing)
        backing_fmt = options.get("backing_fmt", backing_fmt)
        h = L.create_layout(cluster, table, size, backing, backing_fmt == "raw")
        await file.truncate(h.l1_table_offset + h.table_bytes)
        await file.pwrite(0, memoryview(L.build_header(h)))
        await file.flush()


def _size_option(options: Mapping[str, str], name: str, default: int) -> int:
    value = options.get(name)
    if value is None:
        return default
    try:
        return parse_size(value)
    except (ValueError, InvalidOptionError):
        raise InvalidOptionError(f"Parameter '{name}' expects a size") from None
