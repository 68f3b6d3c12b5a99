"""``aioblock io`` command by command against qemu-io 7.2: output (timing aside), stderr and exit status."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest

from aioblock.cli.io import COMMANDS, NumberError, cvtnum, cvtstr

from ..conftest import QEMU_IO, aioblock_cli, needs_qemu, qemu_img
from .differential import normalise, run_differential

pytestmark = needs_qemu


def same(tmp_path: Path, *cmds: str, size: str = "1M", **kw: object) -> None:
    run_differential(list(cmds), size=size, tmp_path=tmp_path, **kw).assert_same()  # type: ignore[arg-type]


# ---- the cases the brief names ---------------------------------------------------------------------------------

@pytest.mark.parametrize("cmds, status", [
    (["write -P 0xcd 0 4k", "read -P 0xcd 0 4k"], 0),
    (["read -P 0xab 0 512"], 1),                                     # a failed verification fails the command
    (["read -P 0xab 0 512", "read 0 1"], 1),                         # ... and the run, even if later ones pass
    (["read -P 0 -s 100 -l 10 0 4k", "read -v -P 1 0 1"], 1),
    (["aio_read -P 0xab 0 512", "aio_flush"], 0),                    # aio: success once submitted
    (["read -q -P 9 0 1"], 1),                                       # -q hides statistics, not the failure
])
def test_pattern_verification_status(tmp_path: Path, cmds: list[str], status: int) -> None:
    diff = run_differential(cmds, size="1M", tmp_path=tmp_path)
    diff.assert_same()
    assert diff.aioblock.returncode == status


PAST_THE_END = ["read 1M 1", "read 1048570 10", "read 2M 0", "read 0 2M", "readv 1M 1", "write 1M 1",
                "write -z 1M 1", "discard 1M 1", "discard 2M 0", "writev 1M 1", "read 9223372036854775807 1"]


def test_request_past_the_end(tmp_path: Path) -> None:
    diff = run_differential([*PAST_THE_END, "read 1M 0", "write 1M 0"], size="1M", tmp_path=tmp_path)
    diff.assert_same()
    assert diff.aioblock.returncode == 1
    assert diff.aioblock.stdout.count("failed: Input/output error\n") == len(PAST_THE_END)


def test_aio_failures_do_not_fail_the_run(tmp_path: Path) -> None:
    diff = run_differential(["aio_write 1M 1", "aio_read 1M 1", "aio_flush", "aio_write -z 0 2G"], size="1M",
                            tmp_path=tmp_path)
    diff.assert_same(sort_stdout=True)
    assert diff.aioblock.returncode == 0
    assert "readv failed: Input/output error" in diff.aioblock.stdout          # qemu-io's word for aio_read


def test_unknown_command(tmp_path: Path) -> None:
    diff = run_differential(["bogus", "length", "READ 0 1", '"read" 0 1', "read\t0 1"], size="1M",
                            tmp_path=tmp_path)
    diff.assert_same()
    assert diff.aioblock.stderr.startswith('command "bogus" not found\n')
    assert diff.aioblock.returncode == 1


def test_read_only_refuses_writes(tmp_path: Path) -> None:
    cmds = ["write 0 1", "write -z 0 1", "write -c 0 64k", "discard 0 512", "aio_write 0 1", "aio_write -z 0 1",
            "truncate 2M", "writev 0 1", "write", "write x y", "flush", "read 0 1", "map", "info", "length"]
    diff = run_differential(cmds, size="1M", tmp_path=tmp_path, qemu_extra=("-r",), aioblock_extra=("-r",))
    diff.assert_same()
    assert diff.aioblock.stderr.count("qemu-io: Block node is read-only\n") == 9
    assert diff.aioblock.returncode == 1


def test_compressed_write_on_raw(tmp_path: Path) -> None:
    """Sector alignment is checked first; then raw says "Operation not supported"."""
    diff = run_differential(["write -c 0 64k", "write -c 0 512", "write -c 0 0", "write -c 1 1", "write -c 2M 1",
                             "write -c 2M 512", "write -z -c 0 512"], size="1M", tmp_path=tmp_path)
    diff.assert_same()
    assert diff.aioblock.stdout.count("write failed: Operation not supported\n") == 3


@pytest.mark.parametrize("sig", [9, 15, 6, 25])
def test_sigraise_kills_like_qemu_io(tmp_path: Path, sig: int) -> None:
    """Output before the signal is flushed; nothing after it runs; the process dies by the signal."""
    diff = run_differential(["write -P 1 0 4k", "length", f"sigraise {sig}", "write -P 2 0 4k"], size="1M",
                            tmp_path=tmp_path)
    diff.assert_same()
    assert diff.aioblock.returncode == -sig
    assert diff.aioblock.stdout.startswith("wrote 4096/4096 bytes at offset 0\n")


def test_sigraise_9_mid_workload(tmp_path: Path) -> None:
    """A hard kill with aio writes in flight: completed and flushed data survive; nothing is printed for the
    requests that were cut off, and the process dies by SIGKILL in both tools."""
    cmds = ["write -P 1 0 64k", "flush", *(f"aio_write -P 2 {64 + i}k 1k" for i in range(64)), "sigraise 9",
            "write -P 3 0 64k"]
    diff = run_differential(cmds, size="1M", tmp_path=tmp_path, check_images=False)
    assert diff.qemu.returncode == diff.aioblock.returncode == -signal.SIGKILL
    first_write = "wrote 65536/65536 bytes at offset 0\n64 KiB, 1 ops; TIME (RATE)\n"
    assert diff.qemu.stdout == diff.aioblock.stdout == first_write
    for image in (diff.qemu_image, diff.aioblock_image):
        data = image.read_bytes()
        assert data[:65536] == b"\x01" * 65536
        assert set(data[65536:131072]) <= {0, 2}


def test_sigraise_without_effect(tmp_path: Path) -> None:
    """Signals qemu-io blocks or ignores, and numbers raise(3) refuses, leave the process running."""
    diff = run_differential([*(f"sigraise {sig}" for sig in (0, 10, 13, 14, 17, 23, 28, 29, 32, 33, 65)),
                             "length"], size="1M", tmp_path=tmp_path)
    diff.assert_same()
    assert diff.aioblock.returncode == 0 and diff.aioblock.stdout == "1 MiB\n"


def test_sigraise_arguments(tmp_path: Path) -> None:
    same(tmp_path, "sigraise x", "sigraise 66", "sigraise 1k", "sigraise 2147483648",
         "sigraise 9223372036854775808", "sigraise -- -1", "sigraise", "sigraise 1 2")


# ---- numbers, options and usage ----------------------------------------------------------------------------

NUMBERS = ["0", "1k", "1K", "0x10", "0X10", "010", "+5", "5.", "1.", "1.0", "1.0b", "0.5k", "1.5k", "1.0001k",
           "0.1m", "0.001k", "0.0001k", "0.00048828125k", "0.00146484375k", "1.9999999999k",
           "4.999999999999999999k", "0.99999999999999999k", "1.e", "1e", "0.0k", "1s", "1.5", "1.5b", "0.5",
           "1e3", "1E3", "1.e5", "1.5e+", "1.5E-1", ".5k", "1,5", "1kb", "1KiB", "0x", "00x1", "0x1.8k", "0x0.0",
           "0xg", "1k0", "1.0.0", "1.5x", "0x10k", "0x1M", "18446744073709551615", "18446744073709551616",
           "18446744073709551616k", "18446744073709551615k", "9223372036854775807", "9223372036854775808",
           "8E", "7E", "16E", "0x7fffffffffffffff", "0x8000000000000000", "0xffffffffffffffff",
           "99999999999999999999999", "99999999999999999999999b", "123456789012345678901234567890k",
           "9007199254740992k", "9223372036854775807.0k", "-- -1"]


def test_number_syntax(tmp_path: Path) -> None:
    """qemu-io's size parser: suffixes, fractions, hex (with its deprecation warning), and both errors."""
    same(tmp_path, *(f"read {n} 0" for n in NUMBERS), size="4M")


