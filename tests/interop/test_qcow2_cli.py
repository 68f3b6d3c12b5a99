"""qcow2 through the aioblock CLI, judged by QEMU: ``aioblock create -f qcow2`` must make the image ``qemu-img
create`` makes (same ``qemu-img info`` fields, same ``qemu-img map``, ``qemu-img check`` clean), refuse what
qemu-img refuses with qemu-img's message on one line, and ``aioblock io`` writes (patterns, zero writes,
discards, compressed writes, over backing files) must read back through ``qemu-io`` and leave images that
``qemu-img check`` passes and ``qemu-img compare`` finds identical to qemu-io's twin."""

from __future__ import annotations

import difflib
import json
import random
import subprocess
from pathlib import Path
from typing import Any

import pytest

import aioblock

from ..conftest import aioblock_cli, needs_qemu, qemu_img, qemu_io
from .differential import normalise, run_differential
from .qcow2_images import build
from .test_qcow2_read import aioblock_main

pytestmark = needs_qemu

KiB = 1024
MiB = 1024 * KiB

INFO_KEYS = ("virtual-size", "cluster-size", "format", "format-specific", "backing-filename",
             "backing-filename-format", "full-backing-filename", "dirty-flag")


def _info(path: Path) -> dict[str, Any]:
    info = json.loads(qemu_img("info", "--output=json", str(path)).stdout)
    return {k: info[k] for k in INFO_KEYS if k in info}


def _map(path: Path, *, offsets: bool = True) -> list[dict[str, Any]]:
    entries: list[dict[str, Any]] = json.loads(qemu_img("map", "--output=json", str(path)).stdout)
    if not offsets:
        for e in entries:
            e.pop("offset", None)
    return entries


def _check_clean(path: Path) -> None:
    res = qemu_img("check", str(path), check=False)
    assert res.returncode == 0, f"qemu-img check {path.name}: exit {res.returncode}\n{res.stdout}{res.stderr}"


def _make_base(tmp_path: Path, kind: str | None) -> tuple[list[str], Path | None]:
    """A backing file with data (``raw``: 1 MiB raw; ``qcow2``: 1.5 MiB qcow2 with 4k clusters) and the
    create arguments naming it (relative to the image's directory, as users write them)."""
    if kind is None:
        return [], None
    if kind == "raw":
        base = tmp_path / "base.raw"
        qemu_img("create", "-q", "-f", "raw", str(base), "1M")
        assert qemu_io(base, "write -P 0xb1 0 1M", "write -P 0xb2 3000 1536").returncode == 0
        return ["-b", "base.raw", "-F", "raw"], base
    base = tmp_path / "base.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", str(base), "1536K")
    assert qemu_io(base, "write -P 0xc1 0 700k", "write -P 0xc2 1000000 5000", fmt="qcow2").returncode == 0
    return ["-b", "base.qcow2", "-F", "qcow2"], base


# ---- create ------------------------------------------------------------------------------------------------

# (-o options, size or None to take the backing file's, backing kind)
CREATE_CASES = [
    ("compat=0.10,cluster_size=512", "1M", None),
    ("compat=0.10", "5M", None),
    ("compat=0.10,cluster_size=2M", "5M", None),
    ("compat=v2", "1M", None),
    ("compat=1.1,cluster_size=512", "1000000", None),       # rounded up to whole sectors
    ("", "0", None),
    ("", "1G", None),
    ("cluster_size=512", "4G", None),                       # a 1 MiB L1 table and several refcount blocks
    ("cluster_size=2M", "100M", None),
    ("cluster_size=4096,refcount_bits=1", "10M", None),
    ("cluster_size=512,refcount_bits=64", "1M", None),
    ("refcount_bits=8", "1M", None),
    ("refcount_bits=32,lazy_refcounts=on", "3M", None),
    ("lazy_refcounts=on", "1M", None),
    ("compression_type=zstd", "1M", None),
    ("compression_type=zlib,compat=0.10", "1M", None),
    ("extended_l2=on", "1M", None),
    ("extended_l2=on,cluster_size=16k", "1M", None),
    ("extended_l2=on,cluster_size=2M", "10M", None),
    ("preallocation=off,compat=1.1", "1M", None),
    ("preallocation=metadata", "5M", None),
    ("preallocation=metadata,cluster_size=512", "1M", None),
    ("preallocation=metadata,compat=0.10", "3M", None),
    ("preallocation=metadata,cluster_size=2M", "7M", None),
    ("preallocation=metadata,extended_l2=on", "2M", None),
    ("preallocation=metadata,refcount_bits=1,cluster_size=4096", "1536K", None),
    ("", None, "raw"),
    ("compat=0.10", "3M", "qcow2"),
    ("cluster_size=512", "2M", "raw"),
    ("cluster_size=2M", None, "qcow2"),
    ("extended_l2=on", "2M", "raw"),
]


