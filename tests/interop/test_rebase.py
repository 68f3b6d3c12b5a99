"""``aioblock rebase`` (safe and ``-u``) on qcow2 and QED, judged by qemu-img: the same operation through
qemu-img rebase on a twin copy, then ``qemu-img compare`` (the rebased image reads as it did over its old chain,
and as qemu-img's result), ``qemu-img check`` clean, the backing reference qemu-img info reports; refused
rebases leave the file byte for byte as it was."""

from __future__ import annotations

import asyncio
import json
import random
import shutil
from pathlib import Path

import pytest

import aioblock
from aioblock.errors import InvalidOptionError, ReadOnlyError

from ..conftest import aioblock_cli, needs_qemu, qemu_img, qemu_io

pytestmark = needs_qemu

SIZE = 4 << 20
#: the images rebased: format and create options
TOPS = {"qcow2": ("qcow2", ""), "qcow2-4k": ("qcow2", "cluster_size=4k"), "qed": ("qed", ""),
        "qed-4k": ("qed", "cluster_size=4k,table_size=2")}


def info(path: Path) -> dict[str, object]:
    out: dict[str, object] = json.loads(qemu_img("info", "--output=json", str(path)).stdout)
    return out


def backing_ref(path: Path) -> tuple[object, object]:
    i = info(path)
    return i.get("backing-filename"), i.get("backing-filename-format")


def scatter(path: Path, fmt: str, seed: int, count: int, *, size: int = SIZE) -> None:
    """``count`` writes of random patterns, sizes and (often unaligned) offsets, through qemu-io."""
    rng = random.Random(seed)
    cmds = []
    for _ in range(count):
        length = rng.choice([512, 4096, 65536, 3 * 4096 + 512, 200 * 1024])
        offset = rng.randrange(0, size - length) // 512 * 512
        cmds.append(f"write -q -P {rng.randrange(1, 255)} {offset} {length}")
    assert qemu_io(path, *cmds, fmt=fmt).returncode == 0


@pytest.fixture
def chain(tmp_path: Path) -> Path:
    """base.qcow2 (data everywhere in its first 3 MiB) and the directory for the tops."""
    base = tmp_path / "base.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(base), str(SIZE))
    assert qemu_io(base, "write -q -P 17 0 3M", fmt="qcow2").returncode == 0
    scatter(base, "qcow2", 1, 20)
    return tmp_path


def make_top(d: Path, key: str, seed: int) -> Path:
    fmt, opts = TOPS[key]
    top = d / f"top.{fmt}"
    argv = ["create", "-q", "-f", fmt, "-b", "base.qcow2", "-F", "qcow2"]
    if opts:
        argv += ["-o", opts]
    qemu_img(*argv, str(top), str(SIZE))
    scatter(top, fmt, seed, 25)
    return top


def make_new_backing(d: Path, kind: str) -> list[str]:
    """The new backing file, sharing some of base's data; returns rebase's -b/-F arguments."""
    if kind == "none":
        return ["-b", ""]
    raw = d / "new.raw"
    # shorter than the image, and not a multiple of any cluster size: past its end the new chain reads zeroes
    qemu_img("convert", "-f", "qcow2", "-O", "raw", str(d / "base.qcow2"), str(raw))
    with open(raw, "r+b") as f:
        f.truncate(3 * (1 << 20) + 1536)
    scatter(raw, "raw", 2, 10, size=3 << 20)
    if kind == "raw":
        return ["-b", "new.raw", "-F", "raw"]
    new = d / "new.qcow2"
    qemu_img("convert", "-f", "raw", "-O", "qcow2", str(raw), str(new))
    return ["-b", "new.qcow2", "-F", "qcow2"]


@pytest.mark.parametrize("new", ["raw", "qcow2", "none"])
@pytest.mark.parametrize("key", list(TOPS))
def test_safe_rebase_matches_qemu_img(chain: Path, key: str, new: str) -> None:
    fmt = TOPS[key][0]
    top = make_top(chain, key, seed=3)
    spec = make_new_backing(chain, new)
    ours, theirs = chain / f"ours.{fmt}", chain / f"theirs.{fmt}"
    shutil.copy(top, ours)
    shutil.copy(top, theirs)
    qemu_img("rebase", "-f", fmt, *spec, str(theirs))
    r = aioblock_cli("rebase", "-f", fmt, *spec, str(ours))
    assert r.returncode == 0, r.stderr
    assert r.stdout == r.stderr == ""
    assert backing_ref(ours) == backing_ref(theirs)
    assert qemu_img("compare", str(top), str(ours), check=False).returncode == 0    # reads as before
    assert qemu_img("compare", str(theirs), str(ours), check=False).returncode == 0
    assert qemu_img("check", str(ours), check=False).returncode == 0


