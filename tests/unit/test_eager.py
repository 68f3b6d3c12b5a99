"""aioblock.frontends.eager: a request's first step runs at once; one that waits goes on in a task that behaves
as if it had run the request from the start (results, exceptions, cancellation, its own context)."""

from __future__ import annotations

import asyncio
import contextvars

import pytest

from aioblock import cancellation
from aioblock.frontends import eager

var: contextvars.ContextVar[str] = contextvars.ContextVar("eager_test", default="outside")


async def test_a_request_that_does_not_wait_finishes_inside_start() -> None:
    done: list[str] = []

    async def request() -> None:
        var.set("inside")
        done.append(var.get())

    assert eager.start(asyncio.get_running_loop(), request()) is None
    assert done == ["inside"]
    assert var.get() == "outside"                  # its context was its own


async def test_a_request_that_waits_goes_on_in_a_task_with_its_context() -> None:
    loop = asyncio.get_running_loop()
    gate: asyncio.Future[int] = loop.create_future()
    seen: list[object] = []

    async def request() -> None:
        var.set("mine")
        seen.append(asyncio.current_task())         # the first step runs in the caller's task
        seen.append(await gate)
        seen.append(var.get())
        await asyncio.sleep(0)                      # a bare yield after the hand-over
        seen.append(asyncio.current_task())

    task = eager.start(loop, request())
    assert task is not None and seen == [asyncio.current_task()]
    assert var.get() == "outside"
    gate.set_result(7)
    await task
    assert seen == [asyncio.current_task(), 7, "mine", task]


async def test_a_bare_yield_in_the_first_step() -> None:
    steps: list[int] = []

    async def request() -> None:
        steps.append(1)
        await asyncio.sleep(0)
        steps.append(2)

    task = eager.start(asyncio.get_running_loop(), request())
    assert task is not None and steps == [1]
    await task
    assert steps == [1, 2]


async def test_exceptions_of_the_first_step_reach_the_caller_and_later_ones_the_task() -> None:
    loop = asyncio.get_running_loop()

    async def fails_at_once() -> None:
        raise ValueError("first")

    with pytest.raises(ValueError, match="first"):
        eager.start(loop, fails_at_once())

    async def fails_later() -> None:
        await asyncio.sleep(0)
        raise ValueError("later")

    task = eager.start(loop, fails_later())
    assert task is not None
    with pytest.raises(ValueError, match="later"):
        await task


@pytest.mark.parametrize("before_first_step", [True, False])
async def test_cancelling_the_task_reaches_the_request_where_it_waits(before_first_step: bool) -> None:
    """Cancelled before the task's first step or while it waits: the request sees CancelledError at its
    await and runs its cleanup, as under a task that ran it from the start."""
    loop = asyncio.get_running_loop()
    lock = asyncio.Lock()
    gate: asyncio.Future[None] = loop.create_future()
    cleaned: list[bool] = []

    async def request() -> None:
        async with lock:
            try:
                await gate
            except asyncio.CancelledError:
                cleaned.append(True)
                raise

    task = eager.start(loop, request())
    assert task is not None and lock.locked()
    if not before_first_step:
        await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert cleaned == [True] and not lock.locked() and gate.cancelled()


async def test_the_metadata_lock_taken_in_a_first_step() -> None:
    """The metadata lock says it is held while a first step outside a task holds it, and a committed request
    that waits inside it runs to its end through a cancellation (cancellation.py rule 1)."""
    loop = asyncio.get_running_loop()
    lock = cancellation.Lock()
    gate: asyncio.Future[None] = loop.create_future()
    finished: list[bool] = []

    async def request() -> None:
        scope, token = cancellation.enter()
        try:
            async with lock:
                await cancellation.wait(gate)
                finished.append(True)
        finally:
            cancellation.leave(scope, token)

    task = eager.start(loop, request())
    assert task is not None and lock.locked()
    task.cancel()
    await asyncio.sleep(0)
    gate.set_result(None)
    with pytest.raises(asyncio.CancelledError):
        await task
    assert finished == [True] and not lock.locked()
