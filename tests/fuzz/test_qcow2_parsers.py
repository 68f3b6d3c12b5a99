"""Fuzz targets for the qcow2 code that reads untrusted bytes: the header and snapshot-table parsers, the
compressed-cluster descriptors, refcount entries of every width, the decompressor, and whole images.

The oracle is the one of QEMU's image-fuzzer (reliability.md §4.1), made stricter: a parser returns a value that
keeps its documented invariants or raises an :class:`AioblockError` (the decompressor: ``CompressedDataError``);
anything else, a hang or an unbounded allocation is a bug. Seeds are images made by ``qemu-img`` / ``qemu-io``.
"""

from __future__ import annotations

import asyncio
import importlib.util
import shutil
import struct
import subprocess
import tempfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import aioblock
from aioblock.drivers.qcow2 import layout as L
from aioblock.drivers.qcow2.compress import CompressedDataError, compress_cluster, decompress_cluster
from aioblock.errors import AioblockError, ImageFormatError, ImageTooLargeError, UnsupportedFeatureError

from ..conftest import QEMU_IMG, QEMU_IO, needs_qemu

KiB = 1024
MiB = 1024 * KiB
HAVE_CHECK = importlib.util.find_spec("aioblock.drivers.qcow2.check") is not None
EXAMPLE_TIMEOUT = 20.0

# header fields: name -> (offset, struct format) (reliability.md §2.1)
FIELDS = {
    "version": (4, ">I"), "backing_file_offset": (8, ">Q"), "backing_file_size": (16, ">I"),
    "cluster_bits": (20, ">I"), "size": (24, ">Q"), "crypt_method": (32, ">I"), "l1_size": (36, ">I"),
    "l1_table_offset": (40, ">Q"), "refcount_table_offset": (48, ">Q"), "refcount_table_clusters": (56, ">I"),
    "nb_snapshots": (60, ">I"), "snapshots_offset": (64, ">Q"), "incompatible_features": (72, ">Q"),
    "compatible_features": (80, ">Q"), "autoclear_features": (88, ">Q"), "refcount_order": (96, ">I"),
    "header_length": (100, ">I"), "compression_type": (104, "B"),
}


