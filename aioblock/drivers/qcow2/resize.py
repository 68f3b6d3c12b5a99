"""Resizing: truncate (grow; shrink only over unallocated space) and moving the L1 table to a bigger one.

A resize runs with the allocating-write queue plugged (no allocation in flight, none starting) and the lock
held; the backend drains guest requests before it.
"""

from __future__ import annotations

import struct
from array import array

from ...errors import InvalidOptionError, NotSupportedError
from . import layout as L
from .mapping import UNALLOC, lookup_locked
from .metaio import L1
from .refcount import pack_table
from .state import Qcow2State

__all__ = ["grow_l1", "truncate"]

_Q = struct.Struct(">Q")


async def truncate(st: Qcow2State, size: int) -> None:
    st.check_usable(True)
    h = st.header
    if size % 512:
        raise InvalidOptionError("The new size must be a multiple of 512")
    async with st.allocs.plugged(), st.lock:
        if size < h.size:
            if h.version < 3 and st.snapshots:
                raise NotSupportedError("Can't resize a v2 image which has snapshots")
            await _check_unallocated(st, size, h.size)
        needed = L.size_to_l1(size, st.cluster_bits, st.ext_l2)
        if needed > len(st.l1):
            await grow_l1(st, needed)
        await st.write_header_bytes(24, _Q.pack(size))
        h.size = size


async def _check_unallocated(st: Qcow2State, start: int, end: int) -> None:
    pos = start
    while pos < end:
        kind, _, n = await lookup_locked(st, pos, end - pos)
        if kind != UNALLOC:
            raise NotSupportedError("qcow2: cannot shrink the image: the area being cut off holds data "
                                    "(discard it first)")
        pos += n


async def grow_l1(st: Qcow2State, needed: int) -> None:
    """Move the L1 table to a bigger one (I6): allocate, write and sync it, switch the header, free the old
    one. Lock held."""
    h, cs = st.header, st.cs
    if needed * 8 > L.MAX_L1_BYTES:
        raise InvalidOptionError("Active L1 table too large")
    new_l1 = array("Q", st.l1)
    new_l1.extend([0] * (needed - len(st.l1)))
    nbytes = needed * 8
    clusters = -(-nbytes // cs)
    st.event("l1_grow_alloc_table")
    off = await st.refcounts.alloc(clusters)
    await st.refcounts.cache.flush()
    st.metamap.add(off, nbytes, L1)
    st.event("l1_grow_write_table")
    await st.metaio.write(off, pack_table(new_l1).ljust(clusters * cs, b"\0"), L1)
    await st.metaio.sync()
    st.event("l1_grow_activate_table")
    old_off, old_size = h.l1_table_offset, h.l1_size
    await st.write_header_bytes(36, struct.pack(">IQ", needed, off))
    h.l1_size, h.l1_table_offset = needed, off
    st.l1 = new_l1
    st.metamap.remove(old_off, old_size * 8)
    st.metamap.add(off, nbytes, L1)
    if old_size:
        await st.refcounts.update(old_off, old_size * 8, -1)
