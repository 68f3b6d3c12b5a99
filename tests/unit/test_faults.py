"""The fault-injection node (blkdebug) and the write recorder, on raw images opened with ``inject``.

Raw announces no events, so event rules are driven through ``disk.root.event(name)`` (raw passes events down
to the fault node) or the injector's ``announce``.
"""

from __future__ import annotations

import asyncio
import errno
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import pytest

import aioblock
from aioblock.backend import BlockBackend
from aioblock.driver import BlockDriver, Extent
from aioblock.errors import BlockIOError, InjectedFaultError, SimulatedCrashError
from aioblock.testing.crash import replay
from aioblock.testing.faults import (
    Crash,
    FaultInjector,
    FaultNode,
    Pause,
    Recorder,
    Request,
    Rule,
    durable_seqs,
)

SIZE = 1 << 20
K = 4096


def blk(tag: int, n: int = K) -> bytes:
    return bytes([tag]) * n


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "disk.raw"
    path.write_bytes(bytes(SIZE))
    return path


@pytest.fixture
def open_disk(image: Path) -> Callable[..., Any]:
    """``async with open_disk(inj) as disk`` (raw, sync engine, through a fault node)."""
    def opener(inj: FaultInjector, engine: str = "sync") -> aioblock.OpenContext:
        return aioblock.open(str(image), "raw", engine=engine, options={"inject": inj})
    return opener


def fault_node(disk: BlockBackend) -> FaultNode:
    node = disk.root.file
    assert isinstance(node, FaultNode)
    return node


# ---- the graph ---------------------------------------------------------------------------------------------


async def test_fault_node_sits_between_format_and_file(open_disk: Callable[..., Any]) -> None:
    inj = FaultInjector()
    async with open_disk(inj) as disk:
        node = fault_node(disk)
        assert node.format_name == "blkdebug" and not node.is_format
        assert node.injector is inj
        assert node.file is not None and node.file.format_name == "file"
        assert node.size == SIZE and node.limits == node.file.limits
        await disk.write(0, b"abc")
        assert await disk.read(0, 3) == b"abc"


# ---- fail --------------------------------------------------------------------------------------------------


async def test_nth_write_fails_with_errno(open_disk: Callable[..., Any], image: Path) -> None:
    inj = FaultInjector()
    rule = inj.fail(op="write", nth=3, errno=errno.ENOSPC)
    async with open_disk(inj) as disk:
        await disk.write(0, blk(1))
        await disk.read(0, K)                          # reads are not writes: not counted
        await disk.write(K, blk(2))
        with pytest.raises(BlockIOError) as info:
            await disk.write(2 * K, blk(3))
        assert info.value.errno == errno.ENOSPC
        assert isinstance(info.value, InjectedFaultError)
        await disk.write(3 * K, blk(4))                # once: the rule is retired
        assert disk.statistics().write.errors == 1
    assert rule.fired == 1 and rule.seen == 3 and rule.retired and not inj.rules
    data = image.read_bytes()
    assert data[:2 * K] == blk(1) + blk(2)
    assert data[2 * K:3 * K] == bytes(K)               # the failed write never reached the file
    assert data[3 * K:4 * K] == blk(4)


async def test_sticky_rule_fails_from_nth_on(open_disk: Callable[..., Any]) -> None:
    inj = FaultInjector()
    rule = inj.fail(op="write", nth=2, once=False)
    async with open_disk(inj) as disk:
        await disk.write(0, blk(1))
        for i in range(3):
            with pytest.raises(BlockIOError) as info:
                await disk.write(i * K, blk(2))
            assert info.value.errno == errno.EIO
        await disk.flush()                             # op="write": flushes pass
        inj.remove(rule)
        await disk.write(0, blk(3))
    assert rule.fired == 3 and rule.retired


