"""The state of one open qcow2 image, shared by the driver's modules (QEMU's ``BDRVQcow2State``).

Modules by concern, each a set of functions taking the state first (QEMU's qcow2.c split):

=================  ==========================================================================================
``layout``         on-disk structures, pure (no I/O)
``metaio``         byte-range I/O on the file with the overlap check; the metadata map
``refcount``       refcount table and blocks, the cluster allocator
``mapping``        the one L2 lookup; L2 slices; new L2 tables and L1 entries
``alloc``          the write path: in-place overwrites, allocating writes (through the allocating-write queue)
``zero``           write-zeroes and discard (rewriting L2 entries)
``compressed``     compressed clusters, read and written
``resize``         truncate and L1 growth
``check``          check and repair
``create``         new images
``driver``         the node: open, close, flush, info, and the request entry points
=================  ==========================================================================================

**Locks and order** (the one statement of it; outermost first, acquire only downward):

1. ``lock`` (QEMU's ``s->lock``; :class:`aioblock.cancellation.Lock`): the header, the L1 table, the refcount
   table, both slice caches, the metadata map, the allocator. Held around metadata work only, never across
   guest data or COW I/O. A section holding it is committed (never interrupted by a cancellation).
2. slice pins (``SliceCache.get``/``put``): released before waiting for anything but the I/O of the section.
3. allocations in flight (``allocs``, :class:`aioblock.allocation.AllocationQueue`): waited for only with no lock
   held and no pin.

**The lock-free moments.** A piece of code that never suspends and runs while ``lock`` is free is a critical
section of its own: nothing else runs until it suspends, and no locked section is half way (a locked section
is only ever suspended while holding the lock). The fast paths use this: a lookup in a cached slice, the start
of an allocation from a cached slice and a cached refcount block, and the linking of a filled allocation
(``alloc``). They share their code with the locked paths, which only prepare what a fast path found missing.

Guards of the fields: *fixed* after open (no lock); *lock* (changed under ``lock``, or in a lock-free moment;
read without it only where stated); *loop* (touched only between awaits, from the loop's thread).
"""

from __future__ import annotations

import errno
import logging
import struct
from array import array
from typing import TYPE_CHECKING

from ... import cancellation
from ...allocation import AllocationQueue
from ...errors import BlockIOError, ReadOnlyError
from . import layout as L
from .layout import Header
from .metaio import HEADER, MetadataMap, MetaIO

if TYPE_CHECKING:
    from ...cache import Flusher, SliceCache
    from ...driver import BlockDriver
    from .refcount import Refcounts

__all__ = ["Qcow2State", "hx"]

log = logging.getLogger("aioblock.qcow2")

_Q = struct.Struct(">Q")


