"""Metadata I/O on the image file, with QEMU's overlap check before every write.

``MetadataMap`` records which host clusters hold metadata (header, L1 tables, refcount table and blocks,
active L2 tables, the snapshot table and snapshot L1 tables) in sorted compact arrays, so that the check
before a write is a bisection (QEMU's ``overlap-check=cached``, without its per-write walk over L1).

``MetaIO`` reads and writes byte ranges of the file (the file node aligns them for O_DIRECT itself),
announces fault-injection events, and is the ``CacheIO`` of the slice caches. A write that would overlap
metadata of another kind raises :class:`OverlapError`; the driver then marks the image corrupt and fails the
request with EIO, never writing the bytes.
"""

from __future__ import annotations

import bisect
import heapq
from array import array
from collections.abc import Callable, Iterable, Iterator

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


#: codes of the one-cluster kinds in ``MetadataMap._blocks``
_BLOCK_KINDS = (L2, REFBLOCK, CONFLICT)
_BLOCK_CODE = {L2: 0, REFBLOCK: 1}
_CONFLICT_CODE = 2
#: values sorted at a time by ``MetadataMap.add_blocks``
_SORT_CHUNK = 1 << 16

#: COW areas up to this size are zeroed with a plain write
_ZERO_WRITE_MAX = 256 << 10
_ZEROES = bytes(_ZERO_WRITE_MAX)


class OverlapError(Exception):
    """A write would overwrite metadata of another kind (the message names it, as QEMU's does)."""


