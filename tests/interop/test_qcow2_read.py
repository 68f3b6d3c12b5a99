"""aioblock's qcow2 driver judged by QEMU on images QEMU made (see ``qcow2_images``): every kind of image is read
whole and at random through the Python API and compared with ``qemu-img convert -O raw``; ``aioblock map``,
``info`` and ``check`` must print what ``qemu-img`` prints; ``compare`` and ``convert`` must agree with
``qemu-img``; and writes through aioblock must leave images that ``qemu-img check`` passes, with every internal
snapshot intact.

The images are built once per session (they are small and QEMU builds them in a few seconds); tests that
write work on a copy. The per-image CLI comparisons run the ``aioblock`` command in-process (``aioblock_main``);
a few tests run it as a real process.
"""

from __future__ import annotations

import asyncio
import contextlib
import difflib
import hashlib
import io
import json
import random
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

import aioblock
from aioblock.cli import main as cli_main

from ..conftest import aioblock_cli, needs_qemu, qemu_img
from .qcow2_images import KINDS, SNAPSHOT_KINDS, Qcow2Image, build, qemu_img_json

pytestmark = needs_qemu

KiB = 1024
MiB = 1024 * KiB

# Chunk sizes for whole-image reads: none aligned to anything, some tiny, some spanning many clusters.
CHUNKS = [1, 511, 4097, 3000, 65535, 65537, 1536, 131071, 7, 2 * MiB + 3, 100003]

# qemu-img info's keys a driver answers for (actual-size depends on the file system; "filename" is ours).
INFO_KEYS = ("virtual-size", "cluster-size", "format", "format-specific", "backing-filename",
             "backing-filename-format", "full-backing-filename", "dirty-flag")

_built: dict[str, Qcow2Image] = {}


@pytest.fixture(scope="session")
def qcow2_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("qcow2-images")


def _image(kind: str, root: Path) -> Qcow2Image:
    if kind not in _built:
        _built[kind] = build(kind, root / kind)
    return _built[kind]


@pytest.fixture(params=sorted(KINDS))
def image(request: pytest.FixtureRequest, qcow2_root: Path) -> Qcow2Image:
    """One kind of image, built on first use; tests must not modify it (use ``_copy``)."""
    return _image(request.param, qcow2_root)


@pytest.fixture(params=SNAPSHOT_KINDS)
def snapshot_image(request: pytest.FixtureRequest, qcow2_root: Path) -> Qcow2Image:
    return _image(request.param, qcow2_root)


def _copy(img: Qcow2Image, dest: Path) -> Qcow2Image:
    """A copy of the image's whole directory (backing files included; they are named relative to it)."""
    shutil.copytree(img.directory, dest)
    return Qcow2Image(img.kind, dest / img.path.name, dest / img.raw.name, img.create_opts,
                      tuple(dest / b.name for b in img.backing),
                      {name: dest / raw.name for name, raw in img.snapshots.items()}, img.check_status)


def _digest(paths: list[Path]) -> list[str]:
    return [hashlib.sha256(p.read_bytes()).hexdigest() for p in paths]


def _first_difference(got: bytes, want: bytes) -> str:
    if len(got) != len(want):
        return f"length {len(got)} instead of {len(want)}"
    i = next(i for i, (a, b) in enumerate(zip(got, want, strict=True)) if a != b)
    return f"first difference at +{i}: {got[i:i + 8].hex()} instead of {want[i:i + 8].hex()}"


def _json_diff(ours: Any, theirs: Any) -> str:
    a = json.dumps(theirs, indent=1, sort_keys=True).splitlines(True)
    b = json.dumps(ours, indent=1, sort_keys=True).splitlines(True)
    return "".join(difflib.unified_diff(a, b, "qemu-img", "aioblock", n=3))[:6000]


# ---- reading ---------------------------------------------------------------------------------------------

