"""The qcow2 format node: open/close, the request paths, flush, truncate and info.

State and locks (the one lock order: ``lock`` -> cache slices -> in-flight allocation futures):

* ``lock`` (QEMU's ``s->lock``) guards every metadata structure: header, L1 table, refcount table, both slice
  caches, the metadata map and the in-flight allocation map. It is held around metadata work only; guest
  data and COW I/O run outside it.
* Reads and in-place overwrites look their L2 entry up without the lock when the slice is cached (a lookup has
  no await, and every change of an L2 entry is made without an await in between, so a lookup sees the old or
  the new entry).
* ``_inflight`` maps a guest cluster to the future of the allocation in flight for it: a request that needs
  to change the mapping of such a cluster waits for it and then looks again; requests on other clusters go on.
  A new cluster is filled (data plus COW from its old contents, or zeroes) exactly once, before the L2 entry
  that maps it changes, so a read of a cluster being allocated sees its old contents.

Durability: the L2 cache depends on the refcount cache (refcount before reference) and on a flush of the data
(data and COW before mapping); the refcount cache depends on the L2 cache for decrements (unreference before
free). ``flush`` writes both caches in that order and syncs. With lazy refcounts the dirty bit is set (and
synced) before the first L2 update that skips the refcount ordering and is cleared at close.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import struct
from array import array
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Self

from ...cache import Flusher, SliceCache
from ...driver import BlockDriver, CheckResult, Extent, Limits
from ...errors import BlockIOError, CorruptImageError, InvalidOptionError, NotSupportedError, ReadOnlyError
from ...sizes import parse_size
from . import layout as L
from .compress import CompressedDataError, compress_cluster, decompress_cluster
from .layout import OFLAG_COMPRESSED, OFLAG_COPIED, OFLAG_ZERO, Header, parse_header
from .metaio import (
    CONFLICT,
    DATA,
    HEADER,
    L1,
    L2,
    REFBLOCK,
    REFTABLE,
    SNAPSHOT_L1,
    SNAPSHOTS,
    MetadataMap,
    MetaIO,
    OverlapError,
)
from .refcount import Refcounts, load_table, pack_table

__all__ = ["Qcow2Driver"]

log = logging.getLogger("aioblock.qcow2")

_Q = struct.Struct(">Q")
_QQ = struct.Struct(">QQ")
#: L2 entry bits that make it refer to host clusters
_MAPS_HOST = L.L2E_OFFSET_MASK | OFLAG_COMPRESSED

# what a guest range maps to
UNALLOC, ZERO, NORMAL, COMPRESSED = 0, 1, 2, 3

DEFAULT_L2_CACHE_MAX = 32 << 20
DEFAULT_SLICE = 4096
DEFAULT_REFCOUNT_CLUSTERS = 4
DEFAULT_CLEAN_INTERVAL = 600.0
#: background write-back of dirty metadata: after this long idle, at the latest FLUSH_MAX_AGE after it became
#: dirty (the write-back holds the lock through its syncs: allocating writes wait for it)
FLUSH_DELAY = 0.5
FLUSH_MAX_AGE = 5.0


@dataclass(slots=True)
class _Alloc:
    """One allocating write: guest clusters ``[gc, gc+k)`` get host clusters from ``host`` on."""

    gc: int
    k: int
    host: int
    new: bool                      # host clusters newly allocated (else: in place, extended L2)
    blank: bool                    # no COW needed: it would copy zeroes to clusters that read as zeroes
    region: tuple[int, int]        # guest byte range written to the host (data plus COW)
    bits: list[int]                # extended L2: subclusters written, per cluster
    old: list[tuple[int, int]]     # old (entry, bitmap) per cluster
    future: asyncio.Future[None]


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
    header: Header
    l1: array[int]
    refcounts: Refcounts
    l2cache: SliceCache
    metamap: MetadataMap
    metaio: MetaIO
    snapshots: list[L.Snapshot]

    def __init__(self, file: BlockDriver, header: Header, *, read_only: bool) -> None:
        self.file = file
        self.filename = file.filename
        self.read_only = read_only
        self.header = header
        self.backing_filename = header.backing_file
        self.backing_format = header.backing_format
        self.limits = Limits(request_alignment=file.limits.request_alignment)
        self.lock = asyncio.Lock()
        self.cluster_bits = header.cluster_bits
        self.cs = header.cluster_size
        self.ext_l2 = header.extended_l2
        self.esz = header.l2_entry_size
        self.l2_bits = self.cluster_bits - (4 if self.ext_l2 else 3)
        self.l1_shift = self.cluster_bits + self.l2_bits
        self.sc_size = self.cs // L.SUBCLUSTERS if self.ext_l2 else self.cs
        self.sc_bits = self.sc_size.bit_length() - 1
        self._inflight: dict[int, asyncio.Future[None]] = {}
        #: host cluster -> in-place data writes in progress on it (not reusable while > 0)
        self.busy_hosts: dict[int, int] = {}
        self._prealloc: bool | None = None
        self._fenced: str | None = None
        self._corrupt_pending = False
        self._lazy_dirty = False
        self._closed = False
        self.flusher: Flusher | None = None

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
        h, file, cs = self.header, self.file, self.cs
        self.metamap = MetadataMap(self.cluster_bits)
        self.metaio = MetaIO(file, self.metamap, self._overlap)
        self.l1 = load_table(await self.metaio.read(h.l1_table_offset, h.l1_size * 8) if h.l1_size else b"")
        reftable = load_table(await self.metaio.read(h.refcount_table_offset, h.refcount_table_clusters * cs)
                              if h.refcount_table_clusters else b"")
        self.snapshots = []
        if h.nb_snapshots:
            n = min(L.MAX_SNAPSHOT_TABLE_BYTES, file.size - h.snapshots_offset)
            raw = await self.metaio.read(h.snapshots_offset, n)
            self.snapshots, used = L.parse_snapshots(bytes(raw), h.nb_snapshots, cs, file.size)
            self.metamap.add(h.snapshots_offset, used, SNAPSHOTS)
        mm = self.metamap
        mm.add_tables([(0, cs, HEADER), (h.l1_table_offset, h.l1_size * 8, L1),
                       (h.refcount_table_offset, h.refcount_table_clusters * cs, REFTABLE),
                       *{(sn.l1_table_offset, sn.l1_size * 8, SNAPSHOT_L1) for sn in self.snapshots}])
        cb, size = self.cluster_bits, file.size
        mm.add_blocks((off >> cb for e in reftable
                       if (off := e & L.REFT_OFFSET_MASK) and not off & (cs - 1) and off < size), REFBLOCK)
        mm.add_blocks((off >> cb for e in self.l1
                       if (off := e & L.L1E_OFFSET_MASK) and not off & (cs - 1) and off < size), L2)

        opts = dict(options)
        slice_size = _size_opt(opts, "l2-cache-entry-size", min(DEFAULT_SLICE, cs))
        if slice_size < 512 or slice_size > cs or slice_size & (slice_size - 1):
            raise InvalidOptionError("L2 cache entry size must be a power of two between 512 and the cluster "
                                     f"size ({cs})")
        covering = -(-h.size // cs) * self.esz
        l2_bytes = _size_opt(opts, "l2-cache-size", max(min(covering, DEFAULT_L2_CACHE_MAX), 2 * slice_size))
        rc_bytes = _size_opt(opts, "refcount-cache-size", DEFAULT_REFCOUNT_CLUSTERS * cs)
        interval = float(opts.get("cache-clean-interval", DEFAULT_CLEAN_INTERVAL))
        if interval < 0:
            raise InvalidOptionError("Cache clean interval too big")
        self.l2cache = SliceCache("l2", self.metaio, slice_size=slice_size, capacity=max(2, l2_bytes // slice_size))
        rcache = SliceCache("refblock", self.metaio, slice_size=cs, capacity=max(2, rc_bytes // cs))
        self.refcounts = Refcounts(self, reftable, rcache)
        self.slice_entries = slice_size // self.esz
        self._slice_bytes = slice_size
        self._slice_shift = self.slice_entries.bit_length() - 1
        self._slice_mask = self.slice_entries - 1
        self._l2_index_mask = (1 << self.l2_bits) - 1
        #: the lock-free single-cluster fast paths apply (standard L2 entries, byte-addressable file, healthy)
        self._fast_io = not self.ext_l2 and self.metaio.align == 1
        if not self.read_only:
            self.flusher = Flusher(self.lock, self._flush_caches, delay=FLUSH_DELAY, max_age=FLUSH_MAX_AGE,
                                   clean_fn=self._clean_caches, clean_interval=interval)
            self.l2cache.on_dirty = self.flusher.notify
            rcache.on_dirty = self.flusher.notify

    async def _open_rw(self) -> None:
        h = self.header
        if h.dirty:
            from .check import check_image
            log.warning("qcow2: Rebuilding refcount structure of %s (dirty image)", self.filename)
            res = await check_image(self, "all")
            if res.corruptions or res.check_errors or res.failed:
                raise CorruptImageError("Could not repair dirty image: errors remain after repair")
            h.incompatible_features &= ~L.INCOMPAT_DIRTY
            await self.write_header()
        if h.autoclear_features:
            h.autoclear_features = 0
            await self.write_header()

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            if not self.read_only and not self._fenced:
                async with self.lock:
                    await self._flush_caches()
                    if self._lazy_dirty:
                        self.header.incompatible_features &= ~L.INCOMPAT_DIRTY
                        await self.write_header()
                        self._lazy_dirty = False
        finally:
            await self._stop()

    async def _stop(self) -> None:
        if self.flusher is not None:
            await self.flusher.aclose()

    # ---- header and corruption ----------------------------------------------------------------------------

    async def write_header(self) -> None:
        """Rewrite the header cluster's used bytes (fields, extensions, backing name) and sync."""
        h = self.header
        if h.version == 3:
            h.header_length = L.V3_HEADER_WRITE_LENGTH
        data = L.build_header_cluster(h)
        await self.metaio.write(0, data, HEADER)
        await self.metaio.sync()

    async def write_header_bytes(self, offset: int, data: bytes) -> None:
        """Rewrite a few header fields in place (one write), then sync."""
        await self.metaio.write(offset, data, HEADER)
        await self.metaio.sync()

    def corruption(self, msg: str) -> BlockIOError:
        """Corrupt metadata found: on a writable image mark it corrupt (at the end of the request) and fence
        the node, as QEMU does; read-only: just fail the request. Returns the EIO to raise."""
        if self.read_only:
            log.error("qcow2: Image is corrupt: %s; further non-fatal corruption events will be suppressed", msg)
        elif self._fenced is None:
            log.error("qcow2: Marking image as corrupt: %s; further corruption events will be suppressed", msg)
            self._fenced = msg
            self._fast_io = False
            self._corrupt_pending = True
        return BlockIOError(errno.EIO, msg, filename=self.filename)

    def _overlap(self, exc: OverlapError) -> BaseException:
        return self.corruption(str(exc))

    async def _after_error(self) -> None:
        """Write the corrupt bit if a request just found corruption (best effort; v2 has no such bit, and
        its bytes 72.. hold header extensions)."""
        if self._corrupt_pending:
            self._corrupt_pending = False
            if self.header.version < 3:
                return
            self.header.incompatible_features |= L.INCOMPAT_CORRUPT
            try:
                await self.metaio.write(72, _Q.pack(self.header.incompatible_features), HEADER)
                await self.metaio.sync()
            except Exception as exc:            # the image is fenced either way
                log.error("qcow2: could not mark the image corrupt: %s", exc)

    def _check_usable(self, write: bool) -> None:
        if self._fenced is not None:
            raise BlockIOError(errno.ENOMEDIUM, "No medium found", filename=self.filename)
        if write and self.read_only:
            raise ReadOnlyError("Block node is read-only", filename=self.filename)

    # ---- properties and info ----------------------------------------------------------------------------

    @property
    def size(self) -> int:
        return self.header.size

    @property
    def cluster_size(self) -> int | None:
        return self.cs

    @property
    def vm_state_offset(self) -> int:
        """Where internal snapshots' VM state starts (the first guest offset the L1 table cannot reach at the
        image's size; qemu-io's ``info``)."""
        return L.size_to_l1(self.header.size, self.cluster_bits, self.ext_l2) << self.l1_shift

    @property
    def dirty(self) -> bool:
        return self.header.dirty or self._lazy_dirty

    def info(self) -> dict[str, Any]:
        h = self.header
        data: dict[str, Any] = {"compat": "0.10" if h.version == 2 else "1.1",
                                "compression-type": L.COMPRESSION_NAMES[h.compression_type]}
        if h.version >= 3:
            data["lazy-refcounts"] = h.lazy_refcounts
        data["refcount-bits"] = h.refcount_bits
        if h.version >= 3:
            data["corrupt"] = h.corrupt or self._fenced is not None
            data["extended-l2"] = h.extended_l2
        return data

    def snapshot_info(self) -> list[dict[str, Any]]:
        out = []
        for sn in self.snapshots:
            entry: dict[str, Any] = {}
            if sn.icount is not None:
                entry["icount"] = sn.icount
            entry.update({"vm-clock-nsec": sn.vm_clock_nsec % 1_000_000_000, "name": sn.name,
                          "date-sec": sn.date_sec, "date-nsec": sn.date_nsec,
                          "vm-clock-sec": sn.vm_clock_nsec // 1_000_000_000, "id": sn.id,
                          "vm-state-size": sn.vm_state_size})
            out.append(entry)
        return out

    def cache_statistics(self) -> dict[str, dict[str, int]]:
        return {"l2": self.l2cache.stats.to_dict(), "refblock": self.refcounts.cache.stats.to_dict()}

    # ---- mapping --------------------------------------------------------------------------------------------

    def _l2_offset(self, l1i: int) -> int:
        e = self.l1[l1i]
        off = e & L.L1E_OFFSET_MASK
        if off & (self.cs - 1):
            raise self.corruption(f"L2 table offset {off:#x} unaligned (L1 index: {_hx(l1i)})")
        return off

    def _slice_offset(self, l2off: int, guest: int) -> int:
        idx = (guest >> self.cluster_bits) & ((1 << self.l2_bits) - 1)
        return l2off + (idx // self.slice_entries) * self.l2cache.slice_size

    async def _slice(self, guest: int) -> Any:
        """The cached, pinned L2 slice for ``guest`` (None when no L2 table maps it). Under the lock."""
        l2off = self._l2_offset(guest >> self.l1_shift)
        if not l2off:
            return None
        if l2off >= self.file.size:
            raise self.corruption(f"L2 table at {l2off:#x} lies beyond the end of the file")
        if self.metamap.kind_at(l2off) == CONFLICT:
            raise self.corruption(f"L2 table at {l2off:#x} overlaps other metadata")
        return await self.l2cache.get(self._slice_offset(l2off, guest))

    def _scan(self, data: bytearray, guest: int, length: int) -> tuple[int, int, int]:
        """What ``[guest, guest+length)`` maps to in a slice, for its longest prefix of one kind.

        Returns (kind, host offset of ``guest`` for NORMAL / the L2 entry for COMPRESSED / 0, bytes)."""
        cb, cs = self.cluster_bits, self.cs
        idx = (guest >> cb) & (self.slice_entries - 1)
        kind, host, n = self._unit(data, idx, guest)
        if kind == COMPRESSED or n >= length:
            return kind, host, min(length, n)
        if not self.ext_l2:
            # A standard entry continues the run iff it equals the previous one advanced by a cluster (by
            # nothing when the run has no host offset): same flags, so same kind and the same validity.
            last = min(self.slice_entries, idx + 1 + ((length - n + cs - 1) >> cb))
            step = cs if host else 0
            expect = _Q.unpack_from(data, idx * 8)[0]
            for entry in struct.unpack_from(f">{last - idx - 1}Q", data, idx * 8 + 8):
                expect += step
                if entry != expect:
                    break
                n += cs
            return kind, host, min(n, length)
        end_host = host + n
        pos = guest + n
        last = self.slice_entries
        while n < length:
            if pos & (cs - 1) == 0:
                idx += 1
                if idx >= last:
                    break
            k2, h2, n2 = self._unit(data, idx, pos)
            if k2 != kind or h2 != (end_host if host else 0):
                break
            n += n2
            pos += n2
            end_host += n2
        return kind, host, min(n, length)

    def _unit(self, data: bytearray, idx: int, guest: int) -> tuple[int, int, int]:
        """Kind, host offset and length of the (sub)cluster containing ``guest``, from its offset to its end."""
        cs = self.cs
        within = guest & (cs - 1)
        if not self.ext_l2:
            entry = _Q.unpack_from(data, idx * 8)[0]
            if entry & OFLAG_COMPRESSED:
                return COMPRESSED, entry, cs - within
            host = entry & L.L2E_OFFSET_MASK
            if entry & OFLAG_ZERO:
                if self.header.version < 3:
                    raise self.corruption(f"Zero cluster entry found in pre-v3 image ({self._where(guest)})")
                if host & (cs - 1):
                    raise self.corruption(f"Preallocated zero cluster offset {host:#x} unaligned (guest offset: "
                                          f"{_hx(guest & ~(cs - 1))})")
                return ZERO, host + within if host else 0, cs - within
            if host:
                if host & (cs - 1):
                    raise self.corruption(f"Cluster allocation offset {host:#x} unaligned ({self._where(guest)})")
                return NORMAL, host + within, cs - within
            return UNALLOC, 0, cs - within
        entry, bitmap = _QQ.unpack_from(data, idx * 16)
        if entry & OFLAG_COMPRESSED:
            return COMPRESSED, entry, cs - within
        sc = within >> self.sc_bits
        rest = self.sc_size - (within & (self.sc_size - 1))
        alloc = bitmap >> sc & 1
        if alloc and bitmap >> (L.SC_ZERO_SHIFT + sc) & 1:
            raise self.corruption(f"Invalid subcluster bitmap {bitmap:#x} ({self._where(guest)})")
        host = entry & L.L2E_OFFSET_MASK
        if host & (cs - 1) or (alloc and not host):
            raise self.corruption(f"Cluster allocation offset {host:#x} invalid ({self._where(guest)})")
        at = host + within if host else 0
        if alloc:
            return NORMAL, at, rest
        if bitmap >> (L.SC_ZERO_SHIFT + sc) & 1:
            return ZERO, at, rest
        return UNALLOC, at, rest

    def _where(self, guest: int) -> str:
        """"L2 offset: 0x..., L2 index: N" for the L2 entry of ``guest``, as QEMU words it."""
        l2off = self.l1[guest >> self.l1_shift] & L.L1E_OFFSET_MASK
        return f"L2 offset: {_hx(l2off)}, L2 index: {_hx((guest >> self.cluster_bits) & self._l2_index_mask)}"

    async def _lookup(self, guest: int, length: int) -> tuple[int, int, int]:
        """(kind, host, bytes) for a prefix of the range; the lock only when the slice must be loaded."""
        l2off = self._l2_offset(guest >> self.l1_shift)
        if not l2off:
            span = (1 << self.l1_shift) - (guest & ((1 << self.l1_shift) - 1))
            return UNALLOC, 0, min(length, span)
        s = self.l2cache.peek(self._slice_offset(l2off, guest))
        if s is not None:
            return self._scan(s.data, guest, length)
        async with self.lock:
            s = await self._slice(guest)
            if s is None:
                return UNALLOC, 0, min(length, self.cs - (guest & (self.cs - 1)))
            try:
                return self._scan(s.data, guest, length)
            finally:
                self.l2cache.put(s)

    # ---- read ---------------------------------------------------------------------------------------------

    def _cached_entry(self, offset: int, length: int) -> int | None:
        """The standard L2 entry mapping ``[offset, offset+length)`` when the range lies in one cluster and its
        L2 slice is cached; None otherwise. No await: the lock-free fast path of pread."""
        cs = self.cs
        if not self._fast_io or (offset & (cs - 1)) + length > cs:
            return None
        l2off = self.l1[offset >> self.l1_shift] & L.L1E_OFFSET_MASK
        if not l2off or l2off & (cs - 1):
            return None
        gc = (offset >> self.cluster_bits) & self._l2_index_mask
        s = self.l2cache.peek(l2off + (gc >> self._slice_shift) * self._slice_bytes)
        if s is None:
            return None
        entry: int = _Q.unpack_from(s.data, (gc & self._slice_mask) << 3)[0]
        host = entry & L.L2E_OFFSET_MASK
        return entry if host and not host & (cs - 1) else None

    async def pread(self, offset: int, buf: memoryview) -> None:
        entry = self._cached_entry(offset, len(buf))
        if entry is not None and not entry & (OFLAG_COMPRESSED | OFLAG_ZERO):
            await self.file.pread((entry & L.L2E_OFFSET_MASK) + (offset & (self.cs - 1)), buf)
            return
        self._check_usable(False)
        try:
            await self._read(offset, buf)
        except BlockIOError:
            await self._after_error()
            raise

    async def _read(self, offset: int, buf: memoryview) -> None:
        pos, total = 0, len(buf)
        while pos < total:
            kind, host, n = await self._lookup(offset + pos, total - pos)
            view = buf[pos:pos + n]
            if kind == NORMAL:
                await self.metaio.read_into(host, view)
            elif kind == ZERO:
                view[:] = bytes(n)
            elif kind == UNALLOC:
                await self._read_backing(offset + pos, view)
            else:
                await self._read_compressed(host, offset + pos, view)
            pos += n

    async def _read_backing(self, offset: int, view: memoryview) -> None:
        b = self.backing
        n = len(view)
        if b is None or offset >= b.size:
            view[:] = bytes(n)
            return
        m = min(n, b.size - offset)
        a = b.limits.request_alignment
        if a > 1 and (offset % a or m % a):
            start = offset - offset % a
            end = min(-(-(offset + m) // a) * a, b.size)
            tmp = bytearray(end - start)
            await b.pread(start, memoryview(tmp))
            view[:m] = tmp[offset - start:offset - start + m]
        else:
            await b.pread(offset, view[:m])
        if m < n:
            view[m:] = bytes(n - m)

    async def _read_compressed(self, entry: int, guest: int, view: memoryview) -> None:
        data = await self._decompress(entry)
        within = guest & (self.cs - 1)
        view[:] = data[within:within + len(view)]

    async def _decompress(self, entry: int) -> bytes:
        coff, clen = L.compressed_descriptor(entry, self.cluster_bits)
        if coff + clen > self.file.size + 511 or coff == 0:
            raise BlockIOError(errno.EIO, f"compressed cluster at {coff:#x} lies beyond the end of the file",
                               filename=self.filename)
        self.file.event("read_compressed")
        raw = await self.metaio.read(coff, min(clen, self.file.size - coff))
        try:
            return decompress_cluster(self.header.compression_type, raw, self.cs)
        except CompressedDataError as exc:
            raise BlockIOError(errno.EIO, f"bad compressed cluster at {coff:#x}: {exc}",
                               filename=self.filename) from None

    # ---- write ----------------------------------------------------------------------------------------------

    async def pwrite(self, offset: int, buf: memoryview, *, fua: bool = False) -> None:
        self._check_usable(True)
        try:
            pos, total = 0, len(buf)
            while pos < total:
                pos += await self._write_some(offset + pos, buf[pos:] if pos else buf)
            if fua:
                await self.flush()
        except BlockIOError:
            await self._after_error()
            raise

    def _overwrite_plan(self, data: bytearray, guest: int, length: int) -> tuple[int, int] | None:
        """(host, bytes) when the start of the range can be overwritten in place: a normal cluster with
        refcount 1 (COPIED) and, with extended L2, allocated subclusters."""
        cs = self.cs
        idx = (guest >> self.cluster_bits) & (self.slice_entries - 1)
        n = 0
        host0 = -1
        pos = guest
        while n < length and idx < self.slice_entries:
            if self.ext_l2:
                entry, bitmap = _QQ.unpack_from(data, idx * 16)
            else:
                entry, bitmap = _Q.unpack_from(data, idx * 8)[0], 0
            if (entry & (OFLAG_COPIED | OFLAG_COMPRESSED | OFLAG_ZERO)) != OFLAG_COPIED:
                break
            host = entry & L.L2E_OFFSET_MASK
            if not host or host & (cs - 1):
                break
            within = pos & (cs - 1)
            take = min(cs - within, length - n)
            if self.ext_l2:
                first = within >> self.sc_bits
                last = (within + take - 1) >> self.sc_bits
                mask = ((1 << (last + 1)) - 1) & ~((1 << first) - 1)
                if bitmap & mask != mask:
                    break
            if host0 < 0:
                host0 = host + within
            elif host + within != host0 + n:
                break
            n += take
            pos += take
            idx += 1
        return (host0, n) if n else None

    async def _write_some(self, guest: int, view: memoryview) -> int:
        """Write a prefix of ``view`` at ``guest``; returns how many bytes were written."""
        length = len(view)
        cb = self.cluster_bits
        while True:
            # fast paths, without the lock: the L2 slice is cached and no allocation of the cluster is in flight
            l1e = self.l1[guest >> self.l1_shift]
            l2off = l1e & L.L1E_OFFSET_MASK
            if l1e & OFLAG_COPIED and l2off and not l2off & (self.cs - 1) and (guest >> cb) not in self._inflight:
                s = self.l2cache.peek(self._slice_offset(l2off, guest))
                if s is not None:
                    plan = self._overwrite_plan(s.data, guest, length)
                    if plan is not None:
                        host, n = plan
                        await self._write_in_place(host, view[:n])
                        return n
                    alloc = self._start_alloc_now(s.data, guest, length)
                    if alloc is not None:
                        return await self._finish_alloc(alloc, guest, view)
            async with self.lock:
                waiter = self._inflight.get(guest >> cb)
                if waiter is None:
                    s = await self._l2_for_write(guest)
                    try:
                        plan = self._overwrite_plan(s.data, guest, length)
                        alloc = None if plan is not None else await self._start_alloc(s.data, guest, length)
                    finally:
                        self.l2cache.put(s)
            if waiter is not None:
                await asyncio.shield(waiter)
                continue
            if plan is not None:
                host, n = plan
                await self._write_in_place(host, view[:n])
                return n
            assert alloc is not None
            return await self._finish_alloc(alloc, guest, view)

    async def _write_in_place(self, host: int, view: memoryview) -> None:
        """Overwrite mapped data without the lock. The host clusters stay in ``busy_hosts`` meanwhile, so that
        a concurrent discard that frees them cannot have them reallocated (as metadata, say) under the write."""
        cb = self.cluster_bits
        clusters = range(host >> cb, ((host + len(view) - 1) >> cb) + 1)
        busy = self.busy_hosts
        for c in clusters:
            busy[c] = busy.get(c, 0) + 1
        try:
            await self.metaio.write(host, view, DATA)
        finally:
            for c in clusters:
                if busy[c] == 1:
                    del busy[c]
                else:
                    busy[c] -= 1

    async def _l2_for_write(self, guest: int) -> Any:
        """The pinned L2 slice for ``guest``, after making its L2 table exist and be ours (COPIED). Locked."""
        l1i = guest >> self.l1_shift
        l2off = self._l2_offset(l1i)
        if not l2off or not self.l1[l1i] & OFLAG_COPIED:
            await self._alloc_l2(l1i, l2off)
        s = await self._slice(guest)
        assert s is not None
        return s

    async def _alloc_l2(self, l1i: int, old: int) -> None:
        """A new L2 table for L1 index ``l1i``: zeroed, or a copy of the shared table ``old`` (I3)."""
        cs = self.cs
        await self._make_dirty_if_lazy()
        self.file.event("l2_alloc")
        new = await self.refcounts.alloc(1)
        try:
            if old:
                await self.l2cache.flush()
                content: bytes | bytearray = await self.metaio.read(old, cs)
            else:
                content = bytes(cs)
            if not self.header.lazy_refcounts:
                await self.refcounts.cache.flush()
            self.file.event("l2_alloc_write")
            self.metamap.add(new, cs, L2)
            await self.metaio.write(new, content, L2)
            await self.metaio.sync()
            saved = self.l1[l1i]
            self.l1[l1i] = new | OFLAG_COPIED
            try:
                self.file.event("l1_update")
                await self._write_l1_entries(l1i, l1i + 1)
            except BaseException:
                self.l1[l1i] = saved
                raise
        except BaseException:
            self.metamap.remove(new, cs)
            self.l2cache.discard(new, cs)
            await self.refcounts.update(new, cs, -1)
            raise
        if old:                                 # the shared table stays with the snapshots that use it
            self.l2cache.discard(old, cs)
            self.metamap.remove(old, cs)
            await self.refcounts.update(old, cs, -1)

    async def _write_l1_entries(self, first: int, end: int) -> None:
        align = max(self.metaio.align, 8) // 8
        lo = first - first % align
        hi = min(-(-end // align) * align, len(self.l1))
        await self.metaio.write(self.header.l1_table_offset + lo * 8, pack_table(self.l1, lo, hi), L1)
        await self.metaio.sync()

    async def _make_dirty_if_lazy(self) -> None:
        """Lazy refcounts: set the dirty bit (synced) before the first update that skips refcount ordering."""
        if self.header.lazy_refcounts and not self._lazy_dirty and not self.header.dirty:
            self.header.incompatible_features |= L.INCOMPAT_DIRTY
            try:
                await self.write_header_bytes(72, _Q.pack(self.header.incompatible_features))
            except BaseException:
                self.header.incompatible_features &= ~L.INCOMPAT_DIRTY
                raise
            self._lazy_dirty = True

    async def _start_alloc(self, data: bytearray, guest: int, length: int) -> _Alloc:
        """Plan and allocate host clusters for the start of the range; registers the allocation in flight.
        Called with the lock held and the slice pinned."""
        cs, cb = self.cs, self.cluster_bits
        gc = guest >> cb
        idx = gc & (self.slice_entries - 1)
        entry, _ = self._entry(data, idx)
        in_place = bool(self.ext_l2 and entry & OFLAG_COPIED and not entry & OFLAG_COMPRESSED
                        and entry & L.L2E_OFFSET_MASK)
        replaces = bool(entry & OFLAG_COMPRESSED or entry & L.L2E_OFFSET_MASK) and not in_place
        end = guest + length
        if self.ext_l2 and (in_place or replaces):
            k = 1
        else:
            # a run of clusters that all need a new host cluster, none in flight
            k = 1
            limit = min(-(-end // cs) - gc, self.slice_entries - idx)
            while k < limit and (gc + k) not in self._inflight:
                e2, _ = self._entry(data, idx + k)
                if e2 & OFLAG_COPIED and not e2 & (OFLAG_COMPRESSED | OFLAG_ZERO):
                    break
                if self.ext_l2 and (e2 & OFLAG_COMPRESSED or e2 & L.L2E_OFFSET_MASK):
                    break
                k += 1
        data_end = min(end, (gc + k) << cb)
        if self.ext_l2 and not replaces:
            # COW only the partial subclusters that are not allocated in place: an allocated one may be
            # overwritten concurrently by an in-place write, which a copy of its old bytes would undo
            sc = self.sc_size
            region = (guest - guest % sc, -(-data_end // sc) * sc)
            if in_place:
                _, bitmap = self._entry(data, idx)
                if bitmap >> ((guest & (cs - 1)) >> self.sc_bits) & 1:
                    region = (guest, region[1])
                if bitmap >> (((data_end - 1) & (cs - 1)) >> self.sc_bits) & 1:
                    region = (region[0], data_end)
        else:
            region = (gc << cb, (gc + k) << cb)
        bits = []
        if self.ext_l2:
            for i in range(k):
                c0 = (gc + i) << cb
                lo = max(region[0], c0) - c0
                hi = min(region[1], c0 + cs) - c0
                first, last = lo >> self.sc_bits, (hi - 1) >> self.sc_bits
                bits.append(((1 << (last + 1)) - 1) & ~((1 << first) - 1))
        old = [self._entry(data, idx + i) for i in range(k)]
        if in_place:
            host, new = entry & L.L2E_OFFSET_MASK, False
        else:
            await self._make_dirty_if_lazy()
            self.file.event("cluster_alloc")
            host, new = await self.refcounts.alloc(k), True
        return self._register_alloc(gc, k, host, new, region, bits, old)

    def _start_alloc_now(self, data: bytearray, guest: int, length: int) -> _Alloc | None:
        """``_start_alloc`` in one synchronous step for the common case; None when the slow path is needed.

        The common case: standard L2 entries that map no host cluster (unallocated or zero), none in flight,
        in the cached slice ``data`` of an L2 table of ours, with free host clusters in a cached refcount block
        and no lazy-refcounts dirty bit to set. The metadata lock must be free: then nothing is half-changed,
        and as nothing here suspends, this runs as a critical section of its own."""
        if self.lock.locked() or self.ext_l2 or (self.header.lazy_refcounts and not self.dirty):
            return None
        cs, cb = self.cs, self.cluster_bits
        gc = guest >> cb
        idx = gc & self._slice_mask
        limit = min(-(-(guest + length) // cs) - gc, self.slice_entries - idx)
        old: list[tuple[int, int]] = []
        inflight, k = self._inflight, 0
        while k < limit and gc + k not in inflight:
            entry = _Q.unpack_from(data, (idx + k) * 8)[0]
            if entry & _MAPS_HOST:
                break
            old.append((entry, 0))
            k += 1
        host = self.refcounts.alloc_now(k) if k else None
        if host is None:
            return None
        self.file.event("cluster_alloc")
        return self._register_alloc(gc, k, host, True, (gc << cb, (gc + k) << cb), [], old)

    def _register_alloc(self, gc: int, k: int, host: int, new: bool, region: tuple[int, int], bits: list[int],
                        old: list[tuple[int, int]]) -> _Alloc:
        """Register an allocation of guest clusters ``[gc, gc+k)`` as in flight."""
        # New clusters past the end of the file have never been written (only their owner will write them,
        # and I/O to a cluster finishes before it can be freed): they read as zeroes, so when what they
        # replace reads as zeroes too (it maps nothing, and there is no backing file) nothing is copied.
        blank = (new and host >= self.file.size and self.backing is None
                 and not any(e & _MAPS_HOST for e, _ in old))
        fut = asyncio.get_running_loop().create_future()
        for i in range(k):
            self._inflight[gc + i] = fut
        return _Alloc(gc, k, host, new, blank, region, bits, old, fut)

    def _entry(self, data: bytearray, idx: int) -> tuple[int, int]:
        if self.ext_l2:
            e, b = _QQ.unpack_from(data, idx * 16)
            return e, b
        return _Q.unpack_from(data, idx * 8)[0], 0

    async def _finish_alloc(self, a: _Alloc, guest: int, view: memoryview) -> int:
        """Fill the new (sub)clusters with COW and data, then map them. Runs without the lock."""
        cb = self.cluster_bits
        g0 = a.gc << cb
        r0, r1 = a.region
        n = min(len(view), r1 - guest)
        ok = False
        try:
            host_of = a.host + (r0 - g0)
            if r0 < guest and not a.blank:
                await self._cow(r0, guest, host_of)
            self.file.event("write_aio")
            await self.metaio.write(a.host + (guest - g0), view[:n], DATA)
            if guest + n < r1 and not a.blank:
                await self._cow(guest + n, r1, a.host + (guest + n - g0))
            if not self._link_now(a):
                async with self.lock:
                    freed = await self._link(a)
                    ok = True                   # mapped: a failure from here on must not free the new clusters
                    for entry in freed:
                        await self._free_entry(entry)
            ok = True
        finally:
            if not ok:
                async with self.lock:
                    for i in range(a.k):
                        self._inflight.pop(a.gc + i, None)
                    if a.new:
                        with contextlib.suppress(BlockIOError):      # a leak at worst
                            await self.refcounts.update(a.host, a.k << cb, -1)
            if not a.future.done():
                a.future.set_result(None)
        return n

    async def _cow(self, start: int, end: int, host: int) -> None:
        """Copy the current contents of guest ``[start, end)`` to ``host`` (a cluster being allocated)."""
        pos = start
        while pos < end:
            kind, _, n = await self._lookup(pos, end - pos)
            if self._reads_zero(kind, pos):
                self.file.event("cow_write")
                await self.metaio.write_zeroes(host + pos - start, n)
            else:
                buf = bytearray(n)
                self.file.event("cow_read")
                await self._read(pos, memoryview(buf))
                self.file.event("cow_write")
                await self.metaio.write(host + pos - start, buf, DATA)
            pos += n

    async def _link(self, a: _Alloc) -> list[int]:
        """Map the filled clusters (lock held): dependencies, then the L2 entries. Returns the old entries
        whose references the caller must drop; if this raises, nothing was mapped."""
        cb = self.cluster_bits
        guest = a.gc << cb
        s = await self._l2_for_write(guest)
        freed: list[int] = []
        try:
            if not self.header.lazy_refcounts:
                await self.l2cache.set_dependency(self.refcounts.cache)
            self.l2cache.set_depends_on_flush()
            idx = a.gc & (self.slice_entries - 1)
            data = s.data
            for i in range(a.k):
                old_entry, old_bitmap = self._entry(data, idx + i)
                host = a.host + (i << cb)
                if self.ext_l2:
                    # a replaced cluster was copied whole (bits: all); an in-place one keeps its bits
                    bits = a.bits[i]
                    alloc = ((0 if a.new else old_bitmap) | bits) & L.SC_ALLOC_MASK
                    zero = (old_bitmap >> L.SC_ZERO_SHIFT) & ~bits & L.SC_ALLOC_MASK
                    _QQ.pack_into(data, (idx + i) * 16, host | OFLAG_COPIED, alloc | (zero << L.SC_ZERO_SHIFT))
                else:
                    _Q.pack_into(data, (idx + i) * 8, host | OFLAG_COPIED)
                if a.new:
                    freed.append(old_entry)
            self.l2cache.mark_dirty(s)
            for i in range(a.k):
                self._inflight.pop(a.gc + i, None)
        finally:
            self.l2cache.put(s)
        return freed

    def _link_now(self, a: _Alloc) -> bool:
        """``_link`` in one synchronous step for the common case; False (nothing changed) when the slow path
        is needed. The common case: standard L2 entries that map nothing (so nothing to free) in a cached
        slice of an L2 table of ours, and the L2-after-refcount ordering set without a flush. Lock rule as
        for ``_start_alloc_now``."""
        if self.lock.locked() or self.ext_l2 or not a.new:
            return False
        cb = self.cluster_bits
        guest = a.gc << cb
        l1e = self.l1[guest >> self.l1_shift]
        if not l1e & OFLAG_COPIED:
            return False
        s = self.l2cache.peek(self._slice_offset(l1e & L.L1E_OFFSET_MASK, guest))
        if s is None:
            return False
        data, idx = s.data, a.gc & self._slice_mask
        for i in range(a.k):
            if _Q.unpack_from(data, (idx + i) * 8)[0] & _MAPS_HOST:
                return False
        if not self.header.lazy_refcounts and not self.l2cache.set_dependency_now(self.refcounts.cache):
            return False
        self.l2cache.set_depends_on_flush()
        for i in range(a.k):
            _Q.pack_into(data, (idx + i) * 8, (a.host + (i << cb)) | OFLAG_COPIED)
            self._inflight.pop(a.gc + i, None)
        self.l2cache.mark_dirty(s)
        return True

    async def _free_entry(self, entry: int, freed: list[int] | None = None) -> None:
        """Drop the reference an (old) L2 entry held (lock held); ``freed`` gets the clusters freed."""
        self.file.event("cluster_free")
        if entry & OFLAG_COMPRESSED:
            coff, clen = L.compressed_descriptor(entry, self.cluster_bits)
            await self.refcounts.update(coff, clen, -1, freed=freed)
            return
        host = entry & L.L2E_OFFSET_MASK
        if host:
            await self.refcounts.update(host, self.cs, -1, freed=freed)

    async def _punch(self, clusters: list[int]) -> None:
        """Give the host file back the space of clusters a guest discard freed (QEMU's pass-discard-request).

        Lock held: the clusters are free but not reusable before the next metadata flush, which needs the lock,
        so nothing can be written to them meanwhile. If the freeing metadata does not reach the disk (a crash),
        the old mapping reads zeroes: what a discard or an unmapping write-zeroes allows. Clusters freed for
        other reasons (a copy-on-write replacing one) are not punched: their old mapping must keep its data
        until the new one is durable."""
        cb = self.cluster_bits
        clusters.sort()
        i = 0
        while i < len(clusters):
            j = i + 1
            while j < len(clusters) and clusters[j] == clusters[j - 1] + 1:
                j += 1
            await self.metaio.discard(clusters[i] << cb, (j - i) << cb)
            i = j

    # ---- zeroes, discard, compressed writes -------------------------------------------------------------

    async def pwrite_zeroes(self, offset: int, length: int, *, may_unmap: bool = False, fua: bool = False) -> None:
        """Zero a range as QEMU 7.2 does, so that images come out allocated alike.

        v3: whole (sub)clusters get the zero flag (keeping their host cluster unless ``may_unmap``); a partial
        unit whose other bytes already read as zeroes and that is unallocated or zero becomes a zero unit;
        other partial units get zeroes written. v2 has no zero flag: without a backing file whole clusters are
        deallocated (they then read as zeroes) and partial ones written with zeroes where needed; with a
        backing file, deallocating would expose it, so zeroes are written (NotSupportedError: the backend
        writes zero buffers)."""
        self._check_usable(True)
        v3 = self.header.version >= 3
        if not v3 and self.backing is not None:
            raise NotSupportedError("qcow2 v2 cannot record zero clusters over a backing file")
        unit = self.sc_size
        end = offset + length
        try:
            head_end = min(end, -(-offset // unit) * unit)
            # the partial unit at the end of an image is zeroed whole, as QEMU does
            tail_start = end if end == self.size else max(head_end, end - end % unit)
            if offset < head_end:
                await self._zero_partial(offset, head_end, may_unmap)
            if head_end < tail_start:
                await self._rewrite_entries(head_end, tail_start, "zero", may_unmap)
            if tail_start < end:
                await self._zero_partial(tail_start, end, may_unmap)
            if fua:
                await self.flush()
        except BlockIOError:
            await self._after_error()
            raise

    async def _zero_partial(self, start: int, end: int, unmap: bool, *, force: bool = False) -> None:
        """Zero part of one (sub)cluster: mark the whole unit zero where that changes nothing else (v3),
        else write zeroes unless the part already reads as zeroes (``force``: write them anyway)."""
        if not force and self.header.version >= 3:
            u0 = start - start % self.sc_size
            u1 = min(u0 + self.sc_size, self.size)
            kind, _, n = await self._lookup(u0, u1 - u0)
            if (n == u1 - u0 and kind in (UNALLOC, ZERO) and self._reads_zero(kind, u0)
                    and await self._rewrite_entries(u0, u1, "zero", unmap, only_if_zero=True)):
                return
        pos = start
        while pos < end:
            kind, _, n = await self._lookup(pos, end - pos)
            if force or not self._reads_zero(kind, pos):
                buf = bytes(n)
                done = 0
                while done < n:
                    done += await self._write_some(pos + done, memoryview(buf)[done:])
            pos += n

    def _reads_zero(self, kind: int, guest: int) -> bool:
        return kind == ZERO or (kind == UNALLOC and (self.backing is None or guest >= self.backing.size))

    async def _wait_range(self, start: int, end: int) -> None:
        """Wait (lock held on entry and exit) until no allocation is in flight for clusters of the range."""
        cb = self.cluster_bits
        while True:
            fut = next((f for c in range(start >> cb, ((end - 1) >> cb) + 1) if (f := self._inflight.get(c))), None)
            if fut is None:
                return
            self.lock.release()
            try:
                await asyncio.shield(fut)
            finally:
                await self.lock.acquire()

    async def pdiscard(self, offset: int, length: int) -> None:
        self._check_usable(True)
        cs = self.cs
        start = -(-offset // cs) * cs
        end = offset + length
        if end != self.size:
            end -= end % cs
        if start >= end:
            return
        if self.header.version < 3 and self.backing is not None:
            return
        try:
            await self._rewrite_entries(start, end, "discard", True)
        except BlockIOError:
            await self._after_error()
            raise

    async def _rewrite_entries(self, start: int, end: int, op: str, unmap: bool, *,
                               only_if_zero: bool = False) -> bool:
        """Zero (``op="zero"``, whole subclusters) or discard (whole clusters) the L2 entries of a range.

        A unit that cannot be expressed in the L2 entry (part of a compressed cluster) is zeroed by writing
        zeroes through the data path instead, after the lock is released. ``only_if_zero`` (one unit): do it
        only if the unit, checked under the lock once no allocation is in flight for it, is still unallocated
        or zero and reads as zeroes; returns whether the entries were rewritten."""
        cb, cs = self.cluster_bits, self.cs
        fallback: list[tuple[int, int]] = []
        async with self.lock:
            pos = start
            if only_if_zero:
                await self._wait_range(start, end)
                kind, _, n = await self._lookup_locked(start, end - start)
                if n != end - start or kind not in (UNALLOC, ZERO) or not self._reads_zero(kind, start):
                    return False
            while pos < end:
                await self._wait_range(pos, min(end, ((pos >> cb) + 1) << cb))
                l1i = pos >> self.l1_shift
                span_end = min(end, (l1i + 1) << self.l1_shift)
                if not self._l2_offset(l1i) and (self.header.version < 3 or
                                                 (op == "discard" and self.backing is None)):
                    pos = span_end                           # nothing mapped here, nothing to hide
                    continue
                await self._make_dirty_if_lazy()
                s = await self._l2_for_write(pos)
                freed: list[int] = []
                try:
                    idx = (pos >> cb) & (self.slice_entries - 1)
                    slice_end = min(span_end, ((pos >> cb) - idx + self.slice_entries) << cb)
                    while pos < slice_end and (pos >> cb) not in self._inflight:
                        c0 = pos & ~(cs - 1)
                        stop = min(slice_end, c0 + cs)
                        dropped = self._rewrite_one(s.data, idx, pos - c0, stop - c0, op, unmap)
                        if dropped is None:
                            fallback.append((pos, stop))
                        elif dropped:
                            freed.append(dropped)
                        pos = stop
                        idx += 1
                    self.l2cache.mark_dirty(s)
                finally:
                    self.l2cache.put(s)
                released: list[int] = []
                for e in freed:
                    await self._free_entry(e, released)
                await self._punch(released)
        for lo, hi in fallback:
            await self._zero_partial(lo, hi, unmap, force=True)
        return True

    def _rewrite_one(self, data: bytearray, idx: int, lo: int, hi: int, op: str, unmap: bool) -> int | None:
        """Rewrite one L2 entry for bytes ``[lo, hi)`` of its cluster (lock held).

        Returns the old entry when its reference must be dropped, 0 when none, None when the change cannot be
        expressed in the entry (zeroing part of a compressed cluster)."""
        entry, bitmap = self._entry(data, idx)
        host = entry & L.L2E_OFFSET_MASK
        compressed = bool(entry & OFLAG_COMPRESSED)
        referenced = entry if (host or compressed) else 0
        if op == "discard":
            if not referenced and not bitmap and not entry & OFLAG_ZERO and self.backing is None:
                return 0                                         # already reads as zeroes, like QEMU: leave it
            self._set_entry(data, idx, (0, L.SC_ALLOC_MASK << L.SC_ZERO_SHIFT) if self.ext_l2
                            else (OFLAG_ZERO if self.header.version >= 3 else 0, 0))
            return referenced
        whole = lo == 0 and hi == self.cs
        if self.ext_l2:
            if compressed and not whole:
                return None
            first, last = lo >> self.sc_bits, (hi - 1) >> self.sc_bits
            mask = ((1 << (last + 1)) - 1) & ~((1 << first) - 1)
            alloc = 0 if compressed else bitmap & L.SC_ALLOC_MASK & ~mask
            zero = ((bitmap >> L.SC_ZERO_SHIFT) | mask) & L.SC_ALLOC_MASK
            drop = compressed or (host and not alloc and (unmap or not entry & OFLAG_COPIED))
            self._set_entry(data, idx, (0 if drop else entry, alloc | (zero << L.SC_ZERO_SHIFT)))
            return referenced if drop else 0
        if self.header.version < 3:                              # no zero flag: deallocate (no backing file)
            self._set_entry(data, idx, (0, 0))
            return referenced
        keep = not unmap and not compressed and host and entry & OFLAG_COPIED
        self._set_entry(data, idx, ((host | OFLAG_COPIED | OFLAG_ZERO) if keep else OFLAG_ZERO, 0))
        return 0 if keep else referenced

    def _set_entry(self, data: bytearray, idx: int, value: tuple[int, int]) -> None:
        if self.ext_l2:
            _QQ.pack_into(data, idx * 16, value[0], value[1])
        else:
            _Q.pack_into(data, idx * 8, value[0])

    async def pwrite_compressed(self, offset: int, buf: memoryview) -> None:
        """Write whole clusters compressed. An empty write ends a stream of them, as in QEMU (``qemu-img convert
        -c`` sends one last): the file is extended to a whole number of sectors, compressed data having left
        it at any byte."""
        self._check_usable(True)
        if not buf:
            async with self.lock:
                if not self._inflight:         # nothing else can be extending the file: the size is exact
                    with contextlib.suppress(NotSupportedError):
                        await self.file.truncate(self.file.size)
            return
        cs = self.cs
        if offset % cs or (len(buf) % cs and offset + len(buf) != self.size):
            raise BlockIOError(errno.EINVAL, "compressed writes must be whole clusters", filename=self.filename)
        try:
            for pos in range(0, len(buf), cs):
                chunk = bytes(buf[pos:pos + cs]).ljust(cs, b"\0")
                await self._write_compressed_cluster(offset + pos, chunk)
        except BlockIOError:
            await self._after_error()
            raise

    async def _write_compressed_cluster(self, guest: int, chunk: bytes) -> None:
        cs = self.cs
        packed = compress_cluster(self.header.compression_type, chunk, cs - 1)
        if packed is None:
            done = 0
            n = min(cs, self.size - guest)
            while done < n:
                done += await self._write_some(guest + done, memoryview(chunk)[done:n])
            return
        async with self.lock:
            await self._wait_range(guest, guest + 1)
            s = await self._l2_for_write(guest)
            try:
                idx = (guest >> self.cluster_bits) & (self.slice_entries - 1)
                entry, _ = self._entry(s.data, idx)
                if entry & L.L2E_OFFSET_MASK or entry & OFLAG_COMPRESSED:
                    raise BlockIOError(errno.EIO, "compressed writes cannot overwrite allocated clusters",
                                       filename=self.filename)
            finally:
                self.l2cache.put(s)
            await self._make_dirty_if_lazy()
            self.file.event("cluster_alloc_bytes")
            coff = await self.refcounts.alloc_bytes(len(packed))
            self.file.event("write_compressed")
            await self.metaio.write(coff, packed, DATA)
            s = await self._l2_for_write(guest)
            try:
                if not self.header.lazy_refcounts:
                    await self.l2cache.set_dependency(self.refcounts.cache)
                self.l2cache.set_depends_on_flush()
                desc = L.encode_compressed(coff, len(packed), self.cluster_bits)
                idx = (guest >> self.cluster_bits) & (self.slice_entries - 1)
                if self.ext_l2:
                    _QQ.pack_into(s.data, idx * 16, desc, 0)
                else:
                    _Q.pack_into(s.data, idx * 8, desc)
                self.file.event("l2_update_compressed")
                self.l2cache.mark_dirty(s)
            finally:
                self.l2cache.put(s)

    # ---- flush ----------------------------------------------------------------------------------------------

    async def flush(self) -> None:
        self._check_usable(False)
        if self.read_only:
            return
        try:
            async with self.lock:
                await self._flush_caches()
        except BlockIOError:
            await self._after_error()
            raise

    async def _flush_caches(self) -> None:
        """Write every dirty slice in dependency order and sync (lock held)."""
        earlier = self.flusher.take_error() if self.flusher is not None else None
        await self.l2cache.flush()
        await self.refcounts.cache.flush()
        self.file.event("flush_to_os")
        await self.metaio.sync()
        self.refcounts.forget_pending()
        if earlier is not None:
            # a failed background write-back or sync may have lost data the page cache held: say so once
            raise BlockIOError(getattr(earlier, "errno", None) or errno.EIO,
                               f"background metadata write-back failed: {earlier}", filename=self.filename)

    def _clean_caches(self) -> None:
        self.l2cache.shrink_idle()
        self.refcounts.cache.shrink_idle()

    # ---- block status -----------------------------------------------------------------------------------

    async def block_status(self, offset: int, length: int) -> Extent:
        """This layer's status; host offsets also for zero clusters and unallocated subclusters that keep
        their host cluster, as QEMU reports them. On an image with preallocated metadata (detected as QEMU
        does: far more clusters referenced than the file really allocates), data ranges over holes of the
        file read as zeroes and say so."""
        self._check_usable(False)
        kind, host, n = await self._lookup(offset, length)
        file = self.file if host else None
        if kind == NORMAL:
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
        if self._prealloc is None:
            actual = await self.file.actual_size() or 0
            real = actual // self.cs
            threshold = max(real * 10 // 9, real + 2)
            count = 0
            async with self.lock:
                for c in range(-(-self.file.size // self.cs)):
                    if await self.refcounts.get(c):
                        count += 1
                        if count >= threshold:
                            break
            self._prealloc = count >= threshold
        return self._prealloc

    # ---- truncate -----------------------------------------------------------------------------------------

    async def truncate(self, size: int) -> None:
        self._check_usable(True)
        h = self.header
        if size % 512:
            raise InvalidOptionError("The new size must be a multiple of 512")
        async with self.lock:
            if size < h.size:
                if h.version < 3 and self.snapshots:
                    raise NotSupportedError("Can't resize a v2 image which has snapshots")
                await self._check_unallocated(size, h.size)
            needed = L.size_to_l1(size, self.cluster_bits, self.ext_l2)
            if needed > len(self.l1):
                await self._grow_l1(needed)
            await self.write_header_bytes(24, _Q.pack(size))
            h.size = size

    async def _check_unallocated(self, start: int, end: int) -> None:
        pos = start
        while pos < end:
            kind, _, n = await self._lookup_locked(pos, end - pos)
            if kind != UNALLOC:
                raise NotSupportedError("qcow2: cannot shrink the image: the area being cut off holds data "
                                        "(discard it first)")
            pos += n

    async def _lookup_locked(self, guest: int, length: int) -> tuple[int, int, int]:
        s = await self._slice(guest)
        if s is None:
            span = (1 << self.l1_shift) - (guest & ((1 << self.l1_shift) - 1))
            return UNALLOC, 0, min(length, span)
        try:
            return self._scan(s.data, guest, length)
        finally:
            self.l2cache.put(s)

    async def _grow_l1(self, needed: int) -> None:
        """Move the L1 table to a bigger one (I6): allocate, write and sync it, switch the header, free."""
        h, cs = self.header, self.cs
        if needed * 8 > L.MAX_L1_BYTES:
            raise InvalidOptionError("Active L1 table too large")
        new_l1 = array("Q", self.l1)
        new_l1.extend([0] * (needed - len(self.l1)))
        nbytes = needed * 8
        clusters = -(-nbytes // cs)
        self.file.event("l1_grow_alloc_table")
        off = await self.refcounts.alloc(clusters)
        await self.refcounts.cache.flush()
        self.metamap.add(off, nbytes, L1)
        self.file.event("l1_grow_write_table")
        await self.metaio.write(off, pack_table(new_l1).ljust(clusters * cs, b"\0"), L1)
        await self.metaio.sync()
        self.file.event("l1_grow_activate_table")
        old_off, old_size = h.l1_table_offset, h.l1_size
        await self.write_header_bytes(36, struct.pack(">IQ", needed, off))
        h.l1_size, h.l1_table_offset = needed, off
        self.l1 = new_l1
        self.metamap.remove(old_off, old_size * 8)
        self.metamap.add(off, nbytes, L1)
        if old_size:
            await self.refcounts.update(old_off, old_size * 8, -1)

    # ---- check ----------------------------------------------------------------------------------------------

    async def check(self, repair: str | None = None) -> CheckResult:
        from .check import check_image
        async with self.lock:
            if not self.read_only:
                await self._flush_caches()
        return await check_image(self, repair)

    @classmethod
    async def create(cls, file: BlockDriver, size: int, *, backing: str | None, backing_fmt: str | None,
                     options: Mapping[str, str]) -> None:
        from .create import create_image
        await create_image(file, size, backing=backing, backing_fmt=backing_fmt, options=options)


def _size_opt(opts: Mapping[str, Any], name: str, default: int) -> int:
    value = opts.get(name)
    if value is None:
        return default
    try:
        return parse_size(value) if isinstance(value, str) else int(value)
    except (ValueError, InvalidOptionError):
        raise InvalidOptionError(f"Parameter '{name}' expects a size") from None


def _hx(value: int) -> str:
    """C's ``%#x``: 0 prints as "0", other values with the 0x prefix (QEMU's messages)."""
    return f"{value:#x}" if value else "0"