@pytest.mark.parametrize(("opts", "size", "backing"), CREATE_CASES, ids=lambda v: str(v))
def test_create_matches_qemu_img(tmp_path: Path, opts: str, size: str | None, backing: str | None) -> None:
    """``aioblock create -f qcow2`` gives what ``qemu-img create`` gives with the same arguments: qemu-img info's
    virtual size, cluster size, format-specific data and backing fields, the identical qemu-img map (host
    offsets included: preallocated clusters sit where QEMU puts them), a clean qemu-img check and the same
    content."""
    back_args, _ = _make_base(tmp_path, backing)
    ours, theirs = tmp_path / "ours.qcow2", tmp_path / "theirs.qcow2"
    argv = ["create", "-q", "-f", "qcow2", *(["-o", opts] if opts else []), *back_args]
    tail = [size] if size is not None else []
    res = aioblock_main(*argv, str(ours), *tail)
    assert res.returncode == 0, res.stderr
    assert res.stdout == "" and res.stderr == ""
    qemu_img(*argv, str(theirs), *tail)
    _check_clean(ours)
    assert _info(ours) == _info(theirs)
    assert _map(ours) == _map(theirs)
    assert qemu_img("compare", str(ours), str(theirs), check=False).returncode == 0


def test_create_with_backing_options(tmp_path: Path) -> None:
    """The backing file given as ``-o backing_file=...,backing_fmt=...`` instead of -b/-F."""
    _make_base(tmp_path, "qcow2")
    ours, theirs = tmp_path / "ours.qcow2", tmp_path / "theirs.qcow2"
    opts = "backing_file=base.qcow2,backing_fmt=qcow2,cluster_size=4096"
    res = aioblock_cli("create", "-q", "-f", "qcow2", "-o", opts, str(ours))
    assert res.returncode == 0, res.stderr
    qemu_img("create", "-q", "-f", "qcow2", "-o", opts, str(theirs))
    _check_clean(ours)
    assert _info(ours) == _info(theirs)
    assert _map(ours) == _map(theirs)


async def test_create_through_the_api_matches_qemu_img(tmp_path: Path) -> None:
    """``aioblock.create`` (the API behind the command) with options and a backing file."""
    _make_base(tmp_path, "raw")
    ours, theirs = tmp_path / "ours.qcow2", tmp_path / "theirs.qcow2"
    await aioblock.create(str(ours), "qcow2", 2 * MiB, backing="base.raw", backing_fmt="raw",
                          options={"cluster_size": "4096", "lazy_refcounts": "on"})
    qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=4096,lazy_refcounts=on", "-b", "base.raw",
             "-F", "raw", str(theirs), "2M")
    _check_clean(ours)
    assert _info(ours) == _info(theirs)
    assert _map(ours) == _map(theirs)