async def test_read_whole_image_in_unaligned_chunks(image: Qcow2Image) -> None:
    """Sequential reads in chunks of varying odd sizes give exactly what qemu-img convert wrote; a read-only
    open changes no byte of the image or its backing files (not even of an image left dirty)."""
    want = image.expected()
    files = [image.path, *image.backing]
    before = _digest(files)
    async with aioblock.open(str(image.path), "qcow2", read_only=True) as disk:
        assert disk.size == len(want)
        pos, i = 0, 0
        while pos < len(want):
            n = min(CHUNKS[i % len(CHUNKS)], len(want) - pos)
            got = await disk.read(pos, n)
            if got != want[pos:pos + n]:
                raise AssertionError(f"read({pos}, {n}): {_first_difference(got, want[pos:pos + n])}")
            pos, i = pos + n, i + 1
    assert _digest(files) == before, "a read-only open modified the image"


async def test_random_and_concurrent_reads(image: Qcow2Image) -> None:
    """Seeded random reads (any offset, 1 byte to 300 KiB, some ending exactly at the end), first one at a time,
    then 64 at once on the same disk."""
    want = image.expected()
    size = len(want)
    rng = random.Random(image.kind)
    ranges = []
    for _ in range(150):
        n = rng.choice([rng.randint(1, 600), rng.randint(1, 70000), rng.randint(1, 300 * KiB)])
        n = min(n, size)
        off = size - n if rng.random() < 0.05 else rng.randrange(0, size - n + 1)
        ranges.append((off, n))
    async with aioblock.open(str(image.path), "qcow2", read_only=True) as disk:
        for off, n in ranges[:60]:
            got = await disk.read(off, n)
            assert got == want[off:off + n], f"read({off}, {n}): {_first_difference(got, want[off:off + n])}"
        results = await asyncio.gather(*(disk.read(off, n) for off, n in ranges[60:124]))
        for (off, n), got in zip(ranges[60:124], results, strict=True):
            assert got == want[off:off + n], f"concurrent read({off}, {n}): " + _first_difference(
                got, want[off:off + n])


async def test_probe_finds_qcow2(image: Qcow2Image) -> None:
    """Opened without a format, the image probes as qcow2 (and each backing file as what it is)."""
    async with aioblock.open(str(image.path), read_only=True) as disk:
        info = await disk.info()
        chain = [i.format for i in info.chain()]
        head = await disk.read(0, min(disk.size, 65536))
    expected = ["qcow2"] + ["raw" if b.suffix == ".raw" else "qcow2" for b in image.backing]
    assert chain == expected
    assert head == image.expected()[:len(head)]


# ---- info, map, check against qemu-img ----------------------------------------------------------------------

def aioblock_main(*args: str) -> subprocess.CompletedProcess[str]:
    """Run the ``aioblock`` command in this process: the code ``python -m aioblock ARGS`` runs (its exit status,
    stdout and stderr), without half a second of interpreter start-up per call, which the per-image matrix
    would pay hundreds of times. Must be called outside a running event loop (from a sync test)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            status = cli_main(list(args))
        except SystemExit as exc:                      # argparse usage errors
            status = exc.code if isinstance(exc.code, int) else 1
    return subprocess.CompletedProcess(["aioblock", *args], status, out.getvalue(), err.getvalue())


def _pick(info: dict[str, Any]) -> dict[str, Any]:
    return {k: info[k] for k in INFO_KEYS if k in info}


def test_info_matches_qemu_img(image: Qcow2Image) -> None:
    """``aioblock info --output=json``: virtual size, cluster size, the format-specific block (compat,
    compression-type, lazy-refcounts, refcount-bits, corrupt, extended-l2), backing names and formats and the
    dirty flag equal qemu-img's; with ``--backing-chain``, for every image of the chain."""
    res = aioblock_main("info", "--output=json", str(image.path))
    assert res.returncode == 0, res.stderr
    ours, theirs = json.loads(res.stdout), qemu_img_json("info", image.path)
    assert ours["filename"] == theirs["filename"]
    assert _pick(ours) == _pick(theirs), _json_diff(_pick(ours), _pick(theirs))
    if not image.backing:
        return
    res = aioblock_main("info", "--output=json", "--backing-chain", str(image.path))
    assert res.returncode == 0, res.stderr
    ours, theirs = json.loads(res.stdout), qemu_img_json("info", "--backing-chain", image.path)
    assert [o["filename"] for o in ours] == [t["filename"] for t in theirs]
    ours, theirs = [_pick(o) for o in ours], [_pick(t) for t in theirs]
    assert ours == theirs, _json_diff(ours, theirs)