class MetadataMap:
    """Host clusters holding metadata, by kind. Changed only under the driver lock.

    Two structures, so that memory grows with the number of tables and never with their sizes or with
    per-object overheads (reliability.md §4.3: an L1 of 4M entries may name 4M L2 tables):

    * multi-cluster tables (header, L1 tables, the refcount and snapshot tables, snapshot L1 tables) as
      disjoint sorted cluster ranges ``[_starts[i], _ends[i])`` of kind ``_kinds[i]`` (Python lists: there are
      a few, plus one per snapshot L1 table);
    * ``_blocks``: one-cluster tables (L2 tables, refcount blocks) as a sorted ``array('q')`` of
      ``cluster << 3 | code``, 8 bytes each.

    A cluster that two kinds claim (a hostile image) reads as CONFLICT, which no write may touch: within one
    structure it is stored so; between the two (always different kinds) it is derived.
    """

    def __init__(self, cluster_bits: int) -> None:
        self.cluster_bits = cluster_bits
        self._starts: list[int] = []
        self._ends: list[int] = []
        self._kinds: list[str] = []
        self._blocks = array("q")

    def _span(self, offset: int, length: int) -> tuple[int, int]:
        return offset >> self.cluster_bits, ((offset + length - 1) >> self.cluster_bits) + 1

    # ---- changes ---------------------------------------------------------------------------------------------

    def add(self, offset: int, length: int, kind: str) -> None:
        """Record metadata of ``kind`` over ``[offset, offset+length)`` (whole clusters)."""
        if length <= 0:
            return
        first, end = self._span(offset, length)
        if kind in _BLOCK_CODE:
            blocks, code = self._blocks, _BLOCK_CODE[kind]
            for c in range(first, end):
                i = bisect.bisect_left(blocks, c << 3)
                if i < len(blocks) and blocks[i] >> 3 == c:
                    if blocks[i] & 7 != code:
                        blocks[i] = c << 3 | _CONFLICT_CODE
                else:
                    blocks.insert(i, c << 3 | code)
        else:
            self.add_tables([(offset, length, kind)])

    def add_blocks(self, clusters: Iterable[int], kind: str) -> None:
        """Bulk ``add`` of one-cluster tables of one kind (used at open): sorted in bounded chunks and merged,
        so that no Python object is kept per cluster."""
        code = _BLOCK_CODE[kind]
        chunks: list[array[int]] = []
        buf: list[int] = []
        for c in clusters:
            buf.append(c << 3 | code)
            if len(buf) == _SORT_CHUNK:
                chunks.append(array("q", sorted(buf)))
                buf = []
        chunks.append(array("q", sorted(buf)))
        del buf
        merged = array("q")
        last = -1
        for v in heapq.merge(self._blocks, *chunks):
            if v >> 3 == last >> 3:
                if v != last:                          # claimed by both kinds
                    merged[-1] = last = (v >> 3) << 3 | _CONFLICT_CODE
                continue
            merged.append(v)
            last = v
        self._blocks = merged

    def add_tables(self, tables: Iterable[tuple[int, int, str]]) -> None:
        """Record multi-cluster tables: (offset, length, kind) each. One sweep over every range boundary, so
        that adding many (one per snapshot) costs O(n log n)."""
        spans = [(*self._span(off, n), kind) for off, n, kind in tables if n > 0]
        spans.extend(zip(self._starts, self._ends, self._kinds, strict=True))
        events = sorted([(a, 1, k) for a, _, k in spans] + [(b, -1, k) for _, b, k in spans])
        active: dict[str, int] = {}
        pieces: list[tuple[int, int, str]] = []
        prev = 0
        for pos, delta, k in events:
            if pos > prev and active:
                kind = next(iter(active)) if len(active) == 1 else CONFLICT
                if pieces and pieces[-1][1] == prev and pieces[-1][2] == kind:
                    pieces[-1] = (pieces[-1][0], pos, kind)
                else:
                    pieces.append((prev, pos, kind))
            n = active.get(k, 0) + delta
            if n:
                active[k] = n
            else:
                del active[k]
            prev = pos
        self._set_tables(0, len(self._starts), pieces)

    def remove(self, offset: int, length: int) -> None:
        """Forget whatever metadata ``[offset, offset+length)`` held."""
        if length <= 0:
            return
        first, end = self._span(offset, length)
        blocks = self._blocks
        i = bisect.bisect_left(blocks, first << 3)
        j = bisect.bisect_left(blocks, end << 3)
        del blocks[i:j]
        self._cut_tables(first, end)

    def _cut_tables(self, first: int, end: int) -> None:
        """Cut clusters ``[first, end)`` out of the tables' ranges."""
        i, j = self._overlapping(first, end)
        if i == j:
            return
        kept: list[tuple[int, int, str]] = []
        for r in range(i, j):
            if self._starts[r] < first:
                kept.append((self._starts[r], first, self._kinds[r]))
            if self._ends[r] > end:
                kept.append((end, self._ends[r], self._kinds[r]))
        self._set_tables(i, j, kept)

    def _set_tables(self, i: int, j: int, pieces: list[tuple[int, int, str]]) -> None:
        pieces.sort()
        self._starts[i:j] = [p[0] for p in pieces]
        self._ends[i:j] = [p[1] for p in pieces]
        self._kinds[i:j] = [p[2] for p in pieces]

    def _overlapping(self, first: int, end: int) -> tuple[int, int]:
        """Indices ``[i, j)`` of the table ranges that overlap clusters ``[first, end)``."""
        i = bisect.bisect_right(self._starts, first) - 1
        if i < 0 or self._ends[i] <= first:
            i += 1
        return i, bisect.bisect_left(self._starts, end, lo=i)

    # ---- queries ---------------------------------------------------------------------------------------------

    def kind_at(self, offset: int) -> str | None:
        c = offset >> self.cluster_bits
        blocks = self._blocks
        i = bisect.bisect_left(blocks, c << 3)
        block = _BLOCK_KINDS[blocks[i] & 7] if i < len(blocks) and blocks[i] >> 3 == c else None
        if not self._starts:
            return block
        t = bisect.bisect_right(self._starts, c) - 1
        table = self._kinds[t] if t >= 0 and c < self._ends[t] else None
        if table is None:
            return block
        return table if block is None else CONFLICT

    def check(self, offset: int, length: int, kind: str) -> None:
        """Raise OverlapError if ``[offset, offset+length)`` touches metadata of a kind other than ``kind``.
        (Every data write pays for this: the common answer, nothing there, takes two bisections.)"""
        if length <= 0:
            return
        cb = self.cluster_bits
        first, end = offset >> cb, ((offset + length - 1) >> cb) + 1
        blocks = self._blocks
        i = bisect.bisect_left(blocks, first << 3)
        while i < len(blocks) and blocks[i] < end << 3:
            found = _BLOCK_KINDS[blocks[i] & 7]
            if found != kind:
                raise OverlapError(f"Preventing invalid write on metadata (overlaps with {found})")
            i += 1
        starts = self._starts
        t = bisect.bisect_right(starts, first) - 1
        if (t < 0 or self._ends[t] <= first) and (t + 1 >= len(starts) or starts[t + 1] >= end):
            return                                # no table range overlaps
        table = self._table_kind_in(first, end, unless=kind)
        if table is not None:
            raise OverlapError(f"Preventing invalid write on metadata (overlaps with {table})")

    def _table_kind_in(self, first: int, end: int, unless: str) -> str | None:
        """The kind of the first table range overlapping clusters ``[first, end)`` whose kind is not
        ``unless`` (None if there is none)."""
        i, j = self._overlapping(first, end)
        for r in range(i, j):
            if self._kinds[r] != unless:
                return self._kinds[r]
        return None

    def clusters(self) -> Iterator[int]:
        """Every metadata cluster (each once per structure holding it)."""
        for v in self._blocks:
            yield v >> 3
        for a, b in zip(self._starts, self._ends, strict=True):
            yield from range(a, b)


