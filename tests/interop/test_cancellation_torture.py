"""Cancellation torture: many tasks, random single and double cancellations and timeouts of every kind of
request, requests held at random I/O points by the fault injector, a flush loop, and a ``close()`` cancelled
while writes are in flight; for qcow2 (plain, 4 KiB clusters with tiny metadata caches, extended L2 with lazy
refcounts, a backing file) and raw, on every engine.

Every task owns its own bytes of the disk (*lanes*): in the first half, lanes interleave inside clusters, so
tasks share clusters (allocations in flight, waits, copy-on-write); in the second half each task owns runs of
whole clusters (multi-cluster writes, discards, write-zeroes). A task's requests run one after the other, each
in a task of its own so that it can be cancelled alone; after each one the task reads its range back.

Oracles (the rules of aioblock.cancellation):

* a request that returned is wholly in the image; a cancelled one is either wholly in or left no trace (the
  read-back equals the old bytes or the new ones, never a mixture), and no request fails with an error;
* nothing hangs: the whole run is bounded;
* the metadata lock never has two holders (``Lock`` asserts it in the request that would be the second) and is
  free at the end;
* after the close, ``qemu-img check`` is clean with no leaked cluster, and the guest content as QEMU reads it
  (``qemu-img convert``) is the model's, byte for byte.

``AIOBLOCK_TORTURE_SEEDS=N`` runs N seeds per case (default 2).
"""

from __future__ import annotations

import asyncio
import os
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

import aioblock
from aioblock.backend import BlockBackend
from aioblock.io.file import available_engines
from aioblock.testing.faults import FaultInjector

from ..conftest import needs_qemu, qemu_img, qemu_io

pytestmark = [needs_qemu, pytest.mark.slow]

KiB, MiB = 1024, 1024 * 1024
ENGINES = available_engines()
SEEDS = int(os.environ.get("AIOBLOCK_TORTURE_SEEDS", "2"))
TASKS = 8
OPS_PER_TASK = 24


@dataclass(frozen=True)
class Config:
    name: str
    fmt: str
    opts: str
    size: int
    cluster: int                   #: discard granularity (raw: 1 byte)
    lane: int                      #: bytes per lane in the shared half
    tiny: bool = False             #: tiny metadata caches (write-back on eviction under the lock)
    backing: bool = False


CONFIGS = [
    Config("qcow2-64k", "qcow2", "cluster_size=64k", 8 * MiB, 64 * KiB, 4 * KiB),
    Config("qcow2-4k-tiny-caches", "qcow2", "cluster_size=4k", 4 * MiB, 4 * KiB, 1 * KiB, tiny=True),
    Config("qcow2-extl2-lazy", "qcow2", "cluster_size=64k,extended_l2=on,lazy_refcounts=on", 8 * MiB, 64 * KiB,
           4 * KiB),
    Config("qcow2-backing", "qcow2", "cluster_size=64k", 8 * MiB, 64 * KiB, 4 * KiB, backing=True),
    Config("raw", "raw", "", 8 * MiB, 1, 4 * KiB),
]


async def ticks(n: int) -> None:
    for _ in range(n):
        await asyncio.sleep(0)