# (-o options, a fragment of QEMU 7.2's message, checked against qemu-img's own output at run time)
BAD_CREATES = [
    ("extended_l2=on,cluster_size=4k",
     "Extended L2 entries are only supported with cluster sizes of at least 16384 bytes"),
    ("compat=0.10,extended_l2=on", "Extended L2 entries are only supported with compatibility level 1.1"),
    ("compat=0.10,lazy_refcounts=on", "Lazy refcounts only supported with compatibility level 1.1 and above"),
    ("compat=0.10,refcount_bits=1",
     "Different refcount widths than 16 bits require compatibility level 1.1 or above"),
    ("compat=0.10,refcount_bits=64",
     "Different refcount widths than 16 bits require compatibility level 1.1 or above"),
    ("compat=0.10,compression_type=zstd",
     "Non-zlib compression type is only supported with compatibility level 1.1 and above"),
    ("cluster_size=4M", "Cluster size must be a power of two between 512 and 2048k"),
    ("cluster_size=1000", "Cluster size must be a power of two between 512 and 2048k"),
    ("cluster_size=0", "Cluster size must be a power of two between 512 and 2048k"),
    ("refcount_bits=3", "Refcount width must be a power of two and may not exceed 64 bits"),
    ("refcount_bits=128", "Refcount width must be a power of two and may not exceed 64 bits"),
    ("compression_type=lz4", "Parameter 'compression-type' does not accept value 'lz4'"),
    ("compat=0.9", "Parameter 'version' does not accept value '0.9'"),
    ("preallocation=bogus", "Parameter 'preallocation' does not accept value 'bogus'"),
    ("lazy_refcounts=maybe", "Parameter 'lazy_refcounts' expects 'on' or 'off'"),
    ("foo=1", "Invalid parameter 'foo'"),
]


@pytest.mark.parametrize(("opts", "fragment"), BAD_CREATES, ids=[c[0] for c in BAD_CREATES])
def test_create_refuses_what_qemu_img_refuses(tmp_path: Path, opts: str, fragment: str) -> None:
    """A combination qemu-img refuses is refused: exit 1, one line ``aioblock: FILE: ...`` containing
    qemu-img's message (taken from qemu-img itself at run time), no traceback."""
    theirs = tmp_path / "theirs.qcow2"
    q = qemu_img("create", "-q", "-f", "qcow2", "-o", opts, str(theirs), "1M", check=False)
    assert q.returncode == 1
    prefix = f"qemu-img: {theirs}: "
    assert q.stderr.startswith(prefix), q.stderr
    message = q.stderr[len(prefix):].strip()
    assert fragment in message                  # the table above documents QEMU 7.2's wording
    assert not theirs.exists()
    ours = tmp_path / "ours.qcow2"
    res = aioblock_main("create", "-q", "-f", "qcow2", "-o", opts, str(ours), "1M")
    _assert_refused(res, ours, message)


def _assert_refused(res: subprocess.CompletedProcess[str], path: Path, message: str) -> None:
    assert res.returncode == 1, res.stdout + res.stderr
    assert "Traceback" not in res.stderr
    assert res.stderr.count("\n") == 1 and res.stderr.startswith(f"aioblock: {path}: "), res.stderr
    assert message in res.stderr, f"expected qemu-img's message {message!r}, got {res.stderr!r}"


@pytest.mark.parametrize(("opts", "message"), [
    ("cluster_size=4M", "Cluster size must be a power of two between 512 and 2048k"),
    ("compat=0.10,lazy_refcounts=on",
     "Lazy refcounts only supported with compatibility level 1.1 and above (use version=v3 or greater)"),
], ids=["cluster_size=4M", "compat=0.10,lazy_refcounts=on"])
def test_create_refusal_as_a_process(tmp_path: Path, opts: str, message: str) -> None:
    """The same through ``python -m aioblock``: exit 1, one line on stderr, no traceback."""
    ours = tmp_path / "ours.qcow2"
    _assert_refused(aioblock_cli("create", "-f", "qcow2", "-o", opts, str(ours), "1M"), ours, message)


@pytest.mark.parametrize("opts", ["cluster_size=4M", "compat=0.10,refcount_bits=1", "extended_l2=on,cluster_size=4k",
                                  "compression_type=lz4"])
def test_refused_create_leaves_no_file(tmp_path: Path, opts: str) -> None:
    """A refused create leaves no file behind, as with qemu-img (which, note, also deletes a file that was
    already there; that is not asked of aioblock)."""
    ours = tmp_path / "ours.qcow2"
    assert aioblock_main("create", "-q", "-f", "qcow2", "-o", opts, str(ours), "1M").returncode == 1
    assert not ours.exists(), "a refused create left a file behind"