@pytest.mark.parametrize("text, value", [("1k", 1024), ("0.1m", 104858), ("0x10k", 16384), ("5.", 5),
                                         ("4.999999999999999999k", 4096), ("7E", 7 << 60)])
def test_cvtnum(text: str, value: int) -> None:
    assert cvtnum(text) == value


@pytest.mark.parametrize("text, too_large", [("1.5", False), ("-1", False), ("8E", True), ("1x", False),
                                             ("18446744073709551616", True), ("18446744073709551616k", False)])
def test_cvtnum_errors(text: str, too_large: bool) -> None:
    with pytest.raises(NumberError) as info:
        cvtnum(text)
    assert info.value.too_large is too_large


@pytest.mark.parametrize("value, text", [(0, "0 bytes"), (1, "1 bytes"), (999, "999 bytes"), (1024, "1 KiB"),
                                         (1025, "1.001 KiB"), (1536, "1.500 KiB"), (1048575, "1023.999 KiB"),
                                         (1073741823, "1024 MiB"), (1 << 60, "1 EiB"), (0.5, "0.500000 bytes")])
def test_cvtstr(value: float, text: str) -> None:
    assert cvtstr(value) == text


def test_patterns(tmp_path: Path) -> None:
    same(tmp_path, *(f"write -P {p} 0 1" for p in ("0x12", "012", "08", "+5", "0XfF", "255", "256", "-1", "0x",
                                                   "zz", "1k", "0b1", "00")),
         "read -v 0 1", "read -P 0x1ff 0 1", "aio_write -P 999 0 1", "aio_read -P 1 -P 999 0 1")


