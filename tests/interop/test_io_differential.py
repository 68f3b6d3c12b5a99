"""Differential tests of ``aioblock io`` against qemu-io on raw images: random command lists with unaligned
requests, and many concurrent aio writes (page cache and O_DIRECT), judged by the outputs, the exit status,
``qemu-img compare`` and a Python model of the image."""

from __future__ import annotations

import io
import itertools
import random
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import aioblock
from aioblock.cli.io import Session

from ..conftest import needs_qemu
from .differential import run_differential

pytestmark = needs_qemu

SIZE = 256 * 1024


class Model:
    """What a raw image must contain after a command list: bytes, updated command by command."""

    def __init__(self, size: int) -> None:
        self.data = bytearray(size)

    def apply(self, cmd: str) -> None:
        """Apply one (well-formed, in-range) write, zero-write or discard; other commands change nothing."""
        words = cmd.split()
        if words[0] not in ("write", "aio_write", "discard"):
            return
        off, length = (int(w, 0) if w.startswith("0x") else int(w) for w in words[-2:])
        if off + length > len(self.data):
            return                                             # refused with EIO: nothing written
        if "-z" in words or words[0] == "discard":             # raw: discard punches a hole, reads as zeroes
            self.data[off:off + length] = bytes(length)
        else:
            pattern = int(words[words.index("-P") + 1], 0) if "-P" in words else 0xCD
            self.data[off:off + length] = bytes([pattern]) * length

    def check(self, image: Path) -> None:
        on_disk = image.read_bytes()
        assert len(on_disk) == len(self.data)
        if on_disk != bytes(self.data):
            first = next(i for i, (a, b) in enumerate(zip(on_disk, self.data, strict=True)) if a != b)
            raise AssertionError(f"image differs from the model at offset {first}: {on_disk[first]:#x} "
                                 f"instead of {self.data[first]:#x}")


def _num(rng: random.Random, value: int) -> str:
    """The same number as qemu-io accepts it in several spellings."""
    choice = rng.random()
    if choice < 0.15:
        return hex(value)
    if choice < 0.25 and value and value % 1024 == 0:
        return f"{value // 1024}k"
    return str(value)


def random_commands(rng: random.Random, count: int, size: int = SIZE) -> list[str]:
    """Writes, zero writes (with and without unmap), discards, flushes and verifying reads at unaligned
    offsets and lengths, a few reaching past the end; reads check ranges written earlier (which later commands
    may have overwritten: both tools must then report the same failure)."""
    cmds: list[str] = []
    written: list[tuple[int, int, int]] = []
    for _ in range(count):
        kind = rng.choices(["write", "zero", "unmap", "discard", "verify", "read", "flush", "past"],
                           weights=[30, 8, 6, 8, 25, 6, 4, 3])[0]
        length = rng.choice([rng.randint(1, 600), rng.randint(1, 5000), rng.randint(1, 70000)])
        off = rng.randrange(0, size - length)
        q = " -q" if rng.random() < 0.2 else ""
        if kind == "write":
            pattern = rng.randrange(256)
            written.append((off, length, pattern))
            cmds.append(f"write{q} -P {_num(rng, pattern)} {_num(rng, off)} {_num(rng, length)}")
        elif kind in ("zero", "unmap"):
            written.append((off, length, 0))
            cmds.append(f"write{q} -z{' -u' if kind == 'unmap' else ''} {_num(rng, off)} {_num(rng, length)}")
        elif kind == "discard":
            written.append((off, length, 0))
            cmds.append(f"discard{q} {_num(rng, off)} {_num(rng, length)}")
        elif kind == "verify" and written:
            off, length, pattern = rng.choice(written)
            cmds.append(f"read{q} -P {pattern} {off} {length}")
        elif kind == "read":
            cmds.append(f"read -v {off} {rng.randint(0, 40)}")
        elif kind == "flush":
            cmds.append("flush")
        elif kind == "past":
            cmds.append(f"{rng.choice(['read', 'write', 'write -z', 'discard'])} {size - rng.randint(0, 9)} "
                        f"{rng.randint(10, 100)}")
    return cmds


def _check(diff_tmp: Path, cmds: list[str], **kw: object) -> None:
    diff = run_differential(cmds, size=SIZE, tmp_path=diff_tmp, **kw)  # type: ignore[arg-type]
    diff.assert_same()
    model = Model(SIZE)
    for cmd in cmds:
        model.apply(cmd.replace(" -q", ""))
    model.check(diff.aioblock_image)


@pytest.mark.parametrize("seed", range(6))
def test_random_command_lists(tmp_path: Path, seed: int) -> None:
    """(a) Seeded random lists of 120 synchronous commands: same output and status, same image as qemu-io's
    and as the model."""
    _check(tmp_path, random_commands(random.Random(seed), 120))


@pytest.mark.parametrize("seed", range(3))
def test_random_command_lists_odirect(tmp_path: Path, seed: int) -> None:
    """(a) The same with O_DIRECT on both sides: unaligned writes become read-modify-write, and unaligned
    discards punch exactly their bytes, as qemu-io's do."""
    _check(tmp_path, random_commands(random.Random(100 + seed), 120), qemu_extra=("-t", "none"),
           aioblock_extra=("--nocache",))