def test_create_with_missing_backing_file(tmp_path: Path) -> None:
    """Without a size the backing file must be opened; a missing one is one clear line (qemu-img prints
    "Could not open 'missing.qcow2': No such file or directory" and "Could not open backing image.")."""
    ours = tmp_path / "ours.qcow2"
    res = aioblock_cli("create", "-q", "-f", "qcow2", "-b", "missing.qcow2", "-F", "qcow2", str(ours))
    assert res.returncode == 1
    assert res.stderr.count("\n") == 1 and "Traceback" not in res.stderr, res.stderr
    assert "missing.qcow2" in res.stderr and "No such file or directory" in res.stderr


# ---- io: writes read back by qemu-io -------------------------------------------------------------------------

SIZE = 4 * MiB
WRITES = [
    "write -P 0x11 3000 70000",
    "write -z 200k 64k",
    "discard 0 64k",
    "write -P 0x22 1048476 200",                 # crosses 1 MiB
    f"write -P 0x33 {SIZE - 512} 512",           # the last sector
    "write -z -u 2M 1M",
    "write -P 0x44 2200000 5000",
    "write -P 0x55 600000 1",
    "discard 1536k 64k",
    "flush",
]
# What must read back whatever the discards did (QEMU ignores discards of partial clusters, and on v2 keeps
# clusters that hide backing data): everything outside [0, 64k) and [1536k, 1600k).
VERIFY_NO_BACKING = [
    "read -P 0x11 65536 7464", "read -P 0 73000 131800", "read -P 0 204800 65536", "read -P 0 270336 329664",
    "read -P 0x55 600000 1", "read -P 0 600001 448475", "read -P 0x22 1048476 200", "read -P 0 1048676 524188",
    "read -P 0 1600k 448k", "read -P 0 2M 102848", "read -P 0x44 2200000 5000", "read -P 0 2205000 1988792",
    f"read -P 0x33 {SIZE - 512} 512",
]
# The same writes over a 1 MiB raw backing file (0xb1, with 0xb2 at 3000+1536): the overlay's unaligned writes
# copy partial clusters from the base, and past the base's end everything reads as zeroes.
VERIFY_RAW_BACKING = [
    "read -P 0x11 65536 7464", "read -P 0xb1 73000 131800", "read -P 0 204800 65536",
    "read -P 0xb1 270336 329664", "read -P 0x55 600000 1", "read -P 0xb1 600001 448475",
    "read -P 0x22 1048476 200", "read -P 0 1048676 524188", "read -P 0 1600k 448k", "read -P 0 2M 102848",
    "read -P 0x44 2200000 5000", "read -P 0 2205000 1988792", f"read -P 0x33 {SIZE - 512} 512",
]

# the 2 MiB-cluster cases take longest (each new cluster is 2 MiB to fill): marked slow
IO_CASES = [pytest.param(f"compat={c},cluster_size={s}", marks=[pytest.mark.slow] if s == "2M" else [])
            for c in ("0.10", "1.1") for s in ("512", "64k", "2M")]


def _text_diff(theirs: str, ours: str) -> str:
    return "".join(difflib.unified_diff(theirs.splitlines(True), ours.splitlines(True), "qemu-io", "aioblock io",
                                        n=2))[:6000]


def _run_both(ours: Path, theirs: Path, cmds: list[str]) -> None:
    """``aioblock io`` on ours, qemu-io on theirs: the same output and exit status (0)."""
    c_args = [a for c in cmds for a in ("-c", c)]
    res = aioblock_cli("io", "-f", "qcow2", *c_args, str(ours))
    q = qemu_io(theirs, *cmds, fmt="qcow2")
    assert q.returncode == 0, q.stdout + q.stderr
    assert res.returncode == 0, res.stdout + res.stderr
    assert normalise(res.stdout) == normalise(q.stdout), _text_diff(normalise(q.stdout), normalise(res.stdout))


def _verify(path: Path, reads: list[str]) -> None:
    res = qemu_io(path, *reads, fmt="qcow2", extra=("-r",))
    assert res.returncode == 0 and "verification failed" not in res.stdout, res.stdout + res.stderr


