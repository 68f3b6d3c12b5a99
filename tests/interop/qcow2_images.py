"""qcow2 images made by QEMU's own tools, to judge aioblock's qcow2 driver against.

Each builder takes an empty directory, makes one kind of image there with ``qemu-img`` / ``qemu-io``
(deterministic patterns at deliberately odd offsets and lengths), and returns a :class:`Qcow2Image`: the image,
the raw file ``qemu-img convert -O raw`` made of it (what a reader must return), the backing files it needs, and
the raw content of each internal snapshot. Builders never depend on aioblock.

    img = build("chain", tmp_path / "chain")
    assert (await disk.read(0, n)) == img.expected()[:n]

``KINDS`` lists every builder by name, ``build(kind, directory)`` runs one. The builders refuse to return an
image that QEMU itself does not accept (``qemu-img check`` must give the exit status the kind expects).
"""

from __future__ import annotations

import json
import random
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..conftest import QEMU_IMG, QEMU_IO

__all__ = ["KINDS", "SNAPSHOT_KINDS", "Qcow2Image", "build", "mixed_content", "qemu_img_json"]

KiB = 1024
MiB = 1024 * KiB


@dataclass(frozen=True)
class Qcow2Image:
    """One built image: ``path`` (top of its chain), ``raw`` (its guest content as ``qemu-img convert -O raw``
    wrote it), ``create_opts`` (the ``-o`` it was created with), ``backing`` (backing files, nearest first),
    ``snapshots`` (internal snapshot name -> raw file with that snapshot's content) and ``check_status``
    (``qemu-img check``'s exit status on it: 0, or 2 for an image left dirty on purpose)."""

    kind: str
    path: Path
    raw: Path
    create_opts: str
    backing: tuple[Path, ...] = ()
    snapshots: dict[str, Path] = field(default_factory=dict)
    check_status: int = 0

    @property
    def directory(self) -> Path:
        return self.path.parent

    def expected(self) -> bytes:
        """The guest content every reader must see."""
        return self.raw.read_bytes()


# ---- running QEMU's tools ---------------------------------------------------------------------------------

def _run(argv: Sequence[str], *, ok: Sequence[int] = (0,)) -> subprocess.CompletedProcess[str]:
    res = subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=120)
    if res.returncode not in ok:
        raise AssertionError(f"{' '.join(map(str, argv))[:500]} exited {res.returncode}:\n{res.stdout[-2000:]}"
                             f"\n{res.stderr[-2000:]}")
    return res


def _img(*args: str | Path, ok: Sequence[int] = (0,)) -> subprocess.CompletedProcess[str]:
    assert QEMU_IMG is not None
    return _run([QEMU_IMG, *map(str, args)], ok=ok)


def _io(path: Path, *cmds: str, fmt: str = "qcow2", ok: Sequence[int] = (0,)) -> None:
    """Run qemu-io commands on ``path``; any failed command (qemu-io exits 1) is an error unless allowed."""
    assert QEMU_IO is not None
    argv: list[str] = [QEMU_IO, "-f", fmt]
    for c in cmds:
        argv += ["-c", c]
    _run([*argv, str(path)], ok=ok)


def qemu_img_json(*args: str | Path) -> Any:
    """``qemu-img ARGS --output=json`` parsed (``check`` may exit non-zero and still print its report)."""
    res = _img(*args, "--output=json", ok=(0, 1, 2, 3))
    return json.loads(res.stdout)


def _create(path: Path, size: str | int, opts: str = "", *, backing: str | Path | None = None,
            backing_fmt: str | None = None, fmt: str = "qcow2") -> Path:
    argv: list[str | Path] = ["create", "-q", "-f", fmt]
    if opts:
        argv += ["-o", opts]
    if backing is not None:
        argv += ["-b", str(backing)]
        if backing_fmt is not None:
            argv += ["-F", backing_fmt]
    _img(*argv, path, str(size))
    return path


def _to_raw(path: Path, raw: Path, *, snapshot: str | None = None) -> Path:
    argv: list[str | Path] = ["convert", "-f", "qcow2", "-O", "raw"]
    if snapshot is not None:
        argv += ["-l", f"snapshot.name={snapshot}"]
    _img(*argv, path, raw)
    return raw