_counter = itertools.count()


@st.composite
def command_lists(draw: st.DrawFn) -> list[str]:
    seed = draw(st.integers(0, 2**32 - 1))
    count = draw(st.integers(1, 40))
    return random_commands(random.Random(seed), count)


@settings(max_examples=10, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(cmds=command_lists())
def test_hypothesis_command_lists(tmp_path: Path, cmds: list[str]) -> None:
    """(a) The same through hypothesis (which shrinks a failing list to a short one)."""
    _check(tmp_path, cmds, name=f"h{next(_counter)}")


@dataclass(frozen=True)
class Extent:
    off: int
    length: int
    pattern: int                # 0: an aio_write -z


def layout(rng: random.Random, count: int, *, start: int, gaps: bool, zero_every: int = 0) -> list[Extent]:
    """``count`` non-overlapping unaligned ranges, in random order. Without gaps each range starts where the
    previous one ends, so neighbours share 512-byte sectors."""
    extents: list[Extent] = []
    pos = start
    for i in range(count):
        pos += rng.randint(0, 2000) if gaps else 0
        length = rng.randint(1, 1500)
        pattern = 0 if zero_every and i % zero_every == zero_every - 1 else 1 + i % 255
        extents.append(Extent(pos, length, pattern))
        pos += length
    rng.shuffle(extents)
    return extents


def aio_workload(extents: list[Extent]) -> list[str]:
    writes = [f"aio_write -z {e.off} {e.length}" if e.pattern == 0 else f"aio_write -P {e.pattern} {e.off} {e.length}"
              for e in extents]
    reads = [f"read -P {e.pattern} {e.off} {e.length}" for e in sorted(extents, key=lambda e: e.off)]
    return [*writes, "aio_flush", *reads]


def _check_aio(tmp_path: Path, extents: list[Extent], size: int, **kw: object) -> None:
    def seed(path: Path) -> None:              # non-zero background: aio_write -z must really write zeroes
        path.write_bytes(b"\xee" * size)
    cmds = aio_workload(extents)
    diff = run_differential(cmds, size=size, tmp_path=tmp_path, prepare=seed, **kw)  # type: ignore[arg-type]
    diff.assert_same(sort_stdout=True)         # aio completions come in any order
    assert diff.aioblock.returncode == 0
    assert "Pattern verification failed" not in diff.aioblock.stdout
    assert diff.aioblock.stdout.count("wrote ") == diff.aioblock.stdout.count("read ") == len(extents)
    model = Model(size)
    model.data[:] = b"\xee" * size
    for cmd in cmds:
        model.apply(cmd)
    model.check(diff.aioblock_image)
    model.check(diff.qemu_image)


def test_concurrent_aio_writes(tmp_path: Path) -> None:
    """(b) 160 concurrent aio_writes with distinct patterns to non-overlapping unaligned ranges, then
    aio_flush, then a verifying read of each."""
    _check_aio(tmp_path, layout(random.Random(1), 160, start=7, gaps=True), 1 << 20)


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["uring", "threads", "sync"])
def test_concurrent_adjacent_aio_writes_odirect(tmp_path: Path, engine: str) -> None:
    """(c) O_DIRECT (-t none): 200 concurrent adjacent unaligned writes (some of them zero writes) whose
    neighbours share 512-byte sectors: each is a read-modify-write, and overlapping RMWs must be serialised or
    one of them loses the other's bytes."""
    extents = layout(random.Random(2), 200, start=333, gaps=False, zero_every=7)
    _check_aio(tmp_path, extents, 512 * 1024, qemu_extra=("-t", "none"),
               aioblock_extra=("--nocache", "--engine", engine))


def test_concurrent_adjacent_aio_writes_odirect_asyncio_loop(tmp_path: Path) -> None:
    """(c) The same on the plain asyncio loop (the default loop is uvloop where installed)."""
    extents = layout(random.Random(3), 160, start=1, gaps=False)
    _check_aio(tmp_path, extents, 512 * 1024, qemu_extra=("-n",), aioblock_extra=("-n",),
               global_extra=("--loop", "asyncio"))


async def test_aio_requests_really_overlap(tmp_path: Path) -> None:
    """The aio commands start a task each and return: many requests are in flight at once."""
    path = tmp_path / "c.raw"
    path.write_bytes(bytes(1 << 20))
    out, err = io.StringIO(), io.StringIO()
    async with aioblock.open(str(path), "raw", cache="none") as disk:
        session = Session(disk, None, stdout=out, stderr=err)
        for i in range(64):
            assert await session.execute(f"aio_write -P {i + 1} {i * 1000 + 1} 1000")
        assert session.tasks                           # nothing has run yet: the commands did not wait
        assert await session.execute("aio_flush")
        assert not session.tasks
        stats = disk.statistics()
        assert stats.write.ops == 64 and stats.max_in_flight > 1
        for i in range(64):
            assert await session.execute(f"read -q -P {i + 1} {i * 1000 + 1} 1000")
    assert err.getvalue() == ""
    assert out.getvalue().count("wrote 1000/1000 bytes") == 64