def _allocation(path: Path) -> list[tuple[int, int, int, bool, bool, bool]]:
    """qemu-img map without host offsets, as (start, length, depth, present, zero, data) runs. A data run is
    counted as data even where qemu-img also calls it zero (QEMU looks at the host file's holes under
    preallocated-looking images, which depends on how the writer filled the rest of a new cluster)."""
    runs: list[tuple[int, int, int, bool, bool, bool]] = []
    for e in _map(path, offsets=False):
        key = (e["depth"], e["present"], e["zero"] and not e["data"], e["data"])
        if runs and runs[-1][2:] == key and runs[-1][0] + runs[-1][1] == e["start"]:
            runs[-1] = (runs[-1][0], runs[-1][1] + e["length"], *key)
        else:
            runs.append((e["start"], e["length"], *key))
    return runs


def _same_allocation(ours: Path, theirs: Path) -> None:
    """The two images are allocated alike: the same runs, depths, zero clusters and data (a zero write made a
    zero cluster in both, a discard deallocated in both, ...)."""
    a, b = _allocation(ours), _allocation(theirs)
    assert a == b, (f"same content, allocated differently from qemu-io's twin (start, length, depth, present, "
                    f"zero, data):\naioblock's image:\n{a}\nqemu-io's image:\n{b}")


@pytest.mark.parametrize("opts", IO_CASES)
def test_io_writes_read_back_by_qemu_io(tmp_path: Path, opts: str) -> None:
    """On an image made by ``aioblock create``: ``aioblock io`` writes, zero writes and discards print what
    qemu-io prints on a twin made by qemu-img, qemu-io reads every byte back, qemu-img check passes, the two
    images compare identical and are allocated alike."""
    ours, theirs = tmp_path / "ours.qcow2", tmp_path / "theirs.qcow2"
    res = aioblock_cli("create", "-q", "-f", "qcow2", "-o", opts, str(ours), str(SIZE))
    assert res.returncode == 0, res.stderr
    qemu_img("create", "-q", "-f", "qcow2", "-o", opts, str(theirs), str(SIZE))
    _run_both(ours, theirs, WRITES)
    _verify(ours, VERIFY_NO_BACKING)
    _check_clean(ours)
    assert qemu_img("compare", str(ours), str(theirs), check=False).returncode == 0
    _same_allocation(ours, theirs)


@pytest.mark.parametrize("opts", [*IO_CASES, "extended_l2=on",
                                  pytest.param("extended_l2=on,cluster_size=2M", marks=pytest.mark.slow)])
def test_io_writes_over_a_shorter_backing_file(tmp_path: Path, opts: str) -> None:
    """The same writes on an overlay (made by ``aioblock create -b base.raw -F raw``) of a 1 MiB raw base, four
    times shorter than the overlay: partial clusters are copied from the base, the tail reads as zeroes, zero
    writes hide base data; the base is not modified."""
    back_args, base = _make_base(tmp_path, "raw")
    assert base is not None
    base_bytes = base.read_bytes()
    ours, theirs = tmp_path / "ours.qcow2", tmp_path / "theirs.qcow2"
    res = aioblock_cli("create", "-q", "-f", "qcow2", "-o", opts, *back_args, str(ours), str(SIZE))
    assert res.returncode == 0, res.stderr
    qemu_img("create", "-q", "-f", "qcow2", "-o", opts, *back_args, str(theirs), str(SIZE))
    _run_both(ours, theirs, WRITES)
    _verify(ours, VERIFY_RAW_BACKING)
    _check_clean(ours)
    assert qemu_img("compare", str(ours), str(theirs), check=False).returncode == 0
    _same_allocation(ours, theirs)
    assert base.read_bytes() == base_bytes


@pytest.mark.parametrize("opts", ["", "compression_type=zstd", "compat=0.10", "extended_l2=on",
                                  "cluster_size=4096"])
