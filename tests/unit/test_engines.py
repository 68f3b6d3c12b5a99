"""I/O engines: the same contract for uring, threads and sync, plus the ring's own edge cases."""

from __future__ import annotations

import asyncio
import errno
import os
from pathlib import Path

import pytest

import aioblock
from aioblock.errors import BlockIOError, InvalidOptionError
from aioblock.io import file as file_mod
from aioblock.io import hybrid
from aioblock.io.engine import SyncEngine, ThreadsEngine
from aioblock.io.file import FileNode, available_engines, make_engine
from aioblock.io.hybrid import HybridEngine
from aioblock.io.uring import Ring, UringEngine, uring_available

needs_uring = pytest.mark.skipif(not uring_available(), reason="io_uring unavailable on this kernel")
ENGINES = available_engines()


@pytest.mark.parametrize("engine", ENGINES)
async def test_engine_contract(tmp_path: Path, engine: str) -> None:
    path = tmp_path / "e.raw"
    path.write_bytes(b"")
    node = await FileNode.open_file(str(path), engine=engine)
    try:
        data = os.urandom(100_000)
        await node.pwrite(1, memoryview(data))
        buf = bytearray(100_010)
        await node.pread(0, memoryview(buf))                    # short read at EOF: zero-filled
        assert buf[1:100_001] == data and buf[0] == 0 and buf[100_001:] == bytes(9)
        await node.pwrite_zeroes(10, 1000, may_unmap=False)
        await node.pread(0, memoryview(buf))
        assert buf[10:1010] == bytes(1000)
        await node.flush()
        assert node.size == 100_352                             # 100_001 rounded up to sectors
        await node.truncate(8192)
        assert node.size == 8192 and os.path.getsize(path) == 8192
    finally:
        await node.close()
        await node.close()


@needs_uring
async def test_uring_more_requests_than_the_completion_queue(tmp_path: Path) -> None:
    """2,000 requests at once: the engine caps in-flight requests at the CQ size and queues the rest."""
    path = tmp_path / "big.raw"
    path.write_bytes(os.urandom(2000 * 512))
    expected = path.read_bytes()
    engine = UringEngine(entries=16)
    fd = os.open(path, os.O_RDONLY)
    try:
        bufs = [bytearray(512) for _ in range(2000)]
        counts = await asyncio.gather(*(engine.pread(fd, memoryview(b), i * 512) for i, b in enumerate(bufs)))
        assert counts == [512] * 2000
        assert b"".join(bufs) == expected
    finally:
        await engine.aclose()
        os.close(fd)


@needs_uring
async def test_uring_cancellation_and_errors(tmp_path: Path) -> None:
    path = tmp_path / "c.raw"
    path.write_bytes(os.urandom(1 << 20))
    engine = UringEngine(entries=4)
    fd = os.open(path, os.O_RDONLY)
    try:
        tasks = [asyncio.ensure_future(engine.pread(fd, memoryview(bytearray(4096)), i * 4096)) for i in range(64)]
        await asyncio.sleep(0)
        for t in tasks[::2]:
            t.cancel()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        # a cancelled read either never completes for its caller or had completed before the cancel
        assert all(isinstance(r, asyncio.CancelledError) or r == 4096 for r in results[::2])
        assert all(r == 4096 for r in results[1::2])
        while engine._pending:                                   # cancelled ones still finish in the kernel
            await asyncio.sleep(0.001)
        assert engine._used == 0 and not engine._waiters         # no slot leaked
        with pytest.raises(OSError) as err:
            await engine.pread(12345, memoryview(bytearray(16)), 0)     # not an open fd
        assert err.value.errno == errno.EBADF
        buf = bytearray(8)
        assert await engine.pread(fd, memoryview(buf), 0) == 8       # still usable afterwards
    finally:
        await engine.aclose()
        os.close(fd)


@needs_uring
def test_ring_sqe128_entries() -> None:
    """The ring can be set up with 128-byte SQEs (the ublk server's URING_CMD needs them)."""
    ring = Ring(8, flags=1 << 10)
    try:
        assert ring.sqe_size == 128
        pos = ring.prep(0, -1, user_data=77)                            # NOP
        assert ring.sqes[pos + 64:pos + 128] == bytes(64)
        ring.submit(wait_nr=1)
        seen: list[tuple[int, int]] = []
        ring.reap(lambda ud, res: seen.append((ud, res)))
        assert seen == [(77, 0)]
    finally:
        ring.close()


