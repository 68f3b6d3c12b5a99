"""Crash states of a recorded raw workload, judged by the oracles of aioblock.testing.crash.

Also checks the harness itself: the log replays to the real file, the state generators give the documented
sets, and the oracles catch a lost durable write, misplaced data and garbage.
"""

from __future__ import annotations

import errno
from pathlib import Path

import pytest

import aioblock
from aioblock.errors import SimulatedCrashError
from aioblock.testing.crash import (
    CrashState,
    GuestModel,
    ModelledDisk,
    check_state,
    crash_states,
    power_loss_states,
    prefix_states,
    replay,
    torn_write_states,
)
from aioblock.testing.faults import FaultInjector, LogEntry, durable_seqs
from tests.conftest import needs_qemu, qemu_img

S = 512
SECTORS = 512                     # a 256 KiB image
SIZE = SECTORS * S


def pattern(sector: int, gen: int) -> bytes:
    """512 bytes that say which sector they belong to and which write generation wrote them."""
    head = f"s{sector:06d}g{gen:04d}".encode()
    return (head * (S // len(head) + 1))[:S]


def data(first: int, count: int, gen: int) -> bytes:
    return b"".join(pattern(first + i, gen) for i in range(count))


async def workload(io: ModelledDisk) -> None:
    """Writes, overwrites, zero writes and discards, with flushes in between and unflushed work at the end."""
    await io.write(0, data(0, 8, 1))
    await io.write(64 * S, data(64, 16, 1))
    await io.flush()
    await io.write(4 * S, data(4, 4, 2))                       # overwrite part of a flushed write
    await io.write_zeroes(66 * S, 4 * S)                        # zero flushed data
    await io.write(128 * S, data(128, 32, 1))                  # a 16 KiB write: torn into 32 sectors
    await io.flush()
    await io.discard(0, 2 * S)                                  # discard flushed data
    await io.write_zeroes(200 * S, 8 * S, may_unmap=True)
    await io.write(130 * S, data(130, 2, 2))
    await io.flush()
    for i in range(6):                                          # unflushed tail: overlapping overwrites
        await io.write((300 + 2 * i) * S, data(300 + 2 * i, 4, 3 + i))
    await io.write(5 * S, data(5, 1, 3))


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "disk.raw"
    path.write_bytes(bytes(SIZE))
    return path


async def record(image: Path, inj: FaultInjector) -> GuestModel:
    inj.record = True
    model = GuestModel(SIZE, base=image.read_bytes(), log=inj.log)
    async with aioblock.open(str(image), "raw", engine="sync", options={"inject": inj}) as disk:
        await workload(ModelledDisk(disk, model))
    return model


# ---- the workload's crash states ----------------------------------------------------------------------------


async def test_log_replays_to_the_file(image: Path) -> None:
    base = image.read_bytes()
    inj = FaultInjector()
    model = await record(image, inj)
    assert replay(inj.log, base) == image.read_bytes() == model.expected()
    assert [e.op for e in inj.log].count("flush") == 3
    assert {e.op for e in inj.log} == {"write", "write_zeroes", "discard", "flush"}


async def test_prefix_states(image: Path, tmp_path: Path) -> None:
    base = image.read_bytes()
    inj = FaultInjector()
    model = await record(image, inj)
    states = prefix_states(inj.log)
    modifying = [e for e in inj.log if e.modifies]
    assert len(states) == len(modifying) + 1                  # the empty prefix, then one per request
    assert states[-1].image(base) == image.read_bytes()
    for state in states:
        problems = await check_state(state, base, tmp_path / "state.raw", "raw", model, qemu=False)
        assert not problems, problems


async def test_power_loss_states_at_every_point(image: Path, tmp_path: Path) -> None:
    """A power cut after each request of the log: durable = up to the last completed flush, plus subsets."""
    base = image.read_bytes()
    inj = FaultInjector()
    model = await record(image, inj)
    log = inj.log
    for cut in range(1, len(log) + 1):
        states = power_loss_states(log[:cut], limit=64)
        durable = durable_seqs(log[:cut])
        undecided = sum(1 for e in log[:cut] if e.modifies and e.seq not in durable)
        assert len(states) == min(2 ** undecided, 64)
        for state in states:
            applied = {e.seq for e in state.ops}
            assert durable <= applied                          # durable entries are in every state
            content = state.image(base)
            assert not model.violations(content, state), (state.label, model.violations(content, state))
            # durability, stated directly: every sector written before a completed flush, and not written
            # after it, reads back as written
            for e in log[:cut]:
                if e.seq in durable and e.op == "write" and e.data is not None:
                    later = [x for x in log[:cut] if x.seq > e.seq and x.modifies and x.offset < e.end
                             and e.offset < x.end]
                    if not later:
                        assert content[e.offset:e.end] == e.data, state.label
    # materialise a sample through files, with every oracle
    for state in power_loss_states(log, limit=64)[::8]:
        problems = await check_state(state, base, tmp_path / "state.raw", "raw", model, qemu=False)
        assert not problems, problems


async def test_power_loss_exhaustive_up_to_2_10(image: Path) -> None:
    base = image.read_bytes()
    inj = FaultInjector()
    inj.record = True
    model = GuestModel(SIZE, log=inj.log)
    async with aioblock.open(str(image), "raw", engine="sync", options={"inject": inj}) as disk:
        io = ModelledDisk(disk, model)
        await io.write(0, data(0, 4, 1))
        await io.flush()
        for i in range(10):                                     # 10 unflushed writes: 2**10 states
            await io.write((8 + i) * S, data(8 + i, 1, 1))
    states = power_loss_states(inj.log)
    assert len(states) == 1024
    assert len({frozenset(e.seq for e in s.ops) for s in states}) == 1024
    assert all(s.ops[0].seq == 0 for s in states)
    for state in states:
        assert not model.violations(state.image(base), state)
    # one more unflushed write: 2**11 > limit, so a sample of 1024 distinct subsets, the same every time
    async with aioblock.open(str(image), "raw", engine="sync", options={"inject": inj}) as disk:
        io = ModelledDisk(disk, model)
        await io.write(20 * S, data(20, 1, 1))
    sample = power_loss_states(inj.log)
    assert len(sample) == 1024
    assert len({frozenset(e.seq for e in s.ops) for s in sample}) == 1024
    assert [s.label for s in sample] == [s.label for s in power_loss_states(inj.log)]
    assert [s.label for s in sample] != [s.label for s in power_loss_states(inj.log, seed=1)]
    for state in sample:
        assert not model.violations(state.image(base), state)


async def test_torn_write_states(image: Path, tmp_path: Path) -> None:
    base = image.read_bytes()
    inj = FaultInjector()
    inj.record = True
    model = GuestModel(SIZE, log=inj.log)
    async with aioblock.open(str(image), "raw", engine="sync", options={"inject": inj}) as disk:
        io = ModelledDisk(disk, model)
        await io.write(0, data(0, 4, 1))
        await io.flush()
        await io.write(16 * S, data(16, 32, 1))                # torn into 32 sectors
        await io.write(17 * S, data(17, 2, 2))
        await io.write_zeroes(60 * S, 8 * S)                    # one unit
    states = torn_write_states(inj.log, limit=300)
    assert len(states) == 300
    units = 32 + 2 + 1
    assert {len(s.ops) - 1 for s in states[:2]} == {0, units}  # none, then everything
    for state in states:
        assert all(len(op.data) == S for op in state.ops[1:] if op.data is not None)
        assert not model.violations(state.image(base), state), state.label
    for state in states[::50]:
        problems = await check_state(state, base, tmp_path / "state.raw", "raw", model, qemu=False)
        assert not problems, problems


async def test_crash_rule_mid_workload(image: Path, tmp_path: Path) -> None:
    """Crash at the write after the 2nd flush; the file then holds exactly the log, and every state is fine."""
    base = image.read_bytes()
    inj = FaultInjector()
    inj.crash(op="write", after_event="second flush done")
    inj.record = True
    model = GuestModel(SIZE, log=inj.log)
    async with aioblock.open(str(image), "raw", engine="sync", options={"inject": inj}) as disk:
        io = ModelledDisk(disk, model)
        await io.write(0, data(0, 8, 1))
        await io.flush()
        await io.write(8 * S, data(8, 8, 1))
        await io.flush()
        disk.root.event("second flush done")
        await io.write_zeroes(0, S)                             # not a write: passes
        with pytest.raises(SimulatedCrashError):
            await io.write(16 * S, data(16, 8, 1))
        with pytest.raises(SimulatedCrashError):
            await io.flush()
    assert replay(inj.log, base) == image.read_bytes()
    for state in crash_states(inj.log, limit=64):
        problems = await check_state(state, base, tmp_path / "state.raw", "raw", model, qemu=False)
        assert not problems, problems
    inj.revive()                                                # reopen: the acknowledged data is there
    async with aioblock.open(str(image), "raw", engine="sync", options={"inject": inj}) as disk:
        assert await disk.read(0, 16 * S) == bytes(S) + data(1, 7, 1) + data(8, 8, 1)


@needs_qemu
async def test_final_and_prefix_states_judged_by_qemu(image: Path, tmp_path: Path) -> None:
    base = image.read_bytes()
    inj = FaultInjector()
    model = await record(image, inj)
    expected = tmp_path / "model.raw"
    expected.write_bytes(model.expected())
    qemu_img("compare", "-f", "raw", "-F", "raw", str(image), str(expected))      # raises unless identical
    states = prefix_states(inj.log)
    for state in states[::3] + states[-1:]:
        problems = await check_state(state, base, tmp_path / "state.raw", "raw", model, qemu=True)
        assert not problems, problems
    final = states[-1].materialise(base, tmp_path / "final.raw")
    qemu_img("compare", "-f", "raw", "-F", "raw", str(final), str(expected))


# ---- the harness catches bad states -------------------------------------------------------------------------


async def test_oracle_catches_a_lost_durable_write(image: Path, tmp_path: Path) -> None:
    """A dropped write before a flush (a driver that acknowledged without writing): durability fails."""
    base = image.read_bytes()
    inj = FaultInjector(record=True)
    inj.drop(op="write", nth=2)
    model = GuestModel(SIZE, log=inj.log)
    async with aioblock.open(str(image), "raw", engine="sync", options={"inject": inj}) as disk:
        io = ModelledDisk(disk, model)
        await io.write(0, data(0, 1, 1))
        await io.write(S, data(1, 1, 1))                        # dropped, yet acknowledged
        await io.flush()
    states = power_loss_states(inj.log)
    assert len(states) == 1
    problems = model.violations(states[0].image(base), states[0])
    assert len(problems) == 1 and "sector 1 " in problems[0] and "lost durable write" in problems[0]
    problems = await check_state(states[0], base, tmp_path / "s.raw", "raw", model, qemu=False)
    assert problems and problems[0].startswith("power-loss")
    # before the flush returned, losing the write is allowed: the prefix states do not claim durability
    assert not model.violations(base, prefix_states(inj.log)[0])


def test_oracle_catches_misplaced_data_and_garbage() -> None:
    model = GuestModel(8 * S)
    model.write(0, data(0, 2, 1))
    model.flush(log_position=1)
    model.write(S, data(1, 1, 2))
    good = bytearray(model.expected())
    assert not model.violations(bytes(good))
    assert not model.violations(data(0, 1, 1) + data(1, 1, 1) + bytes(6 * S))          # older, not durable
    misplaced = bytearray(good)
    misplaced[4 * S:5 * S] = pattern(1, 2)
    (problem,) = model.violations(bytes(misplaced))
    assert "sector 4 " in problem and "data written to sector 1" in problem
    garbage = bytearray(good)
    garbage[7 * S + 100] = 0xFF
    (problem,) = model.violations(bytes(garbage))
    assert "sector 7 " in problem and "unknown data" in problem
    with_base = GuestModel(2 * S, base=data(0, 2, 9))          # zeroes are no sector's content here
    (problem,) = with_base.violations(bytes(S) + pattern(1, 9))
    assert "sector 0 " in problem and "zeroes" in problem
    # with the flush in effect, version 1 of sector 1 is durable: the base content is a lost write
    lost = data(0, 1, 1) + bytes(7 * S)
    (problem,) = model.violations(lost, durable_flushes=1)
    assert "sector 1 " in problem and "lost durable write" in problem
    assert model.violations(bytes(4 * S))[0].startswith("guest size is")


def test_torn_split_at_absolute_sector_boundaries() -> None:
    log = [LogEntry(0, "write", 100, 1000, bytes(range(256)) * 3 + bytes(232), status="ok", completion=0)]
    (everything,) = [s for s in torn_write_states(log) if len(s.ops) == 3]
    assert [(op.offset, op.length) for op in everything.ops] == [(100, 412), (512, 512), (1024, 76)]
    assert everything.image(bytes(2048)) == replay(log, bytes(2048))
    assert len(torn_write_states(log)) == 8                     # 2**3 subsets, exhaustive


def test_materialise_from_a_file_keeps_holes_and_matches_memory(tmp_path: Path) -> None:
    base_path = tmp_path / "base.raw"
    with open(base_path, "wb") as f:
        f.truncate(1 << 20)
        f.seek(4096)
        f.write(b"x" * 4096)
    base = base_path.read_bytes()
    log = [LogEntry(0, "write", 1 << 20, 512, b"y" * 512, status="ok", completion=0),      # grows the file
           LogEntry(1, "discard", 4096, 1 << 21, status="ok", completion=1),               # clipped at EOF
           LogEntry(2, "write_zeroes", (1 << 20) + 256, 1024, status="ok", completion=2),  # grows it more
           LogEntry(3, "truncate", (1 << 20) + 1024, 0, status="ok", completion=3)]
    state = CrashState("prefix", "test", tuple(log), 4)
    out = state.materialise(base_path, tmp_path / "out.raw")
    assert out.read_bytes() == state.image(base) == replay(log, base)
    assert len(out.read_bytes()) == (1 << 20) + 1024
    assert out.stat().st_blocks * 512 < 1 << 20                # the copy stayed sparse
    assert state.materialise(base, tmp_path / "out2.raw").read_bytes() == out.read_bytes()


def test_failed_file_requests_are_not_replayed() -> None:
    log = [LogEntry(0, "write", 0, 2, b"ab", status="ok", completion=0),
           LogEntry(1, "write", 2, 2, b"cd", status="failed", error=f"BlockIOError: {errno.EIO}"),
           LogEntry(2, "flush", 0, 0, status="ok", completion=1, covers=1)]
    assert replay(log, bytes(4)) == b"ab\0\0"
    assert [len(s.ops) for s in prefix_states(log)] == [0, 1]
    (state,) = power_loss_states(log)
    assert state.prefix == 3 and [op.seq for op in state.ops] == [0]
