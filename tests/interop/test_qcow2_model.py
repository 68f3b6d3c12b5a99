"""A hypothesis model test of the qcow2 driver: random sequences of read / write / write_zeroes / discard / flush /
reopen, and batches of concurrent requests, run through the public API (``aioblock.open``) against an in-memory
model of the guest disk.

**The model** is a ``bytearray`` of the guest disk, starting as zeroes (or as the backing file's content, cut or
zero-padded to the guest size). It follows QEMU 7.2's qcow2 semantics exactly, as checked with qemu-io:

- ``write`` (sometimes with FUA): the bytes written. Data is a pattern that names its write (generation) and its
  8-byte slot of the guest disk, so a mismatch says which write the bytes came from and whether they were shifted.
- ``write_zeroes`` (with and without ``may_unmap``, sometimes FUA): exact zeroes over the range (v2 over a backing
  file: zero buffers are written).
- ``discard``: only the whole clusters inside the range (and the partial cluster at the end of the image when the
  range reaches it) are discarded; they then read as zeroes (v3: zero flag or unallocated; v2 without a backing
  file: unallocated). On a v2 image with a backing file QEMU ignores discards (an unallocated cluster would
  expose the backing file and v2 has no zero flag), so the model changes nothing.
- ``read``: compared with the model.
- *cancelled* requests (any single request, and members of batches, now and then): cancelled after a few loop
  ticks; a cancelled request must have completed wholly or left no trace (aioblock.cancellation), so its range
  is read back and must hold either the old bytes or the new ones, never a mixture; the model takes what it
  holds.
- ``flush``: no change; ``reopen``: close (``qemu-img check`` must be clean) and open read-write again. Every open
  (the first one too) picks an I/O engine (sync, threads, uring where io_uring works), a cache mode (page cache,
  or O_DIRECT where the file system has it: then requests and metadata writes smaller than the file's alignment
  are read-modify-writes), default or tiny metadata caches (slices written back on eviction), and a normal or an
  *eager* background flusher (dirty metadata written back as soon as the loop is idle, and a 5 ms cache-clean
  interval, so that write-backs run among the requests instead of 0.5 s after them).
- a concurrent batch (``asyncio.gather``) of writes, zero writes, discards, reads and flushes: either adjacent
  pieces of one range (they share clusters and subclusters, but no byte), or independent random ranges. When no
  two mutating requests of a batch share a byte, the model applies them all (the order does not matter); when
  some do, each byte must afterwards hold the value of one of the requests covering it (any order, per byte),
  bytes no request covers must be unchanged, and the model then takes what the disk says. A read in a batch must
  see, per byte, the old value or that of a request covering the byte.

**The oracles**, for every example: each read (and each read of a batch) against the model; no exception from any
request; at the end, the whole disk read through aioblock equals the model; then, after ``close``, ``qemu-img
check`` exits 0 (no corruption, no leaked clusters: also after every reopen) and the guest content as QEMU reads it
(``qemu-img convert -O raw``) is byte-identical to the model.

Image configurations: v3 with 64 KiB clusters; v2 (compat=0.10) with 4 KiB clusters; 512-byte clusters with
1-bit refcounts; extended L2 with 64 KiB clusters; lazy refcounts with 4 KiB clusters and a guest size that is not
a whole number of clusters; v3 over a raw backing file shorter than the guest (and not a whole number of sectors);
v2 with 4 KiB clusters over a qcow2 backing file with 64 KiB clusters, partly allocated.

The last tests reproduce a driver bug this model test found (see their docstrings).

``AIOBLOCK_MODEL_EXAMPLES=N`` sets the examples per configuration (default 40); ``AIOBLOCK_MODEL_RANDOM=1`` explores
new random examples instead of the fixed (derandomized) set; ``AIOBLOCK_MODEL_SHRINK=1`` lets hypothesis shrink a
failing example to a short one (off by default: a racy failure can take minutes to shrink; the failure message
names the step, and the write each generation of data comes from).
"""