OPTION_CASES = [
    "read", "read 0", "read 0 1 2", "read -x 0 1", "read --foo 0 1", "read -v- 0 1", "read - 0 1",
    "read -P 3 -P", "read 0 1 -P", "read 0 1 -P 3", "read -P3 0 1", "read -qv 0 1", "read -p 0 3", "read -a 0 3",
    "read -s 100 0 4k", "read -l 0 0 1", "read -s 1 x 1", "read -s 1 0 2G", "read -P 1 -s 5 0 2G",
    "read -P 0xbb -s 5000 0 4k", "read -P 0xbb -s 100 -l 10000 0 4k", "read -P 1 -s 2 -l 0 0 1",
    "read -P 0xbb -s x 0 4k", "read -b 0 3", "read -b 1 512", "read -b 0 512", "read -b -P 1 -s 5 1 1",
    "read 0 2G", "r -x 0 1", "r 0 1 2", "r 0 1 -P",
    "write -u 3 100", "write -n 0 512", "write -u -n 0 1", "write -z -P 1 3 100", "write -z -P 1 -u x 1",
    "write -b -z -P 1 0 1", "write -b -z 0 1 2", "write -u 0 1 2", "write -b 0 512", "write -b -c 1 1",
    "write 0 2G", "write -z 0 2G", "write -z -n 0 4G", "write -P 0x1ff x y", "w -q", "w 0 1 2",
    "write -s /nonexist x 1", "write -s /nonexist 1M 1", "write -s /nonexist 0 1", "write -s / 0 1",
    "write -s /dev/null 0 1", "write -s /dev/null -q 0 0", "write -s /nonexist -P 1 0 1",
    "aio_read 0", "aio_read -x -i 0 1", "aio_read -i x 1", "aio_read -P 999 -i 0 1", "aio_read -i -P 999 0 1",
    "aio_read 0 1 -i", "aio_write -i -u 0 1", "aio_write -c 0 1", "aio_write -u 0 1", "aio_write -u 0",
    "aio_write -z x 1 2", "aio_write -z 0 1 1", "aio_read 0 2G", "aio_read 0 1G 1G 1G", "aio_read 0 x 2G",
    "aio_flush x", "readv 0 3G", "writev 0 1G 1G 1G", "readv 0 x", "writev -P 3 x",
    "discard -z 0 1", "discard 0", "discard 0 1 2", "discard 0 3G", "discard x 2G",
    "flush 1", "length 1", "info 1", "map 0", "map -q", "alloc", "alloc x", "alloc 0 x", "alloc 0 1 2",
    "truncate", "truncate -x 1", "truncate 1 2 3 4", "truncate -m", "truncate -m bogus 3M",
    "truncate -m metadata 3M", "truncate x", "sleep", "sleep x", "sleep -5", "sleep 08", "sleep 1.5k",
    "sleep 0x10", "sleep 1 2", "help read write", "help bogus", "help -q", "open x.raw", "open",
]


def test_option_and_argument_errors(tmp_path: Path) -> None:
    """GNU getopt as qemu-io's commands use it, argument counts, and the order of qemu-io's checks."""
    same(tmp_path, *OPTION_CASES)


@pytest.mark.parametrize("cmd", ["read 0 1 2", "read -x 0 1", "bogus", "help bogus", "sleep x", "alloc x",
                                 "write -u 0 1", "truncate -m bogus 1M", "aio_read 0"])
def test_each_error_fails_the_run(tmp_path: Path, cmd: str) -> None:
    diff = run_differential([cmd, "length"], size="1M", tmp_path=tmp_path)
    diff.assert_same()
    assert diff.aioblock.returncode == 1


# ---- output formats ----------------------------------------------------------------------------------------

