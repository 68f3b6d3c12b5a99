"""Guest-to-host mapping: the one L2 lookup, L2 slices, and new L2 tables (QEMU's qcow2-cluster.c, lookup half).

**The lookup.** ``scan(st, data, guest, length)`` decodes the L2 entries of one cached slice into the longest
run from ``guest`` that maps alike: ``(kind, host, nbytes)``. Every path uses it: reads, the write path's
in-place check, COW, zero and discard decisions, block status, shrinking. A kind is one of UNALLOC (read the
backing file), ZERO, DATA, COMPRESSED, plus the flag OWNED on DATA when the entry's COPIED flag says the host
cluster is this mapping's alone (refcount 1: it may be written in place). ``host`` is the host offset of
``guest`` (DATA; ZERO and UNALLOC when the entry keeps a host cluster; 0 if none) or the raw L2 entry
(COMPRESSED). Every entry is validated as it is decoded; a bad one signals corruption (EIO, image marked
corrupt), for writes as for reads.

``lookup`` finds the slice (cached, or loaded under the lock) and scans it; ``peek`` is the lock-free part of it:
the cached slice or None, for the fast paths.

Lock rules: ``peek``/``scan`` never suspend (a lookup sees each entry old or new: an entry changes without an
await). ``get_slice``, ``l2_for_write``, ``alloc_l2`` and ``write_l1_entries`` run under ``st.lock``.
"""

from __future__ import annotations

import struct
from array import array
from typing import TYPE_CHECKING

from . import layout as L
from .layout import OFLAG_COMPRESSED, OFLAG_COPIED, OFLAG_ZERO
from .metaio import CONFLICT, L1, L2
from .refcount import pack_table
from .state import Qcow2State, hx

if TYPE_CHECKING:
    from ...cache import Slice

__all__ = [
    "COMPRESSED",
    "DATA",
    "KIND_MASK",
    "MAPS_HOST",
    "OWNED",
    "UNALLOC",
    "ZERO",
    "alloc_l2",
    "entry",
    "get_slice",
    "l2_for_write",
    "l2_offset",
    "lookup",
    "lookup_locked",
    "peek",
    "peek_own",
    "scan",
    "set_entry",
    "write_l1_entries",
]

_Q = struct.Struct(">Q")
_QQ = struct.Struct(">QQ")

# what a guest range maps to (``kind & KIND_MASK``), and whether its data clusters are ours alone
UNALLOC, ZERO, DATA, COMPRESSED = 0, 1, 2, 3
KIND_MASK = 3
OWNED = 4
#: L2 entry bits that make it refer to host clusters
MAPS_HOST = L.L2E_OFFSET_MASK | OFLAG_COMPRESSED
_L2E_OFFSET_MASK = L.L2E_OFFSET_MASK
_COMPRESSED_OR_ZERO = OFLAG_COMPRESSED | OFLAG_ZERO
_DATA_OWNED = DATA | OWNED


# ---- entries -------------------------------------------------------------------------------------------------

def entry(st: Qcow2State, data: bytearray, idx: int) -> tuple[int, int]:
    """(L2 entry, subcluster bitmap: 0 without extended L2) at index ``idx`` of a slice."""
    if st.ext_l2:
        e, b = _QQ.unpack_from(data, idx * 16)
        return e, b
    return _Q.unpack_from(data, idx * 8)[0], 0


def set_entry(st: Qcow2State, data: bytearray, idx: int, value: tuple[int, int]) -> None:
    if st.ext_l2:
        _QQ.pack_into(data, idx * 16, value[0], value[1])
    else:
        _Q.pack_into(data, idx * 8, value[0])


def where(st: Qcow2State, guest: int) -> str:
    """"L2 offset: 0x..., L2 index: N" for the L2 entry of ``guest``, as QEMU words it."""
    l2off = st.l1[guest >> st.l1_shift] & L.L1E_OFFSET_MASK
    return f"L2 offset: {hx(l2off)}, L2 index: {hx((guest >> st.cluster_bits) & st.l2_index_mask)}"


# ---- slices ----------------------------------------------------------------------------------------------------

def l2_offset(st: Qcow2State, l1i: int) -> int:
    """The L2 table of L1 index ``l1i`` (0: none), validated."""
    off: int = st.l1[l1i] & L.L1E_OFFSET_MASK
    if off & (st.cs - 1):
        raise st.corruption(f"L2 table offset {off:#x} unaligned (L1 index: {hx(l1i)})")
    return off


def _slice_offset(st: Qcow2State, l2off: int, guest: int) -> int:
    return l2off + (((guest >> st.cluster_bits) & st.l2_index_mask) >> st.slice_shift) * st.slice_bytes


