"""Crash consistency of the qcow2 driver (reliability.md sections 3.2-3.5).

Four kinds of test:

1. **Recorded workloads.** Scripted allocating workloads run through a recording :class:`FaultInjector` on images
   made by ``qemu-img create`` (64k clusters; compat=0.10; 512-byte clusters with many L2 and refcount-block
   allocations; a refcount-table growth; tiny caches with concurrent writes; lazy refcounts; a backing file;
   extended L2; compressed clusters; an internal snapshot; L1 growth). Every prefix of the log (process crash),
   power-loss subsets after the last flush and torn writes (512-byte pieces) at the power-cut points of the
   workload, capped with ``limit=``, are rebuilt and judged by :func:`aioblock.testing.crash.check_state`:
   ``qemu-img check`` 0 or 3 after one rw open by aioblock and by qemu-io, the per-sector data oracle, durability
   of writes acknowledged before a completed flush, a robust read-only open.
2. **Injected errors** in the middle of an operation (an L1 update, a new L2 table, a new refcount block or its
   hookup, the refcount-table growth, L1 growth, the data or COW write of an allocation, a compressed write, a
   cache write-back, a sync, the lazy-refcounts dirty bit; alone or among concurrent allocations): the request
   fails, later requests work in the same session, nothing acknowledged is lost, no guest cluster aliases another
   (reliability.md section 2.6 item 4), and the closed image is clean or leaks only.
3. **SIGKILL** of ``python -m aioblock io`` at random moments of a long concurrent aio_write workload (while the
   background metadata flusher runs), then the rw-open repair, ``qemu-img check`` and the data oracle; and a kill
   at a known point (``sigraise 9``) after a flush, where the flushed writes must be durable.
4. **Pause** of an allocation at ``cluster_alloc``: a concurrent read of the cluster sees its old contents (zeroes,
   backing data, a zero flag over backing data, a compressed cluster, other subclusters), a second write to the
   cluster waits, other clusters go on.

The last tests reproduce driver bugs this file found (now fixed).
"""

from __future__ import annotations

import asyncio
import errno
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest

import aioblock
from aioblock.backend import BlockBackend
from aioblock.errors import AioblockError
from aioblock.testing.crash import (
    CrashState,
    GuestModel,
    ModelledDisk,
    check_state,
    power_loss_states,
    prefix_states,
    qemu_guest_content,
    qemu_img_check,
    qemu_io_rw_open,
    replay,
    torn_write_states,
)
from aioblock.testing.faults import FaultInjector, LogEntry, Rule

from ..conftest import QEMU_IMG, needs_qemu

pytestmark = needs_qemu

S = 512
KiB = 1024
MiB = 1024 * KiB
#: threads judging crash states at once (each runs qemu-img / qemu-io subprocesses)
WORKERS = max(1, min(4, os.cpu_count() or 1))
#: events after which a crash is most interesting: prefix states ending around them are always judged
KEY_EVENTS = ("l2_alloc", "l2_alloc_write", "l1_update", "refblock_alloc", "refblock_alloc_hookup",
              "refblock_alloc_write_blocks", "refblock_alloc_write_table", "refblock_alloc_switch_table",
              "l1_grow_write_table", "l1_grow_activate_table", "write_compressed")


# ---- data patterns -------------------------------------------------------------------------------------------

