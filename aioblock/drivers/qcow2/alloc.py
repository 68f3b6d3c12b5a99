"""The write path: in-place overwrites and allocating writes (QEMU's qcow2-cluster.c, allocation half).

One chunk of a guest write (``write``) goes one of three ways, decided by one lookup (``mapping.scan``):

* **in place**, when the run is DATA|OWNED: the data goes straight to the host clusters, without the lock (the
  host clusters stay in ``st.busy_hosts`` meanwhile, so that a discard racing the write cannot have them
  handed out again under it);
* **wait**, when an allocation in flight claims the first cluster (``st.allocs``): wait for it, then look
  again (the write then usually goes in place);
* **allocate**: plan an allocation for a run of clusters (``_plan``), reserve host clusters, register it in the
  allocating-write queue, fill it (copy-on-write of the old contents, or nothing when a new cluster past the
  end of the file replaces nothing: it reads as zeroes already), then link it (the L2 entries) and finish it.

Starting and linking each run as one synchronous step when the lock is free and everything they need is
cached (``_start_now``, ``_link_now``); otherwise the same code runs under the lock after the missing pieces
were loaded or created (``_start_locked``, ``_link_locked``). Either way the allocation's life is the queue's
state table: STARTED (registered, host clusters being reserved) -> FILLING -> WRITTEN -> LINKED, or ABORTED
with the host clusters released (after the engines finished every write into them).

Cancellation: registering the allocation commits the request (cancellation.py), so from there on the fill,
the link and the release run to their end; ``allocs.finish`` is in a ``finally``.

Durability: linking makes the L2 cache depend on the refcount cache (refcount before reference, unless lazy
refcounts) and on a flush of the data (data and COW before the mapping).
"""

from __future__ import annotations

import contextlib
import struct

from ...allocation import Allocation, AllocState
from ...errors import BlockIOError
from . import layout as L
from .layout import OFLAG_COMPRESSED, OFLAG_COPIED, OFLAG_ZERO
from .mapping import DATA, MAPS_HOST, OWNED, UNALLOC, ZERO, entry, l2_for_write, lookup, peek_own, scan
from .metaio import DATA as DATA_KIND
from .read import read
from .state import Qcow2State

__all__ = ["ClusterAlloc", "free_entry", "reads_zero", "write", "write_in_place"]

_Q = struct.Struct(">Q")
_QQ = struct.Struct(">QQ")
_IN_PLACE = DATA | OWNED
_FILLING, _WRITTEN = AllocState.FILLING, AllocState.WRITTEN
_NO_BITS: list[int] = []


class ClusterAlloc(Allocation):
    """An allocating write of guest clusters ``[first, first + count)`` to host clusters from ``host`` on.

    ``new``: host clusters newly reserved (else the clusters are ours already: extended L2 subclusters being
    allocated in place). ``replaces``: a new cluster replaces one that maps host space (its reference is dropped
    when linked). ``blank``: nothing to copy (new clusters past the end of the file replacing nothing).
    ``region``: the guest byte range written to the host (data plus copy-on-write). ``bits``: extended L2, the
    subclusters written, per cluster. The claimed clusters' L2 entries cannot change until it finishes."""

    __slots__ = ("bits", "blank", "host", "new", "region", "replaces")

    def __init__(self, first: int, count: int, new: bool, replaces: bool, region: tuple[int, int],
                 bits: list[int]) -> None:
        Allocation.__init__(self, first, count)
        self.host = 0
        self.new = new
        self.replaces = replaces
        self.blank = False
        self.region = region
        self.bits = bits


# ---- one chunk of a write ---------------------------------------------------------------------------------------

async def write(st: Qcow2State, guest: int, view: memoryview) -> int:
    """Write a prefix of ``view`` at ``guest``; returns how many bytes were written."""
    length = len(view)
    cb = st.cluster_bits
    allocs = st.allocs
    claims = st.claims
    while True:
        gc = guest >> cb
        blocker = claims.get(gc) if claims else None
        if blocker is not None:
            await allocs.wait_for(blocker)
            continue
        s = peek_own(st, guest)
        if s is not None:
            kind, host, n = scan(st, s.data, guest, length)
            if kind == _IN_PLACE:
                await write_in_place(st, host, view[:n])
                return n
            if not st.lock.locked():
                a = _start_now(st, s.data, guest, length)
                if a is not None:
                    return await _fill_and_link(st, a, guest, view)
        plugged, a = False, None
        async with st.lock:
            blocker = claims.get(gc)
            if blocker is None and not (plugged := allocs.plugs > 0):
                s = await l2_for_write(st, guest)
                try:
                    kind, host, n = scan(st, s.data, guest, length)
                    a = None if kind == _IN_PLACE else await _start_locked(st, s.data, guest, length)
                finally:
                    st.l2cache.put(s)
        if blocker is not None:
            await allocs.wait_for(blocker)
        elif plugged:
            await allocs.wait_unplugged()
        elif a is None:
            await write_in_place(st, host, view[:n])
            return n
        else:
            return await _fill_and_link(st, a, guest, view)


