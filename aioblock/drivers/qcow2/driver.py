"""The qcow2 format node: open/close, flush, info, and the request entry points (QEMU's qcow2.c).

The request work lives in modules by concern, listed with the lock order and the fields' guards in
``state.py``: ``read``, ``alloc`` (writes), ``zero`` (write-zeroes, discard), ``compressed``, ``resize``,
``check``. This class owns the :class:`Qcow2State` and turns requests into calls of those modules.

Cancellation: requests run in the scope BlockBackend opens for each (:mod:`aioblock.cancellation`), so that a
request that has changed anything runs to its end; the parts that must never stop halfway (a locked section, an
allocation from its registration to its completion, a file write and its bookkeeping) are protected whether or
not a request scope exists.

Durability: the L2 cache depends on the refcount cache (refcount before reference) and on a flush of the data
(data and COW before mapping); the refcount cache depends on the L2 cache for decrements (unreference before
free). ``flush`` writes both caches in that order and syncs. With lazy refcounts the dirty bit is set (and
synced) before the first L2 update that skips the refcount ordering and is cleared at close.
"""

from __future__ import annotations

import dataclasses
import logging
import struct
from collections.abc import Mapping
from typing import Any, ClassVar, Self

from ... import cancellation
from ...cache import Flusher, SliceCache
from ...driver import BlockDriver, CheckResult, Extent, Limits
from ...errors import BlockIOError, CorruptImageError, InvalidOptionError
from ...sizes import parse_size
from . import alloc, compressed, read, resize, zero
from . import layout as L
from .check import check_image
from .layout import Header, parse_header
from .mapping import COMPRESSED, DATA, KIND_MASK, ZERO, lookup, peek, scan
from .metaio import HEADER, L1, L2, REFBLOCK, REFTABLE, SNAPSHOT_L1, SNAPSHOTS, MetadataMap, MetaIO, OverlapError
from .refcount import Refcounts, load_table
from .state import Qcow2State

__all__ = ["Qcow2Driver"]

log = logging.getLogger("aioblock.qcow2")

DEFAULT_L2_CACHE_MAX = 32 << 20
DEFAULT_SLICE = 4096
DEFAULT_REFCOUNT_CLUSTERS = 4
DEFAULT_CLEAN_INTERVAL = 600.0
#: background write-back of dirty metadata: after this long idle, at the latest FLUSH_MAX_AGE after it became
#: dirty (the write-back holds the lock through its syncs: allocating writes that need the lock wait for it)
FLUSH_DELAY = 0.5
FLUSH_MAX_AGE = 5.0


