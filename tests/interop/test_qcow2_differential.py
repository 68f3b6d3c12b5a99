"""Differential tests of the qcow2 driver against qemu-io: the same command lists on twin qcow2 images across a
matrix of create options; outputs and exit status must match, ``qemu-img compare`` must say identical,
``qemu-img check`` must exit 0 on both images (no leaks after a clean close), and the content must match a
Python model of the guest disk."""

from __future__ import annotations

import random
import subprocess
import zlib
from pathlib import Path

import pytest

from ..conftest import QEMU_IMG, needs_qemu, qemu_io
from .differential import run_differential
from .test_io_differential import Model, layout, random_commands

pytestmark = needs_qemu

SIZE = 256 * 1024

MATRIX = {
    "v3-64k": "cluster_size=64k",
    "v2-64k": "compat=0.10",
    "v3-512": "cluster_size=512",
    "v3-4k-rc1": "cluster_size=4k,refcount_bits=1",
    "v3-4k-rc64": "cluster_size=4k,refcount_bits=64",
    "v3-2M": "cluster_size=2M",
    "v2-512": "compat=0.10,cluster_size=512",
    "extl2-64k": "extended_l2=on",
    "extl2-32k": "extended_l2=on,cluster_size=32k",
    "zstd-4k": "compression_type=zstd,cluster_size=4k",
    "lazy-4k": "lazy_refcounts=on,cluster_size=4k",
}


