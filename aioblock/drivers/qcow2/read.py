"""The read path: data clusters, zero clusters, the backing file, compressed clusters.

Reads take no lock unless an L2 slice must be loaded (``mapping.lookup``), and never wait for allocations in
flight: an allocation changes the mapping only when it links, after its data is written, so a read sees the
old contents or the new ones.
"""

from __future__ import annotations

import errno

from ...driver import read_backing
from ...errors import BlockIOError
from . import layout as L
from .compress import CompressedDataError, decompress_cluster
from .mapping import COMPRESSED, DATA, KIND_MASK, UNALLOC, ZERO, lookup
from .state import Qcow2State

__all__ = ["decompress", "pread", "read"]


async def pread(st: Qcow2State, offset: int, buf: memoryview) -> None:
    """A guest read. (The driver's ``pread`` tries the fast path first: a cached slice mapping the whole range
    to one data run is one lookup and one file read.)"""
    st.check_usable(False)
    try:
        await read(st, offset, buf)
    except BlockIOError:
        await st.after_error()
        raise


async def read(st: Qcow2State, offset: int, buf: memoryview) -> None:
    """Fill ``buf`` with the guest bytes at ``offset`` (also used for copy-on-write)."""
    pos, total = 0, len(buf)
    while pos < total:
        kind, host, n = await lookup(st, offset + pos, total - pos)
        view = buf[pos:pos + n]
        kind &= KIND_MASK
        if kind == DATA:
            await st.metaio.read_into(host, view)
        elif kind == ZERO:
            view[:] = bytes(n)
        elif kind == UNALLOC:
            await read_backing(st.backing, offset + pos, view)
        else:
            assert kind == COMPRESSED
            data = await decompress(st, host)
            within = (offset + pos) & (st.cs - 1)
            view[:] = data[within:within + n]
        pos += n



async def decompress(st: Qcow2State, entry: int) -> bytes:
    """The cluster a compressed L2 entry describes, decompressed."""
    coff, clen = L.compressed_descriptor(entry, st.cluster_bits)
    if coff + clen > st.file.size + 511 or coff == 0:
        raise BlockIOError(errno.EIO, f"compressed cluster at {coff:#x} lies beyond the end of the file",
                           filename=st.filename)
    st.event("read_compressed")
    raw = await st.metaio.read(coff, min(clen, st.file.size - coff))
    try:
        return decompress_cluster(st.header.compression_type, raw, st.cs)
    except CompressedDataError as exc:
        raise BlockIOError(errno.EIO, f"bad compressed cluster at {coff:#x}: {exc}", filename=st.filename) from None