def _finish(kind: str, path: Path, opts: str, *, backing: tuple[Path, ...] = (),
            snapshots: dict[str, Path] | None = None, check_status: int = 0) -> Qcow2Image:
    status = _img("check", "-q", path, ok=(0, 1, 2, 3)).returncode
    if status != check_status:
        raise AssertionError(f"{kind}: qemu-img check exited {status}, expected {check_status}")
    raw = _to_raw(path, path.with_suffix(".expected.raw"))
    return Qcow2Image(kind, path, raw, opts, backing, snapshots or {}, check_status)


# ---- content ---------------------------------------------------------------------------------------------

def mixed_content(size: int, cluster: int, seed: int = 7) -> bytes:
    """Guest data with every kind of cluster a converter meets: repeated text (compresses well), random bytes
    (does not compress: QEMU stores such clusters uncompressed), all zeroes, half random/half zero, a byte ramp
    and runs of one byte at odd offsets. ``size`` need not be a multiple of ``cluster``: the last cluster is
    then partial."""
    rng = random.Random(seed)
    out = bytearray()
    kinds = ["text", "random", "zero", "half", "ramp", "runs"]
    i = 0
    while len(out) < size:
        kind = kinds[i % len(kinds)]
        if kind == "text":
            line = f"cluster {i} of a qcow2 test image; ".encode()
            chunk = (line * (cluster // len(line) + 1))[:cluster]
        elif kind == "random":
            chunk = rng.randbytes(cluster)
        elif kind == "zero":
            chunk = bytes(cluster)
        elif kind == "half":
            chunk = rng.randbytes(cluster // 2) + bytes(cluster - cluster // 2)
        elif kind == "ramp":
            chunk = bytes(j & 0xFF for j in range(cluster))
        else:
            buf = bytearray(cluster)
            for _ in range(8):
                off, n = rng.randrange(cluster), rng.randrange(1, 3000)
                buf[off:off + n] = bytes([rng.randrange(1, 256)]) * min(n, cluster - off)
            chunk = bytes(buf)
        out += chunk
        i += 1
    # a tail that is neither zero nor compressible, so that the partial last cluster is stored
    out[size - 700:size] = rng.randbytes(700)
    return bytes(out[:size])


# Commands used on several kinds: patterns at odd offsets and lengths, crossing cluster and L2 boundaries.
def _scatter(size: int) -> list[str]:
    return [
        "write -P 0x11 0 4096",
        "write -P 0x22 3000 1536",                 # inside the first cluster(s), unaligned both ends
        "write -P 0x33 65000 70000",               # crosses the 64k boundary (and many small clusters)
        f"write -P 0x44 {size // 2 - 1000} 2000",  # around the middle
        f"write -P 0x55 {size - 512} 512",         # the last sector
        f"write -P 0x66 {size // 3} 1",            # one byte
    ]


# ---- builders ----------------------------------------------------------------------------------------------

def _plain(opts: str, size: int) -> Callable[[str, Path], Qcow2Image]:
    """A fresh image with scattered writes, a zero write and a discard in the middle of data."""
    def make(kind: str, d: Path) -> Qcow2Image:
        p = _create(d / f"{kind}.qcow2", size, opts)
        _io(p, *_scatter(size), f"write -P 0x77 {size // 4} 300k", f"write -z {size // 4 + 64 * KiB} 64k",
            f"discard {size // 4 + 192 * KiB} 64k", "write -P 0x78 130000 5")
        return _finish(kind, p, opts)
    return make


def _extended_l2(opts: str, size: int, cluster: int) -> Callable[[str, Path], Qcow2Image]:
    """Subclusters (cluster/32 each): writes covering parts of subclusters, zeroed and discarded
    subclusters, and a compressed cluster."""
    sub = cluster // 32

    def make(kind: str, d: Path) -> Qcow2Image:
        p = _create(d / f"{kind}.qcow2", size, opts)
        _io(p, "write -P 0x21 3000 1536",                         # part of subclusters 1-2 (64k) / 0 (2M)
            f"write -P 0x22 {sub * 5} {sub * 3}",                 # whole subclusters 5-7
            f"write -P 0x23 {cluster - 100} 300",                 # crosses into the next cluster
            f"write -P 0x24 {cluster * 2} {cluster}",             # one whole cluster
            f"write -z {cluster * 2 + sub * 4} {sub * 2}",        # zero subclusters 4-5 of it
            f"discard {cluster * 2 + sub * 10} {sub}",            # discard subcluster 10
            f"write -z {cluster * 2 + sub * 20 + 100} 50",        # unaligned zero write: written as data
            f"write -c -P 0x25 {cluster * 3} {cluster}",          # compressed cluster
            f"write -P 0x26 {size - 1000} 1000")
        return _finish(kind, p, opts)
    return make


def _compressed_io(opts: str, size: int, cluster: int) -> Callable[[str, Path], Qcow2Image]:
    """Clusters written compressed by qemu-io (``write -c``), next to plain ones, then partly overwritten (a
    compressed cluster must be decompressed and copied on write) and one zeroed."""
    def make(kind: str, d: Path) -> Qcow2Image:
        p = _create(d / f"{kind}.qcow2", size, opts)
        _io(p, f"write -c -P 0x5a 0 {cluster}",
            f"write -c -P 0x5b {cluster} {cluster}",
            f"write -c -P 0x5c {cluster * 3} {cluster}",
            f"write -P 0x5d {cluster * 4} {cluster}",
            f"write -c -P 0x5e {cluster * 6} {cluster}",
            f"write -P 0x61 {cluster + 3000} 1536",               # overwrite part of a compressed cluster
            f"write -z {cluster * 6} {cluster}",                  # zero a compressed cluster
            f"write -c -P 0x5f {size - cluster} {cluster}")       # the last cluster
        return _finish(kind, p, opts)
    return make


def _compressed_convert(opts: str, size: int, cluster: int, seed: int) -> Callable[[str, Path], Qcow2Image]:
    """``qemu-img convert -c -O qcow2`` of a raw image with mixed content and a partial last cluster."""
    def make(kind: str, d: Path) -> Qcow2Image:
        src = d / "source.raw"
        src.write_bytes(mixed_content(size, cluster, seed))
        p = d / f"{kind}.qcow2"
        argv: list[str | Path] = ["convert", "-c", "-f", "raw", "-O", "qcow2"]
        if opts:
            argv += ["-o", opts]
        _img(*argv, src, p)
        return _finish(kind, p, opts)
    return make


def _zeros_and_discards(kind: str, d: Path) -> Qcow2Image:
    """v3 zero clusters (with and without unmap), discards of whole and partial clusters, zero writes that
    are not cluster-aligned (written as data), and data written again over a discarded range."""
    opts = "cluster_size=4096"
    size = 2 * MiB
    p = _create(d / f"{kind}.qcow2", size, opts)
    _io(p, "write -P 0x31 0 1M",
        "write -z 4096 8192",
        "write -z -u 65536 65536",
        "write -z 200000 1000",
        "discard 262144 131072",
        "discard 400000 5000",
        "write -P 0x32 270000 1536",
        "write -z 1536k 256k",                                   # zero clusters where nothing was allocated
        "discard 1900k 16k")
    return _finish(kind, p, opts)


def _snapshots(opts: str, size: int) -> Callable[[str, Path], Qcow2Image]:
    """Two internal snapshots; after each, writes over clusters the snapshot shares (unaligned, so that COW
    copies part of a shared cluster), a zeroed range and a discard: the active state differs from both."""
    def make(kind: str, d: Path) -> Qcow2Image:
        p = _create(d / f"{kind}.qcow2", size, opts)
        _io(p, *_scatter(size), "write -P 0x41 256k 512k")
        _img("snapshot", "-c", "snap1", p)
        snap1 = _to_raw(p, d / "snap1.raw", snapshot="snap1")
        _io(p, "write -P 0x42 3000 1536", "write -P 0x43 300000 70000", "write -z 600k 64k", "discard 700k 64k",
            f"write -P 0x44 {size - 100000} 50000")
        _img("snapshot", "-c", "snap2", p)
        snap2 = _to_raw(p, d / "snap2.raw", snapshot="snap2")
        _io(p, "write -P 0x45 0 100", "write -P 0x46 290000 20000", "write -z 320000 64k")
        return _finish(kind, p, opts, snapshots={"snap1": snap1, "snap2": snap2})
    return make


def _chain(kind: str, d: Path) -> Qcow2Image:
    """raw base (768 KiB) <- qcow2 v3 4k-cluster overlay (1.5 MiB) <- qcow2 64k-cluster overlay (3 MiB).

    Each backing file is shorter than the overlay above it, so reads past its end give zeroes; the overlays'
    writes are unaligned, so QEMU copied partial clusters from below (COW). The top overlay zeroes a range
    holding base data (a zero cluster hides the backing file) and discards another."""
    base = _create(d / "base.raw", 768 * KiB, fmt="raw")
    _io(base, "write -P 0xb1 0 768k", "write -P 0xb2 1000 3000", "write -P 0xb3 700000 86432", fmt="raw")
    mid = _create(d / "mid.qcow2", 1536 * KiB, "cluster_size=4096", backing="base.raw", backing_fmt="raw")
    _io(mid, "write -P 0xc1 3000 1536", "write -P 0xc2 65000 70000", "write -P 0xc3 780000 10000",
        "write -z 8192 4096", "discard 16384 8192", "write -P 0xc4 1500000 1000")
    top = _create(d / f"{kind}.qcow2", 3 * MiB, "", backing="mid.qcow2", backing_fmt="qcow2")
    _io(top, "write -P 0xd1 100 200", "write -P 0xd2 700000 200000", "write -z 196608 65536",
        "write -P 0xd3 1530000 20000", "discard 262144 65536", "write -P 0xd4 3000000 145728")
    return _finish(kind, top, "", backing=(mid, base))


def _chain_v2(kind: str, d: Path) -> Qcow2Image:
    """A v2 (compat=0.10) overlay on a qcow2 v2 base: without zero clusters, zero writes over backing data
    must be stored as data; discards of clusters hiding backing data must not expose it."""
    base = _create(d / "base.qcow2", 1 * MiB, "compat=0.10,cluster_size=4096")
    _io(base, "write -P 0xe1 0 1M", "write -P 0xe2 5000 300")
    top = _create(d / f"{kind}.qcow2", 2 * MiB, "compat=0.10", backing="base.qcow2", backing_fmt="qcow2")
    _io(top, "write -P 0xf1 3000 1536", "write -z 64k 64k", "write -P 0xf2 128k 64k", "discard 128k 64k",
        "write -P 0xf3 1000000 100000")
    return _finish(kind, top, "compat=0.10", backing=(base,))


def _chain_extended_l2(kind: str, d: Path) -> Qcow2Image:
    """An extended-L2 overlay on a raw base: subclusters the overlay never wrote still come from the base,
    including inside clusters it allocated."""
    opts = "extended_l2=on,cluster_size=65536"
    base = _create(d / "base.raw", 1 * MiB, fmt="raw")
    _io(base, "write -P 0xa1 0 1M", fmt="raw")
    top = _create(d / f"{kind}.qcow2", 1536 * KiB, opts, backing="base.raw", backing_fmt="raw")
    _io(top, "write -P 0xa2 3000 1536", "write -z 10240 4096", "write -P 0xa3 65536 2048", "discard 69632 2048",
        "write -P 0xa4 1040000 20000", "write -z 131072 65536")
    return _finish(kind, top, opts, backing=(base,))


def _lazy(kind: str, d: Path) -> Qcow2Image:
    """lazy_refcounts=on, closed cleanly."""
    opts = "lazy_refcounts=on"
    size = 1 * MiB
    p = _create(d / f"{kind}.qcow2", size, opts)
    _io(p, *_scatter(size), "write -z 128k 64k")
    return _finish(kind, p, opts)


def _lazy_dirty(kind: str, d: Path) -> Qcow2Image:
    """lazy_refcounts=on and qemu-io aborted after writing: the dirty bit stays set and the refcounts of the
    new clusters were never written (qemu-img check reports corruptions and exits 2; a read-write open must
    repair them; a read-only open must still read the data)."""
    opts = "lazy_refcounts=on,cluster_size=4096"
    size = 1 * MiB
    p = _create(d / f"{kind}.qcow2", size, opts)
    _io(p, "write -P 0x71 0 64k")
    _io(p, "write -P 0x72 3000 1536", "write -P 0x73 300000 100000", "abort", ok=(-6, 134))
    return _finish(kind, p, opts, check_status=2)


def _preallocated(opts: str, size: int) -> Callable[[str, Path], Qcow2Image]:
    """preallocation=metadata: every cluster has a host offset from the start; then writes, a zero write
    (keeps the allocation, sets the zero flag on v3) and a discard."""
    def make(kind: str, d: Path) -> Qcow2Image:
        p = _create(d / f"{kind}.qcow2", size, opts)
        _io(p, *_scatter(size), "write -z 128k 64k", "discard 256k 64k")
        return _finish(kind, p, opts)
    return make


def _resized(kind: str, d: Path) -> Qcow2Image:
    """Created at 1 MiB, filled, grown with ``qemu-img resize`` to 2600 KiB (not a cluster multiple), then
    written across the old end and at the new end."""
    p = _create(d / f"{kind}.qcow2", 1 * MiB, "")
    _io(p, "write -P 0x81 0 1M", "write -P 0x82 1040000 8576")
    _img("resize", "-q", "-f", "qcow2", p, "2600K")
    _io(p, "write -P 0x83 1000000 100000", "write -P 0x84 2661888 512")
    return _finish(kind, p, "")


KINDS: dict[str, Callable[[str, Path], Qcow2Image]] = {
    "v2": _plain("compat=0.10", 3 * MiB),
    "v2-512": _plain("compat=0.10,cluster_size=512", 1 * MiB),
    "v3": _plain("", 3 * MiB),
    "v3-512": _plain("cluster_size=512", 1 * MiB),
    "v3-4k": _plain("cluster_size=4096", 3 * MiB),
    "v3-2M": _plain("cluster_size=2M", 7 * MiB),
    "refcount1": _plain("refcount_bits=1,cluster_size=4096", 2 * MiB),
    "refcount64": _plain("refcount_bits=64,cluster_size=512", 1 * MiB),
    "extl2-64k": _extended_l2("extended_l2=on", 1 * MiB, 64 * KiB),
    "extl2-2M": _extended_l2("extended_l2=on,cluster_size=2M", 9 * MiB, 2 * MiB),
    "zlib-io": _compressed_io("", 1 * MiB, 64 * KiB),
    "zstd-io": _compressed_io("compression_type=zstd,cluster_size=4096", 256 * KiB, 4 * KiB),
    "zlib-convert": _compressed_convert("", 13 * 64 * KiB + 20 * KiB + 512, 64 * KiB, 1),
    "zstd-convert": _compressed_convert("compression_type=zstd,cluster_size=4096", 61 * 4 * KiB + 1536,
                                        4 * KiB, 2),
    "zeros-discards": _zeros_and_discards,
    "snapshots": _snapshots("", 2 * MiB),
    "snapshots-v2": _snapshots("compat=0.10,cluster_size=4096", 1 * MiB),
    "chain": _chain,
    "chain-v2": _chain_v2,
    "chain-extl2": _chain_extended_l2,
    "lazy-refcounts": _lazy,
    "lazy-dirty": _lazy_dirty,
    "prealloc-metadata": _preallocated("preallocation=metadata", 2 * MiB),
    "prealloc-metadata-v2": _preallocated("preallocation=metadata,compat=0.10,cluster_size=4096", 1 * MiB),
    "resized": _resized,
}

SNAPSHOT_KINDS = tuple(k for k in KINDS if k.startswith("snapshots"))


def build(kind: str, directory: Path) -> Qcow2Image:
    """Build one kind of image in ``directory`` (created if missing; should be empty)."""
    directory.mkdir(parents=True, exist_ok=True)
    return KINDS[kind](kind, directory)