class MetaIO:
    """Byte-range I/O on the file for metadata and COW, guarded by the overlap check.

    Lock rule: callers hold the driver lock for metadata writes (the metadata map must not change under
    them); data writes check the map without the lock, which is safe because the check has no await."""

    def __init__(self, file: BlockDriver, metamap: MetadataMap,
                 on_overlap: Callable[[OverlapError], BaseException]) -> None:
        self.file = file
        self.map = metamap
        #: writes aligned to this avoid a read-modify-write in the file node (O_DIRECT's block size)
        self.align = file.limits.opt_alignment
        self._on_overlap = on_overlap

    # ---- raw byte ranges ----------------------------------------------------------------------------------

    async def read(self, offset: int, length: int) -> bytearray:
        buf = bytearray(length)
        await self.file.pread(offset, memoryview(buf))
        return buf

    async def read_into(self, offset: int, buf: memoryview) -> None:
        await self.file.pread(offset, buf)

    def check(self, offset: int, length: int, kind: str) -> None:
        """The overlap check of a write of ``kind`` (against every metadata kind but ``kind``): raises the
        corruption error ``on_overlap`` makes. Never suspends."""
        try:
            self.map.check(offset, length, kind)
        except OverlapError as exc:
            raise self._on_overlap(exc) from None

    async def write(self, offset: int, data: bytes | bytearray | memoryview, kind: str) -> None:
        """Write ``data`` at ``offset`` after the overlap check (``check``)."""
        self.check(offset, len(data), kind)
        await self.file.pwrite(offset, data if isinstance(data, memoryview) else memoryview(data))

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
        if length > _ZERO_WRITE_MAX:
            try:
                await self.file.pwrite_zeroes(offset, length)
                return
            except NotSupportedError:
                pass
        pos = 0
        while pos < length:
            n = min(len(_ZEROES), length - pos)
            await self.file.pwrite(offset + pos, memoryview(_ZEROES)[:n])
            pos += n

    async def discard(self, offset: int, length: int) -> None:
        """Punch free clusters out of the file."""
        await self.file.pdiscard(offset, length)

    async def sync(self) -> None:
        self.file.event("flush_to_disk")
        await self.file.flush()

    def event(self, name: str) -> None:
        """Announce a fault-injection event (QEMU's BLKDBG_EVENT) right before the I/O it names."""
        self.file.event(name)

    # ---- CacheIO ---------------------------------------------------------------------------------------------

    async def read_slice(self, cache: SliceCache, offset: int, buf: memoryview) -> None:
        self.file.event("l2_load" if cache.name == "l2" else "refblock_load")
        await self.read_into(offset, buf)

    async def write_slice(self, cache: SliceCache, offset: int, data: memoryview) -> None:
        self.file.event("l2_update" if cache.name == "l2" else "refblock_update")
        await self.write(offset, data, L2 if cache.name == "l2" else REFBLOCK)
