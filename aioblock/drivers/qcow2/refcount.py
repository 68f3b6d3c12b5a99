"""Refcounts: the refcount table, refcount blocks (through a slice cache) and the cluster allocator.

Ordering (reliability.md §3.3):

* I1 refcount before reference: callers that link a new cluster into L1/L2 set the L2 cache's dependency on
  the refcount cache (or write the refcount blocks and sync themselves, for L1 and reftable entries).
* I4 unreference before decrement: ``update`` with a negative delta makes the refcount cache depend on the L2
  cache, so a dropped reference reaches the disk before the decrement. A cluster whose refcount drops to zero
  is not handed out again until the next full metadata flush (``pending_free``): until then an old L2 entry on
  disk may still point at it, and reusing it could expose one guest offset's data at another after a crash.
* I5 self-describing refcount blocks: a new block is placed inside the range it covers and describes itself;
  it is written and synced before the reftable entry that points at it (written with a sync).
* Reftable growth writes new blocks and the new table, syncs, then switches the header's offset and size in
  one synced write, and only then frees the old table.

The allocator never trusts refcounts alone: a cluster the metadata map knows as metadata, or one that an
in-place data write is still writing to (``busy``: it may have been discarded meanwhile), is never handed out.

What it works with is narrow: the metadata I/O (:class:`MetaIO`, which also announces fault-injection events),
the metadata map, the header (the reftable's place, rewritten when the table moves), the allocation policy
(``busy``), a ``corruption`` callback, and ``unref_first``: the cache whose writes must reach the disk before a
decrement (the L2 cache).

Lock rule: every method runs under the driver's metadata lock, except ``alloc_now``, which may also run in a
lock-free moment (state.py).
"""

from __future__ import annotations

import errno
import struct
from array import array
from collections.abc import Callable, Mapping

from ...cache import SliceCache
from ...errors import BlockIOError, ImageTooLargeError
from .layout import (
    MAX_CLUSTER_OFFSET,
    MAX_REFTABLE_BYTES,
    REFT_OFFSET_MASK,
    Header,
    count_nonzero_refcounts,
    get_refcount,
    set_refcount,
)
from .metaio import CONFLICT, HEADER, REFBLOCK, REFTABLE, MetadataMap, MetaIO

__all__ = ["Refcounts", "load_table", "pack_table"]