def peek(st: Qcow2State, guest: int) -> Slice | None:
    """The cached slice holding the L2 entry of ``guest``, or None (no L2 table, not cached, or an L1 entry
    the slow path must judge). Never suspends; no pin: use it before the next await."""
    l2off = st.l1[guest >> st.l1_shift] & L.L1E_OFFSET_MASK
    if not l2off or l2off & (st.cs - 1):
        return None
    return st.l2cache.peek(
        l2off + (((guest >> st.cluster_bits) & st.l2_index_mask) >> st.slice_shift) * st.slice_bytes)


def peek_own(st: Qcow2State, guest: int) -> Slice | None:
    """``peek``, for a write: only when the L2 table is ours alone (its L1 entry has COPIED), so that its
    entries may be changed in place."""
    l1e = st.l1[guest >> st.l1_shift]
    l2off = l1e & L.L1E_OFFSET_MASK
    if not l1e & OFLAG_COPIED or not l2off or l2off & (st.cs - 1):
        return None
    return st.l2cache.peek(
        l2off + (((guest >> st.cluster_bits) & st.l2_index_mask) >> st.slice_shift) * st.slice_bytes)


async def get_slice(st: Qcow2State, guest: int) -> Slice | None:
    """The slice for ``guest``, pinned (None when no L2 table maps it). Lock held."""
    l2off = l2_offset(st, guest >> st.l1_shift)
    if not l2off:
        return None
    if l2off >= st.file.size:
        raise st.corruption(f"L2 table at {l2off:#x} lies beyond the end of the file")
    if st.metamap.kind_at(l2off) == CONFLICT:
        raise st.corruption(f"L2 table at {l2off:#x} overlaps other metadata")
    return await st.l2cache.get(_slice_offset(st, l2off, guest))


# ---- the lookup ----------------------------------------------------------------------------------------------

def scan(st: Qcow2State, data: bytearray, guest: int, length: int) -> tuple[int, int, int]:
    """What ``[guest, guest+length)`` maps to, for its longest prefix that maps alike within the slice ``data``
    (see the module docstring). Never suspends; raises the corruption error for a bad entry."""
    cb, cs = st.cluster_bits, st.cs
    idx = (guest >> cb) & st.slice_mask
    if st.ext_l2:
        return _scan_extended(st, data, idx, guest, length)
    e = _Q.unpack_from(data, idx * 8)[0]
    within = guest & (cs - 1)
    n = cs - within
    host = e & _L2E_OFFSET_MASK
    if host and not e & _COMPRESSED_OR_ZERO:           # data: the common case first
        if host & (cs - 1):
            raise st.corruption(f"Cluster allocation offset {host:#x} unaligned ({where(st, guest)})")
        kind = _DATA_OWNED if e & OFLAG_COPIED else DATA
    elif e & OFLAG_COMPRESSED:
        return COMPRESSED, e, n if n < length else length
    elif e & OFLAG_ZERO:
        if st.header.version < 3:
            raise st.corruption(f"Zero cluster entry found in pre-v3 image ({where(st, guest)})")
        if host & (cs - 1):
            raise st.corruption(f"Preallocated zero cluster offset {host:#x} unaligned (guest offset: "
                                f"{hx(guest & ~(cs - 1))})")
        kind = ZERO
    else:
        kind = UNALLOC
    at = host + within if host else 0
    if n >= length:
        return kind, at, length
    # A standard entry continues the run iff it equals the previous one advanced by a cluster (by nothing when
    # the run has no host offset): same flags, so same kind and the same validity.
    last = min(st.slice_entries, idx + 1 + ((length - n + cs - 1) >> cb))
    step = cs if host else 0
    expect = e
    for e in struct.unpack_from(f">{last - idx - 1}Q", data, idx * 8 + 8):
        expect += step
        if e != expect:
            break
        n += cs
    return kind, at, min(n, length)


def _scan_extended(st: Qcow2State, data: bytearray, idx: int, guest: int, length: int) -> tuple[int, int, int]:
    """``scan`` for extended L2 entries: runs of subclusters."""
    cs = st.cs
    kind, host, n = _subcluster(st, data, idx, guest)
    if kind == COMPRESSED or n >= length:
        return kind, host, min(length, n)
    end_host = host + n
    pos = guest + n
    while n < length:
        if pos & (cs - 1) == 0:
            idx += 1
            if idx >= st.slice_entries:
                break
        k2, h2, n2 = _subcluster(st, data, idx, pos)
        if k2 != kind or h2 != (end_host if host else 0):
            break
        n += n2
        pos += n2
        end_host += n2
    return kind, host, min(n, length)