def test_io_compressed_writes_match_qemu_io(tmp_path: Path, opts: str) -> None:
    """``write -c`` (whole clusters, several at once, the last cluster; refused over an allocated cluster with
    EIO as QEMU 7.2 does), reads of compressed data, and writes that must decompress a cluster first."""
    cluster = 4096 if "4096" in opts else 65536
    size = 64 * cluster
    cmds = [f"write -c -P 0x5a 0 {cluster}", f"write -c -P 0x5b {cluster * 2} {cluster * 3}",
            f"write -c -P 0x5c {size - cluster} {cluster}", f"write -c -P 0x5d 0 {cluster}",
            f"read -P 0x5a 0 {cluster}", f"read -P 0x5b {cluster * 2 + 5} {cluster * 3 - 10}",
            f"write -P 0x61 {cluster * 3 + 3000} 1536", f"read -P 0x5b {cluster * 3} 3000",
            f"read -P 0x61 {cluster * 3 + 3000} 1536", f"read -P 0x5b {cluster * 3 + 4536} {cluster - 4536}",
            f"write -z {cluster * 4} {cluster}", f"read -P 0 {cluster * 4} {cluster}",
            f"discard {cluster * 2} {cluster}", f"read -P 0x5c {size - cluster} {cluster}"]
    diff = run_differential(cmds, size=size, tmp_path=tmp_path, fmt="qcow2", create_opts=opts or None)
    diff.assert_same()
    _check_clean(diff.aioblock_image)
    _same_allocation(diff.aioblock_image, diff.qemu_image)
    chk = json.loads(qemu_img("check", "--output=json", str(diff.aioblock_image)).stdout)
    assert chk.get("compressed-clusters", 0) > 0


@pytest.mark.parametrize("kind", ["chain", "extl2-64k", "v2", "zlib-io", "prealloc-metadata", "snapshots"])
def test_io_info_map_alloc_match_qemu_io(tmp_path: Path, kind: str) -> None:
    """qemu-io's read-only commands on images QEMU wrote: ``info`` (cluster size, vm state offset, format
    specific information), ``map`` (allocation in the top image), ``alloc``, and hex dumps of odd ranges."""
    img = build(kind, tmp_path / kind)
    size = len(img.expected())
    cmds = ["info", "map", f"alloc 0 {size}", "alloc 3000 100", f"alloc {size // 2} 70000", "read -v 2990 40",
            f"read -v {size - 33} 33", "length"]
    c_args = [a for c in cmds for a in ("-c", c)]
    res = aioblock_cli("io", "-r", "-f", "qcow2", *c_args, str(img.path))
    q = qemu_io(img.path, *cmds, fmt="qcow2", extra=("-r",))
    assert q.returncode == 0
    assert res.returncode == 0 and res.stderr == q.stderr, res.stderr
    assert normalise(res.stdout) == normalise(q.stdout), _text_diff(normalise(q.stdout), normalise(res.stdout))


def test_io_on_lazy_refcounts_image_keeps_the_feature(tmp_path: Path) -> None:
    """Writing to a lazy_refcounts image through aioblock keeps the feature on (a writer must never drop a
    compatible feature bit) and leaves it clean once closed."""
    p = tmp_path / "lazy.qcow2"
    assert aioblock_cli("create", "-q", "-f", "qcow2", "-o", "lazy_refcounts=on", str(p), "2M").returncode == 0
    res = aioblock_cli("io", "-f", "qcow2", "-c", "write -P 0x42 3000 100000", "-c", "write -z 1M 64k", str(p))
    assert res.returncode == 0, res.stderr
    info = json.loads(qemu_img("info", "--output=json", str(p)).stdout)
    assert info["format-specific"]["data"]["lazy-refcounts"] is True
    assert info["dirty-flag"] is False
    _check_clean(p)
    _verify(p, ["read -P 0 0 3000", "read -P 0x42 3000 100000", "read -P 0 1M 64k"])