def load_table(raw: bytes | bytearray) -> array[int]:
    """A big-endian table of u64 entries as a native ``array('Q')`` (8 bytes an entry)."""
    table = array("Q")
    table.frombytes(memoryview(raw)[:len(raw) // 8 * 8])     # no copy of the raw bytes
    if struct.pack("=H", 1) != struct.pack(">H", 1):
        table.byteswap()
    return table


def pack_table(table: array[int], start: int = 0, end: int | None = None) -> bytes:
    """Entries ``[start, end)`` of a native table as big-endian bytes."""
    part = table[start:end]
    if struct.pack("=H", 1) != struct.pack(">H", 1):
        part.byteswap()
    return part.tobytes()


class Refcounts:
    """Reference counts of host clusters and allocation of new ones."""

    def __init__(self, io: MetaIO, metamap: MetadataMap, header: Header, reftable: array[int], cache: SliceCache, *,
                 corruption: Callable[[str], BaseException], busy: Mapping[int, int]) -> None:
        h = header
        self.io = io
        self.metamap = metamap
        self.header = header
        self.corruption = corruption
        #: host clusters that must not be handed out whatever their refcount (in-place writes in progress)
        self.busy = busy
        #: the cache whose dirty slices must be written before a decrement (I4); set by the driver
        self.unref_first: SliceCache | None = None
        self.cache = cache
        self.reftable = reftable
        self.cluster_bits = h.cluster_bits
        self.cluster_size = h.cluster_size
        self.order = h.refcount_order
        self.max_refcount = (1 << (1 << self.order)) - 1
        self.rb_bits = h.cluster_bits + 3 - self.order          # log2(refcounts per block)
        self.rb_mask = (1 << self.rb_bits) - 1
        #: first cluster that may be free (hint)
        self.free_hint = 0
        #: clusters freed since the last full metadata flush: not reusable yet
        self.pending_free: set[int] = set()
        #: one past the highest cluster in use or handed out (new areas such as a grown reftable go here)
        self.end_cluster = -(-io.file.size // self.cluster_size)
        #: where the next compressed cluster may be packed (0: start a new cluster)
        self.free_byte_offset = 0
        #: (reftable index, entry) of the last refcount block validated by ``refblock_offset``
        self._valid: tuple[int, int] | None = None

    # ---- reading -------------------------------------------------------------------------------------------

    def refblock_offset(self, ri: int) -> int:
        """The refcount block of reftable index ``ri`` (0: none), validated (the last one validated is
        remembered: allocation asks for the same block again and again)."""
        if ri >= len(self.reftable):
            return 0
        entry = self.reftable[ri]
        if entry and self._valid == (ri, entry):
            return entry & REFT_OFFSET_MASK
        off = entry & REFT_OFFSET_MASK
        if off & (self.cluster_size - 1):
            raise self.corruption(f"Refblock offset {off:#x} unaligned (reftable index: "
                                    f"{f'{ri:#x}' if ri else '0'})")
        if off and self.metamap.kind_at(off) == CONFLICT:
            raise self.corruption(f"Refblock at {off:#x} overlaps other metadata (reftable index: {ri:#x})")
        if off and off >= self.io.file.size:
            raise self.corruption(f"Refblock at {off:#x} lies beyond the end of the file (reftable index: "
                                    f"{ri:#x})")
        return off

    async def get(self, cluster: int) -> int:
        rb = self.refblock_offset(cluster >> self.rb_bits)
        if not rb:
            return 0
        s = await self.cache.get(rb)
        try:
            return get_refcount(s.data, cluster & self.rb_mask, self.order)
        finally:
            self.cache.put(s)

    async def count_referenced(self, clusters: int, limit: int) -> int:
        """How many of the clusters ``[0, clusters)`` have a nonzero refcount, counting until ``limit``: a
        refcount block at a time, not a cluster at a time."""
        per = 1 << self.rb_bits
        count = 0
        for ri in range(-(-clusters // per)):
            rb = self.refblock_offset(ri)
            if not rb:
                continue
            s = await self.cache.get(rb)
            try:
                count += count_nonzero_refcounts(s.data, min(per, clusters - ri * per), self.order)
            finally:
                self.cache.put(s)
            if count >= limit:
                break
        return count

    # ---- updating ------------------------------------------------------------------------------------------

    async def update(self, offset: int, length: int, delta: int, *, busy: range | None = None,
                     freed: list[int] | None = None) -> None:
        """Add ``delta`` to the refcount of every cluster touching ``[offset, offset+length)``.

        ``busy``: clusters being allocated by the caller (a new refcount block must not land on them).
        ``freed``: gets the clusters whose refcount dropped to 0."""
        if length <= 0:
            return
        first = offset >> self.cluster_bits
        last = (offset + length - 1) >> self.cluster_bits
        if delta < 0 and self.unref_first is not None:
            await self.cache.set_dependency(self.unref_first)
        busy = busy if busy is not None else range(first, last + 1)
        c = first
        while c <= last:
            ri = c >> self.rb_bits
            rb = self.refblock_offset(ri)
            if not rb:
                if delta < 0:
                    raise self.corruption(f"Refcount decrease of cluster {c:#x} without a refcount block")
                rb = await self._refblock_for(ri, busy)
            s = await self.cache.get(rb)
            try:
                stop = min(last + 1, (ri + 1) << self.rb_bits)
                for cc in range(c, stop):
                    idx = cc & self.rb_mask
                    old = get_refcount(s.data, idx, self.order)
                    new = old + delta
                    if new < 0 or new > self.max_refcount:
                        raise BlockIOError(errno.EINVAL, f"refcount of cluster {cc:#x} would become {new} "
                                           f"(width {1 << self.order} bits)")
                    set_refcount(s.data, idx, self.order, new)
                    if new == 0:
                        self.pending_free.add(cc)
                        if freed is not None:
                            freed.append(cc)
                        if self.free_byte_offset >> self.cluster_bits == cc:
                            self.free_byte_offset = 0          # never pack into a cluster that may be reused
                self.cache.mark_dirty(s)
            finally:
                self.cache.put(s)
            c = stop

    async def alloc(self, n: int) -> int:
        """Allocate ``n`` contiguous free clusters (refcount 1 each); returns the host offset of the first."""
        start = await self.find_free(n)
        await self.update(start << self.cluster_bits, n << self.cluster_bits, 1, busy=range(start, start + n))
        self.end_cluster = max(self.end_cluster, start + n)
        return start << self.cluster_bits

    def alloc_now(self, n: int) -> int | None:
        """``alloc`` without suspending: when the first free run of ``n`` clusters from the hint lies in one
        cached refcount block. None otherwise, with nothing changed (the caller takes ``alloc``).

        Lock rule: the metadata lock held, or a synchronous critical section of the caller's own while the
        lock is free (nothing is then half-changed, and nothing else runs until the caller suspends)."""
        c = max(self.free_hint, 1)
        ri = c >> self.rb_bits
        rb = self.refblock_offset(ri)
        s = self.cache.peek(rb) if rb else None
        if s is None:
            return None
        _, start, run, first_free = self._free_run(s.data, c, (ri + 1) << self.rb_bits, n, c, 0, -1)
        if run < n:
            return None
        self._take_run(start, n, first_free)
        for c in range(start, start + n):
            set_refcount(s.data, c & self.rb_mask, self.order, 1)
        self.cache.mark_dirty(s)
        self.end_cluster = max(self.end_cluster, start + n)
        return start << self.cluster_bits

    async def find_free(self, n: int) -> int:
        """First run of ``n`` free clusters at or after the hint (no refcount, not metadata, not pending)."""
        c = max(self.free_hint, 1)
        start, run, first_free = c, 0, -1
        while run < n:
            ri = c >> self.rb_bits
            rb = self.refblock_offset(ri)
            stop = (ri + 1) << self.rb_bits
            if not rb:
                c, start, run, first_free = self._free_run(None, c, stop, n, start, run, first_free)
                continue
            s = await self.cache.get(rb)
            try:
                c, start, run, first_free = self._free_run(s.data, c, stop, n, start, run, first_free)
            finally:
                self.cache.put(s)
        self._take_run(start, n, first_free)
        return start

    def _free_run(self, block: bytearray | None, c: int, stop: int, n: int, start: int, run: int,
                  first_free: int) -> tuple[int, int, int, int]:
        """Go on looking for ``n`` free clusters through clusters ``[c, stop)`` of one refcount block
        (``block`` None: the block does not exist, all its refcounts are 0), from the current run (its start
        and length) and the first free cluster seen (-1: none yet). Returns where the search stopped and the
        new run start, run length and first free cluster."""
        cb, mask, order = self.cluster_bits, self.rb_mask, self.order
        pending, busy, kind_at = self.pending_free, self.busy, self.metamap.kind_at
        while run < n and c < stop:
            if (c in pending or c in busy or kind_at(c << cb) is not None
                    or (block is not None and get_refcount(block, c & mask, order))):
                run = 0
            else:
                if run == 0:
                    start = c
                if first_free < 0:
                    first_free = c
                run += 1
            c += 1
        return c, start, run, first_free

    def _take_run(self, start: int, n: int, first_free: int) -> None:
        """Move the hint past a run found by ``_free_run`` (EFBIG if it lies past the largest host offset)."""
        if (start + n) << self.cluster_bits > MAX_CLUSTER_OFFSET:
            raise BlockIOError(errno.EFBIG, "Image is too big: no host offset left")
        self.free_hint = start + n if first_free == start else first_free

    async def alloc_bytes(self, size: int) -> int:
        """Space for ``size`` (< one cluster) bytes of compressed data, packed as QEMU packs it: right after the
        previous compressed data while its host cluster's refcount (one per compressed cluster touching it) can
        grow, running on into the next cluster when that one is the next free cluster; otherwise at the start
        of a new cluster. Every cluster the bytes touch gets one more reference. Unlike QEMU, never after data
        in a cluster freed since (``update`` forgets ``free_byte_offset`` then): it may be reused."""
        cs, cb = self.cluster_size, self.cluster_bits
        off = self.free_byte_offset
        if off and not 0 < await self.get(off >> cb) < self.max_refcount:
            off = 0
        room = cs - off % cs if off else 0
        if room < size:
            new = await self.find_free(1)
            if not off or -(-off // cs) != new:
                off = new << cb
        first, last = off >> cb, (off + size - 1) >> cb
        await self.update(off, size, 1, busy=range(first, last + 1))
        self.end_cluster = max(self.end_cluster, last + 1)
        self.free_byte_offset = off + size if (off + size) % cs else 0
        return off

    def forget_pending(self) -> None:
        """After a full metadata flush: clusters freed before it are reusable."""
        if self.pending_free:
            self.free_hint = min(self.free_hint, min(self.pending_free))
            self.pending_free.clear()

    # ---- new refcount blocks and reftable growth -----------------------------------------------------------

    async def _refblock_for(self, ri: int, busy: range) -> int:
        if ri >= len(self.reftable):
            await self._grow_reftable(ri, busy)
            rb = self.refblock_offset(ri)
            if rb:
                return rb
        return await self._new_refblock(ri, busy)

    async def _new_refblock(self, ri: int, busy: range) -> int:
        """A self-describing refcount block for reftable index ``ri``, hooked into the reftable."""
        io, mm = self.io, self.metamap
        cs = self.cluster_size
        base = ri << self.rb_bits
        c = max(base, 1)
        while c in busy or c in self.pending_free or mm.kind_at(c * cs) is not None:
            c += 1
        if c >= base + (1 << self.rb_bits):
            raise BlockIOError(errno.ENOSPC, "no room for a refcount block in the range it covers")
        block = bytearray(cs)
        set_refcount(block, c - base, self.order, 1)
        io.event("refblock_alloc")
        await io.write(c * cs, block, REFBLOCK)
        await io.sync()
        self.reftable[ri] = c * cs
        try:
            io.event("refblock_alloc_hookup")
            await self.write_reftable_entries(ri, ri + 1)
        except BaseException:
            self.reftable[ri] = 0
            raise
        mm.add(c * cs, cs, REFBLOCK)
        self.end_cluster = max(self.end_cluster, c + 1)
        return c * cs

    async def write_reftable_entries(self, first: int, end: int) -> None:
        """Write reftable entries ``[first, end)`` (widened to the file's alignment) and sync."""
        io = self.io
        align = max(io.align, 8) // 8
        lo = first - first % align
        hi = min(-(-end // align) * align, len(self.reftable))
        await io.write(self.header.refcount_table_offset + lo * 8, pack_table(self.reftable, lo, hi), REFTABLE)
        await io.sync()

    async def _grow_reftable(self, ri_needed: int, busy: range) -> None:
        """Move the refcount table to a bigger one at the end of the image (reliability.md §3.3 I5)."""
        io, mm, h = self.io, self.metamap, self.header
        cs = self.cluster_size
        per_cluster = cs // 8
        old = self.reftable
        entries = max(ri_needed + 1, len(old) + len(old) // 2)
        area = max(self.end_cluster, busy.stop, -(-io.file.size // cs))
        while True:
            entries = -(-entries // per_cluster) * per_cluster
            if entries * 8 > MAX_REFTABLE_BYTES:
                raise ImageTooLargeError("Reference count table too large: the image cannot grow further")
            t = entries // per_cluster
            k = 0
            while True:                       # refcount blocks needed to describe the new area itself
                lo, hi = area >> self.rb_bits, (area + t + k - 1) >> self.rb_bits
                need = [ri for ri in range(lo, hi + 1) if not (ri < len(old) and old[ri])]
                if len(need) == k:
                    break
                k = len(need)
            if hi < entries:
                break
            entries = hi + 1
        table = array("Q", old)
        table.extend([0] * (entries - len(old)))
        blocks: dict[int, bytearray] = {}
        for i, ri in enumerate(need):
            table[ri] = (area + t + i) * cs
            blocks[ri] = bytearray(cs)
        covered: list[int] = []
        for c in range(area, area + t + k):
            ri = c >> self.rb_bits
            if ri in blocks:
                set_refcount(blocks[ri], c & self.rb_mask, self.order, 1)
            else:
                covered.append(c)
        io.event("refblock_alloc_write_blocks")
        for i, ri in enumerate(need):
            await io.write((area + t + i) * cs, blocks[ri], REFBLOCK)
        for c in covered:                      # area clusters under existing blocks: through the cache
            await self.update(c * cs, cs, 1, busy=range(area, area + t + k))
        await self.cache.flush()
        await io.sync()
        io.event("refblock_alloc_write_table")
        await io.write(area * cs, pack_table(table), REFTABLE)
        await io.sync()
        io.event("refblock_alloc_switch_table")
        old_off, old_clusters = h.refcount_table_offset, h.refcount_table_clusters
        await io.write(48, struct.pack(">QI", area * cs, t), HEADER)
        await io.sync()
        h.refcount_table_offset, h.refcount_table_clusters = area * cs, t
        self.reftable = table
        mm.remove(old_off, old_clusters * cs)
        mm.add(area * cs, t * cs, REFTABLE)
        for i in range(k):
            mm.add((area + t + i) * cs, cs, REFBLOCK)
        self.end_cluster = max(self.end_cluster, area + t + k)
        await self.update(old_off, old_clusters * cs, -1)