async def test_op_filters_flush_and_any(open_disk: Callable[..., Any]) -> None:
    inj = FaultInjector()
    flush_rule = inj.fail(op="flush", errno=errno.EIO)
    any_rule = inj.fail(op="any", nth=4, errno=errno.EROFS)
    async with open_disk(inj) as disk:
        await disk.write(0, blk(1))                    # any #1
        with pytest.raises(BlockIOError) as info:      # any #2; flush #1
            await disk.flush()
        assert info.value.errno == errno.EIO
        await disk.read(0, K)                          # any #3
        with pytest.raises(BlockIOError) as info:      # any #4: a read
            await disk.read(0, K)
        assert info.value.errno == errno.EROFS
        await disk.flush()
    assert flush_rule.fired == any_rule.fired == 1


async def test_default_op_is_every_modifying_request(open_disk: Callable[..., Any]) -> None:
    inj = FaultInjector()
    rule = inj.fail(once=False)
    async with open_disk(inj) as disk:
        await disk.read(0, K)
        await disk.block_status(0, K)
        for call in (disk.write(0, b"x"), disk.write_zeroes(0, K), disk.discard(0, K), disk.flush(),
                     disk.truncate(2 * SIZE)):
            with pytest.raises(InjectedFaultError):
                await call
    assert rule.fired == 5


async def test_where_predicate_and_first_rule_decides(open_disk: Callable[..., Any]) -> None:
    inj = FaultInjector()
    first = inj.fail(errno=errno.EIO, where=lambda r: r.data is not None and bytes(r.data[:3]) == b"BAD")
    second = inj.fail(errno=errno.ENOSPC, op="write", nth=2)
    async with open_disk(inj) as disk:
        await disk.write(0, b"good")                   # second sees #1
        with pytest.raises(BlockIOError) as info:      # both fire: the earlier rule decides
            await disk.write(0, b"BAD data")
        assert info.value.errno == errno.EIO
    assert first.fired == second.fired == 1


# ---- crash -------------------------------------------------------------------------------------------------


async def test_crash_stops_all_later_io(open_disk: Callable[..., Any], image: Path) -> None:
    inj = FaultInjector(record=True)
    inj.crash(op="write", nth=2)
    async with open_disk(inj) as disk:
        await disk.write(0, blk(1))
        with pytest.raises(SimulatedCrashError):
            await disk.write(K, blk(2))
        assert inj.crashed
        calls = [disk.write(2 * K, blk(3)), disk.read(0, K), disk.flush(), disk.write_zeroes(0, K),
                 disk.discard(0, K), disk.block_status(0, K), disk.truncate(2 * SIZE)]
        for call in calls:
            with pytest.raises(SimulatedCrashError) as info:
                await call
            assert isinstance(info.value, BlockIOError) and info.value.errno == errno.EIO
        disk.root.event("l2_update")                   # ignored while crashed
        assert inj.events == []
    assert [(e.op, e.offset) for e in inj.log] == [("write", 0)]     # nothing after the crash reached the file
    data = image.read_bytes()
    assert data[:K] == blk(1) and data[K:3 * K] == bytes(2 * K) and len(data) == SIZE


async def test_revive_reuses_the_injector(open_disk: Callable[..., Any]) -> None:
    inj = FaultInjector()
    inj.crash_now("test")
    async with open_disk(inj) as disk:
        with pytest.raises(SimulatedCrashError, match="test"):
            await disk.read(0, 1)
    inj.revive()
    rule = inj.fail(op="write", nth=2)
    async with open_disk(inj) as disk:                 # counters are per injector, across opens
        await disk.write(0, b"a")
    async with open_disk(inj) as disk:
        with pytest.raises(InjectedFaultError):
            await disk.write(0, b"b")
    assert rule.fired == 1


# ---- events ------------------------------------------------------------------------------------------------