def _boundaries(bits: int) -> list[int]:
    top = (1 << bits) - 1
    vals = {0, 1, 2, 3, 7, 8, 9, 16, 21, 22, 64, 72, 100, 103, 104, 105, 112, 255, 256, 511, 512, 513, 1023, 1024,
            1025, 4096, 65535, 65536, 65537, 65536 * 128, 4 * MiB, 4 * MiB + 1, top, top - 1, top // 2, top // 2 + 1,
            top // 4}
    for k in range(bits):
        vals |= {(1 << k) - 1, 1 << k, (1 << k) + 1}
    return sorted(v for v in vals if 0 <= v <= top)


B8, B32, B64 = _boundaries(8), _boundaries(32), _boundaries(64)


def _run(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True, timeout=120)


# ---- seeds made by QEMU ------------------------------------------------------------------------------------

# name -> (qemu-img create -o options, size, backing)
HEADER_SEEDS = {
    "v3": ("", "1M", False),
    "v2": ("compat=0.10", "1M", False),
    "v3-512": ("cluster_size=512", "1M", False),
    "v2-512": ("compat=0.10,cluster_size=512", "1M", False),
    "zstd": ("compression_type=zstd", "1M", False),
    "extl2": ("extended_l2=on", "1M", False),
    "refcount1": ("refcount_bits=1,cluster_size=4096", "1M", False),
    "refcount64": ("refcount_bits=64,cluster_size=512", "1M", False),
    "lazy": ("lazy_refcounts=on,cluster_size=4096", "1M", False),
    "big-l1": ("cluster_size=4096", "64G", False),
    "backing": ("", "1M", True),
    "backing-v2": ("compat=0.10", "1M", True),
    "backing-512": ("cluster_size=512", "1M", True),
    "backing-4k": ("cluster_size=4096", "1M", True),
}


@dataclass(frozen=True)
class Seed:
    name: str
    data: bytes          # the whole file
    cluster_size: int

    @property
    def header(self) -> bytes:
        return self.data[:self.cluster_size]


_seed_cache: dict[str, Any] = {}


def _tmpdir() -> Path:
    if "dir" not in _seed_cache:
        _seed_cache["dir"] = tempfile.TemporaryDirectory(prefix="qcow2-fuzz-")
    return Path(_seed_cache["dir"].name)


def header_seeds() -> list[Seed]:
    """The first cluster (and the file) of images made by ``qemu-img create`` (built once)."""
    if "headers" not in _seed_cache:
        if QEMU_IMG is None:
            pytest.skip("qemu-img not installed")
        d = _tmpdir() / "headers"
        d.mkdir(exist_ok=True)
        _run(QEMU_IMG, "create", "-q", "-f", "raw", str(d / "base.raw"), "1M")
        seeds = []
        for name, (opts, size, backing) in HEADER_SEEDS.items():
            p = d / f"{name}.qcow2"
            argv = [QEMU_IMG, "create", "-q", "-f", "qcow2"]
            if opts:
                argv += ["-o", opts]
            if backing:
                argv += ["-b", "base.raw", "-F", "raw"]
            _run(*argv, str(p), size)
            data = p.read_bytes()
            seeds.append(Seed(name, data, 1 << struct.unpack_from(">I", data, 20)[0]))
        _seed_cache["headers"] = seeds
    return list(_seed_cache["headers"])


def _header_seed(name: str) -> Seed:
    return next(s for s in header_seeds() if s.name == name)


# ---- parse_header --------------------------------------------------------------------------------------------

def _mutation() -> st.SearchStrategy[tuple[Any, ...]]:
    return st.one_of(
        st.tuples(st.just("byte"), st.integers(0, 1023), st.integers(0, 255)),
        st.tuples(st.just("byte-anywhere"), st.integers(0, 1 << 16), st.integers(0, 255)),
        st.tuples(st.just("flip"), st.integers(0, 111), st.integers(0, 7)),
        st.tuples(st.just("field"), st.sampled_from(sorted(FIELDS)), st.integers(0, len(B64) - 1)),
        st.tuples(st.just("truncate"), st.integers(0, 1 << 16)),
        st.tuples(st.just("extension"), st.integers(0, 3), st.sampled_from(B32)),
    )


def _apply(buf: bytearray, mutations: list[tuple[Any, ...]]) -> bytearray:
    for m in mutations:
        kind = m[0]
        if kind in ("byte", "byte-anywhere") and buf:
            buf[m[1] % len(buf)] = m[2]
        elif kind == "flip" and len(buf) > m[1]:
            buf[m[1]] ^= 1 << m[2]
        elif kind == "field":
            off, fmt = FIELDS[m[1]]
            width = struct.calcsize(fmt)
            values = {1: B8, 4: B32, 8: B64}[width]
            value = values[m[2] % len(values)]
            if len(buf) >= off + width:
                struct.pack_into(fmt, buf, off, value)
        elif kind == "truncate":
            del buf[m[1]:]
        elif kind == "extension":
            # the type or length word of one of the first header extensions (v3 layout: they start at 112)
            off = 112 + 8 * (m[1] // 2) + 4 * (m[1] % 2)
            if len(buf) >= off + 4:
                struct.pack_into(">I", buf, off, m[2])
    return buf


def _assert_header_invariants(h: L.Header, file_size: int, for_check: bool = False) -> None:
    """What ``parse_header`` promises about a Header it returns (layout.py; reliability.md §4.3)."""
    cs = h.cluster_size
    assert h.version in (2, 3)
    assert L.MIN_CLUSTER_BITS <= h.cluster_bits <= L.MAX_CLUSTER_BITS
    if h.version == 3:
        assert L.V3_HEADER_LENGTH <= h.header_length <= cs
    assert h.refcount_order <= 6
    assert h.crypt_method == 0
    assert h.compression_type in L.COMPRESSION_NAMES
    assert h.compression_type == L.COMPRESSION_ZLIB or h.incompatible_features & L.INCOMPAT_COMPRESSION
    assert not h.incompatible_features & ~L.INCOMPAT_KNOWN
    assert not h.incompatible_features & L.INCOMPAT_DATA_FILE
    if h.extended_l2:
        assert cs // L.SUBCLUSTERS >= 512
    rt_bytes = h.refcount_table_clusters * cs
    assert (for_check or h.refcount_table_clusters >= 1) and rt_bytes <= L.MAX_REFTABLE_BYTES
    assert h.refcount_table_offset % cs == 0 and (rt_bytes == 0 or h.refcount_table_offset + rt_bytes <= file_size)
    assert h.l1_size * 8 <= L.MAX_L1_BYTES and h.l1_table_offset % cs == 0
    assert h.l1_size == 0 or h.l1_table_offset + h.l1_size * 8 <= file_size
    needed = L.size_to_l1(h.size, h.cluster_bits, h.extended_l2)
    assert needed <= h.l1_size and needed <= L.INT_MAX
    assert h.nb_snapshots <= L.MAX_SNAPSHOTS
    if h.nb_snapshots:
        assert h.snapshots_offset % cs == 0 and h.snapshots_offset < file_size
    assert h.backing_file_offset <= cs
    if h.backing_file_offset:
        assert h.backing_file_size <= L.MAX_BACKING_NAME
        assert h.backing_file_offset + h.backing_file_size <= cs


_FILE_SIZES = st.one_of(st.none(), st.sampled_from([0, 1, 104, 512, 65536, 1 << 20, 1 << 40, (1 << 63) - 1, 1 << 64]),
                        st.integers(0, 1 << 64))


@needs_qemu
@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data(), st.lists(_mutation(), min_size=1, max_size=6), _FILE_SIZES, st.booleans())
def test_parse_header_total(data: st.DataObject, mutations: list[tuple[Any, ...]], file_size: int | None,
                            for_check: bool) -> None:
    seed = _header_seed(data.draw(st.sampled_from(sorted(HEADER_SEEDS)), label="seed"))
    buf = _apply(bytearray(seed.header), mutations)
    size = len(seed.data) if file_size is None else file_size
    try:
        h = L.parse_header(bytes(buf), size, for_check=for_check)
    except AioblockError as exc:
        assert isinstance(exc, ImageFormatError | UnsupportedFeatureError | ImageTooLargeError), repr(exc)
        assert str(exc)
        return
    _assert_header_invariants(h, size, for_check)


@needs_qemu
def test_parse_header_accepts_every_seed() -> None:
    for seed in header_seeds():
        h = L.parse_header(seed.header, len(seed.data))
        _assert_header_invariants(h, len(seed.data))
        if "backing" in seed.name:
            assert h.backing_file == "base.raw"


@needs_qemu
@pytest.mark.parametrize("name", sorted(n for n in HEADER_SEEDS if "backing" in n))
def test_parse_header_backing_format(name: str) -> None:
    """QEMU writes (and reads) header extensions in v2 images too: the backing format must not be lost."""
    seed = _header_seed(name)
    h = L.parse_header(seed.header, len(seed.data))
    assert (h.backing_file, h.backing_format) == ("base.raw", "raw")


def _core(h: L.Header) -> tuple[Any, ...]:
    return (h.version, h.cluster_bits, h.size, h.crypt_method, h.l1_size, h.l1_table_offset,
            h.refcount_table_offset, h.refcount_table_clusters, h.nb_snapshots, h.snapshots_offset,
            h.incompatible_features, h.compatible_features, h.autoclear_features, h.refcount_order,
            h.compression_type, h.backing_file, h.backing_format, h.other_extensions)


def _rebuild(h: L.Header) -> L.Header:
    """What the driver's ``write_header`` writes, parsed back."""
    if h.version == 3:
        h.header_length = L.V3_HEADER_WRITE_LENGTH
    out = L.build_header_cluster(h)
    return L.parse_header(out.ljust(h.cluster_size, b"\0"), 1 << 62)


@needs_qemu
@pytest.mark.parametrize("name", sorted(HEADER_SEEDS))
def test_header_rebuild_of_qemu_images(name: str) -> None:
    """The header the driver writes back (dirty/corrupt/autoclear updates) parses to the same header, for every
    header QEMU writes."""
    seed = _header_seed(name)
    h = L.parse_header(seed.header, len(seed.data))
    assert _core(_rebuild(L.parse_header(seed.header, len(seed.data)))) == _core(h)


@needs_qemu
@settings(max_examples=300, deadline=None)
@given(st.data(), st.lists(_mutation(), min_size=1, max_size=4))
def test_header_rebuild_round_trip(data: st.DataObject, mutations: list[tuple[Any, ...]]) -> None:
    """Any header parse_header accepts is rewritten so that it parses back the same (or refused, typed)."""
    seed = _header_seed(data.draw(st.sampled_from(sorted(HEADER_SEEDS)), label="seed"))
    buf = _apply(bytearray(seed.header), mutations)
    try:
        h = L.parse_header(bytes(buf), len(seed.data))
    except AioblockError:
        return
    try:
        again = _rebuild(L.parse_header(bytes(buf), len(seed.data)))
    except AioblockError as exc:
        assert isinstance(exc, ImageFormatError), repr(exc)
        return
    assert _core(again) == _core(h)


# ---- parse_snapshots -----------------------------------------------------------------------------------------

def snapshot_seeds() -> list[tuple[str, bytes, int, int, int]]:
    """(name, snapshot table bytes, count, cluster size, file size) of images with two internal snapshots."""
    if "snapshots" not in _seed_cache:
        if QEMU_IMG is None or QEMU_IO is None:
            pytest.skip("qemu-img/qemu-io not installed")
        d = _tmpdir() / "snapshots"
        d.mkdir(exist_ok=True)
        out = []
        for name, opts in (("v3", "cluster_size=4096"), ("v2", "compat=0.10,cluster_size=512")):
            p = d / f"{name}.qcow2"
            _run(QEMU_IMG, "create", "-q", "-f", "qcow2", "-o", opts, str(p), "1M")
            _run(QEMU_IO, "-f", "qcow2", "-c", "write -P 1 0 64k", str(p))
            _run(QEMU_IMG, "snapshot", "-c", "first", str(p))
            _run(QEMU_IO, "-f", "qcow2", "-c", "write -P 2 0 4k", str(p))
            _run(QEMU_IMG, "snapshot", "-c", "a-much-longer-snapshot-name", str(p))
            data = p.read_bytes()
            cs = 1 << struct.unpack_from(">I", data, 20)[0]
            nb, off = struct.unpack_from(">IQ", data, 60)
            out.append((name, data[off:], nb, cs, len(data)))
        _seed_cache["snapshots"] = out
    return list(_seed_cache["snapshots"])


@needs_qemu
def test_parse_snapshots_seeds() -> None:
    for _, table, count, cs, file_size in snapshot_seeds():
        snaps, used = L.parse_snapshots(table, count, cs, file_size)
        assert [s.name for s in snaps] == ["first", "a-much-longer-snapshot-name"]
        assert [s.id for s in snaps] == ["1", "2"]
        assert 0 < used <= len(table) + 7 and used % 8 == 0
        for s in snaps:
            assert s.l1_size == 1 or s.l1_size == 32       # 1 MiB guest: one L1 entry (4k) / 32 (512)


@needs_qemu
@settings(max_examples=400, deadline=None)
@given(st.data(), st.lists(st.tuples(st.integers(0, 255), st.integers(0, 255)), max_size=8),
       st.integers(0, 5), st.one_of(st.none(), st.integers(0, 1 << 64)))
def test_parse_snapshots_total(data: st.DataObject, edits: list[tuple[int, int]], count_delta: int,
                               file_size: int | None) -> None:
    which = data.draw(st.sampled_from([0, 1]), label="seed")
    _, table, count, cs, real_size = snapshot_seeds()[which]
    buf = bytearray(table[:2048])
    for off, value in edits:
        buf[off % len(buf)] = value
    if data.draw(st.booleans(), label="truncate"):
        del buf[data.draw(st.integers(0, len(buf)), label="at"):]
    n = max(0, count + count_delta - 2)
    size = real_size if file_size is None else file_size
    _check_snapshots(bytes(buf), n, cs, size)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600), st.integers(0, 20), st.sampled_from([512, 4096, 65536, 1 << 21]),
       st.integers(0, 1 << 64))