def _subcluster(st: Qcow2State, data: bytearray, idx: int, guest: int) -> tuple[int, int, int]:
    """Kind, host offset and length of the subcluster containing ``guest`` (extended L2), to its end."""
    cs = st.cs
    within = guest & (cs - 1)
    e, bitmap = _QQ.unpack_from(data, idx * 16)
    if e & OFLAG_COMPRESSED:
        return COMPRESSED, e, cs - within
    sc = within >> st.sc_bits
    rest = st.sc_size - (within & (st.sc_size - 1))
    alloc = bitmap >> sc & 1
    if alloc and bitmap >> (L.SC_ZERO_SHIFT + sc) & 1:
        raise st.corruption(f"Invalid subcluster bitmap {bitmap:#x} ({where(st, guest)})")
    host = e & L.L2E_OFFSET_MASK
    if host & (cs - 1) or (alloc and not host):
        raise st.corruption(f"Cluster allocation offset {host:#x} invalid ({where(st, guest)})")
    at = host + within if host else 0
    if alloc:
        return (DATA | OWNED if e & OFLAG_COPIED else DATA), at, rest
    if bitmap >> (L.SC_ZERO_SHIFT + sc) & 1:
        return ZERO, at, rest
    return UNALLOC, at, rest


async def lookup(st: Qcow2State, guest: int, length: int) -> tuple[int, int, int]:
    """``scan`` of the slice for ``guest``: lock-free when it is cached, else loaded under the lock."""
    l2off = l2_offset(st, guest >> st.l1_shift)
    if not l2off:
        span = (1 << st.l1_shift) - (guest & ((1 << st.l1_shift) - 1))
        return UNALLOC, 0, min(length, span)
    s = st.l2cache.peek(_slice_offset(st, l2off, guest))
    if s is not None:
        return scan(st, s.data, guest, length)
    async with st.lock:
        return await lookup_locked(st, guest, length)


async def lookup_locked(st: Qcow2State, guest: int, length: int) -> tuple[int, int, int]:
    """``lookup`` with the lock held."""
    s = await get_slice(st, guest)
    if s is None:
        span = (1 << st.l1_shift) - (guest & ((1 << st.l1_shift) - 1))
        return UNALLOC, 0, min(length, span)
    try:
        return scan(st, s.data, guest, length)
    finally:
        st.l2cache.put(s)


# ---- L2 tables -------------------------------------------------------------------------------------------------

async def l2_for_write(st: Qcow2State, guest: int) -> Slice:
    """The pinned slice for ``guest``, after making its L2 table exist and be ours alone (COPIED). Lock held."""
    l1i = guest >> st.l1_shift
    l2off = l2_offset(st, l1i)
    if not l2off or not st.l1[l1i] & OFLAG_COPIED:
        await alloc_l2(st, l1i, l2off)
    s = await get_slice(st, guest)
    assert s is not None
    return s


async def alloc_l2(st: Qcow2State, l1i: int, old: int) -> None:
    """A new L2 table for L1 index ``l1i``: zeroed, or a copy of the shared table ``old`` (I3): allocated,
    written and synced before the L1 entry points at it. Lock held."""
    cs = st.cs
    await st.make_dirty_if_lazy()
    st.event("l2_alloc")
    new = await st.refcounts.alloc(1)
    try:
        if old:
            await st.l2cache.flush()
            content: bytes | bytearray = await st.metaio.read(old, cs)
        else:
            content = bytes(cs)
        if not st.header.lazy_refcounts:
            await st.refcounts.cache.flush()
        st.event("l2_alloc_write")
        st.metamap.add(new, cs, L2)
        await st.metaio.write(new, content, L2)
        await st.metaio.sync()
        saved = st.l1[l1i]
        st.l1[l1i] = new | OFLAG_COPIED
        try:
            st.event("l1_update")
            await write_l1_entries(st, l1i, l1i + 1)
        except BaseException:
            st.l1[l1i] = saved
            raise
    except BaseException:
        st.metamap.remove(new, cs)
        st.l2cache.discard(new, cs)
        await st.refcounts.update(new, cs, -1)
        raise
    if old:                                 # the shared table stays with the snapshots that use it
        st.l2cache.discard(old, cs)
        st.metamap.remove(old, cs)
        await st.refcounts.update(old, cs, -1)


async def write_l1_entries(st: Qcow2State, first: int, end: int) -> None:
    """Write L1 entries ``[first, end)`` (widened to the file's alignment) and sync. Lock held."""
    align = max(st.metaio.align, 8) // 8
    lo = first - first % align
    hi = min(-(-end // align) * align, len(st.l1))
    table: array[int] = st.l1
    await st.metaio.write(st.header.l1_table_offset + lo * 8, pack_table(table, lo, hi), L1)
    await st.metaio.sync()