async def test_event_rule_arms_on_event(open_disk: Callable[..., Any], image: Path) -> None:
    inj = FaultInjector()
    rule = inj.fail_after_event("l2_update", errno=errno.ENOSPC)
    async with open_disk(inj) as disk:
        await disk.write(0, blk(1))                    # not armed yet
        assert not rule.armed
        disk.root.event("l1_update")                   # another event: nothing
        assert not rule.armed
        disk.root.event("l2_update")                   # raw passes the event down to the fault node
        assert rule.armed and inj.events == ["l1_update", "l2_update"]
        await disk.read(0, K)                          # reads do not match the default op set
        with pytest.raises(BlockIOError) as info:
            await disk.write(K, blk(2))
        assert info.value.errno == errno.ENOSPC
        await disk.write(2 * K, blk(3))                # once: retired
        disk.root.event("l2_update")
        await disk.write(3 * K, blk(4))
    assert rule.fired == 1
    data = image.read_bytes()
    assert data[:K] == blk(1) and data[K:2 * K] == bytes(K) and data[2 * K:4 * K] == blk(3) + blk(4)


async def test_event_nth_and_events_before_the_rule(open_disk: Callable[..., Any]) -> None:
    inj = FaultInjector()
    async with open_disk(inj) as disk:
        node = fault_node(disk)
        node.event("cluster_alloc")                    # before the rule: does not count
        rule = inj.fail_after_event("cluster_alloc", event_nth=2, nth=2)
        node.event("cluster_alloc")
        await disk.write(0, b"a")
        node.event("cluster_alloc")                    # 2nd since the rule: armed now
        assert rule.armed and rule.seen == 0
        await disk.flush()                             # seen #1 (flush is a modify op)
        with pytest.raises(InjectedFaultError):        # seen #2: fires
            await disk.write(0, b"b")
        assert rule.seen == 2


async def test_sticky_event_rule_stays_armed(open_disk: Callable[..., Any]) -> None:
    inj = FaultInjector()
    rule = inj.fail_after_event("refblock_update", op="flush", once=False)
    async with open_disk(inj) as disk:
        await disk.flush()
        inj.announce("refblock_update")
        await disk.write(0, b"a")                      # op="flush": writes pass
        for _ in range(2):
            with pytest.raises(InjectedFaultError):
                await disk.flush()
    assert rule.fired == 2


async def test_crash_after_event(open_disk: Callable[..., Any], image: Path) -> None:
    inj = FaultInjector(record=True)
    inj.crash_after_event("l2_update")
    async with open_disk(inj) as disk:
        await disk.write(0, blk(1))
        disk.root.event("l2_update")
        with pytest.raises(SimulatedCrashError):
            await disk.write(K, blk(2))
        with pytest.raises(SimulatedCrashError):
            await disk.write(2 * K, blk(3))
    assert len(inj.log) == 1
    assert inj.recorder.events == [(1, "l2_update")]
    assert image.read_bytes()[K:3 * K] == bytes(2 * K)


async def test_unfired_reports_mistyped_events(open_disk: Callable[..., Any]) -> None:
    inj = FaultInjector()
    typo = inj.fail_after_event("l2_updat")
    async with open_disk(inj) as disk:
        disk.root.event("l2_update")
        await disk.write(0, b"a")
    assert inj.unfired() == [typo]


# ---- ranges ------------------------------------------------------------------------------------------------


async def test_range_rule(open_disk: Callable[..., Any]) -> None:
    inj = FaultInjector()
    rule = inj.fail(range=(K, 2 * K), once=False)
    async with open_disk(inj) as disk:
        await disk.write(0, blk(1))                    # [0, K): touches neither end
        await disk.write(2 * K, blk(1))                # [2K, 3K): the range is half-open
        await disk.flush()                             # no bytes: never matches a range
        await disk.read(K, K)                          # not a modify op
        for call in (disk.write(K - 1, b"xy"), disk.write(2 * K - 1, b"x"), disk.write(0, blk(1, 3 * K)),
                     disk.write_zeroes(K, 10), disk.discard(0, 2 * K)):
            with pytest.raises(InjectedFaultError):
                await call
    assert rule.fired == 5


def test_request_overlaps() -> None:
    assert Request("write", 10, 5).overlaps(14, 20)
    assert not Request("write", 10, 5).overlaps(15, 20)
    assert not Request("write", 10, 0).overlaps(0, 100)
    assert not Request("flush", 0, 0).overlaps(0, 100)
    assert not Request("truncate", 50, 0).overlaps(0, 100)


