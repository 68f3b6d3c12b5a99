"""The cancellation rules (aioblock.cancellation): scopes, deferred cancellation, the metadata lock, and the
engines' completion waits (rule 4: kernel I/O is never abandoned), the last against a real kernel (a pipe read
stays in the kernel until data arrives)."""

from __future__ import annotations

import asyncio
import os
import threading
from pathlib import Path

import pytest

from aioblock import cancellation
from aioblock.io.engine import ThreadsEngine, in_thread
from aioblock.io.uring import UringEngine, uring_available


async def ticks(n: int) -> None:
    for _ in range(n):
        await asyncio.sleep(0)


async def request(body: object) -> None:
    """A request as BlockBackend runs one: a scope around the body."""
    scope, token = cancellation.enter()
    try:
        await body  # type: ignore[misc]
    finally:
        cancellation.leave(scope, token)


# ---- scopes and waits ------------------------------------------------------------------------------------------

async def test_uncommitted_wait_is_cancelled_at_once() -> None:
    fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(request(cancellation.wait(fut)))
    await ticks(2)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert fut.cancelled()                  # a plain await: the waiter is gone


async def test_committed_wait_defers_every_cancellation_to_the_end() -> None:
    fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    steps: list[str] = []

    async def body() -> None:
        cancellation.commit()
        steps.append(f"got {await cancellation.wait(fut)}")
        await cancellation.wait_event(event)
        steps.append("after event")

    event = asyncio.Event()
    task = asyncio.create_task(request(body()))
    await ticks(2)
    task.cancel()
    await ticks(2)
    task.cancel()                            # a second cancellation is absorbed like the first
    await ticks(2)
    assert not task.done()
    fut.set_result(7)
    await ticks(2)
    task.cancel()
    event.set()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert steps == ["got 7", "after event"]


async def test_deferred_cancellation_becomes_timeout_error() -> None:
    """asyncio.timeout around a committed request: the request completes, then TimeoutError."""
    fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    done = []

    async def body() -> None:
        cancellation.commit()
        await cancellation.wait(fut)
        done.append(True)

    asyncio.get_running_loop().call_later(0.05, fut.set_result, None)
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.001):
            await request(body())
    assert done == [True]
    assert asyncio.current_task().cancelling() == 0   # type: ignore[union-attr]


async def test_nested_scopes_are_one_and_the_outermost_raises() -> None:
    reached = []

    async def inner() -> None:
        scope, token = cancellation.enter()
        assert token is None                 # nested: the outer request's scope
        scope.committed = True
        try:
            fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            asyncio.get_running_loop().call_later(0.01, fut.set_result, None)
            await cancellation.wait(fut)
        finally:
            cancellation.leave(scope, token)     # does not raise: not the outermost
        reached.append("inner returned")

    task = asyncio.create_task(request(inner()))
    await ticks(1)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert reached == ["inner returned"]


# ---- the lock ----------------------------------------------------------------------------------------------------

async def test_lock_section_runs_to_its_end_and_raises_after_release() -> None:
    lock = cancellation.Lock()
    gate: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    log: list[str] = []

    async def holder() -> None:
        async with lock:
            log.append("in")
            await cancellation.wait(gate)
            log.append("section done")
        log.append("never")                  # the deferred cancellation is raised on release

    task = asyncio.create_task(holder())
    await ticks(2)
    task.cancel()
    task.cancel()
    await ticks(2)
    assert lock.locked() and lock.owner is task
    gate.set_result(None)
    with pytest.raises(asyncio.CancelledError):
        await task
    assert log == ["in", "section done"]
    assert not lock.locked() and lock.owner is None


async def test_waiting_for_the_lock_is_cancellable_until_committed() -> None:
    lock = cancellation.Lock()
    release: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    async def holder() -> None:
        async with lock:
            await cancellation.wait(release)

    async def waiter(commit_first: bool) -> str:
        if commit_first:
            cancellation.commit()
        async with lock:
            return "got it"

    h = asyncio.create_task(holder())
    await ticks(1)
    plain = asyncio.create_task(request(waiter(False)))
    committed = asyncio.create_task(request(waiter(True)))
    await ticks(2)
    plain.cancel()
    committed.cancel()
    await ticks(2)
    assert plain.cancelled()                 # nothing happened: it left at once
    assert not committed.done()              # committed: it waits on, then raises
    release.set_result(None)
    await h
    with pytest.raises(asyncio.CancelledError):
        await committed
    stats = lock.statistics()
    assert stats.acquired == 2 and stats.waited == 1


# ---- engines: kernel I/O is never abandoned --------------------------------------------------------------------

@pytest.mark.skipif(not uring_available(), reason="io_uring unavailable")
async def test_uring_cancelled_read_waits_for_the_kernel() -> None:
    engine = UringEngine()
    r, w = os.pipe()
    try:
        buf = bytearray(8)
        task = asyncio.create_task(engine.pread(r, memoryview(buf), 0))
        await ticks(3)
        task.cancel()
        await ticks(3)
        task.cancel()
        await ticks(3)
        assert not task.done()               # the kernel still owns the buffer
        os.write(w, b"data")
        with pytest.raises(asyncio.CancelledError):
            await task
        assert bytes(buf[:4]) == b"data"
    finally:
        await engine.aclose()
        os.close(r)
        os.close(w)


@pytest.mark.skipif(not uring_available(), reason="io_uring unavailable")
async def test_uring_committed_request_gets_its_result_then_the_cancellation() -> None:
    engine = UringEngine()
    r, w = os.pipe()
    got: list[int] = []

    async def body() -> None:
        cancellation.commit()
        got.append(await engine.pread(r, memoryview(bytearray(8)), 0))

    try:
        task = asyncio.create_task(request(body()))
        await ticks(3)
        task.cancel()
        await ticks(3)
        os.write(w, b"abc")
        with pytest.raises(asyncio.CancelledError):
            await task
        assert got == [3]
    finally:
        await engine.aclose()
        os.close(r)
        os.close(w)


async def test_threads_cancelled_call_waits_for_its_thread() -> None:
    started, proceed = threading.Event(), threading.Event()
    finished = []

    def slow() -> int:
        started.set()
        proceed.wait(10)
        finished.append(True)
        return 5

    task = asyncio.create_task(in_thread(slow))
    while not started.is_set():
        await asyncio.sleep(0.001)
    task.cancel()
    await ticks(5)
    assert not task.done()
    proceed.set()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert finished == [True]


async def test_threads_engine_reads(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"0123456789")
    fd = os.open(path, os.O_RDONLY)
    try:
        buf = bytearray(4)
        assert await ThreadsEngine().pread(fd, memoryview(buf), 3) == 4
        assert bytes(buf) == b"3456"
    finally:
        os.close(fd)