def in_place_host(st: Qcow2State, guest: int, length: int) -> int | None:
    """The host offset where all of ``[guest, guest+length)`` is overwritten in place, when its cached slice says
    so and no allocation claims its cluster (the first step of ``write``, for the driver's fast path); None
    otherwise. Never suspends; raises the corruption error for a bad entry."""
    claims = st.claims
    if claims and (guest >> st.cluster_bits) in claims:
        return None
    s = peek_own(st, guest)
    if s is None:
        return None
    kind, host, n = scan(st, s.data, guest, length)
    return host if kind == _IN_PLACE and n == length else None


async def write_in_place(st: Qcow2State, host: int, view: memoryview) -> None:
    """Overwrite mapped data without the lock. The host clusters stay in ``busy_hosts`` meanwhile, so that a
    concurrent discard that frees them cannot have them reallocated (as metadata, say) under the write."""
    cb = st.cluster_bits
    first, last = host >> cb, (host + len(view) - 1) >> cb
    st.metaio.check(host, len(view), DATA_KIND)
    clusters = (first,) if first == last else range(first, last + 1)
    busy = st.busy_hosts
    for c in clusters:
        busy[c] = busy.get(c, 0) + 1
    try:
        await st.metaio.file.pwrite(host, view)
    finally:
        for c in clusters:
            if busy[c] == 1:
                del busy[c]
            else:
                busy[c] -= 1


# ---- starting an allocation -------------------------------------------------------------------------------------

