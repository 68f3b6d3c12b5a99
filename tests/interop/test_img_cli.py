"""qemu-img-style commands judged by qemu-img itself on raw images: info, map, compare, convert, create,
check, and the bad-input contract (one line ``aioblock: FILE: message``, the right exit status)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from ..conftest import aioblock_cli, needs_qemu, qemu_img, qemu_io, run

pytestmark = needs_qemu

# Each layout: qemu-io commands that shape a 2 MiB raw image.
LAYOUTS = {
    "empty": [],
    "first-block": ["write -P 0x11 0 512"],
    "scattered": ["write -P 0xab 4096 8192", "write -P 0x01 1000000 1", "write -P 0xcd 2093056 4096"],
    "zeroed-and-discarded": ["write -P 0x55 0 1M", "write -z 65536 65536", "write -z -u 131072 131072",
                             "discard 524288 262144"],
    "full": ["write -P 0x77 0 2M"],
}


@pytest.fixture(params=sorted(LAYOUTS))
def layout_image(request: pytest.FixtureRequest, tmp_path: Path) -> Path:
    path = tmp_path / f"{request.param}.raw"
    qemu_img("create", "-q", "-f", "raw", str(path), "2M")
    if LAYOUTS[request.param]:
        assert qemu_io(path, *LAYOUTS[request.param]).returncode == 0
    return path


def test_info_and_map_agree_with_qemu_img(layout_image: Path) -> None:
    p = str(layout_image)
    for args in (["info", "--output=json"], ["info"], ["map", "--output=json"], ["map"],
                 ["info", "--backing-chain", "--output=json"], ["info", "-f", "raw", "--output=json"]):
        ours, theirs = aioblock_cli(*args, p), qemu_img(*args, p)
        assert ours.returncode == 0, ours.stderr
        assert ours.stdout == theirs.stdout, args


def test_map_and_info_of_zero_length_image(tmp_path: Path) -> None:
    p = tmp_path / "zero.raw"
    p.touch()
    for args in (["map", "--output=json"], ["info", "--output=json"]):
        assert aioblock_cli(*args, str(p)).stdout == qemu_img(*args, str(p)).stdout


def _compare_both(*args: str) -> tuple[tuple[int, str], tuple[int, str]]:
    ours = aioblock_cli("compare", *args)
    theirs = qemu_img("compare", *args, check=False)
    return (ours.returncode, ours.stdout), (theirs.returncode, theirs.stdout)


@pytest.mark.parametrize("cmds_b", [
    [],                                              # identical
    ["write -P 0x01 100000 1"],                      # one byte, mid-sector
    ["write -P 0x02 0 1"],
    ["write -P 0x03 2097151 1"],                     # last byte
    ["write -z 4096 512"],
])
def test_compare_agrees_with_qemu_img(layout_image: Path, tmp_path: Path, cmds_b: list[str]) -> None:
    b = tmp_path / "b.raw"
    shutil.copy(layout_image, b)
    if cmds_b:
        qemu_io(b, *cmds_b)
    ours, theirs = _compare_both(str(layout_image), str(b))
    assert ours == theirs


@pytest.mark.parametrize("tail", [None, "write -P 0x09 3000000 1"])
@pytest.mark.parametrize("strict", [False, True])
def test_compare_different_sizes(tmp_path: Path, tail: str | None, strict: bool) -> None:
    a, b = tmp_path / "a.raw", tmp_path / "b.raw"
    qemu_img("create", "-q", "-f", "raw", str(a), "2M")
    qemu_img("create", "-q", "-f", "raw", str(b), "4M")
    qemu_io(a, "write -P 0x44 0 64k")
    qemu_io(b, "write -P 0x44 0 64k")
    if tail:
        qemu_io(b, tail)
    extra = ["-s"] if strict else []
    for x, y in ((a, b), (b, a)):
        ours, theirs = _compare_both(*extra, str(x), str(y))
        assert ours == theirs


def test_compare_errors_exit_2(tmp_path: Path) -> None:
    a = tmp_path / "a.raw"
    qemu_img("create", "-q", "-f", "raw", str(a), "1M")
    res = aioblock_cli("compare", str(a), str(tmp_path / "missing.raw"))
    assert res.returncode == 2
    assert res.stderr.count("\n") == 1 and "missing.raw" in res.stderr and "No such file" in res.stderr


@pytest.mark.parametrize("extra", [[], ["-m", "1"], ["-m", "64"], ["-S", "0"], ["-p"]])
def test_convert_agrees_with_qemu_img(layout_image: Path, tmp_path: Path, extra: list[str]) -> None:
    ours, theirs = tmp_path / "ours.raw", tmp_path / "theirs.raw"
    res = aioblock_cli("convert", "-f", "raw", "-O", "raw", *extra, str(layout_image), str(ours))
    assert res.returncode == 0, res.stderr
    qemu_extra = ["-m", "16"] if extra == ["-m", "64"] else extra       # qemu-img allows at most 16
    qemu_img("convert", "-f", "raw", "-O", "raw", *qemu_extra, str(layout_image), str(theirs))
    assert qemu_img("compare", str(ours), str(theirs)).returncode == 0
    assert qemu_img("compare", str(layout_image), str(ours)).returncode == 0
    if "-S" not in extra:                     # same sparseness as qemu-img's output
        assert qemu_img("map", "--output=json", str(ours)).stdout.replace(str(ours), "X") == \
            qemu_img("map", "--output=json", str(theirs)).stdout.replace(str(theirs), "X")


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
@pytest.mark.parametrize("cache", ["unsafe", "writeback", "writethrough", "none", "directsync"])
def test_convert_target_cache_modes(layout_image: Path, tmp_path: Path, fmt: str, cache: str) -> None:
    out = tmp_path / f"out.{fmt}"
    res = aioblock_cli("convert", "-f", "raw", "-O", fmt, "-t", cache, "-T", "none", str(layout_image), str(out))
    assert res.returncode == 0, res.stderr
    assert qemu_img("compare", "-f", "raw", "-F", fmt, str(layout_image), str(out)).returncode == 0
    if fmt == "qcow2":
        assert qemu_img("check", str(out)).returncode == 0


def test_convert_bad_cache_mode(layout_image: Path, tmp_path: Path) -> None:
    res = aioblock_cli("convert", "-t", "bogus", str(layout_image), str(tmp_path / "x.raw"))
    assert res.returncode == 1 and res.stderr.strip().endswith("Invalid cache option: bogus")
    assert not (tmp_path / "x.raw").exists()


def test_convert_compressed_raw_is_refused(layout_image: Path, tmp_path: Path) -> None:
    res = aioblock_cli("convert", "-c", "-O", "raw", str(layout_image), str(tmp_path / "c.raw"))
    assert res.returncode == 1
    assert res.stderr.strip().endswith("Compression not supported for this file format")
    assert res.stderr.count("\n") == 1


@pytest.mark.parametrize("size", ["0", "1", "512", "1k", "1M", "1.5M", "3G", "1T"])
def test_create_sizes_agree(tmp_path: Path, size: str) -> None:
    ours, theirs = tmp_path / "ours.raw", tmp_path / "theirs.raw"
    res = aioblock_cli("create", "-f", "raw", str(ours), size)
    assert res.returncode == 0, res.stderr
    theirs_out = qemu_img("create", "-f", "raw", str(theirs), size).stdout
    assert res.stdout == theirs_out.replace(str(theirs), str(ours))
    assert os.path.getsize(ours) == os.path.getsize(theirs)
    info = [json.loads(qemu_img("info", "--output=json", str(p)).stdout) for p in (ours, theirs)]
    assert info[0]["virtual-size"] == info[1]["virtual-size"]
    assert qemu_img("map", "--output=json", str(ours)).stdout.replace(str(ours), "X") == \
        qemu_img("map", "--output=json", str(theirs)).stdout.replace(str(theirs), "X")


@pytest.mark.parametrize("prealloc", ["off", "falloc", "full"])
def test_create_preallocation(tmp_path: Path, prealloc: str) -> None:
    p = tmp_path / "p.raw"
    assert aioblock_cli("create", "-q", "-f", "raw", "-o", f"preallocation={prealloc}", str(p), "1M").returncode == 0
    assert os.path.getsize(p) == 1 << 20
    if prealloc != "off":
        assert os.stat(p).st_blocks * 512 >= 1 << 20
    assert p.read_bytes() == bytes(1 << 20)


@pytest.mark.parametrize(("args", "message"), [
    (["create", "-f", "raw", "{p}"], "Image creation needs a size parameter"),
    (["create", "-f", "raw", "{p}", "1Q"], "Invalid size specified"),
    (["create", "-f", "raw", "-o", "foo=1", "{p}", "1M"], "Invalid parameter 'foo'"),
    (["create", "-f", "raw", "-o", "preallocation=bogus", "{p}", "1M"], "preallocation"),
    (["create", "-f", "raw", "-b", "base.raw", "{p}", "1M"], "Backing file not supported for file format 'raw'"),
    (["create", "-f", "bogus", "{p}", "1M"], "Unknown file format 'bogus'"),
])
def test_create_errors(tmp_path: Path, args: list[str], message: str) -> None:
    p = str(tmp_path / "x.raw")
    res = aioblock_cli(*[a.format(p=p) for a in args])
    assert res.returncode == 1
    assert res.stderr.startswith("aioblock: ") and message in res.stderr and res.stderr.count("\n") == 1
    assert "Traceback" not in res.stderr


def test_check_raw_exits_63(layout_image: Path) -> None:
    for extra in ([], ["--output=json"], ["-r", "all"]):
        ours = aioblock_cli("check", *extra, str(layout_image))
        theirs = qemu_img("check", *extra, str(layout_image), check=False)
        assert ours.returncode == theirs.returncode == 63
        assert ours.stderr.strip() == f"aioblock: {layout_image}: This image format does not support checks"


# ---- bad input: one clear line, the right exit status, never a traceback ----------------------------------

def _assert_one_line_error(res: object, filename: str, fragment: str) -> None:
    assert res.returncode != 0
    err = res.stderr
    assert err.count("\n") == 1, err
    assert err.startswith(f"aioblock: {filename}: ") and fragment in err, err


@pytest.mark.parametrize("command", [["info"], ["map"], ["check"], ["io", "-c", "read 0 1"],
                                     ["convert", "-O", "raw", "{f}", "{out}"], ["compare", "{f}", "{f}"]])
def test_missing_file_and_directory(tmp_path: Path, command: list[str]) -> None:
    out = str(tmp_path / "out.raw")
    for target, fragment in ((str(tmp_path / "missing.img"), "No such file or directory"),
                             (str(tmp_path), "regular file")):
        argv = [a.format(f=target, out=out) for a in command]
        if "{f}" not in command:
            argv.append(target)
        res = aioblock_cli(*argv)
        _assert_one_line_error(res, target, fragment)
        assert res.returncode == (2 if command[0] == "compare" else 1)


def test_unreadable_file(tmp_path: Path) -> None:
    p = tmp_path / "secret.raw"
    p.write_bytes(bytes(4096))
    p.chmod(0)
    argv = ["info", str(p)]
    if os.geteuid() == 0:           # root reads anything: drop the capabilities that allow it
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            pytest.skip("setpriv (util-linux) is needed to test permissions as root")
        import sys
        res = run([setpriv, "--bounding-set", "-dac_override,-dac_read_search", sys.executable, "-m",
                   "aioblock", *argv])
    else:
        res = aioblock_cli(*argv)
    _assert_one_line_error(res, str(p), "Permission denied")


def test_empty_file_with_format_qcow2(tmp_path: Path) -> None:
    p = tmp_path / "empty.img"
    p.touch()
    res = aioblock_cli("info", "-f", "qcow2", str(p))
    _assert_one_line_error(res, str(p), "qcow2")


def test_request_past_the_end(tmp_path: Path) -> None:
    p = tmp_path / "s.raw"
    qemu_img("create", "-q", "-f", "raw", str(p), "1M")
    ours = aioblock_cli("io", "-f", "raw", "-c", "read 1048570 10", str(p))
    theirs = qemu_io(p, "read 1048570 10")
    assert ours.returncode == theirs.returncode != 0
    assert "read failed: Input/output error" in ours.stdout + ours.stderr
    assert "Traceback" not in ours.stderr
