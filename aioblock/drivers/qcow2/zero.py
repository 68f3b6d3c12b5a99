"""Write-zeroes and discard: rewriting L2 entries, laid out exactly as QEMU 7.2 does.

Both change mappings, so both wait for the allocations in flight that claim the clusters they rewrite: the wait
happens with no lock held (``allocs.wait_clear``), and the rewrite under the lock, after checking again that no
allocation claims the cluster (one may have started meanwhile: then the lock is released and the wait
repeats). A unit whose change the L2 entry cannot express (zeroing part of a compressed cluster) is zeroed
through the write path after the lock is released.

Clusters whose last reference a guest discard or an unmapping write-zeroes drops are punched out of the host
file (QEMU's pass-discard-request).
"""

from __future__ import annotations

from ...errors import BlockIOError, NotSupportedError
from . import layout as L
from .alloc import free_entry, reads_zero, write
from .layout import OFLAG_COMPRESSED, OFLAG_COPIED, OFLAG_ZERO
from .mapping import UNALLOC, ZERO, entry, l2_for_write, l2_offset, lookup, lookup_locked, set_entry
from .state import Qcow2State

__all__ = ["pdiscard", "pwrite_zeroes"]


async def pwrite_zeroes(st: Qcow2State, offset: int, length: int, *, may_unmap: bool) -> None:
    """Zero a range as QEMU 7.2 does, so that images come out allocated alike.

    v3: whole (sub)clusters get the zero flag (keeping their host cluster unless ``may_unmap``); a partial
    unit whose other bytes already read as zeroes and that is unallocated or zero becomes a zero unit;
    other partial units get zeroes written. v2 has no zero flag: without a backing file whole clusters are
    deallocated (they then read as zeroes) and partial ones written with zeroes where needed; with a
    backing file, deallocating would expose it, so zeroes are written (NotSupportedError: the backend
    writes zero buffers)."""
    st.check_usable(True)
    if st.header.version < 3 and st.backing is not None:
        raise NotSupportedError("qcow2 v2 cannot record zero clusters over a backing file")
    unit = st.sc_size
    end = offset + length
    try:
        head_end = min(end, -(-offset // unit) * unit)
        # the partial unit at the end of an image is zeroed whole, as QEMU does
        tail_start = end if end == st.size else max(head_end, end - end % unit)
        if offset < head_end:
            await _zero_partial(st, offset, head_end, may_unmap)
        if head_end < tail_start:
            await _rewrite_entries(st, head_end, tail_start, "zero", may_unmap)
        if tail_start < end:
            await _zero_partial(st, tail_start, end, may_unmap)
    except BlockIOError:
        await st.after_error()
        raise


async def pdiscard(st: Qcow2State, offset: int, length: int) -> None:
    """Discard the whole clusters of the range (and the partial cluster at the end of the image)."""
    st.check_usable(True)
    cs = st.cs
    start = -(-offset // cs) * cs
    end = offset + length
    if end != st.size:
        end -= end % cs
    if start >= end or (st.header.version < 3 and st.backing is not None):
        return
    try:
        await _rewrite_entries(st, start, end, "discard", True)
    except BlockIOError:
        await st.after_error()
        raise


async def _zero_partial(st: Qcow2State, start: int, end: int, unmap: bool, *, force: bool = False) -> None:
    """Zero part of one (sub)cluster: mark the whole unit zero where that changes nothing else (v3), else write
    zeroes unless the part already reads as zeroes (``force``: write them anyway)."""
    if not force and st.header.version >= 3:
        u0 = start - start % st.sc_size
        u1 = min(u0 + st.sc_size, st.size)
        kind, _, n = await lookup(st, u0, u1 - u0)
        if (n == u1 - u0 and kind in (UNALLOC, ZERO) and reads_zero(st, kind, u0)
                and await _rewrite_entries(st, u0, u1, "zero", unmap, only_if_zero=True)):
            return
    pos = start
    while pos < end:
        kind, _, n = await lookup(st, pos, end - pos)
        if force or not reads_zero(st, kind & 3, pos):
            buf = memoryview(bytes(n))
            done = 0
            while done < n:
                done += await write(st, pos + done, buf[done:])
        pos += n


async def _rewrite_entries(st: Qcow2State, start: int, end: int, op: str, unmap: bool, *,
                           only_if_zero: bool = False) -> bool:
    """Zero (``op="zero"``, whole subclusters) or discard (whole clusters) the L2 entries of a range.

    ``only_if_zero`` (one unit): do it only if the unit, checked under the lock when no allocation claims it,
    is still unallocated or zero and reads as zeroes; returns whether the entries were rewritten."""
    cb = st.cluster_bits
    allocs = st.allocs
    fallback: list[tuple[int, int]] = []
    pos = start
    while pos < end:
        await allocs.wait_clear(pos >> cb, (pos >> cb) + 1)
        async with st.lock:
            if allocs.claimed(pos >> cb):
                continue                          # an allocation started meanwhile: wait for it, unlocked
            if only_if_zero:
                kind, _, n = await lookup_locked(st, start, end - start)
                if n != end - start or kind not in (UNALLOC, ZERO) or not reads_zero(st, kind, start):
                    return False
            while pos < end and not allocs.claimed(pos >> cb):
                pos = await _rewrite_span(st, pos, end, op, unmap, fallback)
    for lo, hi in fallback:
        await _zero_partial(st, lo, hi, unmap, force=True)
    return True


async def _rewrite_span(st: Qcow2State, pos: int, end: int, op: str, unmap: bool,
                        fallback: list[tuple[int, int]]) -> int:
    """Rewrite entries from ``pos`` within one L2 slice, up to ``end`` or the first cluster an allocation
    claims; drop the references of what they mapped. Lock held. Returns where it stopped."""
    cb, cs = st.cluster_bits, st.cs
    l1i = pos >> st.l1_shift
    span_end = min(end, (l1i + 1) << st.l1_shift)
    if not l2_offset(st, l1i) and (st.header.version < 3 or (op == "discard" and st.backing is None)):
        return span_end                              # nothing mapped here, nothing to hide
    await st.make_dirty_if_lazy()
    s = await l2_for_write(st, pos)
    freed: list[int] = []
    try:
        idx = (pos >> cb) & st.slice_mask
        slice_end = min(span_end, ((pos >> cb) - idx + st.slice_entries) << cb)
        claimed = st.allocs.claimed
        while pos < slice_end and not claimed(pos >> cb):
            c0 = pos & ~(cs - 1)
            stop = min(slice_end, c0 + cs)
            dropped = _rewrite_one(st, s.data, idx, pos - c0, stop - c0, op, unmap)
            if dropped is None:
                fallback.append((pos, stop))
            elif dropped:
                freed.append(dropped)
            pos = stop
            idx += 1
        st.l2cache.mark_dirty(s)
    finally:
        st.l2cache.put(s)
    released: list[int] = []
    for e in freed:
        await free_entry(st, e, released)
    await _punch(st, released)
    return pos


def _rewrite_one(st: Qcow2State, data: bytearray, idx: int, lo: int, hi: int, op: str, unmap: bool) -> int | None:
    """Rewrite one L2 entry for bytes ``[lo, hi)`` of its cluster (lock held).

    Returns the old entry when its reference must be dropped, 0 when none, None when the change cannot be
    expressed in the entry (zeroing part of a compressed cluster)."""
    e, bitmap = entry(st, data, idx)
    host = e & L.L2E_OFFSET_MASK
    compressed = bool(e & OFLAG_COMPRESSED)
    referenced = e if (host or compressed) else 0
    if op == "discard":
        if not referenced and not bitmap and not e & OFLAG_ZERO and st.backing is None:
            return 0                                         # already reads as zeroes, like QEMU: leave it
        set_entry(st, data, idx, (0, L.SC_ALLOC_MASK << L.SC_ZERO_SHIFT) if st.ext_l2
                  else (OFLAG_ZERO if st.header.version >= 3 else 0, 0))
        return referenced
    whole = lo == 0 and hi == st.cs
    if st.ext_l2:
        if compressed and not whole:
            return None
        first, last = lo >> st.sc_bits, (hi - 1) >> st.sc_bits
        mask = ((1 << (last + 1)) - 1) & ~((1 << first) - 1)
        alloc = 0 if compressed else bitmap & L.SC_ALLOC_MASK & ~mask
        zero = ((bitmap >> L.SC_ZERO_SHIFT) | mask) & L.SC_ALLOC_MASK
        drop = compressed or (host and not alloc and (unmap or not e & OFLAG_COPIED))
        set_entry(st, data, idx, (0 if drop else e, alloc | (zero << L.SC_ZERO_SHIFT)))
        return referenced if drop else 0
    if st.header.version < 3:                              # no zero flag: deallocate (no backing file)
        set_entry(st, data, idx, (0, 0))
        return referenced
    keep = not unmap and not compressed and host and e & OFLAG_COPIED
    set_entry(st, data, idx, ((host | OFLAG_COPIED | OFLAG_ZERO) if keep else OFLAG_ZERO, 0))
    return 0 if keep else referenced


async def _punch(st: Qcow2State, clusters: list[int]) -> None:
    """Give the host file back the space of clusters a guest discard freed (QEMU's pass-discard-request).

    Lock held: the clusters are free but not reusable before the next metadata flush, which needs the lock,
    so nothing can be written to them meanwhile. If the freeing metadata does not reach the disk (a crash),
    the old mapping reads zeroes: what a discard or an unmapping write-zeroes allows. Clusters freed for
    other reasons (a copy-on-write replacing one) are not punched: their old mapping must keep its data
    until the new one is durable."""
    cb = st.cluster_bits
    clusters.sort()
    i = 0
    while i < len(clusters):
        j = i + 1
        while j < len(clusters) and clusters[j] == clusters[j - 1] + 1:
            j += 1
        await st.metaio.discard(clusters[i] << cb, (j - i) << cb)
        i = j