@pytest.mark.parametrize("key", ["qcow2", "qed"])
def test_unsafe_rebase_matches_qemu_img(chain: Path, key: str) -> None:
    """A sequence of -u rebases, each done by both tools on twin copies: the same reference each time (qcow2:
    the same file byte for byte; QED: QEMU leaves the tail of a longer old name in the header, we zero it)."""
    fmt = TOPS[key][0]
    top = make_top(chain, key, seed=4)
    ours, theirs = chain / f"ours.{fmt}", chain / f"theirs.{fmt}"
    shutil.copy(top, ours)
    shutil.copy(top, theirs)
    data = qemu_img("convert", "-O", "raw", str(top), str(chain / "before.raw"))
    assert data.returncode == 0
    for spec in (["-b", "missing-file.qcow2", "-F", "qcow2"], ["-b", "x" * 900, "-F", "raw"],
                 ["-b", "new.raw", "-F", "vmdk"], ["-b", ""], [], ["-b", "base.qcow2", "-F", "qcow2"]):
        qemu_img("rebase", "-u", "-f", fmt, *spec, str(theirs))
        r = aioblock_cli("rebase", "-u", "-f", fmt, *spec, str(ours))
        assert r.returncode == 0, (spec, r.stderr)
        assert backing_ref(ours) == backing_ref(theirs), spec
        if fmt == "qcow2":
            assert ours.read_bytes() == theirs.read_bytes(), spec
    assert qemu_img("check", str(ours), check=False).returncode == 0
    # the data never moved: back on its old backing file, it reads as it did
    assert qemu_img("compare", "-F", "raw", str(ours), str(chain / "before.raw"), check=False).returncode == 0


@pytest.mark.parametrize(("key", "args", "message"), [
    ("qcow2", ["-b", "new.raw"], "backing format must be specified"),
    ("qed", ["-u", "-b", "new.raw"], "backing format must be specified"),
    ("qcow2", ["-b", "missing.raw", "-F", "raw"], "Could not open new backing file 'missing.raw'"),
    ("qcow2", ["-b", "new.raw", "-F", "qcow2"], "Could not open new backing file 'new.raw'"),
    ("qed", ["-b", "top.qed", "-F", "qed"], "backing chain loop"),
    ("qcow2", ["-u", "-b", "top.qcow2", "-F", "qcow2"], "backing chain loop"),
    ("qcow2", ["-u", "-b", "new.raw", "-F", "foo"], "Invalid format name: 'foo'"),
    ("qcow2", ["-b", "y" * 1024, "-F", "raw"], "backing file name too long"),
    ("qed", ["-u", "-b", "y" * 4096, "-F", "raw"], "backing file name too long"),
    ("qed-4k", ["-u", "-b", "y" * 4033, "-F", "raw"], "No space left in the file header"),
])
def test_refused_rebase_changes_nothing(chain: Path, key: str, args: list[str], message: str) -> None:
    top = make_top(chain, key, seed=5)
    make_new_backing(chain, "raw")
    before = top.read_bytes()
    r = aioblock_cli("rebase", *args, str(top))
    assert r.returncode == 1
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"aioblock: {top}: ") and message in lines[0], r.stderr
    assert top.read_bytes() == before


def test_rebase_of_a_format_without_backing_files(tmp_path: Path) -> None:
    img = tmp_path / "a.raw"
    qemu_img("create", "-q", "-f", "raw", str(img), "1M")
    r = aioblock_cli("rebase", "-u", "-b", "x", "-F", "raw", "-f", "raw", str(img))
    assert r.returncode == 1 and "format 'raw' has no backing file" in r.stderr


def test_safe_rebase_needs_the_old_chain(chain: Path) -> None:
    top = make_top(chain, "qcow2", seed=6)
    make_new_backing(chain, "raw")
    (chain / "base.qcow2").unlink()
    before = top.read_bytes()
    r = aioblock_cli("rebase", "-b", "new.raw", "-F", "raw", str(top))
    assert r.returncode == 1 and "base.qcow2" in r.stderr
    assert top.read_bytes() == before
    r = aioblock_cli("rebase", "-u", "-b", "new.raw", "-F", "raw", str(top))       # -u does not need it
    assert r.returncode == 0, r.stderr
    assert backing_ref(top) == ("new.raw", "raw")


@pytest.mark.parametrize("key", ["qcow2", "qed"])
def test_change_backing_file_api(chain: Path, key: str) -> None:
    top = make_top(chain, key, seed=7)

    async def main() -> None:
        async with aioblock.open(str(top), read_only=True, options={"backing": "ignore"}) as disk:
            with pytest.raises(ReadOnlyError):
                await disk.change_backing_file("x", "raw")
        async with aioblock.open(str(top), options={"backing": "ignore"}) as disk:
            with pytest.raises(InvalidOptionError, match="backing format must be specified"):
                await disk.change_backing_file("x", None)
            await disk.change_backing_file("other.raw", "raw")
        async with aioblock.open(str(top), options={"backing": "ignore"}) as disk:
            assert disk.root.backing_filename == "other.raw"
            assert disk.root.backing_format == "raw"
            await disk.change_backing_file(None, None)
        async with aioblock.open(str(top)) as disk:
            assert disk.root.backing_filename is None

    asyncio.run(main())
    assert backing_ref(top) == (None, None)
    assert qemu_img("check", str(top), check=False).returncode == 0