# ---- drop --------------------------------------------------------------------------------------------------


async def test_drop_loses_the_write_silently(open_disk: Callable[..., Any], image: Path) -> None:
    inj = FaultInjector(record=True)
    inj.drop(op="write", nth=2)
    async with open_disk(inj) as disk:
        await disk.write(0, blk(1))
        await disk.write(K, blk(2))                    # reports success
        await disk.write(2 * K, blk(3))
    data = image.read_bytes()
    assert data[:3 * K] == blk(1) + bytes(K) + blk(3)
    assert [e.offset for e in inj.log] == [0, 2 * K]


# ---- pause -------------------------------------------------------------------------------------------------


async def test_pause_holds_only_the_chosen_request(open_disk: Callable[..., Any], image: Path) -> None:
    inj = FaultInjector(record=True)
    gate = inj.pause(op="write", range=(K, 2 * K))
    async with open_disk(inj) as disk:
        task = asyncio.create_task(disk.write(K, blk(2)))
        req = await gate.wait_paused()
        assert req.op == "write" and req.offset == K and req.length == K
        assert gate.paused and gate.held == (req,)
        # others proceed while it is held
        await disk.write(0, blk(1))
        await disk.write(2 * K, blk(3))
        await disk.flush()
        assert await disk.read(K, K) == bytes(K)
        assert not task.done()
        assert image.read_bytes()[K:2 * K] == bytes(K)
        gate.release()
        await task
        assert not gate.paused
        assert await disk.read(0, 3 * K) == blk(1) + blk(2) + blk(3)
        with pytest.raises(RuntimeError):
            gate.release()                             # nothing held
    # the held write reached the file after the ones issued while it waited
    assert [e.offset for e in inj.log if e.op == "write"] == [0, 2 * K, K]


async def test_sticky_pause_holds_each_match_until_release(open_disk: Callable[..., Any]) -> None:
    inj = FaultInjector()
    gate = inj.pause(op="flush", once=False)
    async with open_disk(inj) as disk:
        tasks = [asyncio.create_task(disk.flush()) for _ in range(2)]
        await gate.wait_paused()
        await disk.write(0, b"a")
        while len(gate.held) < 2:                      # let the second flush arrive
            await asyncio.sleep(0)
        gate.release()
        await asyncio.gather(*tasks)
        task = asyncio.create_task(disk.flush())       # still armed
        await gate.wait_paused()
        gate.remove()                                  # retire and release
        await task
        await disk.flush()
    assert gate.rule.fired == 3 and gate.rule.retired


async def test_pause_after_event_then_crash_while_held(open_disk: Callable[..., Any], image: Path) -> None:
    inj = FaultInjector(record=True)
    gate = inj.pause_after_event("l2_update", op="write")
    async with open_disk(inj) as disk:
        await disk.write(0, blk(1))
        disk.root.event("l2_update")
        task = asyncio.create_task(disk.write(K, blk(2)))
        await gate.wait_paused()
        inj.crash_now("power cut while the L2 write was held")
        gate.release()
        with pytest.raises(SimulatedCrashError):
            await task
    assert len(inj.log) == 1 and image.read_bytes()[K:2 * K] == bytes(K)


async def test_cancelled_paused_request_is_no_longer_held(open_disk: Callable[..., Any]) -> None:
    inj = FaultInjector()
    gate = inj.pause(op="write")
    async with open_disk(inj) as disk:
        task = asyncio.create_task(disk.write(0, b"a"))
        await gate.wait_paused()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert not gate.paused
        await disk.write(0, b"b")                      # a once rule: not held again


# ---- a request at the file when the crash happens ------------------------------------------------------------