def test_info_lists_snapshots(snapshot_image: Qcow2Image) -> None:
    """The snapshot table as qemu-img shows it (id, name, dates, VM clock, state size, icount)."""
    res = aioblock_main("info", "--output=json", str(snapshot_image.path))
    assert res.returncode == 0, res.stderr
    ours = json.loads(res.stdout).get("snapshots")
    theirs = qemu_img_json("info", snapshot_image.path)["snapshots"]
    assert ours == theirs, _json_diff(ours, theirs)


def test_map_matches_qemu_img(image: Qcow2Image) -> None:
    """``aioblock map --output=json`` prints the same runs as qemu-img: start, length, depth, present, zero,
    data, and the same host offsets (which come straight from QEMU's own tables), in the same text."""
    res = aioblock_main("map", "--output=json", str(image.path))
    assert res.returncode == 0, res.stderr
    theirs_text = qemu_img("map", "--output=json", str(image.path)).stdout
    ours, theirs = json.loads(res.stdout), json.loads(theirs_text)
    assert ours == theirs, _json_diff(ours, theirs)
    assert res.stdout == theirs_text


def test_check_matches_qemu_img(image: Qcow2Image) -> None:
    """``aioblock check --output=json``: the same keys and counts as qemu-img (image-end-offset, total-,
    allocated-, fragmented-, compressed-clusters, check-errors, corruptions, leaks) and the same exit status."""
    res = aioblock_main("check", "--output=json", str(image.path))
    theirs_res = qemu_img("check", "--output=json", str(image.path), check=False)
    assert theirs_res.returncode == image.check_status
    assert res.returncode == theirs_res.returncode, res.stderr
    ours, theirs = json.loads(res.stdout), json.loads(theirs_res.stdout)
    assert ours.pop("filename") == theirs.pop("filename")
    assert ours == theirs, _json_diff(ours, theirs)
    assert "Traceback" not in res.stderr


# ---- compare and convert -----------------------------------------------------------------------------------

def test_compare_with_raw_copy(image: Qcow2Image) -> None:
    """``aioblock compare IMG RAW`` (formats probed) finds the image identical to qemu-img's raw copy of it."""
    res = aioblock_main("compare", str(image.path), str(image.raw))
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout == qemu_img("compare", str(image.path), str(image.raw)).stdout