class Qcow2Driver(BlockDriver):
    """qcow2 format node (v2 and v3)."""

    format_name: ClassVar[str] = "qcow2"
    supports_backing: ClassVar[bool] = True
    supports_compression: ClassVar[bool] = True
    has_check: ClassVar[bool] = True
    open_options: ClassVar[frozenset[str]] = frozenset({"l2-cache-size", "l2-cache-entry-size",
                                                        "refcount-cache-size", "cache-clean-interval"})
    create_options: ClassVar[frozenset[str]] = frozenset({
        "compat", "cluster_size", "refcount_bits", "lazy_refcounts", "compression_type", "extended_l2",
        "preallocation", "backing_file", "backing_fmt"})

    file: BlockDriver

    def __init__(self, file: BlockDriver, header: Header, *, read_only: bool) -> None:
        self.file = file
        self.filename = file.filename
        self.read_only = read_only
        self.backing_filename = header.backing_file
        self.backing_format = header.backing_format
        self.limits = Limits(opt_alignment=file.limits.opt_alignment)
        self.st = Qcow2State(self, file, header, read_only=read_only)
        self._closed = False

    # ---- open / close -------------------------------------------------------------------------------------

    @classmethod
    def probe(cls, head: bytes, filename: str) -> int:
        return 100 if head[:4] == L.MAGIC and len(head) >= 8 and struct.unpack_from(">I", head, 4)[0] >= 2 else 0

    @classmethod
    async def open(cls, file: BlockDriver, *, read_only: bool, options: Mapping[str, Any]) -> Self:
        return await cls.open_node(file, read_only=read_only, options=options)

    @classmethod
    async def open_for_check(cls, file: BlockDriver, *, read_only: bool, options: Mapping[str, Any]) -> Self:
        return await cls.open_node(file, read_only=read_only, options=options, for_check=True)

    @classmethod
    async def open_node(cls, file: BlockDriver, *, read_only: bool, options: Mapping[str, Any],
                        for_check: bool = False) -> Self:
        """Open; ``for_check`` allows a missing refcount table and skips the repair of a dirty image."""
        size = file.size
        head = bytearray(min(size, 4096))
        await file.pread(0, memoryview(head)) if head else None
        if len(head) >= 24 and head[:4] == L.MAGIC:
            bits = struct.unpack_from(">I", head, 20)[0]
            if L.MIN_CLUSTER_BITS <= bits <= L.MAX_CLUSTER_BITS and (1 << bits) > len(head) and size > len(head):
                head = bytearray(min(size, 1 << bits))
                await file.pread(0, memoryview(head))
        hdr = parse_header(bytes(head), size, for_check=for_check)
        if hdr.corrupt and not read_only and not for_check:
            raise CorruptImageError("qcow2: Image is corrupt; cannot be opened read/write")
        drv = cls(file, hdr, read_only=read_only)
        await drv._load(options)
        try:
            if not read_only and not for_check:
                await drv._open_rw()
        except BaseException:
            await drv._stop()
            raise
        return drv

    async def _load(self, options: Mapping[str, Any]) -> None:
        st = self.st
        h, file, cs = st.header, self.file, st.cs
        st.metamap = mm = MetadataMap(st.cluster_bits)
        st.metaio = MetaIO(file, mm, self._overlap)
        st.l1 = load_table(await st.metaio.read(h.l1_table_offset, h.l1_size * 8) if h.l1_size else b"")
        reftable = load_table(await st.metaio.read(h.refcount_table_offset, h.refcount_table_clusters * cs)
                              if h.refcount_table_clusters else b"")
        st.snapshots = []
        if h.nb_snapshots:
            n = min(L.MAX_SNAPSHOT_TABLE_BYTES, file.size - h.snapshots_offset)
            raw = await st.metaio.read(h.snapshots_offset, n)
            st.snapshots, used = L.parse_snapshots(bytes(raw), h.nb_snapshots, cs, file.size)
            mm.add(h.snapshots_offset, used, SNAPSHOTS)
        mm.add_tables([(0, cs, HEADER), (h.l1_table_offset, h.l1_size * 8, L1),
                       (h.refcount_table_offset, h.refcount_table_clusters * cs, REFTABLE),
                       *{(sn.l1_table_offset, sn.l1_size * 8, SNAPSHOT_L1) for sn in st.snapshots}])
        cb, size = st.cluster_bits, file.size
        mm.add_blocks((off >> cb for e in reftable
                       if (off := e & L.REFT_OFFSET_MASK) and not off & (cs - 1) and off < size), REFBLOCK)
        mm.add_blocks((off >> cb for e in st.l1
                       if (off := e & L.L1E_OFFSET_MASK) and not off & (cs - 1) and off < size), L2)

        opts = dict(options)
        slice_size = _size_opt(opts, "l2-cache-entry-size", min(DEFAULT_SLICE, cs))
        if slice_size < 512 or slice_size > cs or slice_size & (slice_size - 1):
            raise InvalidOptionError("L2 cache entry size must be a power of two between 512 and the cluster "
                                     f"size ({cs})")
        covering = -(-h.size // cs) * st.esz
        l2_bytes = _size_opt(opts, "l2-cache-size", max(min(covering, DEFAULT_L2_CACHE_MAX), 2 * slice_size))
        rc_bytes = _size_opt(opts, "refcount-cache-size", DEFAULT_REFCOUNT_CLUSTERS * cs)
        interval = float(opts.get("cache-clean-interval", DEFAULT_CLEAN_INTERVAL))
        if interval < 0:
            raise InvalidOptionError("Cache clean interval too big")
        st.l2cache = SliceCache("l2", st.metaio, slice_size=slice_size, capacity=max(2, l2_bytes // slice_size))
        rcache = SliceCache("refblock", st.metaio, slice_size=cs, capacity=max(2, rc_bytes // cs))
        st.refcounts = Refcounts(st.metaio, mm, h, reftable, rcache, corruption=st.corruption,
                                 busy=st.busy_hosts)
        st.refcounts.unref_first = st.l2cache
        st.slice_entries = slice_size // st.esz
        st.slice_bytes = slice_size
        st.slice_shift = st.slice_entries.bit_length() - 1
        st.slice_mask = st.slice_entries - 1
        st.fast_io = not st.ext_l2
        if not self.read_only:
            st.flusher = Flusher(st.lock, st.flush_caches, delay=FLUSH_DELAY, max_age=FLUSH_MAX_AGE,
                                 clean_fn=self._clean_caches, clean_interval=interval)
            st.l2cache.on_dirty = st.flusher.notify
            rcache.on_dirty = st.flusher.notify

    async def _open_rw(self) -> None:
        st = self.st
        h = st.header
        if h.dirty:
            log.warning("qcow2: Rebuilding refcount structure of %s (dirty image)", self.filename)
            res = await check_image(st, "all")
            if res.corruptions or res.check_errors or res.failed:
                raise CorruptImageError("Could not repair dirty image: errors remain after repair")
            h.incompatible_features &= ~L.INCOMPAT_DIRTY
            await st.write_header()
        if h.autoclear_features:
            h.autoclear_features = 0
            await st.write_header()

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        st = self.st
        scope, token = cancellation.enter()
        scope.committed = True
        try:
            if not self.read_only and not st.fenced:
                async with st.lock:
                    await st.flush_caches()
                    if st.lazy_dirty:
                        st.header.incompatible_features &= ~L.INCOMPAT_DIRTY
                        await st.write_header()
                        st.lazy_dirty = False
        finally:
            try:
                await self._stop()
            finally:
                cancellation.leave(scope, token)

    async def _stop(self) -> None:
        if self.st.flusher is not None:
            await self.st.flusher.aclose()

    def _overlap(self, exc: OverlapError) -> BaseException:
        return self.st.corruption(str(exc))

    def _clean_caches(self) -> None:
        self.st.l2cache.shrink_idle()
        self.st.refcounts.cache.shrink_idle()

    # ---- properties and info ----------------------------------------------------------------------------

    @property
    def size(self) -> int:
        return self.st.header.size

    @property
    def cluster_size(self) -> int | None:
        return self.st.cs

    @property
    def vm_state_offset(self) -> int:
        """Where internal snapshots' VM state starts (the first guest offset the L1 table cannot reach at the
        image's size; qemu-io's ``info``)."""
        st = self.st
        return L.size_to_l1(st.header.size, st.cluster_bits, st.ext_l2) << st.l1_shift

    @property
    def dirty(self) -> bool:
        return self.st.dirty

    def info(self) -> dict[str, Any]:
        h = self.st.header
        data: dict[str, Any] = {"compat": "0.10" if h.version == 2 else "1.1",
                                "compression-type": L.COMPRESSION_NAMES[h.compression_type]}
        if h.version >= 3:
            data["lazy-refcounts"] = h.lazy_refcounts
        data["refcount-bits"] = h.refcount_bits
        if h.version >= 3:
            data["corrupt"] = h.corrupt or self.st.fenced is not None
            data["extended-l2"] = h.extended_l2
        return data

    def snapshot_info(self) -> list[dict[str, Any]]:
        out = []
        for sn in self.st.snapshots:
            entry: dict[str, Any] = {}
            if sn.icount is not None:
                entry["icount"] = sn.icount
            entry.update({"vm-clock-nsec": sn.vm_clock_nsec % 1_000_000_000, "name": sn.name,
                          "date-sec": sn.date_sec, "date-nsec": sn.date_nsec,
                          "vm-clock-sec": sn.vm_clock_nsec // 1_000_000_000, "id": sn.id,
                          "vm-state-size": sn.vm_state_size})
            out.append(entry)
        return out

    def statistics(self) -> dict[str, Any]:
        """The metadata caches, the allocating-write queue, the metadata lock and the background flusher."""
        st = self.st
        return {**super().statistics(),
                "l2_cache": st.l2cache.stats.to_dict(), "refblock_cache": st.refcounts.cache.stats.to_dict(),
                "allocations": st.allocs.statistics().to_dict(), "metadata_lock": st.lock.statistics().to_dict(),
                "flusher_runs": st.flusher.runs if st.flusher is not None else 0}

    # ---- requests -------------------------------------------------------------------------------------------

    async def pread(self, offset: int, buf: memoryview) -> None:
        st = self.st
        if st.fast_io:                 # one lookup in a cached slice, one file read
            s = peek(st, offset)
            if s is not None:
                kind, host, n = scan(st, s.data, offset, len(buf))
                if kind & KIND_MASK == DATA and n == len(buf):
                    await self.file.pread(host, buf)
                    return
        await read.pread(st, offset, buf)

    async def pwrite(self, offset: int, buf: memoryview, *, fua: bool = False) -> None:
        st = self.st
        st.check_usable(True)
        try:
            host = alloc.in_place_host(st, offset, len(buf)) if st.fast_io else None
            if host is not None:       # an overwrite within one mapped run of a cached slice
                await alloc.write_in_place(st, host, buf)
            else:
                pos, total = 0, len(buf)
                while pos < total:
                    pos += await alloc.write(st, offset + pos, buf[pos:] if pos else buf)
            if fua:
                await self._flush()
        except BlockIOError:
            await st.after_error()
            raise

    async def pwrite_zeroes(self, offset: int, length: int, *, may_unmap: bool = False, fua: bool = False) -> None:
        await zero.pwrite_zeroes(self.st, offset, length, may_unmap=may_unmap)
        if fua:
            await self._flush()

    async def pdiscard(self, offset: int, length: int) -> None:
        await zero.pdiscard(self.st, offset, length)

    async def pwrite_compressed(self, offset: int, buf: memoryview) -> None:
        await compressed.pwrite_compressed(self.st, offset, buf)

    async def flush(self) -> None:
        self.st.check_usable(False)
        if self.read_only:
            return
        await self._flush()

    async def _flush(self) -> None:
        st = self.st
        try:
            async with st.lock:
                await st.flush_caches()
        except BlockIOError:
            await st.after_error()
            raise

    async def truncate(self, size: int) -> None:
        await resize.truncate(self.st, size)

    def check_backing_file(self, name: str, fmt: str) -> None:
        """Names over 1023 bytes (QEMU's limit), or too long for what the header cluster holds besides."""
        if len(name.encode("utf-8", "surrogateescape")) > L.MAX_BACKING_NAME:
            raise InvalidOptionError(f"backing file name too long (qcow2 allows {L.MAX_BACKING_NAME} bytes)")
        L.build_header_cluster(dataclasses.replace(self.st.header, backing_file=name, backing_format=fmt))

    async def change_backing_file(self, name: str | None, fmt: str | None) -> None:
        """The header cluster rewritten whole (zero-padded: no stale bytes of a longer old name) and synced."""
        st = self.st
        st.check_usable(True)
        h = st.header
        async with st.lock:
            old = h.backing_file, h.backing_format, h.backing_file_offset, h.backing_file_size
            h.backing_file, h.backing_format = name, fmt
            try:
                if h.version == 3:
                    h.header_length = L.V3_HEADER_WRITE_LENGTH
                data = L.build_header_cluster(h)
                await st.metaio.write(0, data + bytes(h.cluster_size - len(data)), HEADER)
                await st.metaio.sync()
            except BaseException:
                h.backing_file, h.backing_format, h.backing_file_offset, h.backing_file_size = old
                raise
        self.backing_filename, self.backing_format = name, fmt

    async def check(self, repair: str | None = None) -> CheckResult:
        return await check_image(self.st, repair)

    @classmethod
    async def create(cls, file: BlockDriver, size: int, *, backing: str | None, backing_fmt: str | None,
                     options: Mapping[str, str]) -> None:
        from .create import create_image
        await create_image(file, size, backing=backing, backing_fmt=backing_fmt, options=options)

    # ---- block status -----------------------------------------------------------------------------------

    async def block_status(self, offset: int, length: int) -> Extent:
        """This layer's status; host offsets also for zero clusters and unallocated subclusters that keep
        their host cluster, as QEMU reports them. On an image with preallocated metadata (detected as QEMU
        does: far more clusters referenced than the file really allocates), data ranges over holes of the
        file read as zeroes and say so."""
        st = self.st
        st.check_usable(False)
        kind, host, n = await lookup(st, offset, length)
        kind &= KIND_MASK
        file = self.file if host else None
        if kind == DATA:
            if await self._metadata_preallocated():
                fe = await self.file.block_status(host, n)
                return Extent(offset, fe.length, True, True, fe.zero, host, self.file)
            return Extent(offset, n, True, True, False, host, self.file)
        if kind == ZERO:
            return Extent(offset, n, True, False, True, host or None, file)
        if kind == COMPRESSED:
            return Extent(offset, n, True, True, False)
        return Extent(offset, n, False, False, False, host or None, file)

    async def _metadata_preallocated(self) -> bool:
        """Whether clusters in use outnumber what the file really allocates (by 10 %, and by 2 clusters)."""
        st = self.st
        if st.prealloc is None:
            actual = await self.file.actual_size() or 0
            real = actual // st.cs
            threshold = max(real * 10 // 9, real + 2)
            async with st.lock:
                count = await st.refcounts.count_referenced(-(-self.file.size // st.cs), threshold)
            st.prealloc = count >= threshold
        return st.prealloc


def _size_opt(opts: Mapping[str, Any], name: str, default: int) -> int:
    value = opts.get(name)
    if value is None:
        return default
    try:
        return parse_size(value) if isinstance(value, str) else int(value)
    except (ValueError, InvalidOptionError):
        raise InvalidOptionError(f"Parameter '{name}' expects a size") from None