class GatedNode(BlockDriver):
    """An in-memory protocol node whose writes wait for ``gate`` (to hold a request *at* the file)."""

    format_name: ClassVar[str] = "gated"
    is_format: ClassVar[bool] = False

    def __init__(self) -> None:
        self.filename = "mem"
        self.read_only = False
        self.data = bytearray(SIZE)
        self.gate = asyncio.Event()
        self.arrived = asyncio.Event()

    @property
    def size(self) -> int:
        return len(self.data)

    async def pread(self, offset: int, buf: memoryview) -> None:
        buf[:] = self.data[offset:offset + len(buf)]

    async def pwrite(self, offset: int, buf: memoryview, *, fua: bool = False) -> None:
        self.arrived.set()
        await self.gate.wait()
        self.data[offset:offset + len(buf)] = buf

    async def block_status(self, offset: int, length: int) -> Extent:
        return Extent(offset, length, True, True, False)


async def test_in_flight_request_completes_at_file_but_fails_to_caller() -> None:
    inj = FaultInjector(record=True)
    mem = GatedNode()
    node = FaultNode(mem, inj)
    task = asyncio.create_task(node.pwrite(0, memoryview(b"late")))
    await mem.arrived.wait()
    inj.crash_now()
    mem.gate.set()
    with pytest.raises(SimulatedCrashError):
        await task
    assert bytes(mem.data[:4]) == b"late"              # it had reached the file: its effect stays
    assert len(inj.log) == 1 and inj.log[0].ok         # and stays in the log


# ---- recording ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("engine", ["sync", "threads", "uring"])
async def test_recording_order_data_and_flush_coverage(open_disk: Callable[..., Any], image: Path,
                                                       engine: str) -> None:
    base = image.read_bytes()
    inj = FaultInjector()
    inj.record = True
    log = inj.log
    inj.fail(op="write", nth=3)                        # failed by the injector: never logged
    async with open_disk(inj, engine) as disk:
        await disk.write(0, blk(1))                    # 0
        await disk.write(K, blk(2), fua=True)          # 1
        await disk.flush()                             # 2
        disk.root.event("marker")
        await disk.write_zeroes(0, 100)                # 3
        await disk.discard(2 * K, K)                   # 4
        with pytest.raises(InjectedFaultError):
            await disk.write(3 * K, blk(9))
        await disk.write(5 * K, blk(3))                # 5
        await disk.flush()                             # 6
        await disk.truncate(SIZE + K)                  # 7
        await asyncio.gather(*(disk.write(8 * K + i * K, blk(10 + i)) for i in range(4)))   # 8..11
    assert [e.op for e in log] == ["write", "write", "flush", "write_zeroes", "discard", "write", "flush",
                                   "truncate", "write", "write", "write", "write"]
    assert [e.seq for e in log] == list(range(12))
    assert all(e.ok for e in log)
    seq, op, offset, payload = log[0]
    assert (seq, op, offset, payload) == (0, "write", 0, blk(1))
    assert tuple(log[3]) == (3, "write_zeroes", 0, 100)
    assert tuple(log[7]) == (7, "truncate", SIZE + K, SIZE + K)
    assert log[1].fua and not log[0].fua
    assert sorted(e.offset for e in log[8:]) == [8 * K, 9 * K, 10 * K, 11 * K]
    # the first flush covers entries 0 and 1, the second everything before it
    assert log[2].covers == 2 and log[6].covers == 6
    assert durable_seqs(log) == frozenset({0, 1, 3, 4, 5})
    assert durable_seqs(log[:3]) == frozenset({0, 1})
    assert inj.recorder.events == [(3, "marker")]
    # the log replays to exactly the file
    assert replay(log, base) == image.read_bytes()


async def test_recorder_object_and_failed_entries() -> None:
    rec = Recorder()
    inj = FaultInjector(record=rec)
    assert inj.record and inj.recorder is rec
    log = inj.log
    mem = GatedNode()
    mem.gate.set()
    node = FaultNode(mem, inj)

    async def boom(offset: int, buf: memoryview, *, fua: bool = False) -> None:
        raise BlockIOError(errno.EIO, "disk says no")
    await node.pwrite(0, memoryview(b"ok"))
    mem.pwrite = boom                                   # type: ignore[method-assign]
    with pytest.raises(BlockIOError):
        await node.pwrite(2, memoryview(b"no"))
    assert [e.status for e in log] == ["ok", "failed"] and "disk says no" in (log[1].error or "")
    assert replay(log, bytes(4)) == b"ok\0\0"          # failed entries are not replayed
    rec.clear()
    assert log == [] and inj.log is log
    inj.record = False
    with pytest.raises(RuntimeError):
        _ = inj.log