@pytest.mark.parametrize("kind", ["chain", "zlib-convert", "extl2-2M", "snapshots"])
def test_compare_finds_the_first_difference(kind: str, qcow2_root: Path, tmp_path: Path) -> None:
    """With one byte of the raw copy changed, ``aioblock compare`` reports the same offset and status as
    qemu-img."""
    img = _image(kind, qcow2_root)
    changed = bytearray(img.expected())
    pos = random.Random(kind).randrange(len(changed) // 3, len(changed))
    changed[pos] ^= 0x5A
    other = tmp_path / "changed.raw"
    other.write_bytes(changed)
    ours = aioblock_cli("compare", "-f", "qcow2", "-F", "raw", str(img.path), str(other))
    theirs = qemu_img("compare", "-f", "qcow2", "-F", "raw", str(img.path), str(other), check=False)
    assert theirs.returncode == 1
    assert (ours.returncode, ours.stdout) == (theirs.returncode, theirs.stdout), ours.stderr


def test_convert_to_qcow2(image: Qcow2Image, tmp_path: Path) -> None:
    """``aioblock convert -O qcow2``: qemu-img check passes on the result and qemu-img compare finds it identical
    to the source (backing chain flattened)."""
    out = tmp_path / "out.qcow2"
    res = aioblock_main("convert", "-f", "qcow2", "-O", "qcow2", str(image.path), str(out))
    assert res.returncode == 0, res.stderr
    chk = qemu_img("check", str(out), check=False)
    assert chk.returncode == 0, chk.stdout + chk.stderr
    cmp = qemu_img("compare", "-f", "qcow2", "-F", "qcow2", str(image.path), str(out), check=False)
    assert cmp.returncode == 0, cmp.stdout + cmp.stderr
    assert "backing-filename" not in qemu_img_json("info", out)


@pytest.mark.slow
@pytest.mark.parametrize(("kind", "args"), [
    ("zlib-convert", ["-c"]),
    ("chain", ["-c", "-o", "compression_type=zstd,extended_l2=on,refcount_bits=1"]),
    ("extl2-64k", ["-o", "compat=0.10,cluster_size=512"]),
    ("chain", ["-o", "compat=0.10,cluster_size=4096"]),
    ("zlib-convert", ["-o", "cluster_size=2M,preallocation=metadata"]),
    ("snapshots", ["-o", "refcount_bits=64,lazy_refcounts=on"]),
], ids=lambda v: " ".join(v) if isinstance(v, list) else v)
def test_convert_with_options(kind: str, args: list[str], qcow2_root: Path, tmp_path: Path) -> None:
    """Conversions to qcow2 with other layouts and compression: the results pass qemu-img check, compare
    identical, and carry the options asked for."""
    img = _image(kind, qcow2_root)
    out = tmp_path / "out.qcow2"
    res = aioblock_cli("convert", "-f", "qcow2", "-O", "qcow2", *args, str(img.path), str(out))
    assert res.returncode == 0, res.stderr
    chk = qemu_img("check", "--output=json", str(out), check=False)
    assert chk.returncode == 0, chk.stdout + chk.stderr
    cmp = qemu_img("compare", "-f", "qcow2", "-F", "qcow2", str(img.path), str(out), check=False)
    assert cmp.returncode == 0, cmp.stdout + cmp.stderr
    info = qemu_img_json("info", out)
    data = info["format-specific"]["data"]
    opts = dict(kv.split("=") for kv in args[args.index("-o") + 1].split(",")) if "-o" in args else {}
    assert data["compat"] == opts.get("compat", "1.1")
    assert info["cluster-size"] == {"512": 512, "4096": 4096, "2M": 2 * MiB}.get(opts.get("cluster_size", ""), 65536)
    assert data["compression-type"] == opts.get("compression_type", "zlib")
    assert data["refcount-bits"] == int(opts.get("refcount_bits", "16"))
    if "extended_l2" in opts:
        assert data["extended-l2"] is True
    if "lazy_refcounts" in opts:
        assert data["lazy-refcounts"] is True
    if "-c" in args:       # some clusters of every source hold compressible data
        assert json.loads(chk.stdout).get("compressed-clusters", 0) > 0


# ---- writing through aioblock --------------------------------------------------------------------------------

def _writes(size: int) -> list[tuple[str, int, int, int]]:
    """(op, offset, length, pattern) writes and zero writes at odd places, scaled to the image: over data,
    over holes, over zeroed and compressed clusters, across cluster boundaries of every size, at the end."""
    ops = [("write", 3001, 1536, 0x91), ("write", 65536 - 700, 1400, 0x92), ("write", 0, 1, 0x93),
           ("write", size // 2 - 100000, 200001, 0x94), ("zero", 100000, 5000, 0),
           ("write", size // 4, 64 * KiB, 0x95), ("zero", size // 3 - 4096, 64 * KiB + 8192, 0),
           ("write", size - 10, 10, 0x96), ("write", 300000, 70000, 0x97), ("zero", 0, 512, 0),
           ("write", 290000, 4096, 0x98)]
    if size >= 4 * MiB:
        ops += [("zero", 2 * MiB, 2 * MiB, 0), ("write", 2 * MiB + 12345, 3, 0x99)]
    return [(op, off, min(n, size - off), pat) for op, off, n, pat in ops if off < size]


async def _write_through_aioblock(img: Qcow2Image) -> bytes:
    """Apply ``_writes`` through a read-write open and return the content the image must now have."""
    model = bytearray(img.expected())
    async with aioblock.open(str(img.path), "qcow2") as disk:
        for op, off, n, pat in _writes(len(model)):
            if op == "write":
                await disk.write(off, bytes([pat]) * n)
                model[off:off + n] = bytes([pat]) * n
            else:
                await disk.write_zeroes(off, n, may_unmap=True)
                model[off:off + n] = bytes(n)
        await disk.flush()
        got = await disk.read(0, len(model))
        assert got == model, "read back after writing: " + _first_difference(got, bytes(model))
    return bytes(model)


async def test_writes_keep_image_consistent(image: Qcow2Image, tmp_path: Path) -> None:
    """After writes through aioblock: qemu-img check passes (an image left dirty by lazy refcounts was repaired
    on the read-write open), QEMU reads what was written, the format-specific settings are unchanged (lazy
    refcounts kept), the dirty flag is clear, backing files untouched and every internal snapshot intact."""
    img = _copy(image, tmp_path / "copy")
    info_before = qemu_img_json("info", img.path)
    backing_before = _digest(list(img.backing))
    model = await _write_through_aioblock(img)
    chk = qemu_img("check", str(img.path), check=False)
    assert chk.returncode == 0, chk.stdout + chk.stderr
    out = tmp_path / "after.raw"
    qemu_img("convert", "-f", "qcow2", "-O", "raw", str(img.path), str(out))
    got = out.read_bytes()
    assert got == model, "qemu-img reads: " + _first_difference(got, model)
    info_after = qemu_img_json("info", img.path)
    assert info_after["format-specific"] == info_before["format-specific"]
    assert info_after["dirty-flag"] is False
    assert info_after.get("snapshots") == info_before.get("snapshots")
    assert _digest(list(img.backing)) == backing_before
    for name, raw in img.snapshots.items():
        snap = tmp_path / f"{name}.raw"
        qemu_img("convert", "-f", "qcow2", "-O", "raw", "-l", f"snapshot.name={name}", str(img.path), str(snap))
        assert snap.read_bytes() == raw.read_bytes(), f"snapshot {name} changed"


async def test_snapshot_survives_writes_over_shared_clusters(snapshot_image: Qcow2Image, tmp_path: Path) -> None:
    """Writes through aioblock over clusters the snapshots share must copy them first: after them qemu-img check
    passes, and ``qemu-img snapshot -a snap1`` (on a copy) brings back snap1's content exactly; the writes are
    then gone and the snapshot list is unchanged."""
    img = _copy(snapshot_image, tmp_path / "copy")
    await _write_through_aioblock(img)
    chk = qemu_img("check", str(img.path), check=False)
    assert chk.returncode == 0, chk.stdout + chk.stderr
    listed = qemu_img("snapshot", "-l", str(img.path)).stdout
    assert "snap1" in listed and "snap2" in listed
    for name in ("snap1", "snap2"):
        applied = tmp_path / f"applied-{name}.qcow2"
        shutil.copy(img.path, applied)
        qemu_img("snapshot", "-a", name, str(applied))
        assert qemu_img("check", str(applied), check=False).returncode == 0
        raw = tmp_path / f"applied-{name}.raw"
        qemu_img("convert", "-f", "qcow2", "-O", "raw", str(applied), str(raw))
        got, want = raw.read_bytes(), img.snapshots[name].read_bytes()
        assert got == want, f"{name} after snapshot -a: " + _first_difference(got, want)
