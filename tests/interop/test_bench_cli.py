"""``aioblock bench`` against ``qemu-img bench``: the same output lines, the same requests (a write run leaves
byte-identical files), the same option errors. Functional only: no timing is asserted."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

import aioblock
from aioblock.cli.bench import BenchSettings, run_bench

from ..conftest import aioblock_cli, needs_qemu, qemu_img, qemu_io

FIRST = re.compile(r"^Sending (\d+) (read|write) requests, (\d+) bytes each, (\d+) in parallel "
                   r"\(starting at offset (\d+), step size (\d+)\)$")
LAST = re.compile(r"^Run completed in \d+\.\d{3} seconds\.$")
THROUGHPUT = re.compile(r"^Throughput: \d+ ops/s, \d+\.\d MiB/s$")
LATENCY = re.compile(r"^Latency \(us\): (p50 [\d.]+, p90 [\d.]+, p99 [\d.]+, p99\.9 [\d.]+, max [\d.]+"
                     r"|no requests)$")


def _filled(path: Path, size: int, byte: int = 0xFF) -> Path:
    path.write_bytes(bytes([byte]) * size)
    return path


def _check_output(stdout: str, *, quiet: bool = False, flush_line: bool = False) -> list[str]:
    lines = stdout.splitlines()
    assert FIRST.match(lines[0]), lines
    i = 1
    if flush_line:
        assert re.match(r"^Sending flush every \d+ requests$", lines[1]), lines
        i = 2
    assert LAST.match(lines[i]), lines
    if quiet:
        assert len(lines) == i + 1, lines
    else:
        assert THROUGHPUT.match(lines[i + 1]), lines
        assert LATENCY.match(lines[i + 2]), lines
        assert len(lines) == i + 3, lines
    return lines


@needs_qemu
@pytest.mark.parametrize("args", [
    [],
    ["-c", "100", "-d", "4", "-s", "4k", "-S", "8k", "-o", "4k"],
    ["-c", "37", "-d", "1", "-s", "512", "-S", "0"],                   # step 0 means the buffer size
    ["-c", "50", "-d", "8", "-s", "4k", "-S", "12k", "-o", "1000k"],    # wraps at the image size
    ["-c", "0"],
    ["-c", "10", "-s", "0"],
])
def test_read_output_lines_match_qemu_img(tmp_path: Path, args: list[str]) -> None:
    img = _filled(tmp_path / "r.raw", 1 << 20)
    ours = aioblock_cli("bench", "-f", "raw", *args, str(img))
    theirs = qemu_img("bench", "-f", "raw", *args, str(img))
    assert ours.returncode == 0, ours.stderr
    assert ours.stderr == ""
    lines = _check_output(ours.stdout)
    assert lines[0] == theirs.stdout.splitlines()[0]
    quiet = aioblock_cli("bench", "-q", "-f", "raw", *args, str(img))
    assert quiet.returncode == 0
    _check_output(quiet.stdout, quiet=True)


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
@pytest.mark.parametrize("engine", ["uring", "threads", "sync", "io_uring", "native"])
def test_every_engine_and_loop(tmp_path: Path, engine: str, loop: str) -> None:
    from aioblock.io.uring import uring_available
    if engine in ("uring", "io_uring", "native") and not uring_available():
        pytest.skip("io_uring unavailable")
    img = _filled(tmp_path / "e.raw", 256 << 10)
    res = aioblock_cli("--loop", loop, "bench", "-f", "raw", "-c", "500", "-d", "16", "-i", engine, str(img))
    assert res.returncode == 0, res.stderr
    _check_output(res.stdout)


@needs_qemu
@pytest.mark.parametrize("args", [
    ["-c", "3", "-d", "1", "--pattern", "0x41"],
    ["-c", "40", "-d", "8", "-s", "1k", "-S", "12k", "-o", "3k", "--pattern", "171"],   # wraps around
    ["-c", "64", "-d", "4", "-s", "4k", "-S", "8k", "--pattern", "017"],              # octal, as strtol
    ["-c", "5", "-d", "2", "-s", "64k"],                                                # default pattern 0
    ["-c", "200", "-d", "16", "-s", "512", "-S", "4k", "--flush-interval", "32", "--pattern", "7"],
    ["-c", "200", "-d", "16", "-s", "512", "-S", "4k", "--flush-interval", "16", "--no-drain",
     "--pattern", "9"],
])
def test_write_leaves_the_same_bytes_as_qemu_img(tmp_path: Path, args: list[str]) -> None:
    ours_img = _filled(tmp_path / "ours.raw", 512 << 10)
    theirs_img = tmp_path / "theirs.raw"
    shutil.copyfile(ours_img, theirs_img)
    ours = aioblock_cli("bench", "-f", "raw", "-w", *args, str(ours_img))
    theirs = qemu_img("bench", "-f", "raw", "-w", *args, str(theirs_img))
    assert ours.returncode == 0, ours.stderr
    lines = _check_output(ours.stdout, flush_line="--flush-interval" in args)
    theirs_lines = theirs.stdout.splitlines()
    assert lines[:len(theirs_lines) - 1] == theirs_lines[:-1]        # all but qemu-img's timing line
    assert ours_img.read_bytes() == theirs_img.read_bytes()
    assert ours_img.read_bytes() != bytes([0xFF]) * (512 << 10)


@needs_qemu
def test_write_pattern_seen_by_qemu_io(tmp_path: Path) -> None:
    img = _filled(tmp_path / "w.raw", 1 << 20)
    res = aioblock_cli("bench", "-f", "raw", "-w", "-c", "4", "-d", "2", "-s", "4k", "-S", "8k", "-o", "4k",
                       "--pattern", "0x5a", str(img))
    assert res.returncode == 0, res.stderr
    check = qemu_io(img, "read -P 0x5a 4k 4k", "read -P 0x5a 12k 4k", "read -P 0x5a 20k 4k",
                    "read -P 0x5a 28k 4k", "read -P 0xff 0 4k", "read -P 0xff 8k 4k", "read -P 0xff 32k 4k")
    assert check.returncode == 0 and "Pattern verification failed" not in check.stdout, check.stdout


def test_read_run_does_not_modify_the_image(tmp_path: Path) -> None:
    img = _filled(tmp_path / "ro.raw", 64 << 10, 0x33)
    res = aioblock_cli("bench", "-c", "100", "-d", "8", "--pattern", "1", str(img))
    assert res.returncode == 0, res.stderr
    assert img.read_bytes() == bytes([0x33]) * (64 << 10)


def test_cache_none(tmp_path: Path) -> None:
    img = _filled(tmp_path / "d.raw", 1 << 20)
    for args in (["-n", "-t", "none"], ["-t", "none"],
                 ["-t", "none", "-w", "--pattern", "0x22", "-s", "1000", "-S", "4k"]):
        res = aioblock_cli("bench", "-f", "raw", "-c", "50", "-d", "4", *args, str(img))
        if res.returncode != 0 and "O_DIRECT" in res.stderr:
            pytest.skip("the test directory's file system has no O_DIRECT")
        assert res.returncode == 0, res.stderr
        _check_output(res.stdout)
    data = img.read_bytes()
    assert data[:1000] == b"\x22" * 1000 and data[1000:4096] == b"\xff" * 3096      # RMW kept the rest


@needs_qemu
def test_native_aio_needs_cache_none_as_in_qemu_img(tmp_path: Path) -> None:
    img = _filled(tmp_path / "n.raw", 1 << 20)
    for res in (aioblock_cli("bench", "-f", "raw", "-c", "10", "-n", str(img)),
                qemu_img("bench", "-f", "raw", "-c", "10", "-n", str(img), check=False)):
        assert res.returncode == 1
        assert "aio=native was specified, but it requires cache.direct=on" in res.stderr


@pytest.mark.parametrize(("count", "depth", "interval", "drain", "flushes"), [
    (256, 64, 64, True, 4),            # requests still to send: 192, 128, 64, 0
    (256, 64, 100, True, 2),           # 100 and 0 (200 falls within the first DEPTH requests)
    (130, 64, 65, True, 2),
    (10, 64, 64, True, 1),             # only the final flush
    (256, 64, 64, False, 4),
    (256, 64, 0, True, 0),
])
async def test_flush_interval_semantics(tmp_path: Path, count: int, depth: int, interval: int, drain: bool,
                                        flushes: int) -> None:
    img = _filled(tmp_path / "f.raw", 1 << 20)
    async with aioblock.open(str(img), "raw") as disk:
        settings = BenchSettings(count=count, depth=depth, write=True, flush_interval=interval, drain=drain,
                                 pattern=3)
        result = await run_bench(disk, settings)
        stats = disk.statistics()
    assert stats.flush.ops == flushes
    assert stats.write.ops == count and len(result.latencies_ns) == count
    assert stats.max_in_flight <= min(depth, count) + (0 if drain else flushes)      # no-drain flushes overlap


async def test_depth_is_kept(tmp_path: Path) -> None:
    """DEPTH requests are in flight at once (with an engine that really suspends)."""
    img = _filled(tmp_path / "k.raw", 1 << 20)
    async with aioblock.open(str(img), "raw", read_only=True, engine="threads") as disk:
        await run_bench(disk, BenchSettings(count=200, depth=8))
        stats = disk.statistics()
    assert stats.read.ops == 200 and stats.max_in_flight == 8


@pytest.mark.parametrize(("args", "message"), [
    (["-c", "-1"], "Invalid request count specified"),
    (["-c", "abc"], "Invalid request count specified"),
    (["-c", "99999999999"], "Invalid request count specified"),
    (["-d", "0"], "Invalid queue depth specified"),
    (["-s", "-1"], "Invalid buffer size specified"),
    (["-S", "x"], "Invalid step_size specified"),
    (["-o", "-5"], "Invalid offset specified"),
    (["-w", "--pattern", "300"], "Invalid pattern byte specified"),
    (["--flush-interval", "64"], "--flush-interval is only available in write tests"),
    (["-w", "--flush-interval", "2"], "Flush interval can't be smaller than depth"),
    (["-i", "bogus"], "Invalid aio option: bogus"),
    (["-t", "bogus"], "Invalid cache mode"),
    (["-f", "bogus"], "bogus"),
    (["-c", "5", "-o", "1M"], "Failed request"),                     # past the end, as qemu-img
    (["-c", "5", "-s", "8k", "-S", "12k", "-o", "1020k"], "Failed request"),
])
def test_bad_options_are_one_line_errors(tmp_path: Path, args: list[str], message: str) -> None:
    img = _filled(tmp_path / "x.raw", 1 << 20)
    res = aioblock_cli("bench", *args, str(img))
    assert res.returncode != 0
    err = res.stderr.splitlines()
    assert len(err) == 1 and err[0].startswith(f"aioblock: {img}: ") and message in err[0], res.stderr


def test_missing_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.raw"
    res = aioblock_cli("bench", "-c", "10", str(missing))
    assert res.returncode != 0
    assert res.stdout == ""
    err = res.stderr.splitlines()
    assert len(err) == 1 and err[0].startswith(f"aioblock: {missing}: "), res.stderr


def test_force_share_is_accepted(tmp_path: Path) -> None:
    img = _filled(tmp_path / "u.raw", 64 << 10)
    res = aioblock_cli("bench", "-U", "-c", "10", str(img))
    assert res.returncode == 0, res.stderr