from __future__ import annotations

import asyncio
import itertools
import os
import random
import shutil
import subprocess
import sys
import tempfile
from array import array
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, Phase, currently_in_test_context, event, given, settings
from hypothesis import strategies as st

import aioblock
from aioblock.backend import BlockBackend
from aioblock.drivers.qcow2 import driver as qcow2_driver
from aioblock.io.file import available_engines

from ..conftest import QEMU_IMG, QEMU_IO, needs_qemu

pytestmark = needs_qemu

KiB = 1024
MiB = 1024 * KiB

EXAMPLES = int(os.environ.get("AIOBLOCK_MODEL_EXAMPLES", "40"))
RANDOM = os.environ.get("AIOBLOCK_MODEL_RANDOM", "") not in ("", "0")
SHRINK = os.environ.get("AIOBLOCK_MODEL_SHRINK", "") not in ("", "0")
PHASES = [Phase.explicit, Phase.reuse, Phase.generate, *([Phase.shrink] if SHRINK else [])]


# ---- image configurations ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Config:
    name: str
    opts: str                          #: qemu-img create -o
    size: int                          #: guest size
    cluster_size: int
    version: int = 3
    subclusters: int = 1               #: 32 with extended L2
    backing: str | None = None         #: None, "raw" or "qcow2"
    backing_size: int = 0

    @property
    def subcluster_size(self) -> int:
        return self.cluster_size // self.subclusters


CONFIGS = [
    Config("v3-64k", "cluster_size=64k", 4 * MiB, 64 * KiB),
    Config("v2-4k", "compat=0.10,cluster_size=4k", 2 * MiB, 4 * KiB, version=2),
    Config("v3-512-rc1", "cluster_size=512,refcount_bits=1", 1 * MiB, 512),
    Config("extl2-64k", "extended_l2=on,cluster_size=64k", 4 * MiB, 64 * KiB, subclusters=32),
    Config("lazy-4k", "lazy_refcounts=on,cluster_size=4k", 3 * MiB - 1536, 4 * KiB),
    Config("v3-64k-raw-backing", "cluster_size=64k", 4 * MiB, 64 * KiB, backing="raw",
           backing_size=3 * MiB - 1000),
    Config("v2-4k-qcow2-backing", "compat=0.10,cluster_size=4k", 2 * MiB, 4 * KiB, version=2, backing="qcow2",
           backing_size=3 * MiB // 2),
]


# ---- QEMU's tools ---------------------------------------------------------------------------------------------

def tool(*argv: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=120)


def qemu_img(*args: str | Path) -> subprocess.CompletedProcess[str]:
    assert QEMU_IMG is not None
    res = tool(QEMU_IMG, *args)
    assert res.returncode == 0, f"qemu-img {' '.join(map(str, args))}: rc {res.returncode}\n{res.stdout}{res.stderr}"
    return res


def qemu_check(image: Path, when: str) -> None:
    assert QEMU_IMG is not None
    res = tool(QEMU_IMG, "check", "-f", "qcow2", image)
    assert res.returncode == 0, f"qemu-img check {when}: rc {res.returncode}\n{res.stdout}{res.stderr}"


def qemu_content(image: Path) -> bytes:
    """The guest content as QEMU reads it (backing chain included)."""
    out = image.with_name(image.name + ".raw")
    qemu_img("convert", "-f", "qcow2", "-O", "raw", image, out)
    try:
        return out.read_bytes()
    finally:
        out.unlink()


def make_backing(cfg: Config, directory: Path) -> tuple[Path, bytes] | None:
    """The backing file of a configuration and its guest content (random data, so that it is recognisable)."""
    if cfg.backing is None:
        return None
    rng = random.Random(cfg.name)
    if cfg.backing == "raw":
        path = directory / "backing.raw"
        content = rng.randbytes(cfg.backing_size)
        path.write_bytes(content)
        return path, content
    path = directory / "backing.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=64k", path, str(cfg.backing_size))
    cmds: list[str] = []
    for _ in range(12):            # scattered patterns, some sub-cluster, some over cluster boundaries
        off = rng.randrange(0, cfg.backing_size - 200 * KiB) // 512 * 512
        cmds += ["-c", f"write -q -P {rng.randrange(1, 255)} {off} {rng.randrange(1, 400) * 512}"]
    cmds += ["-c", f"write -q -z {64 * KiB} {64 * KiB}"]
    assert QEMU_IO is not None
    res = tool(QEMU_IO, "-f", "qcow2", *cmds, path)
    assert res.returncode == 0, res.stdout + res.stderr
    return path, qemu_content(path)


