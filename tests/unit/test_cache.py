"""SliceCache and Flusher against a fake CacheIO: a bytearray "disk" that logs every write and sync."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aioblock.cache import CacheIO, CacheStats, Flusher, Slice, SliceCache

SS = 512                      # slice size used by most tests
REF = 0x10000                 # "refcount block" slices live here
L2 = 0x20000                  # "L2" slices live here
DISK = 0x40000


class FakeIO:
    """A CacheIO over a bytearray. ``log`` records ("read", off), ("write", off) and ("sync",) in issue order;
    ``fail_write`` makes writes at those offsets raise; ``on_write`` runs (awaited) inside each write."""

    def __init__(self, size: int = DISK) -> None:
        self.disk = bytearray(size)
        self.log: list[tuple[Any, ...]] = []
        self.fail_write: set[int] = set()
        self.on_write: Callable[[int], Awaitable[None]] | None = None

    async def read_slice(self, cache: SliceCache, offset: int, buf: memoryview) -> None:
        await asyncio.sleep(0)
        self.log.append(("read", offset))
        buf[:] = self.disk[offset:offset + len(buf)]

    async def write_slice(self, cache: SliceCache, offset: int, data: memoryview) -> None:
        await asyncio.sleep(0)
        if offset in self.fail_write:
            raise OSError(5, "injected write error")
        data = memoryview(bytes(data))            # what was handed over, before on_write may change the slice
        if self.on_write is not None:
            await self.on_write(offset)
        self.log.append(("write", offset))
        self.disk[offset:offset + len(data)] = data

    async def sync(self) -> None:
        await asyncio.sleep(0)
        self.log.append(("sync",))

    def io_log(self) -> list[tuple[Any, ...]]:
        """The log without reads."""
        return [e for e in self.log if e[0] != "read"]


def make(io: FakeIO, name: str = "c", *, capacity: int = 4, slice_size: int = SS) -> SliceCache:
    cache_io: CacheIO = io                        # FakeIO satisfies the protocol (checked by mypy here)
    return SliceCache(name, cache_io, slice_size=slice_size, capacity=capacity)


async def dirty(cache: SliceCache, offset: int, value: int) -> Slice:
    """Load the slice at ``offset``, fill it with ``value``, mark it dirty and unpin it."""
    s = await cache.get(offset)
    s.data[:] = bytes([value]) * cache.slice_size
    cache.mark_dirty(s)
    cache.put(s)
    return s


# ---- construction, lookups, statistics ---------------------------------------------------------------------


def test_capacity_and_offsets_are_validated() -> None:
    io = FakeIO()
    with pytest.raises(ValueError):
        make(io, capacity=0)
    with pytest.raises(ValueError):
        make(io, slice_size=0)


async def test_unaligned_offset_is_refused() -> None:
    cache = make(FakeIO())
    with pytest.raises(ValueError):
        await cache.get(SS + 1)
    with pytest.raises(ValueError):
        await cache.get_empty(-SS)


async def test_hits_misses_and_peek() -> None:
    io = FakeIO()
    io.disk[L2:L2 + SS] = b"\x07" * SS
    cache = make(io)
    assert cache.peek(L2) is None                 # a peek miss counts nothing
    assert cache.stats == CacheStats()
    s = await cache.get(L2)
    assert s.offset == L2 and s.data == b"\x07" * SS and s.pins == 1 and not s.dirty
    assert len(s.data) == SS
    cache.put(s)
    assert s.pins == 0
    assert await cache.get(L2) is s
    cache.put(s)
    assert cache.peek(L2) is s and s.pins == 0    # no pin
    assert cache.stats.to_dict() == {"hits": 2, "misses": 1, "evictions": 0, "writes": 0, "flushes": 0}
    assert io.log == [("read", L2)]
    assert len(cache) == 1 and cache.dirty_count == 0


async def test_put_more_than_pinned_asserts() -> None:
    cache = make(FakeIO())
    s = await cache.get(0)
    cache.put(s)
    with pytest.raises(AssertionError):
        cache.put(s)
    assert s.pins == 0


async def test_failed_read_caches_nothing() -> None:
    io = FakeIO()

    async def bad_read(cache: SliceCache, offset: int, buf: memoryview) -> None:
        raise OSError(5, "injected read error")

    io.read_slice = bad_read                      # type: ignore[method-assign]
    cache = make(io)
    with pytest.raises(OSError):
        await cache.get(0)
    assert len(cache) == 0 and cache.stats.misses == 1


async def test_lru_order() -> None:
    io = FakeIO()
    cache = make(io, capacity=3)
    for i in range(3):
        cache.put(await cache.get(i * SS))
    cache.put(await cache.get(0))                 # 0 is now the most recently used: order 1, 2, 0
    cache.peek(SS)                                # peek refreshes too: order 2, 0, 1
    cache.put(await cache.get(3 * SS))            # evicts 2
    assert cache.stats.evictions == 1
    assert [cache.peek(i * SS) is not None for i in range(4)] == [True, True, False, True]
    cache.put(await cache.get(4 * SS))            # order was 0, 1, 3 (peeks above): evicts 0
    assert cache.peek(0) is None and len(cache) == 3
    assert cache.stats.evictions == 2


async def test_pinned_slices_are_never_evicted_and_the_cache_grows_only_when_all_are_pinned() -> None:
    cache = make(FakeIO(), capacity=2)
    a = await cache.get(0)
    b = await cache.get(SS)
    c = await cache.get(2 * SS)                   # every slice pinned: grow instead of waiting
    assert len(cache) == 3 and cache.stats.evictions == 0
    cache.put(b)
    d = await cache.get(3 * SS)                   # b is the only unpinned slice: it goes, a (older) stays
    assert cache.peek(SS) is None and cache.peek(0) is a and len(cache) == 3
    for s in (a, c, d):
        cache.put(s)
    cache.put(await cache.get(4 * SS))            # back down to capacity
    assert len(cache) == 2


async def test_dirty_victim_is_written_before_eviction() -> None:
    io = FakeIO()
    cache = make(io, capacity=1)
    await dirty(cache, L2, 0xAA)
    assert cache.dirty_count == 1
    cache.put(await cache.get(L2 + SS))
    assert io.log == [("read", L2), ("write", L2), ("read", L2 + SS)]
    assert io.disk[L2:L2 + SS] == b"\xaa" * SS
    assert cache.stats.evictions == 1 and cache.stats.writes == 1 and cache.dirty_count == 0
    assert cache.peek(L2) is None


async def test_failed_victim_write_keeps_it_dirty() -> None:
    io = FakeIO()
    cache = make(io, capacity=1)
    s = await dirty(cache, L2, 1)
    io.fail_write.add(L2)
    with pytest.raises(OSError):
        await cache.get(L2 + SS)
    assert cache.peek(L2) is s and s.dirty and s.pins == 0 and len(cache) == 1
    io.fail_write.clear()
    cache.put(await cache.get(L2 + SS))
    assert io.disk[L2:L2 + SS] == b"\x01" * SS


async def test_on_dirty_is_called_on_every_mark_dirty() -> None:
    cache = make(FakeIO())
    calls: list[int] = []
    cache.on_dirty = lambda: calls.append(1)
    s = await cache.get(0)
    cache.mark_dirty(s)
    cache.mark_dirty(s)
    cache.put(s)
    assert len(calls) == 2 and cache.dirty_count == 1


# ---- flush and write ordering ------------------------------------------------------------------------------


async def test_flush_writes_in_offset_order_and_does_not_sync() -> None:
    io = FakeIO()
    cache = make(io)
    for off in (3 * SS, 0, 2 * SS):
        await dirty(cache, off, off // SS + 1)
    io.log.clear()
    await cache.flush()
    assert io.log == [("write", 0), ("write", 2 * SS), ("write", 3 * SS)]
    assert cache.dirty_count == 0 and cache.stats.flushes == 1 and cache.stats.writes == 3
    await cache.flush()                           # nothing dirty: no write, not counted
    assert cache.stats.flushes == 1 and len(io.log) == 3


async def test_flush_error_keeps_slices_dirty_and_propagates() -> None:
    io = FakeIO()
    cache = make(io)
    for i in range(3):
        await dirty(cache, i * SS, i + 1)
    io.log.clear()
    io.fail_write.add(SS)
    with pytest.raises(OSError):
        await cache.flush()
    assert io.log == [("write", 0)]
    assert [s.dirty for s in (cache.peek(0), cache.peek(SS), cache.peek(2 * SS)) if s] == [False, True, True]
    io.fail_write.clear()
    await cache.flush()
    assert io.log == [("write", 0), ("write", SS), ("write", 2 * SS)]
    assert cache.dirty_count == 0


async def test_slice_redirtied_during_its_write_stays_dirty() -> None:
    io = FakeIO()
    cache = make(io)
    s = await dirty(cache, 0, 1)

    async def meanwhile(offset: int) -> None:
        s.data[:] = b"\x02" * SS
        cache.mark_dirty(s)

    io.on_write = meanwhile
    await cache.flush()
    assert s.dirty and io.disk[:SS] == b"\x01" * SS       # the bytes handed to the write were a snapshot
    io.on_write = None
    await cache.flush()
    assert not s.dirty and io.disk[:SS] == b"\x02" * SS


async def test_dependency_orders_refblocks_sync_then_l2() -> None:
    io = FakeIO()
    ref, l2 = make(io, "refcount"), make(io, "l2")
    await dirty(ref, REF + SS, 1)
    await dirty(ref, REF, 2)
    await dirty(l2, L2 + SS, 3)
    await dirty(l2, L2, 4)
    await l2.set_dependency(ref)
    io.log.clear()
    await l2.flush()
    assert io.log == [("write", REF), ("write", REF + SS), ("sync",), ("write", L2), ("write", L2 + SS)]
    assert ref.dirty_count == 0 and l2.dirty_count == 0
    # The dependency was resolved and forgotten: the next L2 write needs no sync.
    await dirty(l2, L2, 5)
    io.log.clear()
    await l2.flush()
    assert io.log == [("write", L2)]


async def test_dependency_is_honoured_on_eviction() -> None:
    io = FakeIO()
    ref, l2 = make(io, "refcount"), make(io, "l2", capacity=1)
    await dirty(ref, REF, 1)
    await dirty(l2, L2, 2)
    await l2.set_dependency(ref)
    io.log.clear()
    l2.put(await l2.get(L2 + SS))                 # evicts the dirty L2 slice
    assert io.log == [("write", REF), ("sync",), ("write", L2), ("read", L2 + SS)]
    assert l2.stats.evictions == 1


async def test_dependency_resolution_with_nothing_dirty_still_syncs() -> None:
    # The sync also orders what the owner wrote elsewhere (qcow2: guest data before the L2 entry).
    io = FakeIO()
    ref, l2 = make(io, "refcount"), make(io, "l2")
    await dirty(l2, L2, 1)
    await l2.set_dependency(ref)
    io.log.clear()
    await l2.flush()
    assert io.log == [("sync",), ("write", L2)]


async def test_same_dependency_twice_is_a_noop_and_self_dependency_is_refused() -> None:
    io = FakeIO()
    ref, l2 = make(io, "refcount"), make(io, "l2")
    await dirty(ref, REF, 1)
    await l2.set_dependency(ref)
    io.log.clear()
    await l2.set_dependency(ref)
    assert io.log == []
    with pytest.raises(ValueError):
        await l2.set_dependency(l2)


async def test_cycle_is_resolved_by_flushing_the_other_cache_first() -> None:
    io = FakeIO()
    ref, l2 = make(io, "refcount"), make(io, "l2")
    await dirty(ref, REF, 1)
    await dirty(l2, L2, 2)
    await l2.set_dependency(ref)                  # L2 after refcounts
    io.log.clear()
    await ref.set_dependency(l2)                  # now refcounts after L2: l2 is flushed (ref first) beforehand
    assert io.log == [("write", REF), ("sync",), ("write", L2)]
    assert ref.dirty_count == 0 and l2.dirty_count == 0
    # The new dependency holds, the old one is gone.
    await dirty(ref, REF, 3)
    await dirty(l2, L2, 4)
    io.log.clear()
    await ref.flush()
    assert io.log == [("write", L2), ("sync",), ("write", REF)]
    io.log.clear()
    await l2.flush()
    assert io.log == []


async def test_longer_cycle_is_resolved() -> None:
    io = FakeIO()
    a, b, c = make(io, "a"), make(io, "b"), make(io, "c")
    await a.set_dependency(b)
    await b.set_dependency(c)
    for cache, off in ((a, 0), (b, SS), (c, 2 * SS)):
        await dirty(cache, off, 1)
    io.log.clear()
    await c.set_dependency(a)                     # c -> a -> b -> c would be a cycle
    assert io.log == [("write", 2 * SS), ("sync",), ("write", SS), ("sync",), ("write", 0)]
    await dirty(c, 2 * SS, 2)
    await dirty(a, 0, 2)
    io.log.clear()
    await c.flush()
    assert io.log == [("write", 0), ("sync",), ("write", 2 * SS)]


async def test_changing_the_dependency_resolves_the_old_one_first() -> None:
    io = FakeIO()
    a, b, c = make(io, "a"), make(io, "b"), make(io, "c")
    await dirty(b, SS, 1)
    await dirty(c, 2 * SS, 1)
    await a.set_dependency(b)
    io.log.clear()
    await a.set_dependency(c)
    assert io.log == [("write", SS), ("sync",)]
    await dirty(a, 0, 1)
    io.log.clear()
    await a.flush()
    assert io.log == [("write", 2 * SS), ("sync",), ("write", 0)]


async def test_depends_on_flush_inserts_one_sync_before_the_next_write() -> None:
    io = FakeIO()
    cache = make(io)
    cache.set_depends_on_flush()
    await cache.flush()                           # nothing to write: the flag stays
    assert io.log == []
    await dirty(cache, 0, 1)
    await dirty(cache, SS, 1)
    io.log.clear()
    await cache.flush()
    assert io.log == [("sync",), ("write", 0), ("write", SS)]
    await dirty(cache, 0, 2)
    io.log.clear()
    await cache.flush()
    assert io.log == [("write", 0)]
    small = make(io, "small", capacity=1)
    small.set_depends_on_flush()
    await dirty(small, L2, 1)
    io.log.clear()
    small.put(await small.get(L2 + SS))
    assert io.log == [("sync",), ("write", L2), ("read", L2 + SS)]


# ---- get_empty, discard, shrink_idle, clear ------------------------------------------------------------------


async def test_get_empty_is_zeroed_unread_and_replaces_the_cached_copy() -> None:
    io = FakeIO()
    io.disk[L2:L2 + 2 * SS] = b"\xff" * 2 * SS
    cache = make(io)
    s = await cache.get_empty(L2)
    assert s.data == bytes(SS) and s.pins == 1 and not s.dirty
    assert io.log == [] and cache.stats == CacheStats()
    cache.put(s)
    old = await dirty(cache, L2 + SS, 1)
    io.log.clear()
    new = await cache.get_empty(L2 + SS)
    assert new is not old and new.data == bytes(SS) and cache.peek(L2 + SS) is new
    cache.put(new)
    await cache.flush()                           # the replaced dirty copy is never written
    assert io.log == [] and len(cache) == 2
    pinned = await cache.get(L2)
    with pytest.raises(RuntimeError):
        await cache.get_empty(L2)
    cache.put(pinned)


async def test_get_empty_evicts_when_full() -> None:
    cache = make(FakeIO(), capacity=1)
    cache.put(await cache.get(0))
    cache.put(await cache.get_empty(SS))
    assert len(cache) == 1 and cache.peek(0) is None and cache.stats.evictions == 1


async def test_discard_drops_without_writing() -> None:
    io = FakeIO()
    cache = make(io, capacity=8)
    for i in range(5):
        await dirty(cache, i * SS, i + 1)
    io.log.clear()
    cache.discard(SS, 2 * SS)                     # slices 1 and 2
    assert len(cache) == 3 and cache.peek(SS) is None and cache.peek(2 * SS) is None
    cache.discard(3 * SS + 10, 1)                 # a range overlapping slice 3 drops it
    assert cache.peek(3 * SS) is None
    cache.discard(0, DISK)                        # the scan path (range larger than the cache)
    assert len(cache) == 0
    await cache.flush()
    assert io.log == []
    s = await cache.get(0)
    with pytest.raises(RuntimeError):
        cache.discard(0, 2 * SS)
    assert cache.peek(0) is s
    cache.put(s)
    cache.discard(0, 0)
    assert len(cache) == 1


async def test_discard_with_a_pinned_slice_drops_nothing() -> None:
    cache = make(FakeIO())
    cache.put(await cache.get(0))
    s = await cache.get(SS)
    with pytest.raises(RuntimeError):
        cache.discard(0, 2 * SS)
    assert len(cache) == 2
    cache.put(s)


async def test_shrink_idle_is_two_phase() -> None:
    cache = make(FakeIO())
    for i in range(4):
        cache.put(await cache.get(i * SS))
    assert cache.shrink_idle() == 0               # everything was used since the (non-existent) previous call
    cache.put(await cache.get(0))                 # used again
    cache.peek(SS)                                # so is a peeked slice
    await dirty(cache, 2 * SS, 1)                 # dirty: never dropped
    pinned = await cache.get(3 * SS)
    cache.put(pinned)
    pinned = await cache.get(3 * SS)              # pinned: never dropped
    assert cache.shrink_idle() == 0
    assert cache.shrink_idle() == 2               # 0 and 1 idle for a whole period; 2 dirty, 3 pinned
    assert cache.peek(0) is None and cache.peek(SS) is None and len(cache) == 2
    cache.put(pinned)


async def test_clear_keeps_dirty_and_pinned() -> None:
    cache = make(FakeIO())
    cache.put(await cache.get(0))
    await dirty(cache, SS, 1)
    s = await cache.get(2 * SS)
    cache.clear()
    assert cache.peek(0) is None and cache.peek(SS) is not None and cache.peek(2 * SS) is s
    cache.put(s)


# ---- a random workload against a model -----------------------------------------------------------------------

N_SLICES = 12
_cache_op = st.one_of(
    st.tuples(st.just("get"), st.integers(0, N_SLICES - 1), st.just(0)),
    st.tuples(st.just("empty"), st.integers(0, N_SLICES - 1), st.integers(1, 255)),
    st.tuples(st.just("put"), st.integers(0, 10), st.just(0)),
    st.tuples(st.just("write"), st.integers(0, 10), st.integers(1, 255)),
    st.tuples(st.just("flush"), st.just(0), st.just(0)),
    st.tuples(st.just("peek"), st.integers(0, N_SLICES - 1), st.just(0)),
    st.tuples(st.just("shrink"), st.just(0), st.just(0)),
    st.tuples(st.just("clear"), st.just(0), st.just(0)),
)


@settings(max_examples=200, deadline=None)
@given(capacity=st.integers(1, 5), ops=st.lists(_cache_op, max_size=60))
def test_random_workload_against_model(capacity: int, ops: list[tuple[str, int, int]]) -> None:
    async def scenario() -> None:
        ss = 64
        io = FakeIO(size=N_SLICES * ss)
        io.disk[:] = bytes(i // ss for i in range(N_SLICES * ss))
        model = bytearray(io.disk)                # what the disk must hold after a flush
        cache = make(io, capacity=capacity, slice_size=ss)
        held: list[Slice] = []
        for kind, arg, value in ops:
            if kind == "get" and len(held) <= capacity:
                s = await cache.get(arg * ss)
                assert s.data == model[arg * ss:(arg + 1) * ss]
                held.append(s)
            elif kind == "empty" and len(held) <= capacity:
                if any(h.offset == arg * ss for h in held):
                    continue                      # replacing a pinned slice is refused (tested elsewhere)
                s = await cache.get_empty(arg * ss)
                s.data[:] = bytes([value]) * ss   # a new table is always filled and marked dirty
                cache.mark_dirty(s)
                model[arg * ss:(arg + 1) * ss] = s.data
                held.append(s)
            elif kind == "put" and held:
                cache.put(held.pop(arg % len(held)))
            elif kind == "write" and held:
                s = held[arg % len(held)]
                s.data[value % ss] = value
                cache.mark_dirty(s)
                model[s.offset + value % ss] = value
            elif kind == "flush":
                await cache.flush()
                assert io.disk == model
                assert cache.dirty_count == 0
            elif kind == "peek":
                p = cache.peek(arg * ss)
                assert p is None or p.data == model[arg * ss:(arg + 1) * ss]
            elif kind == "shrink":
                cache.shrink_idle()
            elif kind == "clear":
                cache.clear()
            # Memory bound: above capacity only after growing while everything was pinned, and then only by
            # slices still pinned or still dirty; nothing pinned and nothing dirty (e.g. after a flush): capacity.
            pinned = len({id(s) for s in held})
            assert len(cache) <= max(capacity, pinned + cache.dirty_count)
            if not held:
                assert len(cache) <= max(capacity, cache.dirty_count)
                if kind == "flush":
                    assert len(cache) <= capacity
            assert all(s.pins > 0 for s in held)
        for s in held:
            cache.put(s)
        await cache.flush()
        assert io.disk == model
        assert len(cache) <= capacity

    asyncio.run(scenario())


# ---- Flusher -------------------------------------------------------------------------------------------------


class Owner:
    """A stand-in driver: a metadata lock and a flush_fn that records its calls."""

    def __init__(self) -> None:
        self.lock = asyncio.Lock()
        self.calls = 0
        self.flushed = asyncio.Event()
        self.locked_during_flush: list[bool] = []

    async def flush(self) -> None:
        self.locked_during_flush.append(self.lock.locked())
        await asyncio.sleep(0)
        self.calls += 1
        self.flushed.set()


async def test_flusher_batches_notifies_into_one_flush() -> None:
    owner = Owner()
    flusher = Flusher(owner.lock, owner.flush, delay=0.01)
    for _ in range(100):
        flusher.notify()
    assert owner.calls == 0                       # not before the delay
    await asyncio.wait_for(owner.flushed.wait(), 5)
    await asyncio.sleep(0.03)                     # no second flush follows
    await flusher.aclose()
    assert owner.calls == 1 and flusher.runs == 1
    assert owner.locked_during_flush == [True]
    assert flusher.error is None


async def test_flusher_waits_for_the_lock() -> None:
    owner = Owner()
    flusher = Flusher(owner.lock, owner.flush, delay=0.001)
    async with owner.lock:
        flusher.notify()
        await asyncio.sleep(0.03)
        assert owner.calls == 0                   # the owner holds the lock: no flush can run
        flusher.notify()                          # served by the waiting flush
    await asyncio.wait_for(owner.flushed.wait(), 5)
    await asyncio.sleep(0.01)
    await flusher.aclose()
    assert owner.calls == 1


async def test_flusher_notify_from_sync_code_and_again_during_a_flush() -> None:
    owner = Owner()
    second = asyncio.Event()

    async def flush_fn() -> None:
        await owner.flush()
        if owner.calls == 1:
            flusher.notify()                      # became dirty while flushing: one more flush
        else:
            second.set()

    flusher = Flusher(owner.lock, flush_fn, delay=0.001)
    asyncio.get_running_loop().call_soon(flusher.notify)   # plain sync callback in the loop
    await asyncio.wait_for(second.wait(), 5)
    await flusher.aclose()
    assert owner.calls == 2 and flusher.runs == 2


async def test_flusher_stores_errors_without_loop_warnings() -> None:
    loop = asyncio.get_running_loop()
    reported: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _loop, ctx: reported.append(ctx))
    owner = Owner()
    failed = asyncio.Event()

    async def flush_fn() -> None:
        await owner.flush()
        failed.set()
        raise OSError(28, "No space left on device")

    flusher = Flusher(owner.lock, flush_fn, delay=0.001)
    flusher.notify()
    await asyncio.wait_for(failed.wait(), 5)
    await asyncio.sleep(0.01)
    assert isinstance(flusher.error, OSError) and flusher.error.errno == 28
    assert not owner.lock.locked()
    flusher.notify()                              # the flusher keeps working after an error
    failed.clear()
    await asyncio.wait_for(failed.wait(), 5)
    await flusher.aclose()
    err = flusher.take_error()
    assert isinstance(err, OSError)
    assert flusher.error is None and flusher.take_error() is None
    assert flusher.runs == 2
    loop.set_exception_handler(None)
    assert reported == []


async def test_flusher_aclose_awaits_a_running_flush() -> None:
    lock = asyncio.Lock()
    started, release = asyncio.Event(), asyncio.Event()
    finished: list[bool] = []

    async def flush_fn() -> None:
        started.set()
        await release.wait()
        finished.append(True)

    flusher = Flusher(lock, flush_fn, delay=0.001)
    flusher.notify()
    await asyncio.wait_for(started.wait(), 5)
    closer = asyncio.create_task(flusher.aclose())
    await asyncio.sleep(0.01)
    assert not closer.done()                      # waiting for the flush, which was not cancelled
    release.set()
    await asyncio.wait_for(closer, 5)
    assert finished == [True] and flusher.runs == 1 and flusher.error is None
    await flusher.aclose()                        # idempotent
    flusher.notify()                              # no-op after close
    await asyncio.sleep(0.01)
    assert flusher.runs == 1


async def test_flusher_aclose_cancels_a_flush_waiting_for_the_lock() -> None:
    owner = Owner()
    flusher = Flusher(owner.lock, owner.flush, delay=0.001)
    async with owner.lock:
        flusher.notify()
        await asyncio.sleep(0.01)                 # the task now waits for the lock we hold
        await asyncio.wait_for(flusher.aclose(), 5)
    await asyncio.sleep(0.01)
    assert owner.calls == 0 and flusher.runs == 0


async def test_flusher_aclose_cancels_a_pending_timer() -> None:
    owner = Owner()
    flusher = Flusher(owner.lock, owner.flush, delay=0.01)
    flusher.notify()
    await flusher.aclose()
    await asyncio.sleep(0.03)
    assert owner.calls == 0


async def test_flusher_runs_clean_fn_periodically_until_closed() -> None:
    owner = Owner()
    cleans: list[int] = []
    enough = asyncio.Event()

    def clean() -> None:
        cleans.append(1)
        if len(cleans) >= 3:
            enough.set()

    flusher = Flusher(owner.lock, owner.flush, clean_fn=clean, clean_interval=0.001)
    await asyncio.wait_for(enough.wait(), 5)
    await flusher.aclose()
    n = len(cleans)
    await asyncio.sleep(0.01)
    assert len(cleans) == n and owner.calls == 0


def test_flusher_validates_arguments() -> None:
    lock = asyncio.Lock()

    async def noop() -> None:
        return None

    with pytest.raises(ValueError):
        Flusher(lock, noop, delay=-1)
    with pytest.raises(ValueError):
        Flusher(lock, noop, clean_interval=-1)
    with pytest.raises(ValueError):
        Flusher(lock, noop, delay=0.5, max_age=0.1)


async def test_flusher_waits_for_idle_then_for_max_age_at_most() -> None:
    owner = Owner()
    loop = asyncio.get_running_loop()
    flusher = Flusher(owner.lock, owner.flush, delay=0.02, max_age=0.2)
    start = loop.time()
    while loop.time() - start < 0.1:              # busy: a notify every 5 ms, for 100 ms
        flusher.notify()
        await asyncio.sleep(0.005)
    assert owner.calls == 0                       # never idle for 20 ms yet
    await asyncio.wait_for(owner.flushed.wait(), 5)
    assert loop.time() - start >= 0.1             # flushed only once idle (>= 20 ms after the last notify)
    owner.flushed.clear()
    start = loop.time()
    while not owner.flushed.is_set():             # busy for good: the flush comes at max_age
        flusher.notify()
        await asyncio.sleep(0.005)
        assert loop.time() - start < 5
    await flusher.aclose()
    assert loop.time() - start >= 0.15 and owner.calls == 2


async def test_flusher_with_a_cache() -> None:
    io = FakeIO()
    lock = asyncio.Lock()
    ref, l2 = make(io, "refcount"), make(io, "l2")

    async def flush_all() -> None:
        await ref.flush()
        await l2.flush()
        await io.sync()

    flusher = Flusher(lock, flush_all, delay=0.005, clean_fn=lambda: (ref.shrink_idle(), l2.shrink_idle()),
                      clean_interval=0.002)
    ref.on_dirty = l2.on_dirty = flusher.notify
    async with lock:
        await dirty(ref, REF, 1)
        await l2.set_dependency(ref)
        await dirty(l2, L2, 2)

    async def until_flushed() -> None:
        while flusher.runs == 0:
            await asyncio.sleep(0.001)

    await asyncio.wait_for(until_flushed(), 5)
    await flusher.aclose()
    assert io.io_log() == [("write", REF), ("sync",), ("write", L2), ("sync",)]
    assert io.disk[REF:REF + SS] == b"\x01" * SS and io.disk[L2:L2 + SS] == b"\x02" * SS
    assert flusher.runs == 1 and flusher.error is None