class Qcow2State:
    """What one open image holds in memory. Built by the driver's open; see the module docstring for guards."""

    file: BlockDriver                 # fixed
    header: Header                    # lock (the mutable fields: sizes, offsets, feature bits)
    l1: array[int]                    # lock; entries read without it (an entry changes without an await)
    snapshots: list[L.Snapshot]       # fixed
    metamap: MetadataMap              # lock; read without it by the overlap check (never suspends)
    metaio: MetaIO                    # fixed
    refcounts: Refcounts              # lock
    l2cache: SliceCache               # lock; ``peek`` without it
    flusher: Flusher | None           # fixed (None: read-only)

    def __init__(self, node: BlockDriver, file: BlockDriver, header: Header, *, read_only: bool) -> None:
        self.node = node                                 # fixed: the driver (its ``backing`` child)
        self.file = file
        self.filename = file.filename
        self.read_only = read_only
        self.header = header
        self.lock = cancellation.Lock()
        self.allocs = AllocationQueue()
        #: claimed guest cluster -> its allocation in flight (``allocs.units``: read-only here)
        self.claims = self.allocs.units
        # geometry (fixed)
        self.cluster_bits = header.cluster_bits
        self.cs = header.cluster_size
        self.ext_l2 = header.extended_l2
        self.esz = header.l2_entry_size
        self.l2_bits = self.cluster_bits - (4 if self.ext_l2 else 3)
        self.l1_shift = self.cluster_bits + self.l2_bits
        self.l2_index_mask = (1 << self.l2_bits) - 1
        self.sc_size = self.cs // L.SUBCLUSTERS if self.ext_l2 else self.cs
        self.sc_bits = self.sc_size.bit_length() - 1
        # slice geometry (fixed once the caches exist)
        self.slice_entries = 0
        self.slice_bytes = 0
        self.slice_shift = 0
        self.slice_mask = 0
        #: lock-free single-cluster fast paths apply: standard L2 entries, image healthy (loop)
        self.fast_io = False
        #: host cluster -> in-place data writes in progress on it: never handed out while > 0 (loop)
        self.busy_hosts: dict[int, int] = {}
        #: preallocated metadata detected (block status), None until asked (loop)
        self.prealloc: bool | None = None
        #: why the node is fenced after corruption (loop)
        self.fenced: str | None = None
        self.corrupt_pending = False
        #: lazy refcounts: the dirty bit is set on disk by us (lock)
        self.lazy_dirty = False
        self.flusher = None

    @property
    def backing(self) -> BlockDriver | None:
        return self.node.backing

    @property
    def size(self) -> int:
        return self.header.size

    @property
    def dirty(self) -> bool:
        return self.header.dirty or self.lazy_dirty

    def event(self, name: str) -> None:
        """A fault-injection event (QEMU's BLKDBG_EVENT), announced right before the I/O it names."""
        self.file.event(name)

    # ---- usability and corruption ----------------------------------------------------------------------------

    def check_usable(self, write: bool) -> None:
        if self.fenced is not None:
            raise BlockIOError(errno.ENOMEDIUM, "No medium found", filename=self.filename)
        if write and self.read_only:
            raise ReadOnlyError("Block node is read-only", filename=self.filename)

    def corruption(self, msg: str) -> BlockIOError:
        """Corrupt metadata found: on a writable image mark it corrupt (at the end of the request) and fence
        the node, as QEMU does; read-only: just fail the request. Returns the EIO to raise."""
        if self.read_only:
            log.error("qcow2: Image is corrupt: %s; further non-fatal corruption events will be suppressed", msg)
        elif self.fenced is None:
            log.error("qcow2: Marking image as corrupt: %s; further corruption events will be suppressed", msg)
            self.fenced = msg
            self.fast_io = False
            self.corrupt_pending = True
        return BlockIOError(errno.EIO, msg, filename=self.filename)

    async def after_error(self) -> None:
        """Write the corrupt bit if a request just found corruption (best effort; v2 has no such bit, and
        its bytes 72.. hold header extensions)."""
        if self.corrupt_pending:
            self.corrupt_pending = False
            if self.header.version < 3:
                return
            self.header.incompatible_features |= L.INCOMPAT_CORRUPT
            try:
                await self.metaio.write(72, _Q.pack(self.header.incompatible_features), HEADER)
                await self.metaio.sync()
            except Exception as exc:            # the image is fenced either way
                log.error("qcow2: could not mark the image corrupt: %s", exc)

    # ---- header --------------------------------------------------------------------------------------------

    async def write_header(self) -> None:
        """Rewrite the header cluster's used bytes (fields, extensions, backing name) and sync."""
        h = self.header
        if h.version == 3:
            h.header_length = L.V3_HEADER_WRITE_LENGTH
        await self.metaio.write(0, L.build_header_cluster(h), HEADER)
        await self.metaio.sync()

    async def write_header_bytes(self, offset: int, data: bytes) -> None:
        """Rewrite a few header fields in place (one write), then sync."""
        await self.metaio.write(offset, data, HEADER)
        await self.metaio.sync()

    async def make_dirty_if_lazy(self) -> None:
        """Lazy refcounts: set the dirty bit (synced) before the first update that skips refcount ordering.
        Lock held."""
        h = self.header
        if h.lazy_refcounts and not self.lazy_dirty and not h.dirty:
            h.incompatible_features |= L.INCOMPAT_DIRTY
            try:
                await self.write_header_bytes(72, _Q.pack(h.incompatible_features))
            except BaseException:
                h.incompatible_features &= ~L.INCOMPAT_DIRTY
                raise
            self.lazy_dirty = True

    # ---- metadata write-back -------------------------------------------------------------------------------

    async def flush_caches(self) -> None:
        """Write every dirty slice in dependency order and sync. Lock held."""
        earlier = self.flusher.take_error() if self.flusher is not None else None
        await self.l2cache.flush()
        await self.refcounts.cache.flush()
        self.event("flush_to_os")
        await self.metaio.sync()
        self.refcounts.forget_pending()
        if earlier is not None:
            # a failed background write-back or sync may have lost data the page cache held: say so once
            raise BlockIOError(getattr(earlier, "errno", None) or errno.EIO,
                               f"background metadata write-back failed: {earlier}", filename=self.filename)


def hx(value: int) -> str:
    """C's ``%#x``: 0 prints as "0", other values with the 0x prefix (QEMU's messages)."""
    return f"{value:#x}" if value else "0"