def o_direct_supported(directory: Path) -> bool:
    flag = getattr(os, "O_DIRECT", 0)
    if not flag:
        return False
    probe = directory / "o_direct_probe"
    try:
        fd = os.open(probe, os.O_CREAT | os.O_RDWR | flag, 0o600)
    except OSError:
        return False
    os.close(fd)
    probe.unlink()
    return True


# ---- operations ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Op:
    kind: str                      #: write | zeroes | discard | read | flush | reopen | batch
    offset: int = 0
    length: int = 0
    unmap: bool = False            #: zeroes: may_unmap
    fua: bool = False              #: write, zeroes
    engine: str = ""               #: reopen
    cache: str = ""                #: reopen: writeback | none
    tiny: bool = False             #: reopen: tiny metadata caches
    eager: bool = False            #: reopen: the background metadata flusher runs as soon as it can
    ops: tuple[Op, ...] = ()       #: batch
    cancel: int = -1               #: cancel the request after this many loop ticks (-1: never)

    @property
    def end(self) -> int:
        return self.offset + self.length

    def __repr__(self) -> str:
        if self.kind in ("write", "zeroes", "read", "discard"):
            flags = "".join(f", {f}" for f, on in (("unmap", self.unmap), ("fua", self.fua)) if on)
            if self.cancel >= 0:
                flags += f", cancel after {self.cancel} ticks"
            return f"{self.kind}({self.offset:#x}, {self.length:#x}{flags})"
        if self.kind == "reopen":
            flags = "".join(f", {f}" for f, on in (("tiny", self.tiny), ("eager", self.eager)) if on)
            return f"reopen({self.engine}, {self.cache}{flags})"
        if self.kind == "batch":
            return f"batch({', '.join(map(repr, self.ops))})"
        return f"{self.kind}()"

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:     # how hypothesis prints a failing example
        printer.text(repr(self))


ENGINES = available_engines()