def _plan(st: Qcow2State, data: bytearray, guest: int, length: int) -> ClusterAlloc:
    """The allocation the start of ``[guest, guest+length)`` needs, from its slice ``data`` (never suspends):
    a run of clusters none of which an allocation in flight claims, whose new contents need a new host cluster
    each (or, with extended L2, one cluster of ours whose subclusters get allocated in place). The caller has
    checked that no allocation claims the first cluster."""
    cs, cb = st.cs, st.cluster_bits
    gc = guest >> cb
    idx = gc & st.slice_mask
    end = guest + length
    claims = st.claims
    if not st.ext_l2:
        e = _Q.unpack_from(data, idx * 8)[0]
        maps = e & MAPS_HOST
        k = 1
        limit = min(-(-end // cs) - gc, st.slice_entries - idx)
        while k < limit and (gc + k) not in claims:
            e = _Q.unpack_from(data, (idx + k) * 8)[0]
            if e & OFLAG_COPIED and not e & (OFLAG_COMPRESSED | OFLAG_ZERO):
                break                                 # ours already: written in place next time
            maps |= e & MAPS_HOST
            k += 1
        return ClusterAlloc(gc, k, True, bool(maps), (gc << cb, (gc + k) << cb), _NO_BITS)
    first, bitmap = entry(st, data, idx)
    in_place = bool(first & OFLAG_COPIED and not first & OFLAG_COMPRESSED and first & L.L2E_OFFSET_MASK)
    replaces = bool(first & MAPS_HOST) and not in_place
    k = 1
    if not (in_place or replaces):
        limit = min(-(-end // cs) - gc, st.slice_entries - idx)
        while k < limit and (gc + k) not in claims:
            e2, _ = entry(st, data, idx + k)
            if e2 & MAPS_HOST or (e2 & OFLAG_COPIED and not e2 & (OFLAG_COMPRESSED | OFLAG_ZERO)):
                break
            k += 1
    data_end = min(end, (gc + k) << cb)
    if not replaces:
        # COW only the partial subclusters that are not allocated in place: an allocated one may be
        # overwritten concurrently by an in-place write, which a copy of its old bytes would undo
        sc = st.sc_size
        region = (guest - guest % sc, -(-data_end // sc) * sc)
        if in_place:
            if bitmap >> ((guest & (cs - 1)) >> st.sc_bits) & 1:
                region = (guest, region[1])
            if bitmap >> (((data_end - 1) & (cs - 1)) >> st.sc_bits) & 1:
                region = (region[0], data_end)
    else:
        region = (gc << cb, (gc + k) << cb)
    bits = []
    for i in range(k):
        c0 = (gc + i) << cb
        lo = max(region[0], c0) - c0
        hi = min(region[1], c0 + cs) - c0
        sc_first, sc_last = lo >> st.sc_bits, (hi - 1) >> st.sc_bits
        bits.append(((1 << (sc_last + 1)) - 1) & ~((1 << sc_first) - 1))
    a = ClusterAlloc(gc, k, not in_place, replaces, region, bits)
    if in_place:
        a.host = first & L.L2E_OFFSET_MASK
    return a


def _set_host(st: Qcow2State, a: ClusterAlloc, host: int) -> None:
    """Record the reserved host clusters. A new cluster past the end of the file has never been written (only
    its owner writes it, and I/O to a cluster finishes before it can be freed): it reads as zeroes, so when
    what it replaces reads as zeroes too (it maps nothing, and there is no backing file) nothing is copied."""
    a.host = host
    a.blank = host >= st.file.size and st.node.backing is None and not a.replaces


def _start_now(st: Qcow2State, data: bytearray, guest: int, length: int) -> ClusterAlloc | None:
    """Start an allocation in one synchronous step (the lock is free: a lock-free moment, state.py), from the
    cached slice ``data`` of an L2 table of ours. None, with nothing changed, when that needs I/O first: a
    refcount block to load or create, the lazy-refcounts dirty bit to set. Registering commits the request."""
    if (st.header.lazy_refcounts and not st.dirty) or st.allocs.plugs:
        return None
    a = _plan(st, data, guest, length)
    if a.new:
        host = st.refcounts.alloc_now(a.count)
        if host is None:
            return None
        _set_host(st, a, host)
        st.file.event("cluster_alloc")
    started = st.allocs.try_start(a)
    assert started, "nothing could claim the clusters: this never suspended"
    return a


async def _start_locked(st: Qcow2State, data: bytearray, guest: int, length: int) -> ClusterAlloc:
    """Start an allocation with the lock held and the slice ``data`` pinned (its L2 table ours), no allocation
    in flight claiming the first cluster and the queue not plugged (the caller checked, under the lock)."""
    a = _plan(st, data, guest, length)
    started = st.allocs.try_start(a)
    assert started, "checked under the lock, which is still held"
    if not a.new:
        return a
    try:
        await st.make_dirty_if_lazy()
        st.event("cluster_alloc")
        host = st.refcounts.alloc_now(a.count)
        _set_host(st, a, host if host is not None else await st.refcounts.alloc(a.count))
    except BaseException:
        st.allocs.finish(a, linked=False)        # nothing reserved: nothing to release
        raise
    return a


# ---- filling and linking ----------------------------------------------------------------------------------------

async def _fill_and_link(st: Qcow2State, a: ClusterAlloc, guest: int, view: memoryview) -> int:
    """Fill the new (sub)clusters with COW and data, then link them; finish the allocation whatever happens.
    Returns how many bytes of ``view`` went in."""
    cb = st.cluster_bits
    g0 = a.first << cb
    r0, r1 = a.region
    n = min(len(view), r1 - guest)
    linked = False
    try:
        a.advance(_FILLING)
        if r0 < guest and not a.blank:
            await _cow(st, r0, guest, a.host + (r0 - g0))
        st.file.event("write_aio")
        await st.metaio.write(a.host + (guest - g0), view[:n], DATA_KIND)
        if guest + n < r1 and not a.blank:
            await _cow(st, guest + n, r1, a.host + (guest + n - g0))
        a.advance(_WRITTEN)
        if _link_now(st, a):
            linked = True
        else:
            async with st.lock:
                freed = await _link_locked(st, a)
                linked = True               # mapped: a failure from here on must not release the new clusters
                for e in freed:
                    await free_entry(st, e)
    finally:
        st.allocs.finish(a, linked=linked)
        if not linked and a.new and a.host:
            # the engines are done with every write into the clusters (cancellation.py rule 4): release them
            # (a leak at worst if that fails; the request is committed, so this runs to its end)
            async with st.lock:
                with contextlib.suppress(BlockIOError):
                    await st.refcounts.update(a.host, a.count << cb, -1)
    return n


async def _cow(st: Qcow2State, start: int, end: int, host: int) -> None:
    """Copy the current contents of guest ``[start, end)`` to ``host`` (a cluster being filled)."""
    pos = start
    while pos < end:
        kind, _, n = await lookup(st, pos, end - pos)
        if reads_zero(st, kind, pos):
            st.event("cow_write")
            await st.metaio.write_zeroes(host + pos - start, n)
        else:
            buf = bytearray(n)
            st.event("cow_read")
            await read(st, pos, memoryview(buf))
            st.event("cow_write")
            await st.metaio.write(host + pos - start, buf, DATA_KIND)
        pos += n


def _apply_link(st: Qcow2State, data: bytearray, a: ClusterAlloc) -> list[int]:
    """Point the allocation's L2 entries in the slice ``data`` at the filled clusters (never suspends); returns
    the replaced entries whose references the caller must drop."""
    cb = st.cluster_bits
    idx = a.first & st.slice_mask
    freed: list[int] = []
    if not st.ext_l2:
        for i in range(a.count):
            old_entry = _Q.unpack_from(data, (idx + i) * 8)[0]
            _Q.pack_into(data, (idx + i) * 8, (a.host + (i << cb)) | OFLAG_COPIED)
            if a.new and old_entry & MAPS_HOST:
                freed.append(old_entry)
        return freed
    for i in range(a.count):
        old_entry, old_bitmap = _QQ.unpack_from(data, (idx + i) * 16)
        # a replaced cluster was copied whole (bits: all); an in-place one keeps its bits
        bits = a.bits[i]
        alloc = ((0 if a.new else old_bitmap) | bits) & L.SC_ALLOC_MASK
        zero = (old_bitmap >> L.SC_ZERO_SHIFT) & ~bits & L.SC_ALLOC_MASK
        _QQ.pack_into(data, (idx + i) * 16, (a.host + (i << cb)) | OFLAG_COPIED, alloc | (zero << L.SC_ZERO_SHIFT))
        if a.new and old_entry & MAPS_HOST:
            freed.append(old_entry)
    return freed


def _link_now(st: Qcow2State, a: ClusterAlloc) -> bool:
    """Link in one synchronous step (a lock-free moment) when the slice is cached, its L2 table ours, no
    replaced entry needs its reference dropped and the L2-after-refcount ordering is set without a write.
    False, with nothing changed, otherwise."""
    if st.lock.locked():
        return False
    guest = a.first << st.cluster_bits
    s = peek_own(st, guest)
    if s is None:
        return False
    if a.new and a.replaces:
        return False
    cache = st.l2cache
    if not st.header.lazy_refcounts and not cache.set_dependency_now(st.refcounts.cache):
        return False
    cache.set_depends_on_flush()
    _apply_link(st, s.data, a)
    cache.mark_dirty(s)
    return True


async def _link_locked(st: Qcow2State, a: ClusterAlloc) -> list[int]:
    """Link with the lock held: the ordering dependencies (which may write), then ``_apply_link``. Returns the
    replaced entries to free; if this raises, nothing was mapped."""
    s = await l2_for_write(st, a.first << st.cluster_bits)
    try:
        if not st.header.lazy_refcounts:
            await st.l2cache.set_dependency(st.refcounts.cache)
        st.l2cache.set_depends_on_flush()
        freed = _apply_link(st, s.data, a)
        st.l2cache.mark_dirty(s)
    finally:
        st.l2cache.put(s)
    return freed


async def free_entry(st: Qcow2State, e: int, freed: list[int] | None = None) -> None:
    """Drop the reference an (old) L2 entry held (lock held); ``freed`` gets the clusters freed."""
    st.event("cluster_free")
    if e & OFLAG_COMPRESSED:
        coff, clen = L.compressed_descriptor(e, st.cluster_bits)
        await st.refcounts.update(coff, clen, -1, freed=freed)
        return
    host = e & L.L2E_OFFSET_MASK
    if host:
        await st.refcounts.update(host, st.cs, -1, freed=freed)


def reads_zero(st: Qcow2State, kind: int, guest: int) -> bool:
    """Whether a range of ``kind`` at ``guest`` reads as zeroes (a zero cluster, or unallocated with nothing
    to read beneath)."""
    b = st.backing
    return kind == ZERO or (kind == UNALLOC and (b is None or guest >= b.size))
