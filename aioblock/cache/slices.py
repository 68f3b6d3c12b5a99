"""The metadata slice cache: fixed-size slices of on-disk tables, keyed by host offset (QEMU's qcow2-cache).

A format driver keeps one :class:`SliceCache` per kind of table (qcow2: L2 slices and refcount-block slices;
QED: L2 tables). A slice is ``slice_size`` bytes of a table at a host offset that is a multiple of
``slice_size``. The cache does no parsing; the driver reads and patches ``Slice.data`` in place.

**Life of a slice.** ``get`` (or ``get_empty`` for a table that is new on disk) returns the slice *pinned*;
the caller reads it, may change ``data`` and call ``mark_dirty``, and ends with ``put``. A pinned slice is never
evicted, discarded or replaced. A dirty slice reaches the disk through ``flush`` or when it is evicted; it is
never dropped without being written, except by ``discard`` (its table was freed) and ``get_empty`` (a new
table replaces it).

**Write ordering.** ``set_dependency(other)`` says "the dirty slices of *other* reach the disk, followed by a
sync, before any slice of this cache is written" (qcow2: refcount blocks before the L2 slices that point at the
new clusters, and the other way round when references are dropped). ``set_depends_on_flush`` says "sync before
the next write of this cache" (qcow2: COW data before the L2 entries that map it). Both are honoured by every
write the cache makes, whether from ``flush`` or from eviction. The dependencies between caches never form a
cycle: ``set_dependency`` breaks a would-be cycle by flushing first.

**Locking.** Every method except ``peek`` must be called with the owner's metadata lock held (the lock that
``Flusher`` also takes around its flushes), so no two of them run at once. ``peek`` is synchronous, never
suspends, and may be called without the lock: it never sees a half-loaded slice (a slice is inserted only
after its read completed) nor a half-dropped one. Methods that suspend (``get``, ``get_empty``, ``flush``,
``set_dependency``) keep the cache consistent at every await: the sync methods ``shrink_idle`` and ``clear``
(what a clean timer calls without the lock) may run in between.

**Memory bound.** The cache holds at most ``capacity`` slices, i.e. ``capacity * slice_size`` bytes of table
data, with one exception: when a new slice is needed and *every* cached slice is pinned, the cache grows past
``capacity`` instead of waiting (a task that holds pins and needs one more slice would wait forever). It shrinks
back as pins are released: ``put`` evicts clean excess slices at once (no I/O needed), and excess dirty slices
are written and evicted by the next ``get``/``get_empty`` (or dropped after the next ``flush``). So whenever
nothing is pinned, ``len(cache) <= max(capacity, dirty_count)``, and ``<= capacity`` after a ``flush``.

**Cancellation.** A cancelled ``get`` inserts nothing (or, if cancelled while writing back a victim, leaves the
victim dirty and cached). A cancelled ``flush`` leaves every slice either written and clean or still dirty,
never clean but unwritten; a dependency or the depends-on-flush flag is cleared only after its sync completed.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

__all__ = ["CacheIO", "CacheStats", "Slice", "SliceCache"]


class CacheIO(Protocol):
    """What a cache needs from its owner (the format driver).

    The owner does alignment, overlap checks and fault-injection events inside these; the cache calls them with
    the owner's metadata lock held (it is held around every cache method that suspends). Errors propagate
    unchanged to the caller of the cache method.
    """

    async def read_slice(self, cache: SliceCache, offset: int, buf: memoryview) -> None:
        """Fill ``buf`` (``cache.slice_size`` bytes) with the table bytes at host ``offset``."""
        ...

    async def write_slice(self, cache: SliceCache, offset: int, data: memoryview) -> None:
        """Write ``data`` (``cache.slice_size`` bytes) at host ``offset``; durable only after ``sync``."""
        ...

    async def sync(self) -> None:
        """fsync the underlying file (every write that completed before the call is durable afterwards)."""
        ...


class Slice:
    """One cached slice of a table.

    ``offset``: host byte offset (a multiple of the cache's ``slice_size``), fixed. ``data``: exactly
    ``slice_size`` bytes, patched in place by the holder of a pin. ``dirty``: ``data`` differs from the disk;
    set only through ``SliceCache.mark_dirty`` and cleared only by the cache after a completed write.
    ``pins``: how many ``get``/``get_empty`` calls have not yet been matched by ``put``; never negative.
    """

    __slots__ = ("_gen", "_used", "data", "dirty", "offset", "pins")

    def __init__(self, offset: int, data: bytearray) -> None:
        self.offset = offset
        self.data = data
        self.dirty = False
        self.pins = 0
        #: Bumped by every mark_dirty: a write-back marks the slice clean only if no mark_dirty came meanwhile.
        self._gen = 0
        #: Set on every use, cleared by shrink_idle (two-phase idle detection).
        self._used = True

    def __repr__(self) -> str:
        return f"<Slice {self.offset:#x} dirty={self.dirty} pins={self.pins}>"


@dataclass
class CacheStats:
    """Counters of one cache. ``hits``/``misses``: lookups by ``get`` and ``peek`` hits (``get_empty`` counts
    neither; a ``peek`` miss counts nothing). ``evictions``: slices dropped to respect ``capacity`` (not those
    dropped by ``discard``, ``shrink_idle`` or ``clear``). ``writes``: slices written back, by flush or eviction.
    ``flushes``: ``flush`` calls that wrote at least one slice."""

    hits: int = 0
    misses: int = 0
    evictions: int = 0
    writes: int = 0
    flushes: int = 0

    def to_dict(self) -> dict[str, int]:
        return {"hits": self.hits, "misses": self.misses, "evictions": self.evictions, "writes": self.writes,
                "flushes": self.flushes}


class SliceCache:
    """An LRU cache of table slices with pinning, dirty tracking and write-ordering dependencies.

    Invariants (between method calls):

    * ``_slices`` maps offset -> Slice, least recently used first; each slice is there under its own offset.
    * ``len(self) <= max(capacity, pinned + dirty)``: the cache exceeds ``capacity`` only after growing while
      every slice was pinned (see the module docstring); ``put`` and ``flush`` evict the clean excess,
      ``get``/``get_empty`` evict (writing if needed) back down to ``capacity`` as soon as unpinned slices allow.
    * The dependency graph (``_depends``, at most one edge per cache) is acyclic, so resolving a dependency
      (which flushes the other cache, which resolves *its* dependency) always terminates.

    All state is guarded by the owner's metadata lock (see the module docstring), ``peek`` excepted.
    """

    def __init__(self, name: str, io: CacheIO, *, slice_size: int, capacity: int) -> None:
        if slice_size < 1:
            raise ValueError(f"slice_size must be positive, not {slice_size}")
        if capacity < 1:
            raise ValueError(f"cache capacity must be at least 1 slice, not {capacity}")
        self.name = name
        self.slice_size = slice_size
        self.capacity = capacity
        self.stats = CacheStats()
        #: Called on every mark_dirty (e.g. ``Flusher.notify``); must not suspend or raise.
        self.on_dirty: Callable[[], None] | None = None
        self._io = io
        self._slices: OrderedDict[int, Slice] = OrderedDict()
        #: Cache whose dirty slices must be written and synced before any write of this one.
        self._depends: SliceCache | None = None
        #: Sync before the next write of this cache.
        self._depends_on_flush = False

    def __len__(self) -> int:
        return len(self._slices)

    def __repr__(self) -> str:
        return f"<SliceCache {self.name!r} {len(self._slices)}/{self.capacity} x {self.slice_size}>"

    @property
    def dirty_count(self) -> int:
        """How many cached slices are dirty."""
        return sum(1 for s in self._slices.values() if s.dirty)

    # ---- lookups ---------------------------------------------------------------------------------------------

    def peek(self, offset: int) -> Slice | None:
        """The cached slice at ``offset``, or None. No I/O, no pin (do not keep it across an await).

        A hit moves the slice to most recently used and counts a hit; a miss counts nothing. Safe without the
        metadata lock (it never suspends)."""
        s = self._slices.get(offset)
        if s is not None:
            self._slices.move_to_end(offset)
            s._used = True
            self.stats.hits += 1
        return s

    async def get(self, offset: int) -> Slice:
        """The slice at ``offset``, pinned; the caller must ``put`` it.

        On a miss (counted), evicts least recently used unpinned slices down to ``capacity - 1`` (a dirty one
        is written first, after its write ordering; see ``_make_room``), then reads the slice with
        ``io.read_slice``. If the read fails, nothing is cached and the error propagates."""
        self._check_offset(offset)
        s = self._slices.get(offset)
        if s is not None:
            self.stats.hits += 1
        else:
            self.stats.misses += 1
            await self._make_room()
            buf = bytearray(self.slice_size)
            await self._io.read_slice(self, offset, memoryview(buf))
            s = Slice(offset, buf)
            self._slices[offset] = s
        self._slices.move_to_end(offset)
        s._used = True
        s.pins += 1
        return s

    async def get_empty(self, offset: int) -> Slice:
        """A zero-filled slice at ``offset``, pinned, not read from disk: for a table that is new on disk.

        A cached copy at ``offset`` is replaced without being written (its table is being overwritten); it must
        not be pinned (RuntimeError). The new slice is clean: the caller fills it and calls ``mark_dirty``.
        Counts neither a hit nor a miss."""
        self._check_offset(offset)
        old = self._slices.get(offset)
        if old is not None:
            if old.pins:
                raise RuntimeError(f"{self.name} cache: slice {offset:#x} is pinned and cannot be replaced")
            del self._slices[offset]
        else:
            await self._make_room()
        s = Slice(offset, bytearray(self.slice_size))
        self._slices[offset] = s
        s.pins = 1
        return s

    def put(self, s: Slice) -> None:
        """Release one pin taken by ``get`` or ``get_empty``.

        If the cache had grown past ``capacity`` (every slice was pinned), clean unpinned slices are evicted
        right away down to ``capacity``; dirty ones need a write and wait for the next ``get``, ``get_empty``
        or ``flush``."""
        assert s.pins > 0, f"{self.name} cache: put() of unpinned slice {s.offset:#x}"
        s.pins -= 1
        if len(self._slices) > self.capacity:
            self._evict_clean_excess()

    def mark_dirty(self, s: Slice) -> None:
        """Record that ``s.data`` was changed in memory (the caller holds a pin). Calls ``on_dirty``.

        Marking a slice that is being written back keeps it dirty after that write completes."""
        assert self._slices.get(s.offset) is s, f"{self.name} cache: mark_dirty() of a slice not in the cache"
        s.dirty = True
        s._gen += 1
        s._used = True
        if self.on_dirty is not None:
            self.on_dirty()

    # ---- write ordering --------------------------------------------------------------------------------------

    async def set_dependency(self, other: SliceCache) -> None:
        """From now on, write and sync every dirty slice of ``other`` before writing any slice of this cache.

        Setting the dependency that is already set does nothing. If ``other`` already depends on this cache,
        directly or through a chain, ``other`` is flushed first (which flushes this cache before it), so the
        dependency graph stays acyclic. A different dependency that is set is resolved first (its cache
        flushed, then synced): a cache has at most one dependency."""
        if self.set_dependency_now(other):
            return
        if other._reaches(self):
            # flush() always resolves the dependency chain, so afterwards nothing on it reaches self.
            await other.flush()
            assert not other._reaches(self)
        await self._resolve_dependency()
        self._depends = other

    def set_dependency_now(self, other: SliceCache) -> bool:
        """``set_dependency`` when it needs no write: True if the dependency is set (already or now); False,
        with nothing changed, if ``set_dependency`` must resolve another dependency or break a cycle first.
        Never suspends."""
        if other is self:
            raise ValueError(f"{self.name} cache cannot depend on itself")
        if self._depends is other:
            return True
        if self._depends is None and not other._reaches(self):
            self._depends = other
            return True
        return False

    def set_depends_on_flush(self) -> None:
        """Make the next write-back of any slice of this cache wait for an ``io.sync()`` first."""
        self._depends_on_flush = True

    def _reaches(self, target: SliceCache) -> bool:
        """Whether following dependencies from this cache leads to ``target`` (terminates: acyclic)."""
        c = self._depends
        while c is not None:
            if c is target:
                return True
            c = c._depends
        return False

    async def _resolve_dependency(self) -> None:
        """Flush the dependency's cache and sync, then forget the dependency (kept if anything fails).

        The sync goes to the dependency's io (where its slices went) and, if different, to ours too (what our
        owner wrote before, e.g. guest data, must precede our writes). A sync also satisfies the
        depends-on-flush flag."""
        dep = self._depends
        if dep is None:
            return
        await dep.flush()
        await dep._io.sync()
        if dep._io is not self._io:
            await self._io.sync()
        self._depends = None
        self._depends_on_flush = False

    async def _before_write(self) -> None:
        """Honour the dependency and the depends-on-flush flag before a write of this cache."""
        await self._resolve_dependency()
        if self._depends_on_flush:
            await self._io.sync()
            self._depends_on_flush = False

    async def _write_back(self, s: Slice) -> None:
        """Write one dirty slice (ordering already resolved by the caller) and mark it clean if unchanged.

        The slice is pinned during the write so that nothing drops it, and the bytes written are a snapshot
        taken before the write: a ``mark_dirty`` during the write leaves the slice dirty."""
        gen = s._gen
        snapshot = bytes(s.data)
        s.pins += 1
        try:
            await self._io.write_slice(self, s.offset, memoryview(snapshot))
        finally:
            s.pins -= 1
        self.stats.writes += 1
        if s._gen == gen:
            s.dirty = False

    async def flush(self) -> None:
        """Write back every dirty slice, in ascending offset order, honouring the write ordering.

        First resolves the dependency (flush the other cache, sync, forget it; done even when nothing here is
        dirty, which is how ``set_dependency`` breaks cycles), then the depends-on-flush flag if there is
        something to write (sync, clear). Each slice is marked clean after its own write; then clean slices in
        excess of ``capacity`` are evicted. Does not sync at the end: the caller does. On a write error the
        failing slice and those after it stay dirty and the error propagates."""
        await self._resolve_dependency()
        dirty = sorted((s for s in self._slices.values() if s.dirty), key=lambda s: s.offset)
        if dirty:
            await self._before_write()
            wrote = False
            for s in dirty:
                # Re-check after each await: the slice may have been written by a nested flush or replaced.
                if self._slices.get(s.offset) is not s or not s.dirty:
                    continue
                await self._write_back(s)
                wrote = True
            if wrote:
                self.stats.flushes += 1
        self._evict_clean_excess()

    # ---- eviction and dropping -------------------------------------------------------------------------------

    def _evictable(self, s: Slice) -> bool:
        return not s.pins and self._slices.get(s.offset) is s

    def _lru_unpinned(self) -> Slice | None:
        for s in self._slices.values():
            if not s.pins:
                return s
        return None

    async def _make_room(self) -> None:
        """Evict least recently used unpinned slices until one more fits in ``capacity``.

        A dirty victim is written first (after resolving the write ordering); if that write fails, the victim
        stays cached and dirty and the error propagates. If every slice is pinned, returns without room: the
        cache grows past ``capacity`` (never waits: the pins may belong to the caller)."""
        while len(self._slices) >= self.capacity:
            victim = self._lru_unpinned()
            if victim is None:
                return
            if victim.dirty:
                await self._before_write()
                # Each await may have changed the cache: write and drop the victim only if it is still one.
                if not self._evictable(victim):
                    continue
                await self._write_back(victim)
                if not self._evictable(victim) or victim.dirty:
                    continue
            del self._slices[victim.offset]
            self.stats.evictions += 1

    def _evict_clean_excess(self) -> None:
        """Evict least recently used clean unpinned slices while the cache is above ``capacity`` (no I/O)."""
        excess = len(self._slices) - self.capacity
        if excess <= 0:
            return
        victims = [s.offset for s in self._slices.values() if not s.pins and not s.dirty][:excess]
        for off in victims:
            del self._slices[off]
        self.stats.evictions += len(victims)

    def discard(self, offset: int, length: int) -> None:
        """Drop every cached slice that overlaps ``[offset, offset + length)`` without writing it (the tables
        there were freed). Raises RuntimeError, dropping nothing, if one of them is pinned."""
        if length <= 0:
            return
        end = offset + length
        ss = self.slice_size
        first = offset - offset % ss
        if (end - first + ss - 1) // ss <= len(self._slices):
            hit = [s for off in range(first, end, ss) if (s := self._slices.get(off)) is not None]
        else:
            hit = [s for s in self._slices.values() if s.offset < end and s.offset + ss > offset]
        for s in hit:
            if s.pins:
                raise RuntimeError(f"{self.name} cache: cannot discard pinned slice {s.offset:#x}")
        for s in hit:
            del self._slices[s.offset]

    def shrink_idle(self) -> int:
        """Drop clean unpinned slices not used since the previous ``shrink_idle`` call (cache-clean-interval).

        Two-phase: every use marks a slice; this call drops the unmarked clean unpinned slices and unmarks the
        rest. A slice loaded after one call survives the next one. Returns how many slices were dropped."""
        idle = []
        for s in self._slices.values():
            if s._used:
                s._used = False
            elif not s.dirty and not s.pins:
                idle.append(s.offset)
        for off in idle:
            del self._slices[off]
        return len(idle)

    def clear(self) -> None:
        """Drop every clean unpinned slice; dirty and pinned slices stay."""
        for off in [s.offset for s in self._slices.values() if not s.dirty and not s.pins]:
            del self._slices[off]

    def _check_offset(self, offset: int) -> None:
        if offset < 0 or offset % self.slice_size:
            raise ValueError(f"{self.name} cache: offset {offset:#x} is not a multiple of {self.slice_size}")
