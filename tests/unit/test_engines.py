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
from aioblock.io.engine import SyncEngine, ThreadsEngine
from aioblock.io.file import FileNode, make_engine
from aioblock.io.uring import Ring, UringEngine, uring_available

needs_uring = pytest.mark.skipif(not uring_available(), reason="io_uring unavailable on this kernel")
ENGINES = ["sync", "threads"] + (["uring"] if uring_available() else [])


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
    assert isinstance(engine, ThreadsEngine)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "io_uring is unavailable" in err
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