class Qcow2Model(Model):
    """The raw model, except that qcow2 discards only the whole clusters inside the range (QEMU ignores the
    partial ones) and then reads them as zeroes."""

    def __init__(self, size: int, cluster_size: int) -> None:
        super().__init__(size)
        self.cluster_size = cluster_size

    def apply(self, cmd: str) -> None:
        words = cmd.split()
        if words[0] != "discard":
            super().apply(cmd)
            return
        off, length = (int(w, 0) if w.startswith("0x") else int(w) for w in words[-2:])
        if off + length > len(self.data):
            return
        cs = self.cluster_size
        start = -(-off // cs) * cs
        end = off + length if off + length == len(self.data) else (off + length) // cs * cs
        if start < end:
            self.data[start:end] = bytes(end - start)


def cluster_size_of(opts: str) -> int:
    for opt in opts.split(","):
        if opt.startswith("cluster_size="):
            v = opt.split("=")[1]
            return int(v[:-1]) * {"k": 1024, "M": 1 << 20}[v[-1]] if v[-1] in "kM" else int(v)
    return 65536


def guest_bytes(image: Path) -> bytes:
    """The guest-visible content, as QEMU reads it."""
    assert QEMU_IMG is not None
    out = image.with_suffix(".raw")
    subprocess.run([QEMU_IMG, "convert", "-f", "qcow2", "-O", "raw", str(image), str(out)], check=True)
    return out.read_bytes()


def qemu_check(image: Path) -> subprocess.CompletedProcess[str]:
    assert QEMU_IMG is not None
    return subprocess.run([QEMU_IMG, "check", "-f", "qcow2", str(image)], capture_output=True, text=True)


def check_both(diff_images: tuple[Path, Path], model: Model | None = None) -> None:
    for image in diff_images:
        res = qemu_check(image)
        assert res.returncode == 0, f"{image.name}: {res.stdout}{res.stderr}"
    if model is not None:
        data = guest_bytes(diff_images[1])
        assert data == bytes(model.data), "aioblock's image differs from the model"


@pytest.mark.parametrize("variant", list(MATRIX))
@pytest.mark.parametrize("seed", range(2))
def test_random_command_lists(tmp_path: Path, variant: str, seed: int) -> None:
    """Random lists of 120 commands (unaligned writes, write -z [-u], discard, flush, verifying reads, requests
    past the end) on empty twin images."""
    cmds = random_commands(random.Random(1000 * seed + zlib.crc32(variant.encode()) % 1000), 120, SIZE)
    diff = run_differential(cmds, size=SIZE, tmp_path=tmp_path, fmt="qcow2", create_opts=MATRIX[variant])
    diff.assert_same()
    model = Qcow2Model(SIZE, cluster_size_of(MATRIX[variant]))
    for cmd in cmds:
        model.apply(cmd.replace(" -q", ""))
    check_both((diff.qemu_image, diff.aioblock_image), model)


@pytest.mark.parametrize("variant", ["v3-64k", "v3-512", "extl2-64k", "v2-64k"])
def test_random_commands_with_backing(tmp_path: Path, variant: str) -> None:
    """The same over a backing file full of data: partial-cluster writes copy the rest of the cluster from
    the backing file, zero writes and discards must hide it."""
    backing = tmp_path / "base.raw"
    backing.write_bytes(bytes(random.Random(5).randbytes(SIZE - 3000)))      # shorter than the overlay
    opts = f"{MATRIX[variant]},backing_file={backing},backing_fmt=raw"
    cmds = [c for c in random_commands(random.Random(77), 120, SIZE) if not c.startswith("read -P")]
    diff = run_differential(cmds, size=SIZE, tmp_path=tmp_path, fmt="qcow2", create_opts=opts)
    diff.assert_same()
    check_both((diff.qemu_image, diff.aioblock_image))


@pytest.mark.parametrize("variant", ["v3-64k", "v3-512", "extl2-64k", "v3-4k-rc1"])
def test_concurrent_aio_writes_same_clusters(tmp_path: Path, variant: str) -> None:
    """Hundreds of concurrent aio_writes into the same unallocated clusters (adjacent unaligned ranges that
    share clusters), some of them zero writes: every range reads back, the images match, check is clean."""
    size = 1 << 20
    extents = layout(random.Random(3), 300, start=11, gaps=False, zero_every=7)
    writes = [f"aio_write -z {e.off} {e.length}" if e.pattern == 0 else f"aio_write -P {e.pattern} {e.off} {e.length}"
              for e in extents]
    reads = [f"read -P {e.pattern} {e.off} {e.length}" for e in sorted(extents, key=lambda e: e.off)]
    cmds = [*writes, "aio_flush", *reads]
    diff = run_differential(cmds, size=size, tmp_path=tmp_path, fmt="qcow2", create_opts=MATRIX[variant])
    diff.assert_same(sort_stdout=True)
    assert diff.aioblock.returncode == 0
    assert "Pattern verification failed" not in diff.aioblock.stdout
    model = Model(size)
    for cmd in writes:
        model.apply(cmd)
    check_both((diff.qemu_image, diff.aioblock_image), model)


@pytest.mark.parametrize("variant", ["v3-64k", "zstd-4k", "extl2-64k"])
def test_compressed_writes(tmp_path: Path, variant: str) -> None:
    """``write -c`` of whole clusters, then partial overwrites of compressed clusters (COW from the
    decompressed data), zero writes and discards over them."""
    cs = 4096 if "4k" in variant else 65536
    cmds = [f"write -c -P 0x5{i} {i * cs} {cs}" for i in range(4)]
    cmds += [f"write -P 0x77 {cs + 100} 300", f"write -z {2 * cs} {cs // 2}", f"discard {3 * cs} {cs}",
             f"read -P 0x50 0 {cs}", f"read -P 0x51 {cs} 100", f"read -P 0x77 {cs + 100} 300",
             f"read -P 0x52 {2 * cs + cs // 2} {cs // 2}", f"write -c -P 0x60 {5 * cs} {cs}",
             f"write -c -P 0x61 {5 * cs} {cs}"]
    diff = run_differential(cmds, size=8 * cs, tmp_path=tmp_path, fmt="qcow2", create_opts=MATRIX[variant])
    diff.assert_same()
    check_both((diff.qemu_image, diff.aioblock_image))


def test_image_written_by_qemu_then_aioblock(tmp_path: Path) -> None:
    """Writes through aioblock on an image QEMU filled (allocated, zero, compressed clusters) read back through
    qemu-io."""
    def prepare(path: Path) -> None:
        qemu_io(path, "write -P 0x11 0 200k", "write -z 256k 64k", "write -c -P 0x22 384k 64k", fmt="qcow2")
    cmds = ["write -P 0x33 1000 5000", "write -P 0x44 260k 2k", "write -P 0x55 390k 1k", "discard 128k 64k",
            "read -P 0x11 6000 10000", "read -P 0x22 384k 6k", "read -P 0 262144 100"]
    diff = run_differential(cmds, size=SIZE * 2, tmp_path=tmp_path, fmt="qcow2", prepare=prepare)
    diff.assert_same()
    check_both((diff.qemu_image, diff.aioblock_image))
