"""BlockBackend against an in-memory model: any offset/length, concurrency, every engine and cache mode."""

from __future__ import annotations

import asyncio
import os
import random
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import aioblock
from aioblock.errors import ClosedError, OutOfRangeError, ReadOnlyError
from aioblock.io.file import available_engines

SIZE = 256 * 1024
ENGINES = available_engines()
CONFIGS = [(e, c) for e in ENGINES for c in ("writeback", "none")]

_extent = st.tuples(st.integers(0, SIZE - 1), st.integers(0, 9000)).map(
    lambda t: (t[0], min(t[1], SIZE - t[0])))
_op = st.one_of(
    st.tuples(st.just("write"), _extent, st.integers(1, 255)),
    st.tuples(st.just("zero"), _extent, st.booleans()),
    st.tuples(st.just("discard"), _extent, st.just(0)),
    st.tuples(st.just("read"), _extent, st.just(0)),
    st.tuples(st.just("flush"), st.just((0, 0)), st.just(0)),
)


async def _apply(disk: aioblock.BlockBackend, model: bytearray, op: tuple[str, tuple[int, int], int]) -> None:
    kind, (off, n), arg = op
    if kind == "write":
        data = bytes([arg]) * n
        await disk.write(off, data)
        model[off:off + n] = data
    elif kind == "zero":
        await disk.write_zeroes(off, n, may_unmap=bool(arg))
        model[off:off + n] = bytes(n)
    elif kind == "discard":
        await disk.discard(off, n)          # raw: exactly these bytes are punched and read as zeroes
        model[off:off + n] = bytes(n)
    elif kind == "read":
        assert await disk.read(off, n) == bytes(model[off:off + n])
    else:
        await disk.flush()


@pytest.mark.parametrize(("engine", "cache"), CONFIGS)
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=st.lists(_op, max_size=25))
def test_sequential_model(tmp_path: Path, engine: str, cache: str, ops: list[tuple[str, tuple[int, int], int]]) -> None:
    path = str(tmp_path / "m.raw")

    async def scenario() -> None:
        await aioblock.create(path, "raw", SIZE)
        model = bytearray(SIZE)
        async with aioblock.open(path, "raw", engine=engine, cache=cache) as disk:
            for op in ops:
                await _apply(disk, model, op)
            assert await disk.read(0, SIZE) == bytes(model)
        with open(path, "rb") as f:
            assert f.read() == bytes(model)

    asyncio.run(scenario())


@pytest.mark.parametrize(("engine", "cache"), CONFIGS)
async def test_concurrent_unaligned_writes_share_sectors(tmp_path: Path, engine: str, cache: str) -> None:
    """300 concurrent writes, each unaligned and sharing 512-byte sectors with its neighbours: with O_DIRECT
    every one is a read-modify-write, and serialisation must keep every byte."""
    path = str(tmp_path / "c.raw")
    await aioblock.create(path, "raw", SIZE)
    rng = random.Random(7)
    pieces, pos = [], 3
    while pos < SIZE - 2000 and len(pieces) < 300:
        n = rng.randint(1, 1500)
        pieces.append((pos, bytes([len(pieces) % 251 + 1]) * n))
        pos += n
    model = bytearray(SIZE)
    for off, data in pieces:
        model[off:off + len(data)] = data
    async with aioblock.open(path, "raw", engine=engine, cache=cache) as disk:
        order = list(pieces)
        rng.shuffle(order)
        await asyncio.gather(*(disk.write(off, data) for off, data in order))
        stats = disk.statistics()
        assert stats.write.ops == len(pieces)
        if engine != "sync":                                 # sync never suspends mid-request
            assert stats.max_in_flight > 1
        assert await disk.read(0, SIZE) == bytes(model)
    with open(path, "rb") as f:
        assert f.read() == bytes(model)


async def test_concurrent_mixed_with_model(tmp_path: Path) -> None:
    """Non-overlapping concurrent writes, reads and zeroes from many tasks."""
    path = str(tmp_path / "x.raw")
    await aioblock.create(path, "raw", SIZE)
    async with aioblock.open(path, "raw", cache="none") as disk:
        slots = list(range(0, SIZE, 1024))

        async def worker(i: int) -> None:
            off = slots[i] + (i % 7)
            data = os.urandom(900)
            await disk.write(off, data)
            assert await disk.read(off, 900) == data
            await disk.write_zeroes(off + 100, 50)
            assert await disk.read(off + 100, 50) == bytes(50)
        await asyncio.gather(*(worker(i) for i in range(len(slots))))


async def test_bounds_readonly_closed(tmp_path: Path) -> None:
    path = str(tmp_path / "b.raw")
    await aioblock.create(path, "raw", 4096)
    disk = await aioblock.open(path, read_only=True)
    assert disk.size == 4096
    assert await disk.read(4000, 96) == bytes(96)
    assert await disk.read(4096, 0) == b""
    for off, n in ((4000, 97), (-1, 1), (4097, 0), (0, -1)):
        with pytest.raises(OutOfRangeError):
            await disk.read(off, n)
    with pytest.raises(ReadOnlyError):
        await disk.write(0, b"x")
    with pytest.raises(ReadOnlyError):
        await disk.write_zeroes(0, 1)
    await disk.close()
    await disk.close()                                      # idempotent
    with pytest.raises(ClosedError):
        await disk.read(0, 1)


async def test_close_drains_in_flight(tmp_path: Path) -> None:
    path = str(tmp_path / "d.raw")
    await aioblock.create(path, "raw", SIZE)
    disk = await aioblock.open(path, engine="threads")
    writes = [asyncio.ensure_future(disk.write(i * 1000, b"\x5a" * 1000)) for i in range(100)]
    await asyncio.sleep(0)
    await disk.close()
    assert all(w.done() and w.exception() is None for w in writes)
    with open(path, "rb") as f:
        assert f.read(100_000) == b"\x5a" * 100_000