def test_parse_snapshots_random(buf: bytes, count: int, cs: int, file_size: int) -> None:
    _check_snapshots(buf, count, cs, file_size)


def _check_snapshots(buf: bytes, count: int, cs: int, file_size: int) -> None:
    try:
        snaps, used = L.parse_snapshots(buf, count, cs, file_size)
    except AioblockError as exc:
        assert isinstance(exc, ImageFormatError), repr(exc)
        return
    assert len(snaps) == count
    assert 0 <= used <= len(buf) + 7
    for s in snaps:
        assert s.l1_table_offset % cs == 0
        assert s.l1_size * 8 <= L.MAX_L1_BYTES
        assert s.l1_size == 0 or s.l1_table_offset + s.l1_size * 8 <= file_size
        assert isinstance(s.id, str) and isinstance(s.name, str)


# ---- compressed descriptors ------------------------------------------------------------------------------

@settings(max_examples=300)
@given(st.integers(0, (1 << 64) - 1), st.integers(L.MIN_CLUSTER_BITS, L.MAX_CLUSTER_BITS))
def test_compressed_descriptor_bounds(entry: int, cluster_bits: int) -> None:
    offset, length = L.compressed_descriptor(entry, cluster_bits)
    assert 0 <= offset < 1 << 62
    assert 1 <= length <= 2 << cluster_bits
    assert (offset + length) % 512 == 0