@pytest.mark.parametrize("opts", ["compat=1.1", "compat=0.10", "extended_l2=on"])
def test_discards_give_the_space_back_like_qemu(tmp_path: Path, opts: str) -> None:
    """Discards and unmapping zero writes punch the freed clusters out of the host file as QEMU's do (its
    pass-discard-request): both twins end up with the same allocated size (to a cluster: the filesystem's own
    block accounting of metadata writes varies by a block), and a zero write without unmap keeps its clusters."""
    ours, theirs = tmp_path / "ours.qcow2", tmp_path / "theirs.qcow2"
    for p in (ours, theirs):
        qemu_img("create", "-q", "-f", "qcow2", "-o", opts, str(p), "64M")
        assert qemu_io(p, "write -P 7 0 16M", fmt="qcow2").returncode == 0
    full = ours.stat().st_blocks * 512
    cmds = ["discard 0 4M", "write -z -u 4M 4M", "write -z 8M 4M", "discard 12M 100k"]
    _run_both(ours, theirs, cmds)
    _check_clean(ours)
    assert qemu_img("compare", str(ours), str(theirs), check=False).returncode == 0
    ours_size, theirs_size = ours.stat().st_blocks * 512, theirs.stat().st_blocks * 512
    assert abs(ours_size - theirs_size) <= 64 << 10, (ours_size, theirs_size)
    assert ours_size < full - 7 * (1 << 20), (full, ours_size)      # 8 MiB given back (v2 keeps zero writes' too)


def test_json_output_is_qemu_img_text_exactly(tmp_path: Path) -> None:
    """``info``/``check --output json`` print the same text as qemu-img, key order included (qemu-img prints
    QDict hash order): a chain over raw, snapshots, compressed clusters, leaked and overcounted clusters."""
    base, top, snap = tmp_path / "base.raw", tmp_path / "top.qcow2", tmp_path / "snap.qcow2"
    qemu_img("create", "-q", "-f", "raw", str(base), "8M")
    qemu_img("create", "-q", "-f", "qcow2", "-b", str(base), "-F", "raw", str(top))
    assert qemu_io(top, "write -P 1 0 1M", "write -c -P 2 2M 64k", fmt="qcow2").returncode == 0
    qemu_img("create", "-q", "-f", "qcow2", "-o", "lazy_refcounts=on", str(snap), "16M")
    assert qemu_io(snap, "write -P 1 0 1M", fmt="qcow2").returncode == 0
    qemu_img("snapshot", "-c", "s1", str(snap))
    leak = tmp_path / "leak.qcow2"
    leak.write_bytes(snap.read_bytes())
    with leak.open("r+b") as f:                        # cluster 200 leaked, cluster 3 overcounted
        f.seek(48)
        f.seek(int.from_bytes(f.read(8), "big"))
        f.seek(int.from_bytes(f.read(8), "big") + 2 * 200)
        f.write((1).to_bytes(2, "big"))
        f.seek(-2 * 198, 1)
        f.write((5).to_bytes(2, "big"))
    for args in (["info", "--output", "json", "--backing-chain", str(top)], ["info", "--output", "json", str(snap)],
                 ["check", "--output", "json", str(top)], ["check", "--output", "json", str(leak)]):
        theirs = qemu_img(*args, check=False)
        ours = aioblock_cli(*args)
        assert (ours.returncode, ours.stdout) == (theirs.returncode, theirs.stdout), \
            _text_diff(theirs.stdout, ours.stdout)


@pytest.mark.parametrize("opts", ["cluster_size=65536", "cluster_size=4096", "compression_type=zstd,cluster_size=2048"])
def test_convert_compressed_is_byte_identical_to_qemu_img(tmp_path: Path, opts: str) -> None:
    """``convert -c`` writes in guest order and packs compressed clusters as qemu-img does (running on into the
    next host cluster when it is the next free one; incompressible clusters stored whole), and ends the stream
    by aligning the file to a sector: the output file is qemu-img's, byte for byte."""
    src = tmp_path / "src.raw"
    with src.open("wb") as f:
        f.write(bytes(range(256)) * 4096)                          # compressible, but not to nothing
        f.write(random.Random(7).randbytes(2 << 20))               # incompressible
        f.write(bytes(1 << 20))                                    # zeroes: left unallocated
        f.write(b"hello qcow2 " * 87382)                           # very compressible, odd length
    ours, theirs = tmp_path / "ours.qcow2", tmp_path / "theirs.qcow2"
    qemu_img("convert", "-f", "raw", "-O", "qcow2", "-c", "-o", opts, str(src), str(theirs))
    res = aioblock_cli("convert", "-f", "raw", "-O", "qcow2", "-c", "-o", opts, str(src), str(ours))
    assert res.returncode == 0, res.stderr
    _check_clean(ours)
    assert ours.read_bytes() == theirs.read_bytes()