async def test_split_at_max_transfer(tmp_path: Path) -> None:
    """Requests larger than the node's max_transfer are split; the bytes must be unaffected."""
    path = str(tmp_path / "s.raw")
    await aioblock.create(path, "raw", SIZE)
    async with aioblock.open(path) as disk:
        disk._max = 4096                                    # force splitting
        data = os.urandom(SIZE - 10)
        await disk.write(5, data)
        assert await disk.read(5, len(data)) == data


async def test_truncate_and_block_status(tmp_path: Path) -> None:
    path = str(tmp_path / "t.raw")
    await aioblock.create(path, "raw", 1 << 20)
    async with aioblock.open(path) as disk:
        await disk.write(512 * 1024, b"\1" * 4096)
        entries = [e async for e in disk.map()]
        assert sum(e.length for e in entries) == 1 << 20
        data_entries = [e for e in entries if e.data]
        assert any(e.start <= 512 * 1024 < e.start + e.length for e in data_entries)
        await disk.truncate(2 << 20)
        assert disk.size == 2 << 20
        assert await disk.read((2 << 20) - 10, 10) == bytes(10)
    assert os.path.getsize(path) == 2 << 20


async def test_unclosed_disk_gives_a_resource_warning(tmp_path: Path) -> None:
    import gc
    import warnings
    path = tmp_path / "d.raw"
    path.write_bytes(bytes(4096))
    disk = await aioblock.open(str(path), "raw", engine="sync")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        await disk.root.close()                 # the file closed, the disk itself never
        del disk
        gc.collect()
    assert any(issubclass(w.category, ResourceWarning) and "never closed" in str(w.message) for w in caught)


async def test_closed_disk_gives_no_warning(tmp_path: Path) -> None:
    import gc
    import warnings
    path = tmp_path / "d.raw"
    path.write_bytes(bytes(4096))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        async with aioblock.open(str(path), "raw", engine="sync") as disk:
            await disk.write(0, b"x")
        del disk
        gc.collect()
    assert not [w for w in caught if issubclass(w.category, ResourceWarning)]


async def test_cancelled_requests_are_counted_apart_from_errors(tmp_path: Path) -> None:
    from aioblock.testing.faults import FaultInjector
    path = tmp_path / "d.raw"
    path.write_bytes(bytes(65536))
    inj = FaultInjector()
    async with aioblock.open(str(path), "raw", engine="sync", options={"inject": inj}) as disk:
        gate = inj.pause(op="read")
        task = asyncio.create_task(disk.read(0, 512))
        await gate.wait_paused()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        inj.fail(op="write")
        with pytest.raises(aioblock.errors.BlockIOError):
            await disk.write(0, b"y")
        stats = disk.statistics()
        assert (stats.read.ops, stats.read.errors, stats.read.cancelled) == (0, 0, 1)
        assert (stats.write.ops, stats.write.errors, stats.write.cancelled) == (0, 1, 0)
        assert stats.in_flight == 0


@pytest.mark.skipif("hybrid" not in ENGINES, reason="io_uring unavailable")
async def test_engine_statistics_count_inline_and_handed_on_requests(tmp_path: Path) -> None:
    path = tmp_path / "e.raw"
    path.write_bytes(bytes(1 << 20))
    async with aioblock.open(str(path), "raw") as disk:          # the default engine: hybrid over uring
        await asyncio.gather(*(disk.write(i * 4096, b"e" * 4096) for i in range(32)))
        for _ in range(4):                                       # a lone large request: inline every time
            before = disk.statistics().driver["file"]["engine"]["inline"]
            assert await disk.read(0, 256 << 10) == b"e" * (128 << 10) + bytes(128 << 10)
            assert disk.statistics().driver["file"]["engine"]["inline"] == before + 1
        before = disk.statistics().driver["file"]["engine"]["handed_on"]
        await asyncio.gather(*(disk.read(0, 256 << 10) for _ in range(4)))   # one inline, the others: ring
        assert disk.statistics().driver["file"]["engine"]["handed_on"] >= before + 3
        assert await disk.read(4096, 4096) == b"e" * 4096         # cached: inline
        for _ in range(32):                                      # one task, 32 inline reads in a row
            await disk.read(0, 4096)
        await disk.flush()
        eng = disk.statistics().driver["file"]["engine"]
    assert eng["name"] == "hybrid" and eng["fallback"]["name"] == "uring"
    assert eng["inline"] >= 37 and eng["handed_on"] >= 3          # (the writes may go to the ring: dirty pages)
    assert eng["yields"] >= 32 // 8 - 1                          # the engine yielded between them
    assert eng["fallback"]["sqes"] >= 2 and eng["fallback"]["submits"] >= 1


async def test_qcow2_statistics_reach_the_driver(tmp_path: Path) -> None:
    path = tmp_path / "d.qcow2"
    await aioblock.create(str(path), "qcow2", "4M")
    async with aioblock.open(str(path), engine="sync") as disk:
        await asyncio.gather(*(disk.write(i * 4096, b"z" * 4096) for i in range(16)))
        await disk.read(0, 4096)
        drv = disk.statistics().driver
    assert set(drv) == {"file", "l2_cache", "refblock_cache", "allocations", "metadata_lock", "flusher_runs"}
    assert drv["file"] == {"engine": {"name": "sync"}}
    assert drv["allocations"]["started"] >= 1 and drv["allocations"]["in_flight"] == 0
    assert drv["allocations"]["started"] == drv["allocations"]["linked"] + drv["allocations"]["aborted"]
    assert drv["l2_cache"]["hits"] > 0
