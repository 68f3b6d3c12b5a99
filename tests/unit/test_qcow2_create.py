"""qcow2 image creation (``aioblock.drivers.qcow2.create``) against qemu-img 7.2.

For each set of options the same image is made twice, by ``create_image`` and by ``qemu-img create``, and the
two must be indistinguishable: ``qemu-img check``/``info``/``map`` print the same (but for file names and the
allocated size), and the files are byte for byte the same. Refused options must give QEMU's message and write
nothing.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import pytest

from aioblock.drivers.qcow2 import layout
from aioblock.drivers.qcow2.create import (
    CreateOptions,
    _ones,
    _refblocks_needed,
    _Runs,
    create_image,
    parse_create_options,
    plan_image,
)
from aioblock.errors import ImageTooLargeError, InvalidOptionError
from aioblock.io.file import FileNode

from ..conftest import QEMU_IMG, needs_qemu, qemu_img, run

# ---- helpers -----------------------------------------------------------------------------------------------


async def ours(path: Path, size: int, opts: dict[str, str], backing: str | None = None,
               fmt: str | None = None) -> None:
    node = await FileNode.open_file(str(path), create=True, engine="sync")
    try:
        await create_image(node, (size + 511) & ~511, backing=backing, backing_fmt=fmt, options=opts)
    finally:
        await node.close()


def theirs(path: Path, size: int, opts: dict[str, str], backing: str | None = None,
           fmt: str | None = None) -> None:
    argv = ["create", "-q", "-f", "qcow2"]
    if opts:
        argv += ["-o", ",".join(f"{k}={v}" for k, v in opts.items())]
    if backing is not None:
        argv += ["-u", "-b", backing, "-F", fmt or "raw"]
    qemu_img(*argv, str(path), str(size))


def _data_extents(path: Path) -> list[tuple[int, int]]:
    out = []
    fd = os.open(path, os.O_RDONLY)
    try:
        end = os.fstat(fd).st_size
        pos = 0
        while pos < end:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:
                break
            pos = os.lseek(fd, start, os.SEEK_HOLE)
            out.append((start, pos))
    finally:
        os.close(fd)
    return out


def first_difference(a: Path, b: Path) -> int | None:
    """Byte offset of the first difference between two (sparse) files, or None; holes read as zeroes, so only
    the data extents of either file are compared."""
    if a.stat().st_size != b.stat().st_size:
        return min(a.stat().st_size, b.stat().st_size)
    extents = sorted(_data_extents(a) + _data_extents(b))
    with open(a, "rb") as fa, open(b, "rb") as fb:
        for start, end in extents:
            pos = start
            while pos < end:
                n = min(end - pos, 1 << 22)
                fa.seek(pos)
                fb.seek(pos)
                ba, bb = fa.read(n), fb.read(n)
                if ba != bb:
                    return pos + next(i for i in range(n) if ba[i] != bb[i])
                pos += n
    return None


def _head(path: Path) -> bytes:
    with open(path, "rb") as f:
        return f.read(1 << 21)


def _qemu_json(*args: str) -> object:
    assert QEMU_IMG is not None
    proc = run([QEMU_IMG, *args])
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def assert_same_image(mine: Path, ref: Path) -> None:
    """``qemu-img check``/``info``/``map`` agree and the files are identical."""
    check_a = _qemu_json("check", "--output=json", "-f", "qcow2", str(mine))
    check_b = _qemu_json("check", "--output=json", "-f", "qcow2", str(ref))
    assert isinstance(check_a, dict) and isinstance(check_b, dict)
    assert check_a["check-errors"] == 0 and "leaks" not in check_a and "corruptions" not in check_a
    for d in (check_a, check_b):
        d.pop("filename")
    assert check_a == check_b
    info_a = _qemu_json("info", "--output=json", "-f", "qcow2", str(mine))
    info_b = _qemu_json("info", "--output=json", "-f", "qcow2", str(ref))
    assert isinstance(info_a, dict) and isinstance(info_b, dict)
    for d in (info_a, info_b):
        for key in ("filename", "actual-size"):
            d.pop(key, None)
    assert info_a == info_b
    assert (_qemu_json("map", "--output=json", "-f", "qcow2", str(mine)) ==
            _qemu_json("map", "--output=json", "-f", "qcow2", str(ref)))
    diff = first_difference(mine, ref)
    assert diff is None, f"files differ at byte {diff:#x}"
    hdr = layout.parse_header(_head(mine), mine.stat().st_size)          # our own parser accepts it too
    assert hdr.l1_size == layout.size_to_l1(hdr.size, hdr.cluster_bits, hdr.extended_l2)


async def compare(tmp_path: Path, size: int, opts: dict[str, str], backing: str | None = None,
                  fmt: str | None = None) -> None:
    if backing is not None and not backing.startswith("/") and len(backing) < 200:
        (tmp_path / backing).parent.mkdir(parents=True, exist_ok=True)
        qemu_img("create", "-q", "-f", fmt or "raw", str(tmp_path / backing), str(max(size, 512)))
    mine, ref = tmp_path / "mine.qcow2", tmp_path / "ref.qcow2"
    await ours(mine, size, opts, backing, fmt)
    theirs(ref, size, opts, backing, fmt)
    assert_same_image(mine, ref)


# ---- identical to qemu-img ---------------------------------------------------------------------------------

K, M, G, T = 1 << 10, 1 << 20, 1 << 30, 1 << 40

LAYOUT_CASES = [
    (M, {}),
    (0, {}),
    (12345, {}),                                                  # rounded up to 12800 as the API does
    (M, {"compat": "0.10"}),
    (10 * G, {"compat": "v2", "cluster_size": "4k"}),
    (M, {"cluster_size": "512"}),
    (10 * G, {"cluster_size": "512"}),
    (10 * G, {"cluster_size": "4k", "refcount_bits": "1"}),
    (4 * T, {"cluster_size": "64k", "refcount_bits": "8"}),
    (16 * T, {"cluster_size": "64k"}),
    (4 * T, {"cluster_size": "2M", "refcount_bits": "64"}),
    (128 * G, {"cluster_size": "512"}),                           # the largest L1: the refcount table moves
    (100 * G, {"cluster_size": "1k", "refcount_bits": "64"}),     # several refcount-table growths
    (64 * G, {"cluster_size": "512", "refcount_bits": "1"}),
    (10 * G, {"lazy_refcounts": "on", "compression_type": "zstd"}),
    (10 * G, {"extended_l2": "on"}),
    (4 * T, {"extended_l2": "on", "cluster_size": "2M", "refcount_bits": "2", "compat": "v3"}),
    (10 * G, {"extended_l2": "on", "cluster_size": "16k", "refcount_bits": "32"}),
    # preallocation=metadata
    (M, {"preallocation": "metadata"}),
    (M + 512, {"preallocation": "metadata"}),                     # the tail of the last cluster is zeroed
    (M + 512, {"preallocation": "metadata", "extended_l2": "on"}),
    (10 * G, {"preallocation": "metadata"}),
    (16 * M, {"preallocation": "metadata", "cluster_size": "512"}),   # refcount table grows on the way
    (27124736, {"preallocation": "metadata", "cluster_size": "512", "compression_type": "zstd"}),
    (3 * M + 4096, {"preallocation": "metadata", "cluster_size": "512", "refcount_bits": "64"}),
    (2 * G, {"preallocation": "metadata", "cluster_size": "8k", "refcount_bits": "64"}),
    (58994196480, {"preallocation": "metadata", "cluster_size": "256k", "compat": "0.10"}),  # INT_MAX chunks
    (600 * G, {"preallocation": "metadata", "cluster_size": "2M", "refcount_bits": "64"}),
    (5 * G + 1536, {"preallocation": "metadata", "cluster_size": "1M", "extended_l2": "on", "lazy_refcounts": "on"}),
    # preallocation=falloc / full
    (0, {"preallocation": "falloc"}),
    (M, {"preallocation": "falloc"}),
    (20 * M, {"preallocation": "falloc", "cluster_size": "512"}),
    (12345, {"preallocation": "full", "extended_l2": "on"}),
    (8 * M, {"preallocation": "full", "cluster_size": "4k", "refcount_bits": "4"}),
]


def _layout_param(size: int, opts: dict[str, str]) -> object:
    name = f"{size}-{','.join(f'{k}={v}' for k, v in opts.items()) or 'defaults'}"
    slow = size == 128 * G                                        # qemu-img itself needs seconds for this one
    return pytest.param(size, opts, id=name, marks=[pytest.mark.slow] if slow else [])


@needs_qemu
@pytest.mark.parametrize(("size", "opts"), [_layout_param(s, o) for s, o in LAYOUT_CASES])
async def test_same_as_qemu(tmp_path: Path, size: int, opts: dict[str, str]) -> None:
    await compare(tmp_path, size, opts)


BACKING_CASES = [
    ({}, "base.raw", "raw"),
    ({"compat": "0.10"}, "base.qcow2", "qcow2"),
    ({"cluster_size": "512"}, "base.raw", "raw"),                 # no room for the feature table
    ({"cluster_size": "4k"}, "sub/base.qcow2", "qcow2"),
    ({"cluster_size": "8k", "compat": "v2"}, "base.raw", "raw"),
    ({"extended_l2": "on", "preallocation": "metadata"}, "base.raw", "raw"),
    ({"cluster_size": "512"}, "/nonexistent/" + "n" * 363, "vmdk"),   # exactly fills the header cluster
    ({}, "/nonexistent/" + "n" * 1010, "qed"),                    # 1023 bytes: the longest name
]


@needs_qemu
@pytest.mark.parametrize(("opts", "backing", "fmt"), BACKING_CASES,
                         ids=[f"{i}-{b[:20]}" for i, (_, b, _) in enumerate(BACKING_CASES)])
async def test_same_as_qemu_with_backing(tmp_path: Path, opts: dict[str, str], backing: str, fmt: str) -> None:
    if backing.startswith("/"):                 # a backing file that does not exist: compare bytes only
        mine, ref = tmp_path / "mine.qcow2", tmp_path / "ref.qcow2"
        await ours(mine, M, opts, backing, fmt)
        theirs(ref, M, opts, backing, fmt)
        assert first_difference(mine, ref) is None
        hdr = layout.parse_header(_head(mine), mine.stat().st_size)
        assert (hdr.backing_file, hdr.backing_format) == (backing, fmt)
    else:
        await compare(tmp_path, M, opts, backing, fmt)


@needs_qemu
@pytest.mark.parametrize("opts", [{}, {"compat": "0.10"}, {"cluster_size": "4k"}])
async def test_backing_without_format(tmp_path: Path, opts: dict[str, str]) -> None:
    """qemu-img 7.2 insists on a backing format; the driver does not, and then writes no format extension."""
    qemu_img("create", "-q", "-f", "raw", str(tmp_path / "base.raw"), "1M")
    path = tmp_path / "mine.qcow2"
    await ours(path, M, opts, "base.raw", None)
    info = _qemu_json("info", "--output=json", str(path))
    assert isinstance(info, dict)
    assert info["backing-filename"] == "base.raw" and "backing-filename-format" not in info
    check = _qemu_json("check", "--output=json", str(path))
    assert isinstance(check, dict) and check["check-errors"] == 0 and "leaks" not in check
    head = path.read_bytes()
    hdr = layout.parse_header(head, len(head))
    assert (hdr.backing_file, hdr.backing_format) == ("base.raw", None)
    # the name follows the end-of-extensions marker
    fixed = 72 if opts.get("compat") == "0.10" else 112
    table = 8 + 384 if hdr.version == 3 and hdr.cluster_size > 4096 else 0
    assert hdr.backing_file_offset == fixed + table + 8
    assert head[hdr.backing_file_offset - 8:hdr.backing_file_offset] == bytes(8)


# ---- refusals ----------------------------------------------------------------------------------------------

V3_HINT = " (use version=v3 or greater)"
SIZE_HINT = ("Parameter 'cluster_size' expects a non-negative number below 2^64\n"
             "Optional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-\n"
             "and exabytes, respectively.")

REFUSALS: list[tuple[dict[str, str], int, str | None, str | None, str]] = [
    ({"extended_l2": "on", "cluster_size": "4k"}, M, None, None,
     "Extended L2 entries are only supported with cluster sizes of at least 16384 bytes"),
    ({"compat": "0.10", "extended_l2": "on"}, M, None, None,
     "Extended L2 entries are only supported with compatibility level 1.1 and above" + V3_HINT),
    ({"compat": "0.10", "lazy_refcounts": "on"}, M, None, None,
     "Lazy refcounts only supported with compatibility level 1.1 and above" + V3_HINT),
    ({"compat": "0.10", "refcount_bits": "8"}, M, None, None,
     "Different refcount widths than 16 bits require compatibility level 1.1 or above" + V3_HINT),
    ({"compat": "v2", "compression_type": "zstd"}, M, None, None,
     "Non-zlib compression type is only supported with compatibility level 1.1 and above" + V3_HINT),
    ({"cluster_size": "4M"}, M, None, None, "Cluster size must be a power of two between 512 and 2048k"),
    ({"cluster_size": "1000"}, M, None, None, "Cluster size must be a power of two between 512 and 2048k"),
    ({"cluster_size": "256"}, M, None, None, "Cluster size must be a power of two between 512 and 2048k"),
    ({"cluster_size": "1.5k"}, M, None, None, "Cluster size must be a power of two between 512 and 2048k"),
    ({"cluster_size": "abc"}, M, None, None, SIZE_HINT),
    ({"cluster_size": "64kB"}, M, None, None, SIZE_HINT),
    ({"cluster_size": "64k "}, M, None, None, SIZE_HINT),
    ({"cluster_size": "16384E"}, M, None, None, "Value '16384E' is out of range for parameter 'cluster_size'"),
    ({"refcount_bits": "3"}, M, None, None, "Refcount width must be a power of two and may not exceed 64 bits"),
    ({"refcount_bits": "128"}, M, None, None, "Refcount width must be a power of two and may not exceed 64 bits"),
    ({"refcount_bits": "0"}, M, None, None, "Refcount width must be a power of two and may not exceed 64 bits"),
    ({"refcount_bits": "-1"}, M, None, None, "Refcount width must be a power of two and may not exceed 64 bits"),
    ({"refcount_bits": "abc"}, M, None, None, "Parameter 'refcount_bits' expects a number"),
    ({"refcount_bits": "16 "}, M, None, None, "Parameter 'refcount_bits' expects a number"),
    ({"refcount_bits": "99999999999999999999"}, M, None, None,
     "Value '99999999999999999999' is too large for parameter 'refcount_bits'"),
    ({"refcount_bits": "18446744073709551615"}, M, None, None, "Parameter 'refcount-bits' expects integer"),
    ({"compat": "1.2"}, M, None, None, "Parameter 'version' does not accept value '1.2'"),
    ({"compat": ""}, M, None, None, "Parameter 'version' does not accept value ''"),
    ({"lazy_refcounts": "ON"}, M, None, None, "Parameter 'lazy_refcounts' expects 'on' or 'off'"),
    ({"extended_l2": "maybe"}, M, None, None, "Parameter 'extended_l2' expects 'on' or 'off'"),
    ({"preallocation": "bogus"}, M, None, None, "Parameter 'preallocation' does not accept value 'bogus'"),
    ({"compression_type": "lz4"}, M, None, None, "Parameter 'compression-type' does not accept value 'lz4'"),
    ({}, 1 << 60, None, None,
     "The image size is too large for file format 'qcow2' (try using a larger cluster size)"),
    ({"cluster_size": "512"}, 128 * G + 512, None, None,
     "The image size is too large for file format 'qcow2' (try using a larger cluster size)"),
    ({"cluster_size": "2M", "extended_l2": "on"}, 1 << 61, None, None,
     "The image size is too large for file format 'qcow2' (try using a larger cluster size)"),
    ({"cluster_size": "2M"}, (1 << 63) - 512, None, None,
     "Could not resize image: offset(9223372036854775296) exceeds maximum(9223372035781033984)"),
    ({}, M, None, "raw", "Backing format cannot be used without backing file"),
    ({}, M, "base.img", "foo", "Parameter 'backing-fmt' does not accept value 'foo'"),
    ({}, M, "base.img", "QCOW2", "Parameter 'backing-fmt' does not accept value 'QCOW2'"),
    ({}, M, "", "raw", "Expected backing file name, got empty string"),
    ({"preallocation": "metadata"}, M, "base.img", "raw",
     "Backing file and preallocation can only be used at the same time if extended_l2 is on"),
    ({"preallocation": "full"}, M, "base.img", "raw",
     "Backing file and preallocation can only be used at the same time if extended_l2 is on"),
    ({}, M, "b" * 1024, "raw", f"Could not assign backing file '{'b' * 1024}' with format 'raw': Invalid argument"),
    ({"cluster_size": "512"}, M, "c" * 377, "raw",
     f"Could not assign backing file '{'c' * 377}' with format 'raw': No space left on device"),
    ({"cluster_size": "1k", "compat": "0.10"}, M, "d" * 929, "qcow2",
     f"Could not assign backing file '{'d' * 929}' with format 'qcow2': No space left on device"),
    # QEMU's order of checks when several options are wrong
    ({"refcount_bits": "x", "cluster_size": "y"}, M, None, None, "Parameter 'refcount_bits' expects a number"),
    ({"cluster_size": "y", "refcount_bits": "x"}, M, None, None, SIZE_HINT),
    ({"compat": "x", "cluster_size": "3"}, M, None, None, "Parameter 'version' does not accept value 'x'"),
    ({"compat": "0.10", "extended_l2": "on", "cluster_size": "4k"}, M, None, None,
     "Extended L2 entries are only supported with compatibility level 1.1 and above" + V3_HINT),
    ({"compat": "0.10", "lazy_refcounts": "on", "refcount_bits": "3"}, M, None, None,
     "Lazy refcounts only supported with compatibility level 1.1 and above" + V3_HINT),
    ({"compat": "0.10", "refcount_bits": "8", "compression_type": "zstd"}, M, None, None,
     "Different refcount widths than 16 bits require compatibility level 1.1 or above" + V3_HINT),
    ({"compat": "0.10", "lazy_refcounts": "on"}, M, None, "raw", "Backing format cannot be used without backing file"),
    ({"preallocation": "x", "compression_type": "y"}, M, None, None,
     "Parameter 'preallocation' does not accept value 'x'"),
    ({"refcount_bits": "18446744073709551615", "compression_type": "bad"}, M, None, None,
     "Parameter 'refcount-bits' expects integer"),
    ({"compat": "x"}, M, "", "raw", "Expected backing file name, got empty string"),
    ({"cluster_size": "512", "compat": "0.10", "lazy_refcounts": "on"}, 1 << 40, None, None,
     "Lazy refcounts only supported with compatibility level 1.1 and above" + V3_HINT),
]


def _refusal_id(case: tuple[dict[str, str], int, str | None, str | None, str]) -> str:
    opts, size, backing, fmt, _ = case
    return ",".join(f"{k}={v[:12]}" for k, v in opts.items()) + f"-{size}-{(backing or '')[:8]}-{fmt}"


@pytest.mark.parametrize(("opts", "size", "backing", "fmt", "message"), REFUSALS,
                         ids=[_refusal_id(c) for c in REFUSALS])
async def test_refusals(tmp_path: Path, opts: dict[str, str], size: int, backing: str | None, fmt: str | None,
                        message: str) -> None:
    path = tmp_path / "x.qcow2"
    with pytest.raises(InvalidOptionError) as err:
        await ours(path, size, opts, backing, fmt)
    assert err.value.message == message
    assert path.stat().st_size == 0                              # nothing written


@needs_qemu
@pytest.mark.parametrize(("opts", "size", "backing", "fmt", "message"),
                         REFUSALS, ids=[_refusal_id(c) for c in REFUSALS])
def test_refusals_are_qemus(tmp_path: Path, opts: dict[str, str], size: int, backing: str | None,
                            fmt: str | None, message: str) -> None:
    """The expected messages above are what qemu-img 7.2 prints."""
    assert QEMU_IMG is not None
    path = tmp_path / "x.qcow2"
    argv = [QEMU_IMG, "create", "-q", "-f", "qcow2"]
    if opts:
        argv += ["-o", ",".join(f"{k}={v}" for k, v in opts.items())]
    if backing is not None:
        argv += ["-u", "-b", backing]
    if fmt is not None:
        argv += ["-F", fmt]
    proc = run([*argv, str(path), str(size)])
    assert proc.returncode == 1
    assert proc.stderr == f"qemu-img: {path}: {message}\n"


@pytest.mark.parametrize(("text", "bits"), [("16", 16), ("0x10", 16), ("010", 8), (" 16", 16), ("+16", 16),
                                            ("1", 1), ("64", 64)])
def test_refcount_bits_numbers(text: str, bits: int) -> None:
    opts = parse_create_options(M, None, None, {"refcount_bits": text})
    assert 1 << opts.refcount_order == bits


@pytest.mark.parametrize(("text", "size"), [("64k", 65536), ("64K", 65536), ("0.5k", 512), ("2M", 2 * M),
                                            ("65536", 65536), ("512b", 512), ("0x10000", 65536),
                                            (" 64k", 65536)])
def test_cluster_size_strings(text: str, size: int) -> None:
    assert 1 << parse_create_options(M, None, None, {"cluster_size": text}).cluster_bits == size


@pytest.mark.parametrize(("text", "value"), [("on", True), ("yes", True), ("true", True), ("y", True),
                                             ("off", False), ("no", False), ("false", False), ("n", False)])
def test_bool_spellings(text: str, value: bool) -> None:
    assert parse_create_options(M, None, None, {"lazy_refcounts": text}).lazy_refcounts is value


async def test_preallocation_beyond_the_refcount_table_limit(tmp_path: Path) -> None:
    path = tmp_path / "x.qcow2"
    with pytest.raises(ImageTooLargeError, match="refcount table larger than 8 MiB"):
        await ours(path, 64 * G, {"cluster_size": "512", "refcount_bits": "64", "preallocation": "metadata"})
    assert path.stat().st_size == 0


def test_unknown_option() -> None:
    with pytest.raises(InvalidOptionError) as err:
        parse_create_options(M, None, None, {"compat": "v3", "data_file": "x"})
    assert err.value.message == "Invalid parameter 'data_file'"


def test_options_may_carry_backing() -> None:
    opts = parse_create_options(M, None, None, {"backing_file": "b.img", "backing_fmt": "raw"})
    assert (opts.backing_file, opts.backing_format) == ("b.img", "raw")


# ---- the pure parts -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("order", range(7))
def test_ones_matches_set_refcount(order: int) -> None:
    per_block = (512 * 8) >> order
    for first, end in [(0, per_block), (1, 2), (3, 17), (5, per_block - 3), (per_block - 1, per_block), (7, 7)]:
        fast = bytearray(512)
        _ones(fast, first, end, order)
        slow = bytearray(512)
        for i in range(first, end):
            layout.set_refcount(slow, i, order, 1)
        assert fast == slow
        assert all(layout.get_refcount(fast, i, order) == (1 if first <= i < end else 0) for i in range(per_block))


def test_runs() -> None:
    runs = _Runs()
    runs.add(0, 3)
    runs.add(5, 8)
    assert runs.find_free(0, 1) == 3 and runs.find_free(0, 2) == 3 and runs.find_free(0, 3) == 8
    runs.add(3, 5)
    assert (runs.starts, runs.ends) == ([0], [8])
    runs.remove(2, 4)
    assert (runs.starts, runs.ends) == ([0, 4], [2, 8])
    assert runs.find_free(0, 2) == 2 and runs.find_free(5, 1) == 8
    assert list(runs.overlapping(1, 6)) == [(1, 2), (4, 6)]
    runs.remove(0, 100)
    assert runs.starts == [] and runs.find_free(7, 4) == 7


def test_refblocks_needed_fixed_point() -> None:
    # a 128 GiB image with 512-byte clusters: the L1 table ends at cluster 65539, the new area at 65792
    assert _refblocks_needed(65792, 256, 64, True) == 259
    assert _refblocks_needed(4 + 163840 + 20, 32768, 8192, False) == 6


def test_plan_default_layout() -> None:
    plan = plan_image(CreateOptions(size=M))
    hdr = plan.header
    assert (hdr.refcount_table_offset, hdr.l1_table_offset, hdr.l1_size) == (65536, 3 * 65536, 1)
    assert plan.allocator.table == {0: 2}
    assert plan.length == 3 * 65536 + 8
    assert len(plan.header_cluster) == 65536
    # v3: header 112 bytes, then the feature-name table extension
    assert struct.unpack_from(">II", plan.header_cluster, 112) == (layout.EXT_FEATURE_TABLE, 8 * 48)


def test_plan_huge_l1_moves_the_refcount_table() -> None:
    plan = plan_image(CreateOptions(size=128 * G, cluster_bits=9))
    alloc = plan.allocator
    assert plan.l1_start == 3 and plan.l1_entries == 1 << 22
    assert (alloc.table_start, alloc.table_size) == (65794, 448)
    assert alloc.table[1] == 65539 and alloc.table[256] == 65540 and alloc.table[253] == 65801
    assert alloc.stale == [(512, struct.pack(">Q", 1024).ljust(512, b"\0"))]
    assert plan.length == 65804 * 512