def pattern(sector: int, gen: int) -> bytes:
    """512 bytes that say which guest sector they belong to and which write generation wrote them."""
    head = f"<q{sector:07d}g{gen:03d}>".encode()
    return (head * (S // len(head) + 1))[:S]


def data(offset: int, length: int, gen: int) -> bytes:
    """Pattern data for the guest range (whole sectors)."""
    assert offset % S == 0 and length % S == 0
    return b"".join(pattern(offset // S + i, gen) for i in range(length // S))


def qemu(*args: str | Path, ok: Sequence[int] = (0,)) -> subprocess.CompletedProcess[str]:
    assert QEMU_IMG is not None
    res = subprocess.run([QEMU_IMG, *map(str, args)], capture_output=True, text=True, timeout=300)
    assert res.returncode in ok, f"qemu-img {' '.join(map(str, args))}: rc {res.returncode}\n{res.stdout}{res.stderr}"
    return res


def create(path: Path, size: int | str, opts: str = "", *, backing: Path | None = None,
           backing_fmt: str = "raw") -> Path:
    argv: list[str | Path] = ["create", "-q", "-f", "qcow2"]
    if opts:
        argv += ["-o", opts]
    if backing is not None:
        argv += ["-b", str(backing.resolve()), "-F", backing_fmt]
    qemu(*argv, path, str(size))
    return path


def make_backing(path: Path, size: int) -> bytes:
    """A raw backing file whose every sector holds pattern generation 0 (so backing data is recognisable)."""
    content = data(0, size, 0)
    path.write_bytes(content)
    return content


# ---- recording a workload ------------------------------------------------------------------------------------


class Workload(ModelledDisk):
    """A ModelledDisk that also notes power-cut points (before every guest flush, and at the end) and knows
    compressed writes and pattern writes."""

    def __init__(self, disk: BlockBackend, model: GuestModel, log: list[LogEntry]) -> None:
        super().__init__(disk, model)
        self.log = log
        self.cuts: list[int] = []

    async def put(self, offset: int, length: int, gen: int) -> None:
        await self.write(offset, data(offset, length, gen))

    async def put_compressed(self, offset: int, length: int, gen: int) -> None:
        buf = data(offset, length, gen)
        await self.disk.write_compressed(offset, buf)
        self.model.write(offset, buf)

    async def flush(self) -> None:
        self.cut()
        await super().flush()

    def cut(self) -> None:
        """A power cut here is worth judging (the unflushed work so far is undecided)."""
        if not self.cuts or self.cuts[-1] != len(self.log):
            self.cuts.append(len(self.log))


@dataclass
class Recording:
    path: Path
    base: bytes
    log: list[LogEntry]
    events: list[tuple[int, str]]
    model: GuestModel
    cuts: list[int]

    def event_names(self) -> set[str]:
        return {name for _, name in self.events}


async def record(path: Path, size: int, workload: Callable[[Workload], Awaitable[None]], *,
                 base_content: bytes | None = None, options: dict[str, object] | None = None) -> Recording:
    """Run ``workload`` on the image through a recording injector; check the result of the whole run."""
    base = path.read_bytes()
    inj = FaultInjector(record=True)
    model = GuestModel(size, base=base_content, log=inj.log)
    async with aioblock.open(str(path), "qcow2", engine="sync", options={"inject": inj, **(options or {})}) as disk:
        io = Workload(disk, model, inj.log)
        await workload(io)
        io.cut()                                            # power loss with the unflushed tail undecided
        assert await disk.read(0, size) == model.expected()
    log = inj.log
    assert all(e.ok for e in log), [e for e in log if not e.ok]
    assert replay(log, base) == path.read_bytes()
    res = qemu_img_check(path, "qcow2")
    assert res.returncode == 0, res.stdout + res.stderr
    assert qemu_guest_content(path, "qcow2") == model.expected()
    return Recording(path, base, log, list(inj.recorder.events), model, io.cuts)


# ---- choosing and judging crash states --------------------------------------------------------------------------


def _key(state: CrashState) -> tuple[object, ...]:
    return (state.prefix, tuple((e.seq, e.offset, e.length) for e in state.ops))


def select_states(rec: Recording, *, prefixes: int, power: int, torn: int, torn_cuts: int = 3,
                  extra_cuts: int = 4, seed: int = 0) -> list[CrashState]:
    """A capped, deterministic choice of crash states of ``rec``.

    * prefixes: at most ``prefixes`` process-crash states, evenly spread, plus every prefix ending within two
      entries of a KEY_EVENTS announcement (crashes inside L2 / refblock / reftable allocation);
    * power loss: ``power`` states (``limit=``) at each cut point of the workload (before each flush, at the
      end) and at ``extra_cuts`` random log positions;
    * torn writes: ``torn`` states at the last ``torn_cuts`` cut points and the random ones.
    Duplicates (same entries applied, same durability claim) are judged once."""
    log = rec.log
    rng = random.Random(seed)
    pre = prefix_states(log)
    chosen: dict[tuple[object, ...], CrashState] = {}

    def add(states: Sequence[CrashState]) -> None:
        for st in states:
            chosen.setdefault(_key(st), st)

    if len(pre) <= prefixes:
        add(pre)
    else:
        step = len(pre) / prefixes
        add([pre[int(i * step)] for i in range(prefixes)] + [pre[-1]])
        # prefix state i ends at the i-th ok modify entry; find those right around key events
        ends = [st.ops[-1].seq if st.ops else -1 for st in pre]
        hot = {pos for pos, name in rec.events if name in KEY_EVENTS}
        add([st for st, end in zip(pre, ends, strict=True) if any(p - 2 <= end <= p + 1 for p in hot)])
    random_cuts = sorted(rng.sample(range(1, len(log)), min(extra_cuts, len(log) - 1)))
    cuts = sorted(set(rec.cuts) | set(random_cuts))
    for cut in cuts:
        add(power_loss_states(log[:cut], limit=power, seed=seed + cut))
    for cut in sorted(set(rec.cuts[-torn_cuts:]) | set(random_cuts)):
        add(torn_write_states(log[:cut], limit=torn, seed=seed + cut))
    return list(chosen.values())


@dataclass
class Verdict:
    states: int
    by_kind: dict[str, int] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def __str__(self) -> str:
        kinds = ", ".join(f"{k}: {n}" for k, n in sorted(self.by_kind.items()))
        return f"{self.states} crash states ({kinds}) judged in {self.seconds:.1f}s, {len(self.problems)} problems"


def judge(rec: Recording, states: Sequence[CrashState], tmp: Path) -> Verdict:
    """Every oracle on every state, ``WORKERS`` states at a time (each in its own event loop and files)."""
    t0 = time.monotonic()

    def one(item: tuple[int, CrashState]) -> list[str]:
        i, state = item
        dest = tmp / f"state-{i}.qcow2"
        try:
            return asyncio.run(check_state(state, rec.base, dest, "qcow2", rec.model))
        finally:
            for p in (dest, Path(f"{dest}.qemu")):
                p.unlink(missing_ok=True)

    with ThreadPoolExecutor(WORKERS) as pool:
        results = list(pool.map(one, enumerate(states)))
    verdict = Verdict(len(states), seconds=time.monotonic() - t0)
    for st in states:
        verdict.by_kind[st.kind] = verdict.by_kind.get(st.kind, 0) + 1
    verdict.problems = [p for r in results for p in r]
    return verdict


async def judge_recording(rec: Recording, tmp: Path, *, prefixes: int, power: int, torn: int,
                          **kw: int) -> Verdict:
    states = select_states(rec, prefixes=prefixes, power=power, torn=torn, **kw)
    verdict = await asyncio.to_thread(judge, rec, states, tmp)
    print(f"\n{rec.path.name}: {len(rec.log)} log entries; {verdict}")
    assert not verdict.problems, "\n".join(verdict.problems[:12])
    return verdict


# ---- 1. recorded workloads ---------------------------------------------------------------------------------------


async def default_workload(io: Workload, cs: int = 64 * KiB) -> None:
    """Allocations (with COW from nothing), overwrites, zero writes both ways, compressed clusters, discards and
    the reuse of what they freed, flushes in between and unflushed work at the end."""
    await io.put(0, 4 * KiB, 1)                              # new L2 table, then a cluster with tail COW
    await io.put(cs + 512, 1 * KiB, 1)                       # head and tail COW
    await io.put(3 * cs, 2 * cs, 1)                          # two clusters in one request
    await io.write(5 * cs + 700, b"unaligned" * 11)          # a sub-sector write
    await io.flush()
    await io.put(2 * KiB, 1 * KiB, 2)                        # in-place overwrite
    await io.write_zeroes(3 * cs, cs, may_unmap=True)        # whole cluster: unmapped and freed
    await io.write_zeroes(4 * cs, cs)                        # whole cluster: zero flag, allocation kept
    await io.write_zeroes(cs + 512, 512)                     # part of a cluster: zeroes written
    await io.put_compressed(8 * cs, cs, 1)                   # compressed clusters, packed together
    await io.put_compressed(9 * cs, cs, 1)
    await io.flush()
    freed = (await io.disk.block_status(0, cs)).offset
    await io.discard(0, cs)                                  # frees a cluster
    await io.discard(9 * cs, cs)                             # frees a compressed cluster
    await io.flush()                                         # now the freed clusters may be reused
    await io.put(10 * cs, cs, 1)
    assert (await io.disk.block_status(10 * cs, cs)).offset == freed      # and one was
    await io.put(8 * cs + 4 * KiB, 4 * KiB, 3)               # COW from a compressed cluster
    await io.put(12 * cs, 4 * KiB, 1)
    await io.flush()
    # unflushed tail: allocations, overwrites, zeroes, a discard and an allocation right after it
    await io.put(20 * cs, 8 * KiB, 1)
    await io.put(20 * cs + 4 * KiB, 8 * KiB, 2)
    await io.write_zeroes(10 * cs, cs, may_unmap=True)
    await io.put(21 * cs, cs + 4 * KiB, 1)
    await io.discard(12 * cs, cs)
    await io.put(0, 512, 4)
    await io.put(4 * cs + 8 * KiB, 512, 2)                   # into a zero-flagged allocated cluster


async def test_default_64k(tmp_path: Path) -> None:
    path = create(tmp_path / "w64k.qcow2", 4 * MiB)
    rec = await record(path, 4 * MiB, default_workload)
    assert {"l2_alloc", "l1_update", "cluster_alloc", "cow_write", "write_compressed"} <= rec.event_names()
    await judge_recording(rec, tmp_path, prefixes=200, power=24, torn=12)


async def test_version_2_image(tmp_path: Path) -> None:
    """compat=0.10: no zero flag (zero writes become data writes, discards unmap), no feature bits."""
    path = create(tmp_path / "v2.qcow2", 4 * MiB, "compat=0.10")
    rec = await record(path, 4 * MiB, default_workload)
    await judge_recording(rec, tmp_path, prefixes=60, power=8, torn=6)


async def small_cluster_workload(io: Workload) -> None:
    """512-byte clusters, 16-bit refcounts: an L2 table covers 32 KiB of guest and a refcount block 256 host
    clusters, so this allocates many L2 tables and several refcount blocks, with frees and reuse."""
    l2 = 32 * KiB
    for i in range(10):                                      # a new L2 table for each
        await io.put(i * 3 * l2 + (i % 4) * 1024, 4 * KiB, 1)
    await io.flush()
    await io.put(40 * l2, 64 * KiB, 1)                       # spans three L2 tables
    await io.put(48 * l2 + 512, 48 * KiB, 1)                 # now refcount blocks are needed
    await io.write_zeroes(40 * l2, 16 * KiB, may_unmap=True)
    await io.write_zeroes(41 * l2, 8 * KiB)
    await io.flush()
    await io.discard(0, 4 * KiB)
    await io.discard(48 * l2 + 4 * KiB, 16 * KiB)
    await io.put(3 * l2 + 1024, 1 * KiB, 2)                  # in-place overwrite
    await io.flush()
    await io.put(56 * l2, 32 * KiB, 1)                       # reuses what the discards freed
    await io.put(1024, 2 * KiB, 3)
    await io.flush()
    for i in range(6):                                       # unflushed tail, more L2 tables and refblocks
        await io.put((60 + 2 * i) * l2 + 512 * i, 12 * KiB, 1)
    await io.put(40 * l2 + 4 * KiB, 4 * KiB, 2)
    await io.discard(56 * l2, 8 * KiB)
    await io.put(2 * MiB + 5 * KiB, 24 * KiB, 1)


@pytest.mark.slow
async def test_small_clusters_l2_and_refblock_allocations(tmp_path: Path) -> None:
    size = 4 * MiB
    path = create(tmp_path / "w512.qcow2", size, "cluster_size=512")
    rec = await record(path, size, small_cluster_workload)
    assert {"l2_alloc", "l1_update", "refblock_alloc", "refblock_alloc_hookup"} <= rec.event_names()
    await judge_recording(rec, tmp_path, prefixes=160, power=16, torn=10)


#: reftable growth image: 512-byte clusters, 64-bit refcounts (a refcount block covers 64 clusters, the
#: one-cluster refcount table 64 blocks = 2 MiB of file), prefilled by qemu-io to just below 2 MiB
GROW_SIZE = 2 * MiB
GROW_PREFILL = 1900 * KiB


def make_growth_image(path: Path) -> bytes:
    """The image for reftable growth; returns its guest content (the base of the model)."""
    create(path, GROW_SIZE, "cluster_size=512,refcount_bits=64")
    res = subprocess.run(["qemu-io", "-f", "qcow2", "-c", f"write -P 0x5a 0 {GROW_PREFILL}", str(path)],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    assert path.stat().st_size < 2 * MiB - 32 * KiB
    return qemu_guest_content(path, "qcow2")


async def growth_workload(io: Workload) -> None:
    """Allocations that cross the 2 MiB file size the refcount table covers, around other work."""
    start = GROW_PREFILL
    await io.put(4 * KiB, 2 * KiB, 1)                        # in place, in the prefilled part
    await io.discard(64 * KiB, 16 * KiB)                     # frees clusters
    await io.flush()
    for i in range(6):
        await io.put(start + i * 16 * KiB, 12 * KiB, 1)      # new L2 tables, new refblocks, the reftable grows
        if i == 2:
            await io.flush()
    await io.put(64 * KiB, 8 * KiB, 2)                       # reuses the freed clusters
    await io.flush()
    await io.put(start + 100 * KiB, 24 * KiB, 1)             # unflushed tail
    await io.write_zeroes(start + 4 * KiB, 4 * KiB, may_unmap=True)
    await io.put(128 * KiB, 4 * KiB, 2)


@pytest.mark.slow
async def test_small_clusters_refcount_table_growth(tmp_path: Path) -> None:
    path = tmp_path / "grow.qcow2"
    content = make_growth_image(path)
    rec = await record(path, GROW_SIZE, growth_workload, base_content=content)
    assert {"refblock_alloc_write_blocks", "refblock_alloc_write_table",
            "refblock_alloc_switch_table"} <= rec.event_names()
    await judge_recording(rec, tmp_path, prefixes=120, power=12, torn=8)


async def lazy_workload(io: Workload) -> None:
    cs = 64 * KiB
    await io.put(0, 4 * KiB, 1)
    await io.put(2 * cs + 512, 8 * KiB, 1)
    await io.flush()
    await io.put(5 * cs, 2 * cs, 1)
    await io.write_zeroes(5 * cs, cs, may_unmap=True)
    await io.discard(2 * cs, cs)
    await io.flush()
    await io.put(8 * cs, 4 * KiB, 1)                          # reuses a freed cluster
    await io.put_compressed(10 * cs, cs, 1)
    await io.put(0, 512, 2)
    await io.flush()
    await io.put(12 * cs, 12 * KiB, 1)                        # unflushed tail
    await io.discard(8 * cs, cs)
    await io.put(13 * cs + 4 * KiB, 4 * KiB, 1)


async def test_lazy_refcounts(tmp_path: Path) -> None:
    path = create(tmp_path / "lazy.qcow2", 4 * MiB, "lazy_refcounts=on")
    rec = await record(path, 4 * MiB, lazy_workload)
    await judge_recording(rec, tmp_path, prefixes=80, power=16, torn=8)


async def backing_workload(io: Workload, cs: int = 64 * KiB) -> None:
    """COW from the backing file (partial clusters), zero writes and discards that must hide it."""
    await io.put(512, 1 * KiB, 1)                             # head and tail COW from the backing file
    await io.put(2 * cs - 4 * KiB, 8 * KiB, 1)                # spans two clusters: tail of one, head of next
    await io.flush()
    await io.put(4 * KiB, 512, 2)                             # in place
    await io.write_zeroes(3 * cs, cs)                         # zero flag over backing data
    await io.write_zeroes(4 * cs + 1024, 2 * KiB)             # part of a cluster: COW + zeroes
    await io.discard(5 * cs, 2 * cs)                          # reads zeroes, not backing data
    await io.put_compressed(8 * cs, cs, 1)
    await io.flush()
    await io.put(8 * cs + 1024, 1 * KiB, 2)                   # COW from a compressed cluster
    await io.discard(0, cs)                                   # frees a cluster
    await io.flush()
    await io.put(10 * cs + 2 * KiB, 4 * KiB, 1)               # reuses it; COW from backing
    await io.flush()
    await io.put(3 * cs + 4 * KiB, 4 * KiB, 2)                # unflushed tail: into a zero cluster
    await io.put(12 * cs + 3 * KiB, cs, 1)
    await io.write_zeroes(10 * cs, cs, may_unmap=True)
    await io.put(14 * cs + 512, 512, 1)


async def test_backing_file_cow(tmp_path: Path) -> None:
    size = 2 * MiB
    content = make_backing(tmp_path / "backing.raw", size)
    path = create(tmp_path / "overlay.qcow2", size, backing=tmp_path / "backing.raw")
    rec = await record(path, size, backing_workload, base_content=content)
    assert "cow_read" in rec.event_names()
    await judge_recording(rec, tmp_path, prefixes=90, power=16, torn=8)


async def extended_l2_workload(io: Workload) -> None:
    """Subcluster allocation (2 KiB subclusters of 64 KiB clusters) over a backing file."""
    cs, sc = 64 * KiB, 2 * KiB
    await io.put(0, sc, 1)                                    # one subcluster; the rest stays backing data
    await io.put(3 * sc + 512, 512, 1)                        # same cluster, another subcluster, partial
    await io.put(cs - sc, 2 * sc, 1)                          # last subcluster of one cluster, first of next
    await io.flush()
    await io.write_zeroes(2 * sc, 2 * sc)                     # zero bits
    await io.write_zeroes(5 * sc + 512, 512)                  # part of a subcluster
    await io.put(0, 512, 2)                                   # in place
    await io.put_compressed(4 * cs, cs, 1)
    await io.discard(cs, cs)
    await io.flush()
    await io.put(4 * cs + 3 * sc, 1 * KiB, 2)                 # COW from the compressed cluster
    await io.put(6 * cs, 4 * cs, 1)                           # whole clusters
    await io.flush()
    await io.put(10 * cs + 7 * sc, 3 * sc, 1)                 # unflushed tail
    await io.write_zeroes(6 * cs, cs, may_unmap=True)
    await io.put(cs + 4 * sc, sc, 2)
    await io.put(2 * sc + 512, 512, 3)                        # into a zeroed subcluster


async def test_extended_l2(tmp_path: Path) -> None:
    size = 2 * MiB
    content = make_backing(tmp_path / "backing.raw", size)
    path = create(tmp_path / "extl2.qcow2", size, "extended_l2=on", backing=tmp_path / "backing.raw")
    rec = await record(path, size, extended_l2_workload, base_content=content)
    await judge_recording(rec, tmp_path, prefixes=90, power=16, torn=8)



async def pressure_workload(io: Workload) -> None:
    """Tiny caches (two L2 slices, two refcount blocks): dirty slices are written back by eviction, in the
    middle of allocations; concurrent allocating writes; a pause in which the background flusher runs."""
    l2 = 32 * KiB
    await asyncio.gather(*(io.put(i * l2 + 1024, 3 * KiB, 1) for i in range(8)))
    await io.flush()
    await asyncio.gather(*(io.put(20 * l2 + i * 2 * KiB, 2 * KiB, 1) for i in range(12)))
    await asyncio.gather(io.put(2 * l2, 1 * KiB, 2), io.discard(4 * l2, 8 * KiB), io.put(30 * l2, 40 * KiB, 1))
    await asyncio.sleep(0.8)                                     # the background flusher writes back
    await io.put(50 * l2 + 512, 2 * KiB, 1)
    await io.flush()
    await asyncio.gather(*(io.put((60 + 3 * i) * l2, 5 * KiB, 1) for i in range(8)))
    await io.put(1024, 3 * KiB, 3)


@pytest.mark.slow
async def test_cache_pressure_and_concurrency(tmp_path: Path) -> None:
    size = 4 * MiB
    path = create(tmp_path / "pressure.qcow2", size, "cluster_size=512")
    rec = await record(path, size, pressure_workload,
                       options={"l2-cache-size": "1k", "l2-cache-entry-size": "512", "refcount-cache-size": "1k"})
    await judge_recording(rec, tmp_path, prefixes=110, power=12, torn=8)


def make_snapshot_image(path: Path, size: int) -> bytes:
    """An image with data, then an internal snapshot: every cluster and L2 table is shared (refcount 2)."""
    create(path, size)
    for i in range(6):
        res = subprocess.run(["qemu-io", "-f", "qcow2", "-c", f"write -P {0x30 + i} {i * 64 * KiB} {48 * KiB}",
                              str(path)], capture_output=True, text=True, timeout=120)
        assert res.returncode == 0, res.stdout + res.stderr
    qemu("snapshot", "-c", "before", path)
    return qemu_guest_content(path, "qcow2")


async def snapshot_workload(io: Workload) -> None:
    """Writes to shared clusters (copy on write of the cluster, and of the shared L2 table first), a discard of a
    shared cluster (a refcount decrement that must not reach zero), then ordinary allocations."""
    cs = 64 * KiB
    await io.put(4 * KiB, 4 * KiB, 1)                            # shared L2 table copied, shared cluster copied
    await io.put(cs + 40 * KiB, 16 * KiB, 1)
    await io.flush()
    await io.discard(2 * cs, cs)
    await io.write_zeroes(3 * cs, cs, may_unmap=True)
    await io.put(8 * cs, 8 * KiB, 1)
    await io.flush()
    await io.put(4 * cs + 512, 512, 1)                           # unflushed tail
    await io.put(4 * KiB, 512, 2)                                # now in place


async def test_internal_snapshot_cow(tmp_path: Path) -> None:
    size = 1 * MiB
    path = tmp_path / "snap.qcow2"
    before = make_snapshot_image(path, size)
    rec = await record(path, size, snapshot_workload, base_content=before)
    assert "l2_alloc" in rec.event_names()
    await judge_recording(rec, tmp_path, prefixes=60, power=12, torn=8)
    # the snapshot still holds what it held
    snap = tmp_path / "snap.raw"
    qemu("convert", "-l", "snapshot.name=before", "-O", "raw", path, snap)
    assert snap.read_bytes() == before


async def test_l1_growth_crash_states(tmp_path: Path) -> None:
    """Growing the image past what the L1 table covers (I6), with writes around it. A state may show the old
    or the new size; the contents must be right either way."""
    old_size, size = 1 * MiB, 4 * MiB
    path = create(tmp_path / "l1.qcow2", old_size, "cluster_size=512")
    base = path.read_bytes()
    inj = FaultInjector(record=True)
    model = GuestModel(size, log=inj.log)
    async with aioblock.open(str(path), "qcow2", engine="sync", options={"inject": inj}) as disk:
        io = Workload(disk, model, inj.log)
        await io.put(0, 8 * KiB, 1)
        await io.flush()
        await disk.truncate(size)
        await io.put(3 * MiB, 8 * KiB, 1)
        await io.put(512 * KiB, 4 * KiB, 1)
        await io.flush()
        await io.put(4 * KiB, 4 * KiB, 2)
        io.cut()
    assert {"l1_grow_write_table", "l1_grow_activate_table"} <= set(inj.events)
    rec = Recording(path, base, inj.log, list(inj.recorder.events), model, io.cuts)
    states = select_states(rec, prefixes=100, power=16, torn=16)
    verdict = await asyncio.to_thread(judge, rec, states, tmp_path)
    old_size_note = f"guest size is {old_size}, expected {size}"
    problems = [p for p in verdict.problems if not p.endswith(old_size_note)]
    print(f"\nl1 growth: {verdict}; {len(verdict.problems) - len(problems)} states show the old size")
    assert not problems, "\n".join(problems[:12])


# ---- 2. errors injected in the middle of an operation -------------------------------------------------------


@dataclass
class _Maybe:
    """A guest write or zero write that failed: its sectors may hold its data, until a later acknowledged write
    covers them (``versions``: how many versions each sector had when it failed)."""

    offset: int
    data: bytes
    versions: dict[int, int]


class FaultSession:
    """Guest requests that may fail. Acknowledged requests go into the model; failed writes may or may not
    have reached the guest (:meth:`verify` accepts either); every failure is kept with its error."""

    def __init__(self, disk: BlockBackend, model: GuestModel) -> None:
        self.disk = disk
        self.model = model
        self.failures: list[tuple[str, AioblockError]] = []
        self.maybe: list[_Maybe] = []
        self.failed_ranges: list[tuple[int, int, int]] = []        # offset, length, gen of failed writes
        self.acked_after_failure = 0

    async def _run(self, what: str, request: Awaitable[None]) -> bool:
        try:
            await request
        except AioblockError as exc:
            self.failures.append((what, exc))
            return False
        if self.failures:
            self.acked_after_failure += 1
        return True

    def _note_failed(self, offset: int, buf: bytes) -> None:
        first, end = offset // S, -(-(offset + len(buf)) // S)
        self.maybe.append(_Maybe(offset, buf, {i: len(self.model.versions(i)) for i in range(first, end)}))

    async def put(self, offset: int, length: int, gen: int) -> bool:
        buf = data(offset, length, gen)
        if await self._run(f"write {offset:#x}+{length:#x}", self.disk.write(offset, buf)):
            self.model.write(offset, buf)
            return True
        self._note_failed(offset, buf)
        self.failed_ranges.append((offset, length, gen))
        return False

    async def put_compressed(self, offset: int, length: int, gen: int) -> bool:
        buf = data(offset, length, gen)
        if await self._run(f"compressed write {offset:#x}", self.disk.write_compressed(offset, buf)):
            self.model.write(offset, buf)
            return True
        self._note_failed(offset, buf)
        self.failed_ranges.append((offset, length, gen))
        return False

    async def zeroes(self, offset: int, length: int, *, may_unmap: bool = False) -> bool:
        if await self._run(f"write_zeroes {offset:#x}+{length:#x}",
                           self.disk.write_zeroes(offset, length, may_unmap=may_unmap)):
            self.model.write_zeroes(offset, length)
            return True
        self._note_failed(offset, bytes(length))
        return False

    async def discard(self, offset: int, length: int) -> bool:
        """Whole clusters only (qcow2 discards nothing else, and the model reads discarded sectors as zeroes)."""
        if await self._run(f"discard {offset:#x}+{length:#x}", self.disk.discard(offset, length)):
            self.model.discard(offset, length)
            return True
        self._note_failed(offset, bytes(length))
        return False

    async def flush(self) -> bool:
        return await self._run("flush", self.disk.flush())

    async def retry_failed(self) -> None:
        """Write every range whose write failed again (a new generation); these must succeed now."""
        for offset, length, gen in list(self.failed_ranges):
            assert await self.put(offset, length, gen + 100), self.failures[-1]
        self.failed_ranges.clear()

    def verify(self, content: bytes, size: int | None = None) -> list[str]:
        """Sectors of ``content`` that hold neither the acknowledged content nor the data of a failed write
        made after the last acknowledged write to them."""
        expected = self.model.expected()
        if size is not None:
            expected = expected[:size]
        problems = []
        if len(content) != len(expected):
            problems.append(f"guest size {len(content)}, expected {len(expected)}")
        block = 64 * KiB
        for pos in range(0, min(len(content), len(expected)), block):
            if content[pos:pos + block] == expected[pos:pos + block]:
                continue
            for off in range(pos, min(pos + block, len(content)), S):
                got, exp = content[off:off + S], expected[off:off + S]
                if got == exp or self._excused(off // S, got):
                    continue
                problems.append(f"guest offset {off:#x}: holds {got[:16]!r}..., expected {exp[:16]!r}...")
        return problems[:10] + ([f"... {len(problems) - 10} more"] if len(problems) > 10 else [])

    def _excused(self, sector: int, got: bytes) -> bool:
        for m in self.maybe:
            n = m.versions.get(sector)
            if n is not None and n == len(self.model.versions(sector)):
                lo = sector * S - m.offset
                if m.data[lo:lo + S] == got:
                    return True
        return False


@dataclass(frozen=True)
class FaultCase:
    """Fail (once) the first ``op`` request after the ``event_nth``-th announcement of ``event``, during the
    scenario of ``image`` (FAULT_IMAGES)."""

    event: str | None             # None: the first ``op`` request touching ``range``
    image: str                    # a key of FAULT_IMAGES
    op: str = "modify"
    error: int = errno.EIO        # the errno injected
    event_nth: int = 1
    range: tuple[int, int] | None = None
    fenced_ok: bool = False       # a failure here may fence the node (and then requests fail with ENOMEDIUM)


FAULT_CASES = [
    FaultCase("l1_update", "64k"),
    FaultCase("l2_alloc_write", "64k"),
    FaultCase("write_aio", "64k", op="write"),                      # the data write of an allocation
    FaultCase("write_aio", "64k", op="write", error=errno.ENOSPC, event_nth=3),
    FaultCase("cow_write", "64k"),                                  # the COW part of an allocation
    FaultCase("l2_update", "64k"),                                  # L2 write-back (flush or dependency)
    FaultCase("refblock_update", "64k", event_nth=2),
    FaultCase("flush_to_disk", "64k", op="flush", event_nth=3),
    FaultCase("write_compressed", "64k"),
    FaultCase("l2_alloc_write", "512", event_nth=4),
    FaultCase("l1_update", "512", event_nth=5),
    FaultCase("refblock_alloc", "512"),                             # the write of a new refcount block
    FaultCase("refblock_alloc_hookup", "512"),                      # its reftable entry
    FaultCase("refblock_alloc_write_blocks", "grow"),
    FaultCase("refblock_alloc_write_table", "grow"),
    FaultCase("refblock_alloc_switch_table", "grow"),               # the header switch to the new reftable
    FaultCase("l1_grow_write_table", "l1"),
    FaultCase("l1_grow_activate_table", "l1"),
    FaultCase(None, "lazy", op="write", range=(72, 80)),            # setting the dirty bit (lazy refcounts)
    FaultCase("l2_alloc_write", "lazy"),
    FaultCase("write_aio", "lazy", op="write", event_nth=2),
    FaultCase("write_aio", "concurrent", op="write", event_nth=3),  # one of many allocations in flight
    FaultCase("cow_write", "concurrent", event_nth=5),
    FaultCase("l2_update", "concurrent"),
]


async def scenario_64k(s: FaultSession, cs: int) -> None:
    await s.put(5 * cs, cs, 1)                         # new L2 table, then an allocation
    await s.put(512, 1 * KiB, 1)                       # a new cluster past EOF: nothing to copy
    await s.put(cs, 2 * cs, 1)
    await s.put_compressed(12 * cs, cs, 1)
    await s.put(12 * cs + 512, 1 * KiB, 2)             # COW from a compressed cluster
    await s.flush()
    await s.put(cs + 512, 512, 2)                      # in place
    await s.put(8 * cs, cs, 1)
    await s.zeroes(2 * cs, cs, may_unmap=True)
    await s.put_compressed(13 * cs, cs, 1)
    await s.flush()
    await s.retry_failed()
    # new allocations after the failure: a cluster the failed request had must not be handed out twice
    await s.put(10 * cs, cs, 1)
    await s.put(11 * cs + 4 * KiB, 4 * KiB, 1)
    await s.flush()                                    # what failed allocations freed is reusable now
    await s.put(14 * cs, 2 * cs, 1)
    await s.put(20 * cs + 1 * KiB, 1 * KiB, 1)


async def scenario_512(s: FaultSession, cs: int) -> None:
    """Sequential 16 KiB writes: an L2 table per 32 KiB of guest, a refcount block per 256 host clusters."""
    for i in range(24):
        await s.put(i * 16 * KiB, 16 * KiB, 1)
        if i == 12:
            await s.flush()
    await s.discard(0, 8 * KiB)
    await s.flush()
    await s.retry_failed()
    for i in range(24, 36):
        await s.put(i * 16 * KiB + 512, 8 * KiB, 1)
    await s.flush()
    await s.put(2 * KiB, 4 * KiB, 2)


async def scenario_grow(s: FaultSession, cs: int) -> None:
    """Allocations that cross the file size the refcount table covers."""
    await s.discard(64 * KiB, 16 * KiB)
    await s.flush()
    for i in range(10):
        await s.put(GROW_PREFILL + i * 12 * KiB, 12 * KiB, 1)
        if i == 7:
            await s.flush()
    await s.flush()
    await s.retry_failed()
    await s.put(64 * KiB, 16 * KiB, 2)
    await s.put(GROW_SIZE - 4 * KiB, 4 * KiB, 1)
    await s.flush()


async def scenario_l1(s: FaultSession, cs: int) -> None:
    """Growing the image beyond what its L1 table covers (512-byte clusters: an L1 entry covers 32 KiB)."""
    await s.put(0, 8 * KiB, 1)
    await s.put(900 * KiB, 8 * KiB, 1)
    first = await s._run("truncate 4M", s.disk.truncate(4 * MiB))
    await s.put(4 * KiB, 8 * KiB, 2)
    await s.flush()
    if not first:
        assert await s._run("truncate 4M again", s.disk.truncate(4 * MiB)), s.failures[-1]
    await s.put(3 * MiB, 8 * KiB, 1)
    await s.put(4 * MiB - 4 * KiB, 4 * KiB, 1)
    await s.flush()


async def scenario_concurrent(s: FaultSession, cs: int) -> None:
    """Many allocating writes in flight at once (in one L2 slice), then overwrites of them, at once too. They
    reuse freed clusters, whose stale bytes the COW must replace with zeroes."""
    await s.put(0, 4 * KiB, 1)
    await s.put(cs, 15 * cs, 9)
    await s.flush()
    await s.discard(cs, 15 * cs)
    await s.flush()
    await asyncio.gather(*(s.put(i * cs + (i % 3) * KiB, 8 * KiB + (i % 2) * cs, 1) for i in range(1, 16)))
    await asyncio.gather(*(s.put(i * cs + 512, 1 * KiB, 2) for i in range(1, 16)))
    await s.flush()
    await s.retry_failed()
    await asyncio.gather(*(s.put(i * cs, 4 * KiB, 3) for i in range(20, 30)))
    await s.flush()


FAULT_IMAGES: dict[str, tuple[int, str, Callable[[FaultSession, int], Awaitable[None]]]] = {
    "64k": (4 * MiB, "", scenario_64k),
    "lazy": (4 * MiB, "lazy_refcounts=on", scenario_64k),
    "concurrent": (4 * MiB, "", scenario_concurrent),
    "512": (1 * MiB, "cluster_size=512", scenario_512),
    "grow": (GROW_SIZE, "", scenario_grow),
    "l1": (4 * MiB, "cluster_size=512", scenario_l1),
}


def _case_id(c: FaultCase) -> str:
    where = c.event if c.event is not None else f"{c.range[0]}-{c.range[1]}" if c.range else "any"
    return f"{where}-{c.image}-{c.op}-{errno.errorcode[c.error]}-{c.event_nth}"


@pytest.mark.parametrize("case", FAULT_CASES, ids=_case_id)
async def test_injected_error(case: FaultCase, tmp_path: Path) -> None:
    size, opts, scenario = FAULT_IMAGES[case.image]
    path = tmp_path / "img.qcow2"
    base_content = None
    if case.image == "grow":
        base_content = make_growth_image(path)
    elif case.image == "l1":
        create(path, 1 * MiB, opts)
    else:
        create(path, size, opts)
    cs = 512 if opts.startswith("cluster_size=512") or case.image == "grow" else 64 * KiB
    inj = FaultInjector()
    rule: Rule = inj.fail(op=case.op, errno=case.error, after_event=case.event, event_nth=case.event_nth,
                          range=case.range)
    model = GuestModel(size, base=base_content)
    async with aioblock.open(str(path), "qcow2", engine="sync", options={"inject": inj}) as disk:
        s = FaultSession(disk, model)
        await scenario(s, cs)
        assert rule.fired == 1, f"the rule never fired: events seen {sorted(set(inj.events))}"
        assert s.failures, "the injected error reached no guest request"
        first_what, first_exc = s.failures[0]
        print(f"\n{_case_id(case)}: {first_what} failed: {first_exc}")
        later = s.failures[1:]
        fenced = any(getattr(exc, "errno", None) == errno.ENOMEDIUM for _, exc in later)
        if fenced:
            assert case.fenced_ok, f"fenced after {first_what}: {first_exc}; then {later}"
        else:
            assert not later, f"after the injected failure of {first_what} ({first_exc}) these failed too: {later}"
            assert s.acked_after_failure >= 4, f"{first_what} failed too late in the scenario to test what follows"
            content = await disk.read(0, size)
            problems = s.verify(content)
            assert not problems, f"in the same session, after {first_what} failed:\n" + "\n".join(problems)
    # the closed image: clean or leaks only, and the same guest content for QEMU and for a new aioblock open
    res = qemu_img_check(path, "qcow2")
    assert res.returncode in (0, 3), res.stdout + res.stderr
    problems = s.verify(qemu_guest_content(path, "qcow2"))
    assert not problems, "after close (qemu-img convert):\n" + "\n".join(problems)
    async with aioblock.open(str(path), "qcow2", engine="sync") as disk:
        problems = s.verify(await disk.read(0, size))
        assert not problems, "after reopening:\n" + "\n".join(problems)
        await disk.write(0, data(0, 4 * KiB, 7))       # still writable
    res = qemu_img_check(path, "qcow2")
    assert res.returncode in (0, 3), res.stdout + res.stderr


# ---- 4. a read while an allocation is paused ------------------------------------------------------------------

PAUSE_KINDS = ["unallocated", "backing", "zero-over-backing", "compressed", "extl2-subcluster"]


@pytest.mark.parametrize("kind", PAUSE_KINDS)
async def test_read_during_paused_allocation(kind: str, tmp_path: Path) -> None:
    """Hold the first file write of an allocation (announced by ``cluster_alloc``): a concurrent read of the
    cluster returns its old contents, a second write to it waits, other clusters go on; release: all completes."""
    cs, size = 64 * KiB, 1 * MiB
    c = 2 * cs                                                   # the guest cluster being allocated
    backing: bytes | None = None
    opts = "extended_l2=on" if kind.startswith("extl2") else ""
    if kind == "unallocated":
        path = create(tmp_path / "p.qcow2", size)
    else:
        backing = make_backing(tmp_path / "b.raw", size)
        path = create(tmp_path / "p.qcow2", size, opts, backing=tmp_path / "b.raw")
    model = GuestModel(size, base=backing)
    inj = FaultInjector()
    async with aioblock.open(str(path), "qcow2", engine="sync", options={"inject": inj}) as disk:
        io = Workload(disk, model, [])
        await io.put(6 * cs, 4 * KiB, 1)                         # the L2 table exists beforehand
        if kind == "zero-over-backing":
            await io.write_zeroes(c, cs)                         # zero flag, no host cluster
        elif kind == "compressed":
            await io.put_compressed(c, cs, 1)
        elif kind == "extl2-subcluster":
            await io.put(c, 2 * KiB, 1)                          # subcluster 0 allocated, the rest backing data
        await disk.flush()
        old = model.expected()[c:c + cs]
        # no new host cluster for a subcluster of an allocated cluster: hold its first write instead
        gate = inj.pause(op="modify") if kind == "extl2-subcluster" else inj.pause_after_event("cluster_alloc")
        first = asyncio.create_task(io.put(c + 4 * KiB, 4 * KiB, 2))
        held = await asyncio.wait_for(gate.wait_paused(), 10)
        assert held.op in ("write", "write_zeroes")
        try:
            assert await asyncio.wait_for(disk.read(c, cs), 10) == old
            second = asyncio.create_task(io.put(c + 16 * KiB, 4 * KiB, 3))
            await asyncio.sleep(0.02)
            assert await asyncio.wait_for(disk.read(c, cs), 10) == old
            await asyncio.wait_for(io.put(8 * cs + 512, 1 * KiB, 1), 10)      # elsewhere: not held up
            assert await asyncio.wait_for(disk.read(8 * cs, cs), 10) == model.expected()[8 * cs:9 * cs]
            assert not first.done()
        finally:
            gate.remove()
        await asyncio.wait_for(asyncio.gather(first, second), 10)
        assert await disk.read(0, size) == model.expected()
    res = qemu_img_check(path, "qcow2")
    assert res.returncode == 0, res.stdout + res.stderr
    assert qemu_guest_content(path, "qcow2") == model.expected()


# ---- 3. SIGKILL of aioblock io ---------------------------------------------------------------------------------

KILL_SIZE = 8 * MiB
KILL_OPTS = "cluster_size=512"


def kill_commands(seed: int) -> tuple[list[str], GuestModel]:
    """Phases of concurrent allocating aio_writes (each with its own pattern byte, so a sector holding another
    sector's data is caught), zero writes and discards, with flushes and pauses in between (the background
    metadata flusher runs during the pauses). Returns the command list and the model of every write in it."""
    rng = random.Random(seed)
    model = GuestModel(KILL_SIZE)
    cmds: list[str] = []
    pat = 0
    for phase in range(3):
        used: set[int] = set()                    # sectors of this phase: requests of a phase never overlap
        for _ in range(80):
            pat += 1
            off, n = _free_range(rng, used, [1, 2, 7, 16, 33, 64])
            cmds.append(f"aio_write -q -P {pat} {off} {n}")
            model.write(off, bytes([pat]) * n)
        if phase:
            for _ in range(6):
                off, n = _free_range(rng, used, [1, 8, 16])
                if rng.random() < 0.5:
                    cmds.append(f"aio_write -q -z {'-u ' if rng.random() < 0.5 else ''}{off} {n}")
                    model.write_zeroes(off, n)
                else:
                    cmds.append(f"discard -q {off} {n}")
                    model.discard(off, n)
        cmds += ["aio_flush", "flush", "sleep 600"]
    return cmds, model


def _free_range(rng: random.Random, used: set[int], sizes: Sequence[int]) -> tuple[int, int]:
    """A random range of ``rng.choice(sizes)`` sectors that overlaps no sector in ``used`` (which it joins)."""
    while True:
        n = rng.choice(sizes)
        first = rng.randrange(KILL_SIZE // S - n)
        if used.isdisjoint(range(first, first + n)):
            used.update(range(first, first + n))
            return first * S, n * S


def aioblock_io(image: Path, cmds: Sequence[str]) -> subprocess.Popen[bytes]:
    """Start ``python -m aioblock io -f qcow2 -c CMD ... IMAGE``."""
    argv = [sys.executable, "-m", "aioblock", "io", "-f", "qcow2"]
    for c in cmds:
        argv += ["-c", c]
    return subprocess.Popen([*argv, str(image)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def recover_and_judge(image: Path, model: GuestModel, *, durable_flushes: int = 0) -> list[str]:
    """The rw-open repair by aioblock, then qemu-img check and the data oracle; and the same after a rw open by
    qemu-io on a copy."""
    problems = []
    copy = image.with_suffix(".qemu")
    copy.write_bytes(image.read_bytes())
    res = subprocess.run([sys.executable, "-m", "aioblock", "io", "-f", "qcow2", "-c", "read -q 0 512", str(image)],
                         capture_output=True, text=True, timeout=120)
    if res.returncode:
        problems.append(f"aioblock rw open: rc {res.returncode}: {res.stdout}{res.stderr}")
    res = qemu_img_check(image, "qcow2")
    if res.returncode not in (0, 3):
        problems.append(f"qemu-img check after aioblock's rw open: rc {res.returncode}: {res.stdout}{res.stderr}")
    problems += model.violations(qemu_guest_content(image, "qcow2"), durable_flushes=durable_flushes)
    res = qemu_io_rw_open(copy, "qcow2")
    if res.returncode:
        problems.append(f"qemu-io rw open: {res.stdout}{res.stderr}")
    res = qemu_img_check(copy, "qcow2")
    if res.returncode not in (0, 3):
        problems.append(f"qemu-img check after qemu-io's rw open: rc {res.returncode}: {res.stdout}{res.stderr}")
    return problems


def test_sigraise_after_flush(tmp_path: Path) -> None:
    """A kill at a known point (``sigraise 9`` after a flush and more unflushed work): everything before the
    flush is durable."""
    cmds, model = kill_commands(1)
    cut = cmds.index("flush", len(cmds) // 2)
    model_flushes = sum(1 for c in cmds[:cut + 1] if c == "flush")
    # a fresh model: every write up to the kill, with the flushes noted where they happened
    model = GuestModel(KILL_SIZE)
    for c in cmds[:cut + 1] + cmds[cut + 2:cut + 60]:
        _note(model, c)
    cmds = cmds[:cut + 1] + cmds[cut + 2:cut + 60] + ["aio_flush", "sigraise 9"]
    image = create(tmp_path / "k.qcow2", KILL_SIZE, KILL_OPTS)
    proc = aioblock_io(image, cmds)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == -signal.SIGKILL, err
    problems = recover_and_judge(image, model, durable_flushes=model_flushes)
    assert not problems, "\n".join(problems[:12])


def _note(model: GuestModel, cmd: str) -> None:
    words = cmd.split()
    if words[0] == "flush":
        model.flush(log_position=0)
    elif words[0] == "discard":
        model.discard(int(words[-2]), int(words[-1]))
    elif words[0] == "aio_write" and "-z" in words:
        model.write_zeroes(int(words[-2]), int(words[-1]))
    elif words[0] == "aio_write":
        model.write(int(words[-2]), bytes([int(words[words.index("-P") + 1])]) * int(words[-1]))


@pytest.mark.slow
@pytest.mark.parametrize("lazy", [False, True], ids=["refcounts", "lazy-refcounts"])
def test_sigkill_at_random_moments(lazy: bool, tmp_path: Path) -> None:
    cmds, model = kill_commands(2)
    opts = KILL_OPTS + (",lazy_refcounts=on" if lazy else "")
    pristine = create(tmp_path / "pristine.qcow2", KILL_SIZE, opts)
    image = tmp_path / "k.qcow2"
    # the whole run, not killed: it must end clean and hold exactly the model's content; it times the kills
    image.write_bytes(pristine.read_bytes())
    t0 = time.monotonic()
    proc = aioblock_io(image, cmds)
    _, err = proc.communicate(timeout=300)
    duration = time.monotonic() - t0
    assert proc.returncode == 0, err
    assert qemu_img_check(image, "qcow2").returncode == 0
    assert qemu_guest_content(image, "qcow2") == model.expected()
    rng = random.Random(3 if lazy else 4)
    killed = 0
    for _ in range(4):
        image.write_bytes(pristine.read_bytes())
        proc = aioblock_io(image, cmds)
        time.sleep(rng.uniform(0.2, duration))
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=60)
        killed += proc.returncode == -signal.SIGKILL
        problems = recover_and_judge(image, model)
        assert not problems, f"killed after {duration:.2f}s:\n" + "\n".join(problems[:12])
    print(f"\nsigkill ({'lazy' if lazy else 'plain'}): a run takes {duration:.2f}s; {killed} of 4 runs killed mid-way")
    assert killed >= 2


# ---- regressions: driver bugs this file found -------------------------------------------------------------


async def test_compressed_packing_after_the_cluster_was_freed_and_reused(tmp_path: Path) -> None:
    cs = 64 * KiB
    path = create(tmp_path / "c.qcow2", 1 * MiB)
    no_log: list[LogEntry] = []
    model = GuestModel(1 * MiB, log=no_log)
    async with aioblock.open(str(path), "qcow2", engine="sync") as disk:
        io = Workload(disk, model, no_log)
        await io.put(0, 4 * KiB, 1)
        await io.put_compressed(2 * cs, cs, 1)        # packed at the start of host cluster X
        await io.discard(2 * cs, cs)                  # X's refcount drops to 0
        await io.flush()                              # X may be reused
        await io.put(5 * cs, cs, 1)                   # a data cluster: X
        await io.put_compressed(7 * cs, cs, 1)        # packed after the first one's bytes: inside X
        assert await disk.read(0, 1 * MiB) == model.expected()
    assert qemu_img_check(path, "qcow2").returncode == 0


async def test_failed_background_sync_fails_the_next_guest_flush(tmp_path: Path) -> None:
    path = create(tmp_path / "f.qcow2", 1 * MiB)
    inj = FaultInjector()
    async with aioblock.open(str(path), "qcow2", engine="sync", options={"inject": inj}) as disk:
        await disk.write(0, data(0, 4 * KiB, 1))
        await disk.flush()
        await disk.write(8 * KiB, data(8 * KiB, 4 * KiB, 2))       # in place: only in the page cache so far
        await disk.write(64 * KiB, data(64 * KiB, 4 * KiB, 1))     # dirty metadata: the flusher will run
        rule = inj.fail(op="flush")                                # ... and its fdatasync fails (EIO)
        for _ in range(200):                                       # the flusher runs FLUSH_DELAY later
            if rule.fired:
                break
            await asyncio.sleep(0.05)
        assert rule.fired == 1
        # after a failed fdatasync the kernel may have dropped the dirty pages: a flush must not say "durable"
        with pytest.raises(AioblockError):
            await disk.flush()


async def test_discard_during_in_place_write_cannot_hit_a_reused_cluster(tmp_path: Path) -> None:
    cs = 64 * KiB
    far = 600 * MiB                                      # another L2 table's range (an L2 table maps 512 MiB)
    path = create(tmp_path / "r.qcow2", 1024 * MiB)
    inj = FaultInjector()
    async with aioblock.open(str(path), "qcow2", engine="sync", options={"inject": inj}) as disk:
        await disk.write(0, data(0, cs, 1))
        await disk.flush()
        gate = inj.pause(op="write")
        write = asyncio.create_task(disk.write(0, data(0, 4 * KiB, 2)))    # in place, held at the file
        await asyncio.wait_for(gate.wait_paused(), 10)
        await disk.discard(0, cs)                         # the guest discards the same cluster meanwhile
        await disk.flush()                                # its host cluster becomes reusable
        await disk.write(far, data(far, 4 * KiB, 1))      # a new L2 table takes it
        gate.release()
        await asyncio.wait_for(write, 10)
    res = qemu_img_check(path, "qcow2")
    assert res.returncode in (0, 3), res.stdout
    async with aioblock.open(str(path), "qcow2", engine="sync") as disk:
        assert await disk.read(far, 4 * KiB) == data(far, 4 * KiB, 1)