# ---- validation --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs", [
    {"op": "writ"}, {"op": []}, {"nth": 0}, {"event_nth": 0}, {"range": (5, 5)}, {"range": (-1, 5)},
])
def test_invalid_rules_are_refused(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        FaultInjector().fail(**kwargs)


def test_invalid_actions_are_refused() -> None:
    inj = FaultInjector()
    with pytest.raises(ValueError):
        inj.drop(op="read")
    with pytest.raises(ValueError):
        inj.add(Rule(Crash(), once=False))
    with pytest.raises(ValueError):
        inj.fail(errno=0)
    rule = inj.fail()
    with pytest.raises(ValueError):
        inj.add(rule)                                  # a rule is added once
    handle = inj.add(Rule(Pause(), op="write")).handle
    assert handle is not None
    with pytest.raises(RuntimeError):
        handle.release()                               # nothing held



# ---- sticky fsync errors: the file node under a failing kernel ---------------------------------------------

@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
async def test_a_failed_fsync_fails_every_later_flush_until_reopened(tmp_path: Path, fmt: str) -> None:
    """After fdatasync reported an error, the pages that failed may be gone: a later fsync that succeeds would
    lie, so every later flush fails the same way; reopening the image clears it."""
    from aioblock.io.file import FileNode
    from aioblock.testing.faults import FaultyEngine

    path = tmp_path / f"s.{fmt}"
    await aioblock.create(str(path), fmt, "1M")
    disk = await aioblock.open(str(path), fmt)
    node = disk.root.file
    assert isinstance(node, FileNode)
    node.engine = faulty = FaultyEngine(node.engine)
    await disk.write(0, b"a" * 4096)
    faulty.fail("fsync", errno.EIO)
    with pytest.raises(BlockIOError) as first:
        await disk.flush()
    assert first.value.errno == errno.EIO
    calls = faulty.calls["fsync"]
    await disk.write(4096, b"b" * 4096)
    for _ in range(2):
        with pytest.raises(BlockIOError, match="an earlier flush failed") as later:
            await disk.flush()
        assert later.value.errno == errno.EIO
    assert faulty.calls["fsync"] == calls            # not asked again: its answer could not be trusted
    with pytest.raises(BlockIOError):
        await disk.close()                           # close flushes too, and says so
    async with aioblock.open(str(path), fmt) as again:   # a new open starts clean
        await again.write(0, b"c" * 4096)
        await again.flush()
        assert await again.read(0, 4096) == b"c" * 4096


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
async def test_cache_unsafe_never_fsyncs(tmp_path: Path, fmt: str) -> None:
    """cache=unsafe (QEMU's): no flush reaches the kernel, the driver's own and close's included; the data is
    still written (through the page cache)."""
    from aioblock.io.file import FileNode
    from aioblock.testing.faults import FaultyEngine

    path = tmp_path / f"u.{fmt}"
    await aioblock.create(str(path), fmt, "4M")
    disk = await aioblock.open(str(path), fmt, cache="unsafe")
    node = disk.root.file
    assert isinstance(node, FileNode)
    node.engine = faulty = FaultyEngine(node.engine)
    faulty.fail("fsync", errno.EIO)                 # any fsync would fail the flush, or close
    await asyncio.gather(*(disk.write(i << 16, bytes([i + 1]) * 4096) for i in range(40)))
    await disk.flush()
    await disk.close()
    assert faulty.calls["fsync"] == 0
    async with aioblock.open(str(path), fmt) as again:
        assert [await again.read(i << 16, 1) for i in range(40)] == [bytes([i + 1]) for i in range(40)]