def ranges(cfg: Config) -> st.SearchStrategy[tuple[int, int]]:
    """(offset, length) inside the guest: mostly near cluster (and subcluster) boundaries of the first clusters,
    some anywhere, some reaching the end of the image; lengths from one byte to many clusters."""
    cs, sc, size = cfg.cluster_size, cfg.subcluster_size, cfg.size
    nclusters = -(-size // cs)
    hot = min(nclusters, max(8, 256 * KiB // cs))
    deltas = sorted({d for d in (1, 512, sc, sc + 512, cs // 2, cs - sc, cs - 512, cs - 1) if 0 < d < cs})
    lengths = st.one_of(
        st.integers(1, 600),
        st.integers(1, cs),
        st.sampled_from(sorted({512, sc, cs - 512, cs, 2 * cs} - {0})),
        st.integers(cs, max(4 * cs, 64 * KiB)),
    )
    big = st.integers(cs, size // 2)            # now and then: many L2 tables / a new refcount block

    @st.composite
    def build(draw: st.DrawFn) -> tuple[int, int]:
        length = draw(big if draw(st.integers(0, 29)) == 29 else lengths)
        if draw(st.integers(0, 11)) == 0:                        # up to the end of the image
            length = min(length, size)
            return size - length, length
        index = draw(st.one_of(st.integers(0, 3), st.integers(0, hot - 1), st.integers(0, nclusters - 1)))
        delta = draw(st.one_of(st.just(0), st.sampled_from(deltas), st.integers(0, cs - 1)))
        offset = min(index * cs + delta, size - 1)
        return offset, min(length, size - offset)

    return build()


def requests(cfg: Config, kinds: Sequence[str]) -> st.SearchStrategy[Op]:
    @st.composite
    def build(draw: st.DrawFn) -> Op:
        kind = draw(st.sampled_from(kinds))
        if kind == "flush":
            return Op("flush")
        offset, length = draw(ranges(cfg))
        return request(draw, kind, offset, length)
    return build()


def request(draw: st.DrawFn, kind: str, offset: int, length: int) -> Op:
    unmap = kind == "zeroes" and draw(st.booleans())
    fua = kind in ("write", "zeroes") and draw(st.integers(0, 9)) == 0
    cancel = draw(st.integers(0, 6)) if draw(st.integers(0, 7)) == 0 else -1
    return Op(kind, offset, length, unmap=unmap, fua=fua, cancel=cancel)


def batches(cfg: Config) -> st.SearchStrategy[Op]:
    piece_kinds = ["write", "write", "write", "zeroes", "discard", "read"]
    cs, sc = cfg.cluster_size, cfg.subcluster_size
    piece_lengths = st.one_of(st.integers(1, 2 * sc), st.integers(1, 2 * cs),
                              st.sampled_from(sorted({512, sc, cs})))

    @st.composite
    def adjacent(draw: st.DrawFn) -> Op:
        """2..12 requests on adjacent pieces of one range (sharing clusters, never a byte)."""
        pos, _ = draw(ranges(cfg))
        pieces: list[Op] = []
        for _ in range(draw(st.integers(2, 12))):
            if pos >= cfg.size:
                break
            length = min(draw(piece_lengths), cfg.size - pos)
            kind = draw(st.sampled_from(piece_kinds))
            pieces.append(request(draw, kind, pos, length))
            pos += length + draw(st.sampled_from([0, 0, 0, 1, 512]))
        return Op("batch", ops=tuple(pieces))

    @st.composite
    def independent(draw: st.DrawFn) -> Op:
        """2..8 requests on random ranges (which may overlap), flushes among them."""
        ops = draw(st.lists(requests(cfg, [*piece_kinds, "flush"]), min_size=2, max_size=8))
        return Op("batch", ops=tuple(ops))

    return st.one_of(adjacent(), independent())


def reopens(direct: bool) -> st.SearchStrategy[Op]:
    return st.builds(lambda engine, cache, tiny, eager: Op("reopen", engine=engine, cache=cache, tiny=tiny,
                                                           eager=eager),
                     st.sampled_from(ENGINES), st.sampled_from(["writeback", "none"] if direct else ["writeback"]),
                     st.booleans(), st.booleans())


def op_lists(cfg: Config, direct: bool) -> st.SearchStrategy[list[Op]]:
    simple = requests(cfg, ["write", "write", "write", "zeroes", "discard", "read", "read", "flush"])
    batch, reopen = batches(cfg), reopens(direct)

    @st.composite
    def op(draw: st.DrawFn) -> Op:
        choice = draw(st.integers(0, 19))        # 75% single requests, 20% batches, 5% reopens
        return draw(simple if choice < 15 else batch if choice < 19 else reopen)

    return st.lists(op(), min_size=6, max_size=50)


async def cancel_after(task: asyncio.Future[Any], n: int) -> None:
    for _ in range(n):
        await asyncio.sleep(0)
    task.cancel()


# ---- data patterns -------------------------------------------------------------------------------------------

def pattern(offset: int, length: int, gen: int) -> bytes:
    """The bytes write ``gen`` puts at ``offset``: 8-byte slots (generation: 16 bits, slot index: 32 bits, 0x5aa5),
    big-endian, so that a slot names the write and the place it belongs to."""
    first, last = offset // 8, -(-(offset + length) // 8)
    words = array("Q", [(gen << 48) | ((i & 0xFFFFFFFF) << 16) | 0x5AA5 for i in range(first, last)])
    if sys.byteorder == "little":
        words.byteswap()
    skip = offset - first * 8
    return words.tobytes()[skip:skip + length]


def describe(data: bytes, offset: int) -> str:
    """The 8-byte slot holding ``offset`` in ``data`` (guest bytes from offset 0), and what it looks like."""
    start = offset // 8 * 8
    slot = data[start:start + 8]
    if slot == bytes(8):
        what = "zeroes"
    elif len(slot) == 8 and slot[6:] == b"\x5a\xa5":
        what = f"write gen {int.from_bytes(slot[:2], 'big')} for slot {int.from_bytes(slot[2:6], 'big') * 8:#x}"
    else:
        what = "other data"
    return f"{slot.hex()} ({what})"


def first_difference(actual: bytes, expected: bytes) -> int:
    lo, hi = 0, min(len(actual), len(expected))
    while hi - lo > 4096:                         # bisect on chunk equality, then scan
        mid = (lo + hi) // 2
        if actual[lo:mid] != expected[lo:mid]:
            hi = mid
        else:
            lo = mid
    return next((i for i in range(lo, hi) if actual[i] != expected[i]), hi)


# ---- running an example --------------------------------------------------------------------------------------

class Mismatch(AssertionError):
    pass


class Runner:
    def __init__(self, cfg: Config, path: Path, model: bytearray) -> None:
        self.cfg = cfg
        self.path = path
        self.model = model
        self.disk: BlockBackend | None = None
        self.gen = 0
        self.history: list[str] = []             #: what each generation was (index: generation - 1)
        self.step = ""

    # -- helpers --

    async def open(self, mode: Op) -> None:
        options: dict[str, Any] = {}
        if mode.tiny:
            options = {"l2-cache-size": 1024, "l2-cache-entry-size": 512,
                       "refcount-cache-size": 2 * self.cfg.cluster_size}
        if mode.eager:
            options["cache-clean-interval"] = 0.005
        # "eager": the background flusher writes dirty metadata back as soon as the loop is idle (instead of
        # 0.5 s later), so that its write-backs run between and during the requests. The delay is a module
        # constant the driver reads when it opens an image.
        delay = qcow2_driver.FLUSH_DELAY
        if mode.eager:
            qcow2_driver.FLUSH_DELAY = 0.0
        try:
            self.disk = await aioblock.open(str(self.path), "qcow2", engine=mode.engine, cache=mode.cache,
                                            options=options)
        finally:
            qcow2_driver.FLUSH_DELAY = delay

    @property
    def d(self) -> BlockBackend:
        assert self.disk is not None
        return self.disk

    def new_data(self, op: Op) -> bytes:
        self.gen += 1
        self.history.append(f"{op!r} in step {self.step}")
        return pattern(op.offset, op.length, self.gen)

    def discarded(self, op: Op) -> tuple[int, int] | None:
        """The range a discard turns into zeroes (QEMU: whole clusters, and the tail of the image)."""
        cs = self.cfg.cluster_size
        start, end = -(-op.offset // cs) * cs, op.end
        if end != self.cfg.size:
            end -= end % cs
        if start >= end or (self.cfg.version < 3 and self.cfg.backing is not None):
            return None
        return start, end

    def effect(self, op: Op) -> tuple[int, bytes] | None:
        """(offset, bytes) a mutating request puts into the model (None: no change)."""
        if op.kind == "write":
            return op.offset, self.new_data(op)
        if op.kind == "zeroes":
            return op.offset, bytes(op.length)
        if op.kind == "discard":
            r = self.discarded(op)
            return None if r is None else (r[0], bytes(r[1] - r[0]))
        return None

    def submit(self, op: Op, effect: tuple[int, bytes] | None) -> Awaitable[Any]:
        d = self.d
        if op.kind == "write":
            assert effect is not None
            return d.write(op.offset, effect[1], fua=op.fua)
        if op.kind == "zeroes":
            return d.write_zeroes(op.offset, op.length, may_unmap=op.unmap, fua=op.fua)
        if op.kind == "discard":
            return d.discard(op.offset, op.length)
        if op.kind == "read":
            return d.read(op.offset, op.length)
        assert op.kind == "flush", op
        return d.flush()

    def fail(self, what: str, offset: int, actual: bytes, expected: bytes) -> Mismatch:
        """A mismatch at guest ``offset``; ``actual`` and ``expected`` hold guest bytes from guest offset 0 (at
        least up to the slot of ``offset``)."""
        gens = "\n".join(f"  gen {i + 1}: {h}" for i, h in enumerate(self.history))
        return Mismatch(f"{self.cfg.name}: {what} differs at guest offset {offset:#x} (step {self.step}); "
                        f"slot {offset // 8 * 8:#x}: expected {describe(expected, offset)}, "
                        f"got {describe(actual, offset)}\nwrites:\n{gens}")

    def compare(self, what: str, offset: int, actual: bytes) -> None:
        expected = bytes(self.model[offset:offset + len(actual)])
        if actual != expected:
            i = first_difference(actual, expected)
            pad = bytes(offset)
            raise self.fail(what, offset + i, pad + actual, pad + expected)

    def check_candidates(self, what: str, offset: int, actual: bytes, old: bytes,
                         effects: Sequence[tuple[int, bytes]], allow_old: bool,
                         maybe: Sequence[tuple[int, bytes]] = ()) -> None:
        """Each byte of ``actual`` (the disk at ``offset``) must come from one of the ``effects`` or ``maybe``
        (cancelled requests) covering it, or be ``old``, the model before the batch, when ``allow_old`` or when
        no effect covers it."""
        end = offset + len(actual)
        points = {offset, end}
        for eoff, edata in effects:
            points.update(p for p in (eoff, eoff + len(edata)) if offset < p < end)
        for eoff, edata in maybe:
            points.update(p for p in (eoff, eoff + len(edata)) if offset < p < end)
        cuts = sorted(points)
        for a, b in itertools.pairwise(cuts):
            covering = [edata[a - eoff:b - eoff] for eoff, edata in effects if eoff <= a and b <= eoff + len(edata)]
            optional = [edata[a - eoff:b - eoff] for eoff, edata in maybe if eoff <= a and b <= eoff + len(edata)]
            candidates = [*covering, *optional]
            if allow_old or not covering:
                candidates.append(old[a - offset:b - offset])
            seg = actual[a - offset:b - offset]
            if any(seg == c for c in candidates):
                continue
            for i in range(b - a):
                if all(seg[i] != c[i] for c in candidates):
                    got = bytes(offset) + actual
                    exp = bytearray(got)
                    exp[a:b] = candidates[0]              # shown: the first acceptable value
                    raise self.fail(f"{what} (none of {len(candidates)} candidate values)", a + i, got, bytes(exp))

    # -- operations --

    async def run(self, ops: Sequence[Op]) -> None:
        for n, op in enumerate(ops):
            self.step = f"{n}: {op!r}"
            if op.kind == "reopen":
                await self.d.close()
                self.disk = None
                qemu_check(self.path, f"before step {self.step}")
                await self.open(op)
            elif op.kind == "batch":
                await self.batch(op.ops)
            elif op.cancel >= 0:
                effect = self.effect(op)
                task = asyncio.ensure_future(self.submit(op, effect))
                await cancel_after(task, op.cancel)
                await asyncio.wait([task])
                await self.settle(op, effect, task)
            elif op.kind == "read":
                self.compare("read", op.offset, await self.d.read(op.offset, op.length))
            else:
                effect = self.effect(op)
                await self.submit(op, effect)
                if effect is not None:
                    self.model[effect[0]:effect[0] + len(effect[1])] = effect[1]

    async def settle(self, op: Op, effect: tuple[int, bytes] | None, task: asyncio.Future[Any]) -> None:
        """After a request that was to be cancelled: if it completed, as usual; if it was cancelled, its range
        holds the old bytes or the new ones, wholly (a read: nothing to check)."""
        if not task.cancelled():
            result = task.result()
            if op.kind == "read":
                self.compare("read", op.offset, result)
            elif effect is not None:
                self.model[effect[0]:effect[0] + len(effect[1])] = effect[1]
            return
        if effect is None or not effect[1]:
            return
        off, data = effect
        back = await self.d.read(off, len(data))
        if back != data:
            self.compare(f"cancelled {op.kind} (neither wholly done nor without trace)", off, back)
        self.model[off:off + len(data)] = back

    async def batch(self, ops: Sequence[Op]) -> None:
        old = bytes(self.model)
        effects = [self.effect(op) for op in ops]
        tasks = [asyncio.ensure_future(self.submit(op, e)) for op, e in zip(ops, effects, strict=True)]
        await asyncio.gather(*(cancel_after(t, op.cancel) for t, op in zip(tasks, ops, strict=True)
                               if op.cancel >= 0))
        await asyncio.wait(tasks)
        for t in tasks:
            if not t.cancelled() and t.exception() is not None:
                raise t.exception()  # type: ignore[misc]
        done = [e for e, t in zip(effects, tasks, strict=True) if e is not None and e[1] and not t.cancelled()]
        maybe = [e for e, t in zip(effects, tasks, strict=True) if e is not None and e[1] and t.cancelled()]
        mutations = done + maybe
        for e in maybe:              # a cancelled request alone on its bytes: wholly in or wholly out
            if not any(o is not e and o[0] < e[0] + len(e[1]) and e[0] < o[0] + len(o[1]) for o in mutations):
                back = await self.d.read(e[0], len(e[1]))
                if back != e[1] and back != old[e[0]:e[0] + len(e[1])]:
                    self.compare("a cancelled request of a batch (neither wholly done nor without trace)", e[0],
                                 back)
        spans = sorted((off, off + len(data)) for off, data in mutations)
        disjoint = all(a_end <= b_start for (_, a_end), (b_start, _) in itertools.pairwise(spans))
        overlapping_reads = any(op.kind == "read" and any(off < op.end and op.offset < off + len(data)
                                                          for off, data in mutations) for op in ops)
        if currently_in_test_context():            # --hypothesis-show-statistics
            event(f"batch: {'disjoint' if disjoint else 'overlapping'} requests"
                  f"{', reads overlapping them' if overlapping_reads else ''}{', cancellations' if maybe else ''}")
        if disjoint and not maybe:
            for off, data in mutations:
                self.model[off:off + len(data)] = data
        elif mutations:            # per byte: the value of one of the requests covering it; the disk decides
            lo, hi = spans[0][0], max(e for _, e in spans)
            actual = await self.d.read(lo, hi - lo)
            self.check_candidates("concurrent requests", lo, actual, old[lo:hi], done, allow_old=False,
                                  maybe=maybe)
            self.model[lo:hi] = actual
        for op, t in zip(ops, tasks, strict=True):
            if op.kind == "read" and not t.cancelled():
                r = t.result()
                assert isinstance(r, bytes)
                self.check_candidates("read in a batch", op.offset, r, old[op.offset:op.end], mutations,
                                      allow_old=True)


async def run_example(cfg: Config, path: Path, model: bytearray, start: Op, ops: Sequence[Op]) -> None:
    runner = Runner(cfg, path, model)
    runner.step = f"open: {start!r}"
    await runner.open(start)
    try:
        await runner.run(ops)
        runner.step = "end"
        runner.compare("the whole disk read through aioblock", 0, await runner.d.read(0, cfg.size))
    finally:
        if runner.disk is not None:
            await runner.disk.close()
    qemu_check(path, "after the last step")
    content = qemu_content(path)
    if content != bytes(model):
        i = first_difference(content, bytes(model))
        raise runner.fail("the guest content read by qemu-img convert", i, content, bytes(model))


@pytest.mark.slow
@pytest.mark.parametrize("cfg", CONFIGS, ids=[c.name for c in CONFIGS])
def test_qcow2_model(tmp_path: Path, cfg: Config) -> None:
    """Random request sequences against the model, for one image configuration."""
    backing = make_backing(cfg, tmp_path)
    direct = o_direct_supported(tmp_path)

    @settings(max_examples=EXAMPLES, deadline=None, derandomize=not RANDOM, database=None, phases=PHASES,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(start=reopens(direct), ops=op_lists(cfg, direct))
    def example(start: Op, ops: list[Op]) -> None:
        workdir = Path(tempfile.mkdtemp(dir=tmp_path))
        path = workdir / "disk.qcow2"
        argv: list[str | Path] = ["create", "-q", "-f", "qcow2", "-o", cfg.opts]
        model = bytearray(cfg.size)
        if backing is not None:
            argv += ["-b", backing[0], "-F", cfg.backing or ""]
            n = min(cfg.size, len(backing[1]))
            model[:n] = backing[1][:n]
        qemu_img(*argv, path, str(cfg.size))
        asyncio.run(run_example(cfg, path, model, start, ops))
        shutil.rmtree(workdir)               # kept when the example fails

    example()


# ---- bugs the model test found -------------------------------------------------------------------------------

ASYNC_ENGINES = [e for e in ENGINES if e != "sync"]


def run_fixed(tmp_path: Path, cfg_name: str, start: Op, ops: list[Op], attempts: int) -> None:
    """Run one op list on fresh images (a race may need a few attempts)."""
    if start.cache == "none" and not o_direct_supported(tmp_path):
        pytest.skip("no O_DIRECT on this file system")
    cfg = next(c for c in CONFIGS if c.name == cfg_name)
    for attempt in range(attempts):
        path = tmp_path / f"disk{attempt}.qcow2"
        qemu_img("create", "-q", "-f", "qcow2", "-o", cfg.opts, path, str(cfg.size))
        asyncio.run(run_example(cfg, path, bytearray(cfg.size), start, ops))


@pytest.mark.parametrize("engine", ASYNC_ENGINES)
def test_o_direct_concurrent_writes_sharing_a_host_block(tmp_path: Path, engine: str) -> None:
    """Found by the model test (v3-512-rc1, cache=none). With O_DIRECT the file's request alignment (4 KiB here)
    is larger than a 512-byte cluster, so one host block holds several clusters (data of unrelated guest
    offsets, L2 tables, refcount blocks), and the driver's read-modify-write of a partial host block (MetaIO) is
    not serialised against other writes to the same block. Two concurrent writes to different guest 4 KiB blocks
    of a fresh image (guest 0 -> host 0xa00..0x1a00, guest 0x2000 -> host 0x1a00..0x2a00, sharing the host
    block 0x1000..0x2000): one of them is lost (reads as zeroes, through aioblock and qemu-img convert)."""
    ops = [Op("batch", ops=(Op("write", 0, 0x200), Op("write", 0x2000, 0x200)))]
    run_fixed(tmp_path, "v3-512-rc1", Op("reopen", engine=engine, cache="none"), ops, attempts=10)


@pytest.mark.parametrize("engine", ASYNC_ENGINES)
def test_o_direct_flush_racing_an_in_place_write(tmp_path: Path, engine: str) -> None:
    """The same bug with metadata: after an allocating write of guest 0..0x1000 (host 0xa00..0x1a00), a flush
    (writing back the dirty L2 slice and refcount block, host clusters 1..4) concurrent with an in-place rewrite
    of guest 0..0x1000 (a lock-free read-modify-write of host 0..0x2000 that puts back the stale metadata it read):
    ``qemu-img check`` finds the 8 data clusters referenced with refcount 0 (16 errors)."""
    ops = [Op("write", 0, 0x1000), Op("batch", ops=(Op("flush"), Op("write", 0, 0x1000)))]
    run_fixed(tmp_path, "v3-512-rc1", Op("reopen", engine=engine, cache="none"), ops, attempts=3)
