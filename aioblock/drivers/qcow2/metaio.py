"""Metadata I/O on the image file, with QEMU's overlap check before every write.

``MetadataMap`` records which host clusters hold metadata (header, L1 tables, refcount table and blocks,
active L2 tables, the snapshot table and snapshot L1 tables) as a sorted list of cluster indices, so that the
check before a write is one bisection (QEMU's ``overlap-check=cached``, without its per-write walk over L1).

``MetaIO`` reads and writes byte ranges of the file whatever its alignment (O_DIRECT files get
read-modify-write of the edge blocks), announces fault-injection events, and is the ``CacheIO`` of the slice
caches. A write that would overlap metadata of another kind raises :class:`OverlapError`; the driver then
marks the image corrupt and fails the request with EIO, never writing the bytes.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable

from ...cache import SliceCache
from ...driver import BlockDriver
from ...errors import NotSupportedError

__all__ = [
    "DATA",
    "HEADER",
    "L1",
    "L2",
    "REFBLOCK",
    "REFTABLE",
    "SNAPSHOTS",
    "SNAPSHOT_L1",
    "MetaIO",
    "MetadataMap",
    "OverlapError",
]

# kinds of metadata (the names QEMU's overlap message uses)
HEADER = "qcow2_header"
L1 = "active L1 table"
L2 = "active L2 table"
REFTABLE = "refcount table"
REFBLOCK = "refcount block"
SNAPSHOTS = "snapshot table"
SNAPSHOT_L1 = "inactive L1 table"
DATA = "data"
#: a cluster two kinds of metadata claim (hostile image): nothing may write it
CONFLICT = "metadata claimed twice"


#: COW areas up to this size are zeroed with a plain write
_ZERO_WRITE_MAX = 256 << 10
_ZEROES = bytes(_ZERO_WRITE_MAX)


class OverlapError(Exception):
    """A write would overwrite metadata of another kind (the message names it, as QEMU's does)."""


class MetadataMap:
    """Host clusters holding metadata, by kind. Changed only under the driver lock."""

    def __init__(self, cluster_bits: int) -> None:
        self.cluster_bits = cluster_bits
        self._sorted: list[int] = []
        self._kind: dict[int, str] = {}

    def add(self, offset: int, length: int, kind: str) -> None:
        """Record metadata of ``kind``; a cluster claimed by two kinds (a hostile image) becomes CONFLICT, which
        no write may touch."""
        if length <= 0:
            return
        first = offset >> self.cluster_bits
        last = (offset + length - 1) >> self.cluster_bits
        for c in range(first, last + 1):
            old = self._kind.get(c)
            if old is None:
                bisect.insort(self._sorted, c)
            self._kind[c] = kind if old in (None, kind) else CONFLICT

    def add_many(self, items: dict[int, str]) -> None:
        """Bulk form of ``add`` for whole clusters (cluster index -> kind), sorting once (used at open)."""
        for c, kind in items.items():
            old = self._kind.get(c)
            self._kind[c] = kind if old in (None, kind) else CONFLICT
        self._sorted = sorted(self._kind)

    def remove(self, offset: int, length: int) -> None:
        if length <= 0:
            return
        first = offset >> self.cluster_bits
        last = (offset + length - 1) >> self.cluster_bits
        for c in range(first, last + 1):
            if self._kind.pop(c, None) is not None:
                del self._sorted[bisect.bisect_left(self._sorted, c)]

    def kind_at(self, offset: int) -> str | None:
        return self._kind.get(offset >> self.cluster_bits)

    def check(self, offset: int, length: int, kind: str) -> None:
        """Raise OverlapError if ``[offset, offset+length)`` touches metadata of a kind other than ``kind``."""
        if length <= 0:
            return
        first = offset >> self.cluster_bits
        last = (offset + length - 1) >> self.cluster_bits
        lst = self._sorted
        i = bisect.bisect_left(lst, first)
        while i < len(lst) and lst[i] <= last:
            found = self._kind[lst[i]]
            if found != kind:
                raise OverlapError(f"Preventing invalid write on metadata (overlaps with {found})")
            i += 1

    def clusters(self) -> dict[int, str]:
        return dict(self._kind)


class MetaIO:
    """Byte-range I/O on the file for metadata and COW, guarded by the overlap check.

    Lock rule: callers hold the driver lock for metadata writes (the metadata map must not change under
    them); data writes check the map without the lock, which is safe because the check has no await."""

    def __init__(self, file: BlockDriver, metamap: MetadataMap,
                 on_overlap: Callable[[OverlapError], BaseException]) -> None:
        self.file = file
        self.map = metamap
        self.align = file.limits.request_alignment
        self._on_overlap = on_overlap

    # ---- raw byte ranges ----------------------------------------------------------------------------------

    async def read(self, offset: int, length: int) -> bytearray:
        buf = bytearray(length)
        await self.read_into(offset, memoryview(buf))
        return buf

    async def read_into(self, offset: int, buf: memoryview) -> None:
        a = self.align
        if a == 1 or (offset % a == 0 and len(buf) % a == 0):
            await self.file.pread(offset, buf)
            return
        start = offset - offset % a
        end = -(-(offset + len(buf)) // a) * a
        tmp = bytearray(end - start)
        await self.file.pread(start, memoryview(tmp))
        buf[:] = tmp[offset - start:offset - start + len(buf)]

    async def write(self, offset: int, data: bytes | bytearray | memoryview, kind: str) -> None:
        """Write ``data`` at ``offset`` after the overlap check against every metadata kind but ``kind``."""
        try:
            self.map.check(offset, len(data), kind)
        except OverlapError as exc:
            raise self._on_overlap(exc) from None
        await self._write_unchecked(offset, data)

    async def _write_unchecked(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        a = self.align
        view = memoryview(data)
        if a == 1 or (offset % a == 0 and len(view) % a == 0):
            await self.file.pwrite(offset, view)
            return
        start = offset - offset % a
        end = -(-(offset + len(view)) // a) * a
        tmp = bytearray(end - start)
        await self.file.pread(start, memoryview(tmp))
        tmp[offset - start:offset - start + len(view)] = view
        await self.file.pwrite(start, memoryview(tmp))

    async def write_zeroes(self, offset: int, length: int) -> None:
        """Zero a range of a cluster being allocated (COW from nothing).

        Bytes at or past the end of the file already read as zeroes and are skipped (only the allocation's
        owner writes there). Small ranges are written as zero buffers (cheaper than a fallocate, which
        io_uring runs synchronously); large ones use the file's write-zeroes (a ZERO_RANGE fallocate)."""
        try:
            self.map.check(offset, length, DATA)
        except OverlapError as exc:
            raise self._on_overlap(exc) from None
        length = min(length, self.file.size - offset)
        if length <= 0:
            return
        a = self.align
        if length > _ZERO_WRITE_MAX and offset % a == 0 and length % a == 0:
            try:
                await self.file.pwrite_zeroes(offset, length)
                return
            except NotSupportedError:
                pass
        pos = 0
        while pos < length:
            n = min(len(_ZEROES), length - pos)
            await self._write_unchecked(offset + pos, memoryview(_ZEROES)[:n])
            pos += n

    async def sync(self) -> None:
        self.file.event("flush_to_disk")
        await self.file.flush()

    # ---- CacheIO ---------------------------------------------------------------------------------------------

    async def read_slice(self, cache: SliceCache, offset: int, buf: memoryview) -> None:
        self.file.event("l2_load" if cache.name == "l2" else "refblock_load")
        await self.read_into(offset, buf)

    async def write_slice(self, cache: SliceCache, offset: int, data: memoryview) -> None:
        self.file.event("l2_update" if cache.name == "l2" else "refblock_update")
        await self.write(offset, data, L2 if cache.name == "l2" else REFBLOCK)
