"""Compressed writes (``write -c``, ``convert -c``), packed as QEMU packs them (see ``Refcounts.alloc_bytes``).

A compressed write replaces an unallocated cluster only (QEMU refuses the others). It runs under the lock from
its check of the target entry to its L2 update, after waiting, unlocked, for any allocation in flight that
claims the cluster; a cluster that does not compress is written through the normal write path instead.
Reads of compressed clusters are in ``read``.
"""

from __future__ import annotations

import contextlib
import errno
import struct

from ...errors import BlockIOError, NotSupportedError
from . import layout as L
from .alloc import write
from .compress import compress_cluster
from .layout import OFLAG_COMPRESSED
from .mapping import entry, l2_for_write
from .metaio import DATA
from .state import Qcow2State

__all__ = ["pwrite_compressed"]

_Q = struct.Struct(">Q")
_QQ = struct.Struct(">QQ")


async def pwrite_compressed(st: Qcow2State, offset: int, buf: memoryview) -> None:
    """Write whole clusters compressed. An empty write ends a stream of them, as in QEMU (``qemu-img convert
    -c`` sends one last): the file is extended to a whole number of sectors, compressed data having left it
    at any byte."""
    st.check_usable(True)
    if not buf:
        async with st.lock:
            if not st.allocs.in_flight:    # nothing else can be extending the file: the size is exact
                with contextlib.suppress(NotSupportedError):
                    await st.file.truncate(st.file.size)
        return
    cs = st.cs
    if offset % cs or (len(buf) % cs and offset + len(buf) != st.size):
        raise BlockIOError(errno.EINVAL, "compressed writes must be whole clusters", filename=st.filename)
    try:
        for pos in range(0, len(buf), cs):
            chunk = bytes(buf[pos:pos + cs]).ljust(cs, b"\0")
            await _write_cluster(st, offset + pos, chunk)
    except BlockIOError:
        await st.after_error()
        raise


async def _write_cluster(st: Qcow2State, guest: int, chunk: bytes) -> None:
    cs, cb = st.cs, st.cluster_bits
    packed = compress_cluster(st.header.compression_type, chunk, cs - 1)
    if packed is None:
        done = 0
        n = min(cs, st.size - guest)
        while done < n:
            done += await write(st, guest + done, memoryview(chunk)[done:n])
        return
    gc = guest >> cb
    while True:
        await st.allocs.wait_clear(gc, gc + 1)
        async with st.lock:
            if st.allocs.claimed(gc):
                continue                       # an allocation started meanwhile: wait for it, unlocked
            s = await l2_for_write(st, guest)
            try:
                e, _ = entry(st, s.data, gc & st.slice_mask)
                if e & L.L2E_OFFSET_MASK or e & OFLAG_COMPRESSED:
                    raise BlockIOError(errno.EIO, "compressed writes cannot overwrite allocated clusters",
                                       filename=st.filename)
            finally:
                st.l2cache.put(s)
            await st.make_dirty_if_lazy()
            st.event("cluster_alloc_bytes")
            coff = await st.refcounts.alloc_bytes(len(packed))
            st.event("write_compressed")
            await st.metaio.write(coff, packed, DATA)
            s = await l2_for_write(st, guest)
            try:
                if not st.header.lazy_refcounts:
                    await st.l2cache.set_dependency(st.refcounts.cache)
                st.l2cache.set_depends_on_flush()
                desc = L.encode_compressed(coff, len(packed), cb)
                idx = gc & st.slice_mask
                if st.ext_l2:
                    _QQ.pack_into(s.data, idx * 16, desc, 0)
                else:
                    _Q.pack_into(s.data, idx * 8, desc)
                st.event("l2_update_compressed")
                st.l2cache.mark_dirty(s)
            finally:
                st.l2cache.put(s)
            return