@settings(max_examples=300)
@given(st.data(), st.integers(L.MIN_CLUSTER_BITS, L.MAX_CLUSTER_BITS))
def test_compressed_descriptor_round_trip(data: st.DataObject, cluster_bits: int) -> None:
    x = 62 - (cluster_bits - 8)
    host = data.draw(st.integers(0, min(1 << x, L.MAX_CLUSTER_OFFSET + 1) - 1), label="host")
    length = data.draw(st.integers(1, 1 << cluster_bits), label="length")
    entry = L.encode_compressed(host, length, cluster_bits)
    assert entry & L.OFLAG_COMPRESSED and not entry & L.OFLAG_COPIED
    offset, got = L.compressed_descriptor(entry, cluster_bits)
    assert offset == host
    assert length <= got < length + 512


# ---- refcounts of every width ------------------------------------------------------------------------------

def _ref_get(block: bytes | bytearray, index: int, order: int) -> int:
    """QEMU's get_refcount_ro0..ro6 (block/qcow2-refcount.c), written out."""
    bits = 1 << order
    if bits >= 8:
        w = bits // 8
        return int.from_bytes(block[index * w:(index + 1) * w], "big")
    per = 8 // bits
    return (block[index // per] >> (bits * (index % per))) & ((1 << bits) - 1)


@settings(max_examples=200, deadline=None)
@given(st.data(), st.integers(0, 6), st.sampled_from([512, 1024]))
def test_refcount_round_trip(data: st.DataObject, order: int, block_size: int) -> None:
    block = bytearray(data.draw(st.binary(min_size=block_size, max_size=block_size), label="block"))
    entries = block_size * 8 >> order
    for _ in range(data.draw(st.integers(1, 4), label="updates")):
        index = data.draw(st.integers(0, entries - 1), label="index")
        value = data.draw(st.one_of(st.integers(0, (1 << (1 << order)) - 1),
                                    st.sampled_from([0, 1, (1 << (1 << order)) - 1])), label="value")
        before = [_ref_get(block, i, order) for i in range(entries)]
        assert [L.get_refcount(block, i, order) for i in range(entries)] == before
        L.set_refcount(block, index, order, value)
        assert L.get_refcount(block, index, order) == value
        before[index] = value
        assert [_ref_get(block, i, order) for i in range(entries)] == before


@pytest.mark.parametrize("order", range(7))
def test_refcount_max_values_every_index(order: int) -> None:
    block = bytearray(512)
    entries = 512 * 8 >> order
    top = (1 << (1 << order)) - 1
    for i in range(entries):
        L.set_refcount(block, i, order, top if i % 3 else 1)
    assert [L.get_refcount(block, i, order) for i in range(entries)] == [top if i % 3 else 1 for i in range(entries)]
    assert [_ref_get(block, i, order) for i in range(entries)] == [top if i % 3 else 1 for i in range(entries)]


# ---- decompression -----------------------------------------------------------------------------------------

_CTYPES = [L.COMPRESSION_ZLIB, L.COMPRESSION_ZSTD]
_CLUSTERS = [512, 4096, 65536]


def _check_decompress(ctype: int, data: bytes, cs: int) -> bytes | None:
    try:
        out = decompress_cluster(ctype, data, cs)
    except CompressedDataError:
        return None
    assert isinstance(out, bytes)
    assert len(out) == cs
    return out


@settings(max_examples=400, deadline=None)
@given(st.sampled_from(_CTYPES), st.binary(max_size=3000), st.sampled_from(_CLUSTERS))
def test_decompress_random(ctype: int, data: bytes, cs: int) -> None:
    _check_decompress(ctype, data, cs)


def _cluster_content(seed: int, cs: int, kind: int) -> bytes:
    import random

    rng = random.Random(seed)
    if kind == 0:
        return bytes(cs)
    if kind == 1:
        return (b"qcow2 fuzz %d " % seed * (cs // 8 + 1))[:cs]
    half = rng.randbytes(cs // 2)
    return half + bytes(cs - len(half))


@settings(max_examples=400, deadline=None)
@given(st.sampled_from(_CTYPES), st.sampled_from(_CLUSTERS), st.integers(0, 1000), st.integers(0, 2),
       st.lists(st.tuples(st.integers(0, 1 << 16), st.integers(0, 255)), max_size=4),
       st.one_of(st.none(), st.integers(0, 1 << 16)), st.binary(max_size=64))
def test_decompress_mutated(ctype: int, cs: int, seed: int, kind: int, edits: list[tuple[int, int]],
                            cut: int | None, tail: bytes) -> None:
    content = _cluster_content(seed, cs, kind)
    packed = compress_cluster(ctype, content, 2 * cs)
    assert packed is not None
    assert decompress_cluster(ctype, packed, cs) == content
    buf = bytearray(packed)
    for off, value in edits:
        buf[off % len(buf)] = value
    if cut is not None:
        del buf[cut % (len(buf) + 1):]
    buf += tail                       # qcow2 reads whole sectors: bytes after the stream are normal
    out = _check_decompress(ctype, bytes(buf), cs)
    if not edits and cut is None and out is not None:
        assert out == content


@pytest.mark.parametrize("ctype", _CTYPES)
@pytest.mark.parametrize("cs", _CLUSTERS)
def test_decompress_longer_stream_gives_one_cluster(ctype: int, cs: int) -> None:
    """A stream that expands past one cluster (even a bomb) gives exactly one cluster or an error, fast."""
    for n in (cs + 1, 2 * cs, 64 * MiB):
        if ctype == L.COMPRESSION_ZLIB:
            c = zlib.compressobj(9, zlib.DEFLATED, -12)
            stream = c.compress(bytes(n)) + c.flush()
        else:
            stream = compress_cluster(ctype, bytes(n), n) or b""
        _check_decompress(ctype, stream, cs)


def test_decompress_short_stream_is_an_error() -> None:
    for ctype in _CTYPES:
        packed = compress_cluster(ctype, bytes(4096), 8192)
        assert packed is not None
        with pytest.raises(CompressedDataError):
            decompress_cluster(ctype, packed, 8192)
    with pytest.raises(CompressedDataError):
        decompress_cluster(7, b"", 512)


# ---- whole images --------------------------------------------------------------------------------------------

# name -> (create -o options, size, qemu-io commands before and after a snapshot)
IMAGE_SEEDS = {
    "v3-4k": ("cluster_size=4096", 256 * KiB,
              ["write -P 0x11 0 20k", "write -c -P 0x22 64k 4k", "write -c -P 0x23 68k 4k", "write -z 96k 8k"],
              ["write -P 0x33 4096 100", "write -P 0x44 200k 8k", "discard 96k 4k"]),
    "v2-512": ("compat=0.10,cluster_size=512", 128 * KiB,
               ["write -P 0x11 0 3000", "write -c -P 0x22 32k 512", "write -P 0x12 40k 1k"],
               ["write -P 0x33 100 100", "write -P 0x44 120k 2k"]),
    "extl2-64k": ("extended_l2=on", 512 * KiB,
                  ["write -P 0x11 0 5000", "write -c -P 0x22 128k 64k", "write -z 70000 8192"],
                  ["write -P 0x33 2048 100", "write -P 0x44 300k 2k"]),
    "zstd-512": ("compression_type=zstd,cluster_size=512,refcount_bits=8", 64 * KiB,
                 ["write -P 0x11 0 3000", "write -c -P 0x22 8k 512"], ["write -P 0x33 100 100"]),
}


@dataclass(frozen=True)
class ImageSeed:
    name: str
    data: bytes
    regions: tuple[tuple[int, int], ...]     # (offset, length) of every metadata structure


def _metadata_regions(data: bytes) -> list[tuple[int, int]]:
    """Header, L1, refcount table, refcount blocks, L2 tables, snapshot table and snapshot L1 tables (parsed
    here without aioblock)."""
    cs = 1 << struct.unpack_from(">I", data, 20)[0]
    ext_l2 = struct.unpack_from(">I", data, 4)[0] == 3 and struct.unpack_from(">Q", data, 72)[0] & 16
    l1_size, l1_off, rt_off, rt_clusters, nb, snap_off = struct.unpack_from(">IQQIIQ", data, 36)
    regions = [(0, min(cs, 512)), (l1_off, l1_size * 8), (rt_off, rt_clusters * cs)]

    def table(off: int, n: int) -> Iterator[int]:
        for i in range(n):
            yield struct.unpack_from(">Q", data, off + 8 * i)[0]

    for e in table(rt_off, rt_clusters * cs // 8):
        if e & ~0x1FF:
            regions.append((e & ~0x1FF, cs))
    l1s = [(l1_off, l1_size)]
    off = snap_off
    for _ in range(nb):
        sl1_off, sl1_size, id_len, name_len = struct.unpack_from(">QIHH", data, off)
        extra = struct.unpack_from(">I", data, off + 36)[0]
        end = off + 40 + extra + id_len + name_len
        regions.append((off, end - off))
        l1s.append((sl1_off, sl1_size))
        regions.append((sl1_off, sl1_size * 8))
        off = (end + 7) & ~7
    for lo, n in l1s:
        for e in table(lo, n):
            if e & L.L1E_OFFSET_MASK:
                regions.append((e & L.L1E_OFFSET_MASK, cs))
    del ext_l2
    return [(o, n) for o, n in regions if n > 0 and o + n <= len(data)]


def image_seeds() -> list[ImageSeed]:
    if "images" not in _seed_cache:
        if QEMU_IMG is None or QEMU_IO is None:
            pytest.skip("qemu-img/qemu-io not installed")
        d = _tmpdir() / "images"
        d.mkdir(exist_ok=True)
        seeds = []
        for name, (opts, size, before, after) in IMAGE_SEEDS.items():
            p = d / f"{name}.qcow2"
            _run(QEMU_IMG, "create", "-q", "-f", "qcow2", "-o", opts, str(p), str(size))
            _run(QEMU_IO, "-f", "qcow2", *[a for c in before for a in ("-c", c)], str(p))
            _run(QEMU_IMG, "snapshot", "-c", "s1", str(p))
            _run(QEMU_IO, "-f", "qcow2", *[a for c in after for a in ("-c", c)], str(p))
            data = p.read_bytes()
            seeds.append(ImageSeed(name, data, tuple(_metadata_regions(data))))
        _seed_cache["images"] = seeds
    return list(_seed_cache["images"])


def _image_seed(name: str) -> ImageSeed:
    return next(s for s in image_seeds() if s.name == name)


_U64_VALUES = [0, 1, 0x200, 0x10000, 1 << 62, 1 << 63, (1 << 63) | (1 << 62), (1 << 64) - 1, 0x00FFFFFFFFFFFE00,
               (1 << 56), 0x8000000000010000, 0x8000000000000201]


def _image_mutation() -> st.SearchStrategy[tuple[Any, ...]]:
    return st.one_of(
        st.tuples(st.just("meta-byte"), st.integers(0, 1 << 20), st.integers(0, 1 << 20), st.integers(0, 255)),
        st.tuples(st.just("meta-u64"), st.integers(0, 1 << 20), st.integers(0, 1 << 20),
                  st.sampled_from(_U64_VALUES)),
        st.tuples(st.just("byte"), st.integers(0, 1 << 22), st.integers(0, 255)),
        st.tuples(st.just("field"), st.sampled_from(sorted(FIELDS)), st.integers(0, len(B64) - 1)),
    )


def _mutate_image(seed: ImageSeed, mutations: list[tuple[Any, ...]]) -> bytes:
    buf = bytearray(seed.data)
    for m in mutations:
        if m[0] in ("meta-byte", "meta-u64"):
            off, n = seed.regions[m[1] % len(seed.regions)]
            pos = off + m[2] % n
            if m[0] == "meta-byte":
                buf[pos] = m[3]
            else:
                pos -= pos % 8
                if pos + 8 <= len(buf):
                    struct.pack_into(">Q", buf, pos, m[3])
        elif m[0] == "byte":
            buf[m[1] % len(buf)] = m[2]
        else:
            _apply(buf, [m])
    return bytes(buf)


async def _exercise_ro(path: str) -> None:
    try:
        async with aioblock.open(path, "qcow2", read_only=True) as disk:
            size = disk.size
            step = 64 * KiB
            offsets = [*range(0, min(size, 2 * MiB), step), *([max(0, size - step)] if size > 2 * MiB else [])]
            for off in offsets:
                try:
                    data = await disk.read(off, min(step, size - off))
                    assert len(data) == min(step, size - off)
                except AioblockError:
                    pass
            try:
                await disk.info()
                if HAVE_CHECK:
                    await disk.check()
            except AioblockError:
                pass
    except AioblockError:
        pass
    if HAVE_CHECK:
        try:
            async with aioblock.open(path, "qcow2", read_only=True, options={"check": True}) as disk:
                await disk.check()
        except AioblockError:
            pass


async def _exercise_rw(path: str) -> None:
    try:
        async with aioblock.open(path, "qcow2") as disk:
            size = disk.size
            cs = 4096
            requests = [
                ("write", 0, b"\x5a" * 512), ("write", 4096 + 100, b"\x5b" * 3000),
                ("write", size // 2 - 700, b"\x5c" * 1500), ("write", size - 512, b"\x5d" * 512),
                ("zero", min(96 * KiB, size // 2), cs), ("discard", min(64 * KiB, size // 4), 64 * KiB),
                ("write", 64 * KiB + 10, b"\x5e" * 100),
            ]
            for op, off, arg in requests:
                if off < 0 or off >= size:
                    continue
                try:
                    if op == "write":
                        assert isinstance(arg, bytes)
                        await disk.write(off, arg[:size - off])
                    elif op == "zero":
                        assert isinstance(arg, int)
                        await disk.write_zeroes(off, min(arg, size - off))
                    else:
                        assert isinstance(arg, int)
                        await disk.discard(off, min(arg, size - off))
                except AioblockError:
                    pass
            try:
                await disk.read(0, min(size, 256 * KiB))
                await disk.flush()
            except AioblockError:
                pass
    except AioblockError:
        pass


def _run_bounded(coro: Any) -> None:
    asyncio.run(asyncio.wait_for(coro, EXAMPLE_TIMEOUT))


@pytest.fixture(scope="module")
def work_dir() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="qcow2-fuzz-img-"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


@needs_qemu
def test_image_seeds_are_sane(work_dir: Path) -> None:
    for seed in image_seeds():
        path = work_dir / f"seed-{seed.name}.qcow2"
        path.write_bytes(seed.data)
        _run_bounded(_exercise_ro(str(path)))
        assert len(seed.regions) >= 5


@pytest.mark.slow
@needs_qemu
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data(), st.lists(_image_mutation(), min_size=1, max_size=6))
def test_image_read_only_total(work_dir: Path, data: st.DataObject, mutations: list[tuple[Any, ...]]) -> None:
    """A mutated image opened read-only, read whole, info and check: only AioblockError may escape, in time,
    and the file never changes."""
    seed = _image_seed(data.draw(st.sampled_from(sorted(IMAGE_SEEDS)), label="seed"))
    image = _mutate_image(seed, mutations)
    path = work_dir / "ro.qcow2"
    path.write_bytes(image)
    _run_bounded(_exercise_ro(str(path)))
    assert path.read_bytes() == image, "a read-only open changed the file"


@pytest.mark.slow
@needs_qemu
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data(), st.lists(_image_mutation(), min_size=1, max_size=6))
def test_image_read_write_total(work_dir: Path, data: st.DataObject, mutations: list[tuple[Any, ...]]) -> None:
    """A mutated image opened read-write, written, zeroed, discarded, flushed and closed: only AioblockError."""
    seed = _image_seed(data.draw(st.sampled_from(sorted(IMAGE_SEEDS)), label="seed"))
    path = work_dir / "rw.qcow2"
    path.write_bytes(_mutate_image(seed, mutations))
    _run_bounded(_exercise_rw(str(path)))
    _run_bounded(_exercise_ro(str(path)))