async def test_default_engine_falls_back_with_a_notice(monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(file_mod, "uring_available", lambda: False)
    engine = make_engine(None)
    assert isinstance(engine, HybridEngine) and isinstance(engine.fallback, ThreadsEngine)
    assert isinstance(make_engine(None, direct=True), ThreadsEngine)
    err = capsys.readouterr().err
    assert err.count("\n") == 2 and "io_uring is unavailable" in err
    with pytest.raises(InvalidOptionError, match="hybrid"):
        make_engine("hybrid")
    with pytest.raises(InvalidOptionError, match="uring"):
        make_engine("uring")
    assert isinstance(make_engine("sync"), SyncEngine)
    with pytest.raises(InvalidOptionError, match="unknown I/O engine"):
        make_engine("bogus")


async def test_io_errors_become_block_io_errors(tmp_path: Path) -> None:
    path = tmp_path / "r.raw"
    path.write_bytes(bytes(4096))
    async with aioblock.open(str(path)) as disk:
        node = disk.root.file
        assert isinstance(node, FileNode)
        os.close(node.fd)                      # sabotage: the next syscall fails with EBADF
        try:
            with pytest.raises(BlockIOError) as err:
                await disk.read(0, 512)
            assert err.value.errno == errno.EBADF
        finally:
            node.fd = os.open(path, os.O_RDWR)


# ---- hybrid: inline where the kernel will not block, the fallback engine where it might ----------------------

def _engine_stats(node: FileNode) -> dict[str, object]:
    stats = node.statistics()["engine"]
    assert isinstance(stats, dict)
    return stats


@needs_uring
async def test_hybrid_cold_reads_go_to_the_ring(tmp_path: Path) -> None:
    """A read the page cache cannot serve gets EAGAIN from preadv2(RWF_NOWAIT) and is handed on: right bytes,
    counted as a miss (the file is on the test directory's disk file system)."""
    path = tmp_path / "cold.raw"
    data = os.urandom(1 << 20)
    path.write_bytes(data)
    node = await FileNode.open_file(str(path), engine="hybrid")
    try:
        os.fsync(node.fd)
        os.posix_fadvise(node.fd, 0, 0, os.POSIX_FADV_DONTNEED)        # drop the clean pages
        buf = bytearray(4096)
        await node.pread(512 << 10, memoryview(buf))
        assert buf == data[512 << 10:(512 << 10) + 4096]
        stats = _engine_stats(node)
        if hybrid.on_memory_fs(node.fd):
            pytest.skip("the test directory is on a memory file system (never cold)")
        assert stats["nowait_misses"] == 1 and stats["handed_on"] == 1 and stats["inline"] == 0
        await node.pread(512 << 10, memoryview(buf))                   # now cached: inline
        assert _engine_stats(node)["inline"] == 1
    finally:
        await node.close()


@needs_uring
@pytest.mark.skipif(not os.path.isdir("/dev/shm"), reason="no tmpfs at /dev/shm")
async def test_hybrid_serves_tmpfs_inline() -> None:
    """tmpfs rejects RWF_NOWAIT, but never waits for a disk: its reads and writes run inline."""
    path = f"/dev/shm/aioblock-test-{os.getpid()}.raw"
    node = await FileNode.open_file(path, engine="hybrid", create=True)
    try:
        await node.pwrite(0, memoryview(b"t" * 8192))
        buf = bytearray(8192)
        await node.pread(0, memoryview(buf))
        assert buf == b"t" * 8192
        stats = _engine_stats(node)
        assert stats["inline"] == 2 and stats["handed_on"] == 0
    finally:
        await node.close()
    try:                                   # O_DIRECT on tmpfs is a copy too: the default engine is hybrid
        direct = await FileNode.open_file(path, cache="none")
    except aioblock.errors.ImageOpenError:
        os.unlink(path)
        return                             # a kernel whose tmpfs has no O_DIRECT (before 6.6)
    try:
        assert isinstance(direct.engine, HybridEngine)
        buf = bytearray(100)
        await direct.pread(10, memoryview(buf))
        assert buf == b"t" * 100 and _engine_stats(direct)["inline"] >= 1
    finally:
        await direct.close()
        os.unlink(path)


@needs_uring
async def test_hybrid_slow_writes_send_later_writes_to_the_ring(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """An inline write slower than SLOW_WRITE_NS (here: any) sends the file's writes to the ring for a while."""
    monkeypatch.setattr(hybrid, "SLOW_WRITE_NS", -1)
    monkeypatch.setattr(hybrid, "dirty_headroom", lambda: 1 << 40)     # whatever else dirties pages meanwhile
    path = tmp_path / "slow.raw"
    node = await FileNode.open_file(str(path), engine="hybrid", create=True)
    try:
        if hybrid.on_memory_fs(node.fd):
            pytest.skip("the test directory is on a memory file system (writes always inline)")
        for i in range(3):
            await node.pwrite(i * 4096, memoryview(bytes([i + 1]) * 4096))
        stats = _engine_stats(node)
        assert stats["inline"] == 1 and stats["slow_writes"] == 1 and stats["handed_on"] == 2
        assert path.read_bytes() == b"".join(bytes([i + 1]) * 4096 for i in range(3))
    finally:
        await node.close()


@needs_uring
async def test_hybrid_yield_is_a_cancellation_point_only_before_a_commit(tmp_path: Path) -> None:
    """The engine yields to the loop between inline requests; an uncommitted read cancelled there stops with
    nothing done, while a committed request goes on and raises at its end."""
    from aioblock import cancellation

    path = tmp_path / "y.raw"
    path.write_bytes(bytes(1 << 20))
    node = await FileNode.open_file(str(path), engine="hybrid")
    engine = node.engine
    assert isinstance(engine, HybridEngine)
    try:
        buf = memoryview(bytearray(4096))

        async def reads(commit: bool) -> int:
            scope, token = cancellation.enter()
            try:
                if commit:
                    cancellation.commit()
                for _ in range(hybrid.YIELD_EVERY * 4):
                    await node.pread(0, buf)
                return 1
            finally:
                cancellation.leave(scope, token)

        for commit in (False, True):
            engine._run = 0
            before = _engine_stats(node)["inline"]
            task = asyncio.create_task(reads(commit))
            await asyncio.sleep(0)              # the task runs YIELD_EVERY inline reads, then yields
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            done = _engine_stats(node)["inline"] - before       # type: ignore[operator]
            assert done == (hybrid.YIELD_EVERY * 4 if commit else hybrid.YIELD_EVERY)
    finally:
        await node.close()


@needs_uring
async def test_hybrid_writes_go_to_the_ring_near_dirty_throttling(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Near the kernel's dirty-page throttling point writes are handed on, so the ring's workers take the
    pauses; with headroom again they run inline."""
    room = hybrid.dirty_headroom()
    assert room is None or isinstance(room, int)           # a reading of this machine's /proc
    path = tmp_path / "dirty.raw"
    node = await FileNode.open_file(str(path), engine="hybrid", create=True)
    try:
        if hybrid.on_memory_fs(node.fd):
            pytest.skip("the test directory is on a memory file system (writes always inline)")
        monkeypatch.setattr(hybrid, "dirty_headroom", lambda: -1)
        await node.pwrite(0, memoryview(b"d" * 4096))
        monkeypatch.setattr(hybrid, "dirty_headroom", lambda: 1 << 30)
        monkeypatch.setattr(hybrid, "DIRTY_REFRESH_S", 0.0)
        monkeypatch.setattr(hybrid, "DIRTY_REFRESH_MIN_S", 0.0)
        await node.pwrite(4096, memoryview(b"e" * 4096))
        stats = _engine_stats(node)
        assert stats["dirty_handoffs"] == 1 and stats["handed_on"] == 1 and stats["inline"] == 1
        assert path.read_bytes() == b"d" * 4096 + b"e" * 4096
    finally:
        await node.close()


async def test_file_node_aligns_o_direct_requests_itself(tmp_path: Path) -> None:
    """The file node accepts any offset and length with O_DIRECT (no node above aligns anything): concurrent
    unaligned writes into one block, each a read-modify-write, keep each other's bytes; unaligned reads and a
    write past the end read back; every node reports alignment 1 as a requirement, the block as a preference."""
    path = tmp_path / "d.raw"
    path.write_bytes(b"\xee" * 8192)
    try:
        node = await FileNode.open_file(str(path), cache="none")
    except aioblock.errors.ImageOpenError:
        pytest.skip("the test directory's file system has no O_DIRECT")
    try:
        assert node.limits.opt_alignment == node.alignment in (512, 4096)
        pieces = [(100 + i * 37, bytes([i + 1]) * 37) for i in range(64)]       # all inside bytes 100..2468
        await asyncio.gather(*(node.pwrite(off, memoryview(data)) for off, data in pieces))
        await node.pwrite(8190, memoryview(b"tail"))                            # crosses the end: grows
        buf = bytearray(64 * 37 + 3)
        await node.pread(99, memoryview(buf))
        assert buf[0] == 0xEE and bytes(buf[1:-2]) == b"".join(d for _, d in pieces) and buf[-2:] == b"\xee\xee"
        end = bytearray(10)
        await node.pread(8188, memoryview(end))
        assert bytes(end[:6]) == b"\xee\xeetail"
    finally:
        await node.close()
    assert path.read_bytes()[8190:8194] == b"tail"


def test_hybrid_hole_reads(tmp_path: Path) -> None:
    """A read that misses the page cache (RWF_NOWAIT's EAGAIN, e.g. while readahead holds the pages) but lies
    wholly in a hole of a sparse file needs no disk access: zeroes inline, with the count a read returns. A
    range that holds data is left to the ring (None)."""
    path = tmp_path / "sparse.raw"
    with open(path, "wb") as f:
        f.truncate(8 << 20)
        f.seek(4 << 20)
        f.write(b"D" * 4096)
    fd = os.open(path, os.O_RDONLY)
    try:
        buf = bytearray(b"x" * 8192)
        data = os.lseek(fd, 0, os.SEEK_DATA)
        if data != 4 << 20:
            pytest.skip("the test directory's file system does not report holes")
        assert hybrid._hole_read(fd, memoryview(buf), 1 << 20) == 8192 and buf == bytes(8192)
        buf[:] = b"x" * 8192
        assert hybrid._hole_read(fd, memoryview(buf), (8 << 20) - 4096) == 4096       # hole up to the end
        assert buf[:4096] == bytes(4096)
        assert hybrid._hole_read(fd, memoryview(buf), 9 << 20) == 0                   # past the end
        assert hybrid._hole_read(fd, memoryview(buf), (4 << 20) - 4096) is None       # hole, then data
    finally:
        os.close(fd)