def test_hex_dump_and_statistics_formats(tmp_path: Path) -> None:
    def seed(path: Path) -> None:
        path.write_bytes(bytes(range(256)) * 4096)
    same(tmp_path, "read -v 100 300", "read -v 0 16", "read -v 0 0", "read -C 0 512", "read -C -v 0 3",
         "read -C -q 0 1", "write -C 0 512", "write -q 0 512", "discard -C 0 1k", "discard -q 0 1k",
         "read -v 0x100000 17", *(f"read {n} {n}" for n in (1, 999, 1000, 1023, 1024, 1025, 1536, 10000,
                                                            102400, 1048575, 1048576, 1572864)),
         "writev -P 7 1 2 3", "readv -P 7 1 2 3", "readv -P 8 1 2 3", "readv -v 0 3 4", "readv -q -v 100 3",
         "writev -P 5 0 0", size="1M", prepare=seed)


def test_info_length_map_alloc(tmp_path: Path) -> None:
    same(tmp_path, "info", "length", "map", "write -P 1 1M 64k", "discard 0 64k", "map", "alloc 0",
         "alloc 0 1M", "alloc 1M 1", "alloc 1M 0", "alloc 10M 1", "alloc 10000000 1000000", "alloc 0 0",
         "alloc 0x100 0x10", "l", "i", size="10M")


def test_empty_image(tmp_path: Path) -> None:
    same(tmp_path, "map", "length", "info", "alloc 0", "read 0 0", "read 0 1", size="0")


def test_truncate(tmp_path: Path) -> None:
    same(tmp_path, "truncate 2M", "length", "truncate -m full 3M", "truncate -m falloc 4M", "length",
         "read -P 0 1M 3M", "truncate 512 2", "length", "truncate 1M", "map", "t 64k", "length")


def test_aio_requests_and_quirks(tmp_path: Path) -> None:
    """aio_write -z wins over -P; -C/-q/-v/-i; completion order may differ, so lines are compared sorted."""
    diff = run_differential(["aio_write -P 0x11 0 1k 1k", "aio_flush", "aio_read -P 0x11 0 2k",
                             "aio_read -v 0 1k 16", "aio_write -z 4k 512", "aio_write -z -u 8k 4k",
                             "aio_write -z -P 1 12k 1", "aio_write -z -C 16k 1", "aio_read -C -v 100 3",
                             "aio_write -q 20k 1 1 1", "aio_read -q -v 100 3", "aio_write -f 24k 1",
                             "aio_write -C 28k 1", "aio_read 0 0", "aio_write 32k 0", "aio_read -i 0 1",
                             "aio_write -i 0 1", "aio_flush", "read -P 0 4k 8k", "read -P 0 12k 1"],
                            size="1M", tmp_path=tmp_path)
    diff.assert_same(sort_stdout=True)


def test_aio_without_flush_completes_at_exit(tmp_path: Path) -> None:
    run_differential(["aio_write -P 3 0 64k", "aio_write -P 4 64k 64k"], size="1M",
                     tmp_path=tmp_path).assert_same(sort_stdout=True)
    diff = run_differential(["aio_write -P 5 0 1", "close", "length"], size="1M", tmp_path=tmp_path, name="b")
    diff.assert_same()


def test_sync_command_between_aio(tmp_path: Path) -> None:
    diff = run_differential(["aio_write -P 1 0 1k", "read 64k 1", "aio_flush"], size="1M", tmp_path=tmp_path)
    diff.assert_same(sort_stdout=True)


def test_help(tmp_path: Path) -> None:
    """Our command list is qemu-io's minus the blkdebug breakpoint commands and reopen; the one-line usage of
    every command (as typed, alias or not) is qemu-io's. Extended help texts are our own words."""
    diff = run_differential(["help"], size="1M", tmp_path=tmp_path)
    theirs = diff.qemu.stdout.splitlines()
    ours = diff.aioblock.stdout.splitlines()
    assert set(ours) <= set(theirs)
    assert {line.split()[0] for line in set(theirs) - set(ours)} == {"break", "remove_break", "reopen", "resume",
                                                                     "wait_break"}
    assert ours[-2:] == theirs[-2:]
    names = [n for cmd in COMMANDS for n in (cmd.name, cmd.altname) if n]
    diff = run_differential([f"help {n}" for n in names], size="1M", tmp_path=tmp_path, name="one")

    def usage_lines(text: str) -> list[str]:       # extended help lines start with a space
        return [line for line in text.splitlines() if line and not line.startswith(" ")]
    assert usage_lines(diff.qemu.stdout) == usage_lines(diff.aioblock.stdout)
    assert len(usage_lines(diff.aioblock.stdout)) == len(names)
    assert diff.qemu.returncode == diff.aioblock.returncode == 0