class Torture:
    def __init__(self, cfg: Config, disk: BlockBackend, model: bytearray, rng: random.Random) -> None:
        self.cfg, self.disk, self.model, self.rng = cfg, disk, model, rng
        self.half = cfg.size // 2
        #: each task's runs of whole clusters in the second half: two clusters per run (at least 128 KiB)
        self.run = max(2 * cfg.cluster, 128 * KiB)
        self.cancelled = 0
        self.gen = 0

    # -- ranges a task owns --

    def shared_range(self, task: int) -> tuple[int, int]:
        lane, cfg = self.cfg.lane, self.cfg
        slot = self.rng.randrange(self.half // lane // TASKS) * TASKS + task
        start = slot * lane
        lo = self.rng.choice([0, 0, self.rng.randrange(lane)])
        hi = self.rng.choice([lane, lane, self.rng.randrange(lo + 1, lane + 1)])
        assert cfg.size
        return start + lo, hi - lo

    def owned_range(self, task: int) -> tuple[int, int]:
        runs = self.half // self.run
        r = self.rng.randrange(runs // TASKS) * TASKS + task
        start = self.half + r * self.run
        length = self.rng.choice([self.run, self.cfg.cluster if self.cfg.cluster > 1 else 4 * KiB,
                                  self.rng.randrange(1, self.run + 1)])
        lo = self.rng.randrange(0, self.run - length + 1)
        return start + lo, length

    # -- effects --

    def effect(self, kind: str, offset: int, length: int) -> tuple[int, bytes] | None:
        if kind == "write":
            self.gen += 1
            return offset, bytes([self.gen % 251 + 1]) * length
        if kind == "zeroes":
            return offset, bytes(length)
        if kind == "discard":
            c = self.cfg.cluster
            start, end = -(-offset // c) * c, (offset + length) // c * c
            return (start, bytes(end - start)) if start < end else None
        return None

    def submit(self, kind: str, offset: int, length: int, effect: tuple[int, bytes] | None,
               unmap: bool) -> Callable[[], Awaitable[Any]]:
        d = self.disk
        if kind == "write":
            assert effect is not None
            return lambda: d.write(offset, effect[1])
        if kind == "zeroes":
            return lambda: d.write_zeroes(offset, length, may_unmap=unmap)
        if kind == "discard":
            return lambda: d.discard(offset, length)
        return lambda: d.read(offset, length)

    async def cancellable(self, call: Callable[[], Awaitable[Any]]) -> tuple[str, Any]:
        """Run ``call`` in a task of its own, cancelled (or timed out) at random; its outcome and result."""
        rng = self.rng
        mode = rng.choices(["none", "cancel", "double", "timeout"], [45, 25, 15, 15])[0]

        async def body() -> Any:
            if mode == "timeout":
                async with asyncio.timeout(rng.choice([0, 0.0002, 0.001, 0.004])):
                    return await call()
            return await call()

        inner = asyncio.create_task(body())
        if mode in ("cancel", "double"):
            await ticks(rng.randrange(0, 8))
            inner.cancel()
            if mode == "double":
                await ticks(rng.randrange(0, 6))
                inner.cancel()
        await asyncio.wait([inner])
        if inner.cancelled():
            return "cancelled", None
        exc = inner.exception()
        if isinstance(exc, TimeoutError):
            return "cancelled", None
        if exc is not None:
            raise AssertionError(f"a request failed: {exc!r}") from exc
        return "ok", inner.result()

    # -- workers --

    async def worker(self, task: int) -> None:
        rng = self.rng
        for _ in range(OPS_PER_TASK):
            kind = rng.choices(["write", "zeroes", "discard", "read"], [50, 15, 15, 20])[0]
            offset, length = self.shared_range(task) if rng.random() < 0.5 else self.owned_range(task)
            effect = self.effect(kind, offset, length)
            old = bytes(self.model[offset:offset + length])
            outcome, result = await self.cancellable(self.submit(kind, offset, length, effect, rng.random() < 0.5))
            if kind == "read":
                if outcome == "ok":
                    assert result == old, f"read at {offset:#x}+{length:#x} differs from the model"
                continue
            back = await self.disk.read(offset, length)
            new = bytearray(old)
            if effect is not None:
                eo, data = effect
                new[eo - offset:eo - offset + len(data)] = data
            if outcome == "ok":
                assert back == new, f"{kind} at {offset:#x}+{length:#x} returned but is not (wholly) in the image"
            else:
                self.cancelled += 1
                assert back in (old, bytes(new)), (f"cancelled {kind} at {offset:#x}+{length:#x} left part of "
                                                   "itself in the image")
            self.model[offset:offset + length] = back

    async def flusher(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            await self.cancellable(self.disk.flush)
            await ticks(self.rng.randrange(1, 20))

    async def releaser(self, gate: Any, stop: asyncio.Event) -> None:
        while not stop.is_set():
            await ticks(self.rng.randrange(1, 5))
            if gate.paused:
                gate.release()


async def torture(cfg: Config, path: Path, engine: str, model: bytearray, seed: int) -> None:
    rng = random.Random(seed)
    inj = FaultInjector()
    options: dict[str, Any] = {"inject": inj}
    if cfg.tiny:
        options.update({"l2-cache-size": 2048, "l2-cache-entry-size": 1024, "refcount-cache-size": 8192,
                        "cache-clean-interval": 0.002})
    disk = await aioblock.open(str(path), cfg.fmt, engine=engine, options=options)
    t = Torture(cfg, disk, model, rng)
    gate = inj.pause(op="any", where=lambda req: rng.random() < 0.15, once=False)
    stop, stop_releasing = asyncio.Event(), asyncio.Event()
    flusher = asyncio.create_task(t.flusher(stop))
    releaser = asyncio.create_task(t.releaser(gate, stop_releasing))
    try:
        await asyncio.gather(*(t.worker(i) for i in range(TASKS)))
        # the close: cancelled at once or a few ticks in, with a burst of writes in flight (held at random)
        burst: list[tuple[int, bytes, asyncio.Task[None]]] = []
        for i in range(TASKS):
            off, n = t.shared_range(i)
            data = bytes([0xE0 + i]) * n
            burst.append((off, data, asyncio.create_task(disk.write(off, data))))
        stop.set()
        await flusher                         # the releaser goes on: the flusher's last flush may be held
        stop_releasing.set()
        await releaser
        closer = asyncio.create_task(disk.close())
        await ticks(rng.randrange(0, 4))
        closer.cancel()
        await ticks(rng.randrange(0, 4))
        gate.remove()                         # release what is held (the close may be committed already)
        await asyncio.wait([closer])
        for off, data, w in burst:
            await asyncio.wait([w])
            assert w.exception() is None, w.exception()
            model[off:off + len(data)] = data
        if not disk.closed:
            assert closer.cancelled()
            await disk.close()
        stats = disk.statistics()
        for op in ("read", "write", "write_zeroes", "discard", "flush"):
            assert getattr(stats, op).errors == 0, (op, getattr(stats, op))
        if cfg.fmt == "qcow2":
            lock = disk.root.st.lock  # type: ignore[attr-defined]
            assert lock.owner is None and not lock.locked()
    finally:
        stop.set()
        stop_releasing.set()
        gate.remove()
        if not disk.closed:
            await disk.close()


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("cfg", CONFIGS, ids=[c.name for c in CONFIGS])
def test_cancellation_torture(tmp_path: Path, cfg: Config, engine: str) -> None:
    for seed in range(SEEDS):
        work = tmp_path / f"seed{seed}"
        work.mkdir()
        path = work / f"disk.{cfg.fmt}"
        model = bytearray(cfg.size)
        argv = ["create", "-q", "-f", cfg.fmt]
        if cfg.opts:
            argv += ["-o", cfg.opts]
        if cfg.backing:
            base = work / "base.raw"
            content = random.Random(seed).randbytes(cfg.size - 3 * KiB)
            base.write_bytes(content)
            argv += ["-b", str(base), "-F", "raw"]
            model[:len(content)] = content
        qemu_img(*argv, str(path), str(cfg.size))

        async def main(path: Path = path, model: bytearray = model, seed: int = seed) -> None:
            async with asyncio.timeout(120):
                await torture(cfg, path, engine, model, seed * 1000 + ENGINES.index(engine))

        asyncio.run(main())
        if cfg.fmt == "qcow2":
            res = qemu_img("check", "-f", "qcow2", str(path), check=False)
            assert res.returncode == 0, res.stdout + res.stderr
            out = work / "content.raw"
            qemu_img("convert", "-f", "qcow2", "-O", "raw", str(path), str(out))
            content = out.read_bytes()
        else:
            content = path.read_bytes()
        if content != bytes(model):
            i = next(i for i in range(len(model)) if content[i] != model[i])
            raise AssertionError(f"guest content differs from the model at {i:#x}: "
                                 f"{content[i:i + 16].hex()} vs {bytes(model[i:i + 16]).hex()}")
        assert qemu_io(path, "read -q 0 512", fmt=cfg.fmt).returncode == 0
