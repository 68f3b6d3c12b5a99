"""Crash consistency of the QED driver (reliability.md §3.3 Q1-Q5, §3.4): allocating workloads recorded through
the fault-injection node, every prefix of the log (process crash), power-loss subsets after the last flush and
torn writes, each judged by :func:`aioblock.testing.crash.check_state` (``qemu-img check`` 0 or 3 after one rw
open by aioblock and by qemu-io, the per-sector data oracle, flushed data present). Includes the state QEMU gets
wrong (§3.4: an L2 update durable while the unsynced NEED_CHECK header write is not)."""

from __future__ import annotations

import asyncio
import random
import subprocess
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

import aioblock
from aioblock.testing.crash import (
    CrashState,
    GuestModel,
    ModelledDisk,
    check_state,
    power_loss_states,
    prefix_states,
    qemu_img_check,
    torn_write_states,
)
from aioblock.testing.faults import FaultInjector, LogEntry

from ..conftest import QEMU_IMG, needs_qemu

pytestmark = needs_qemu

S = 512
SIZE = 4 << 20


def pattern(offset: int, length: int, gen: int) -> bytes:
    out = bytearray()
    for sector in range(offset // S, (offset + length) // S):
        head = f"<q{sector:07d}g{gen:03d}>".encode()
        out += (head * (S // len(head) + 1))[:S]
    return bytes(out)


async def _record(path: Path, base: bytes | None,
                  workload: Callable[[ModelledDisk], Awaitable[None]]) -> tuple[bytes, list[LogEntry], GuestModel,
                                                                               list[int]]:
    image = path.read_bytes()
    inj = FaultInjector(record=True)
    model = GuestModel(SIZE, base=base, log=inj.log)
    cuts: list[int] = []
    async with aioblock.open(str(path), "qed", engine="sync", options={"inject": inj}) as disk:
        io = ModelledDisk(disk, model)
        await workload(io)
        cuts.append(len(inj.log))
        assert await disk.read(0, SIZE) == model.expected()
    assert qemu_img_check(path, "qed").returncode == 0
    return image, list(inj.log), model, cuts


def _judge(image: bytes, states: list[CrashState], model: GuestModel, tmp: Path) -> list[str]:
    def one(item: tuple[int, CrashState]) -> list[str]:
        i, state = item
        return asyncio.run(check_state(state, image, tmp / f"state-{i}.qed", "qed", model))

    with ThreadPoolExecutor(2) as pool:
        return [p for r in pool.map(one, enumerate(states)) for p in r]


def _states(log: list[LogEntry], cuts: list[int], *, power: int, torn: int) -> list[CrashState]:
    """Every prefix; power-loss and torn-write states cut right before each flush the driver issued (what was
    written since the previous one is undecided), at the workload's cut points and at the end."""
    states = prefix_states(log)
    flushes = {i for i, e in enumerate(log) if e.op == "flush"}
    for cut in sorted(set(cuts) | flushes | {len(log)}):
        states += power_loss_states(log[:cut], limit=power, seed=cut)
        states += torn_write_states(log[:cut], limit=torn, seed=cut)
    return states


@pytest.mark.parametrize("geometry", ["cluster_size=4k,table_size=2", "cluster_size=64k,table_size=4"])
@pytest.mark.parametrize("with_backing", [False, True])
def test_allocating_workload_crash_states(tmp_path: Path, geometry: str, with_backing: bool) -> None:
    assert QEMU_IMG is not None
    img = tmp_path / "c.qed"
    base: bytes | None = None
    argv = [QEMU_IMG, "create", "-q", "-f", "qed", "-o", geometry]
    if with_backing:
        base = pattern(0, SIZE, 0)
        (tmp_path / "base.raw").write_bytes(base)
        argv += ["-b", str(tmp_path / "base.raw"), "-F", "raw"]
    subprocess.run([*argv, str(img), str(SIZE)], check=True)
    cs = 4096 if "4k" in geometry else 65536
    rng = random.Random(7)
    cuts: list[int] = []

    async def workload(io: ModelledDisk) -> None:
        await io.write(0, pattern(0, 2048, 1))                          # first allocation: need-check, new L2
        await io.write(3 * cs + 512, pattern(3 * cs + 512, 1024, 1))   # same L2, partial cluster (COW)
        await io.flush()
        await asyncio.gather(*(io.write(o, pattern(o, 1024, 2))
                               for o in sorted({rng.randrange(0, SIZE // S - 2) * S for _ in range(12)})))
        await io.write(2 << 20, pattern(2 << 20, 3 * cs, 3))          # a second L2 table (4k geometry)
        await io.write(0, pattern(0, 1024, 4))                         # in place
        await io.write_zeroes(cs * 8, cs * 2)

    image, log, model, cuts = asyncio.run(_record(img, base, workload))
    states = _states(log, cuts, power=24, torn=12)
    assert len(states) > 50
    problems = _judge(image, states, model, tmp_path)
    assert not problems, f"{len(problems)} problems in {len(states)} states:\n" + "\n".join(problems[:20])


def test_l2_update_durable_without_data_or_header(tmp_path: Path) -> None:
    """One allocating write into an existing L2 table after a clean close (the workload of §3.4, where QEMU
    leaves 2 of 35 states corrupt): every power-loss subset, exhaustively."""
    assert QEMU_IMG is not None
    img = tmp_path / "h.qed"
    subprocess.run([QEMU_IMG, "create", "-q", "-f", "qed", str(img), str(SIZE)], check=True)
    subprocess.run(["qemu-io", "-f", "qed", "-c", "write -P 1 0 64k", str(img)], check=True, capture_output=True)

    async def workload(io: ModelledDisk) -> None:
        await io.write(1 << 20, pattern(1 << 20, 4096, 1))

    guest = b"\x01" * 65536 + bytes(SIZE - 65536)
    image, log, model, cuts = asyncio.run(_record(img, guest, workload))
    assert len(log) >= 3, log
    states = _states(log, cuts, power=1024, torn=64)
    assert len(states) > 10
    problems = _judge(image, states, model, tmp_path)
    assert not problems, "\n".join(problems[:20])