def test_open_and_close(tmp_path: Path) -> None:
    qemu_img("create", "-q", "-f", "raw", str(tmp_path / "other.raw"), "64k")
    same(tmp_path, "close", "read 0 1", "length", "close", "sigraise 0", "sleep 1", "open -o driver=raw other.raw",
         "length", "write -P 7 0 1", "close", "open -r -o driver=raw other.raw", "read -P 7 0 1",
         "write 0 1", "open other.raw", "close", "open -t bogus other.raw", "open nonexist", "open a b",
         "open -x a", "open -n -o driver=raw other.raw", "write -P 9 1 1", "read -P 9 1 1", "q", "length")


def test_no_file(tmp_path: Path) -> None:
    """Without a file name both tools start with no file open; ``open`` opens one later."""
    qemu_img("create", "-q", "-f", "raw", str(tmp_path / "x.raw"), "64k")
    cmds = ["length", "help help", "open -o driver=raw x.raw", "length"]
    c_args = [a for c in cmds for a in ("-c", c)]
    assert QEMU_IO is not None
    theirs = subprocess.run([QEMU_IO, "-f", "raw", *c_args], capture_output=True, text=True, cwd=tmp_path)
    ours = subprocess.run([sys.executable, "-m", "aioblock", "io", "-f", "raw", *c_args], capture_output=True,
                          text=True, cwd=tmp_path)
    assert (ours.stdout, ours.stderr, ours.returncode) == (theirs.stdout, theirs.stderr, theirs.returncode)
    assert ours.returncode == 1 and ours.stdout.endswith("64 KiB\n")


def test_interactive_stdin(tmp_path: Path) -> None:
    """Without -c: a prompt before every line (terminal or not), EOF ends, quit ends early."""
    diff = run_differential([], size="1M", tmp_path=tmp_path,
                            stdin="write -P 1 0 1\nbogus\n\nread -P 1 0 1\nread -P 2 0 1\nlength")
    diff.assert_same()
    assert diff.aioblock.stdout.startswith("qemu-io> wrote 1/1 bytes at offset 0\n")
    assert diff.aioblock.returncode == 1
    diff = run_differential([], size="1M", tmp_path=tmp_path, stdin="length\nquit\nlength\n", name="q")
    diff.assert_same()
    assert diff.aioblock.stdout == "qemu-io> 1 MiB\nqemu-io> "


@pytest.mark.parametrize("extra", [("-t", "none"), ("-n",), ("-t", "writethrough"), ("-t", "directsync"),
                                   ("-t", "unsafe"), ("--nocache",)])
def test_cache_modes(tmp_path: Path, extra: tuple[str, ...]) -> None:
    cmds = ["write -P 5 1 3", "read -P 5 1 3", "write -z 3 1000", "read -P 0 3 1000", "write -P 6 511 2",
            "read -v 508 8", "discard 0 1k", "flush", "write -f -P 7 4095 2", "read -P 7 4095 2"]
    run_differential(cmds, size="1M", tmp_path=tmp_path, qemu_extra=extra if extra != ("--nocache",) else ("-n",),
                     aioblock_extra=extra).assert_same()


def test_bad_cache_mode_and_missing_file(tmp_path: Path) -> None:
    res = aioblock_cli("io", "-f", "raw", "-t", "bogus", "-c", "length", str(tmp_path / "x.raw"))
    assert res.returncode == 1 and "Invalid cache option: bogus" in res.stderr
    res = aioblock_cli("io", "-f", "raw", "-c", "read 0 1", str(tmp_path / "missing.raw"))
    assert res.returncode == 1
    assert res.stderr.startswith(f"aioblock: {tmp_path / 'missing.raw'}: ") and "No such file" in res.stderr


def test_normalise() -> None:
    text = ("wrote 4096/4096 bytes at offset 0\n4 KiB, 1 ops; 00.00 sec (5.766 MiB/sec and 737.9900 ops/sec)\n"
            "1 GiB, 1 ops; 0:00:03.31 (309.768 MiB/sec and 0.3025 ops/sec)\n"
            "512,1,0:00:00.00,797530.149,1557.676\n")
    assert normalise(text) == ("wrote 4096/4096 bytes at offset 0\n4 KiB, 1 ops; TIME (RATE)\n"
                               "1 GiB, 1 ops; TIME (RATE)\n512,1,TIME,RATE,RATE\n")


def test_sigint_dies_by_the_signal(tmp_path: Path) -> None:
    """Python turns SIGINT into KeyboardInterrupt; sigraise 2 must still kill the process like qemu-io."""
    diff = run_differential(["sigraise 2"], size="1M", tmp_path=tmp_path)
    assert diff.qemu.returncode == diff.aioblock.returncode == -signal.SIGINT
