"""aioblock's ublk server against a real kernel: the scenarios of tests/vm/scenarios.py, each in a fresh guest.

The guest drives the device and checks what it reads back; then, on the host, the judges have their say:
``qemu-img check`` must be clean and ``qemu-img compare`` must find the image identical to the guest's model of
the device's contents.
"""

from __future__ import annotations

import json
import shlex
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from tests.vm.guest import Guest

REPO = Path(__file__).resolve().parents[2]
MIB = 1 << 20
FORMATS = ("raw", "qcow2")


def create(path: Path, fmt: str, size: int = 64 * MIB, *options: str) -> Path:
    opts = ["-o", ",".join(options)] if options else []
    subprocess.run(["qemu-img", "create", "-q", "-f", fmt, *opts, str(path), str(size)], check=True)
    return path


def scenario(guest: Guest, name: str, image: Path, *args: str, queues: int = 1, expect: bool = True,
             fmt: str | None = None, timeout: float = 600) -> str:
    """Run scenario ``name`` in the guest (one vCPU per queue) and return its output; assert that it passed."""
    argv = [sys.executable, "-m", "tests.vm.scenarios", name, str(image), "--queues", str(queues), *args]
    if expect:
        argv += ["--expect", str(image.parent / "expect.raw")]
    if fmt:
        argv += ["--serve", f"-f {fmt}"]
    result = guest.run(shlex.join(argv), smp=max(queues, 1), shares=[image.parent], cwd=str(REPO),
                       env={"PYTHONPATH": str(REPO)}, timeout=timeout)
    assert result.returncode == 0, result.output
    assert f"scenario {name} passed" in result.output, result.output
    return result.output


def assert_clean(image: Path, fmt: str, *, leaks_allowed: bool = False) -> None:
    """``qemu-img check`` finds no error (nor leak, unless allowed); raw has no metadata to check."""
    if fmt == "raw":
        return
    result = subprocess.run(["qemu-img", "check", "-f", fmt, str(image)], capture_output=True, text=True)
    allowed = (0, 3) if leaks_allowed else (0,)
    assert result.returncode in allowed, result.stdout + result.stderr
    assert "ERROR" not in result.stdout, result.stdout


def assert_matches_model(image: Path, fmt: str) -> None:
    model = image.parent / "expect.raw"
    result = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", fmt, str(model), str(image)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("queues", [1, 2])
@pytest.mark.parametrize("fmt", FORMATS)
def test_pattern_io(guest: Guest, tmp_path: Path, fmt: str, queues: int) -> None:
    image = create(tmp_path / f"disk.{fmt}", fmt)
    scenario(guest, "pattern", image, "--ops", "120", queues=queues, fmt=fmt)
    assert_clean(image, fmt)
    assert_matches_model(image, fmt)


@pytest.mark.parametrize("queues", [1, 2])
@pytest.mark.parametrize("fmt", FORMATS)
def test_fio_verify(guest: Guest, tmp_path: Path, fmt: str, queues: int) -> None:
    image = create(tmp_path / f"disk.{fmt}", fmt, 32 * MIB)
    scenario(guest, "fio", image, queues=queues, fmt=fmt, expect=False)
    assert_clean(image, fmt)


@pytest.mark.parametrize(("fmt", "queues"), [("raw", 1), ("qcow2", 2)])
def test_ext4(guest: Guest, tmp_path: Path, fmt: str, queues: int) -> None:
    image = create(tmp_path / f"disk.{fmt}", fmt, 128 * MIB)
    scenario(guest, "ext4", image, "--tree", str(REPO / "aioblock"), queues=queues, fmt=fmt, expect=False)
    assert_clean(image, fmt)
    raw = tmp_path / "fs.raw"
    subprocess.run(["qemu-img", "convert", "-f", fmt, "-O", "raw", str(image), str(raw)], check=True)
    fsck = subprocess.run(["e2fsck", "-f", "-n", str(raw)], capture_output=True, text=True)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    copied = subprocess.run(["debugfs", "-R", "cat /tree/__init__.py", str(raw)], capture_output=True)
    assert copied.stdout == (REPO / "aioblock" / "__init__.py").read_bytes()


@pytest.mark.parametrize("fmt", FORMATS)
def test_discard_and_write_zeroes(guest: Guest, tmp_path: Path, fmt: str) -> None:
    image = create(tmp_path / f"disk.{fmt}", fmt, 32 * MIB)
    scenario(guest, "discard", image, fmt=fmt)
    assert_clean(image, fmt)
    assert_matches_model(image, fmt)
    if fmt == "qcow2":
        mapped = _mapping(image)
        assert not any(mapped[c] for c in range(0, 16)), "discarded clusters are still mapped"
        assert all(mapped[c] for c in range(64, 80)), "BLKZEROOUT (NOUNMAP) unmapped clusters"
        assert not any(mapped[c] for c in range(128, 144)), "an unmapping write-zeroes left clusters mapped"


def _mapping(image: Path) -> dict[int, bool]:
    """64 KiB cluster index -> whether qemu-img map says the cluster has a host offset."""

    out = subprocess.run(["qemu-img", "map", "--output=json", "-f", "qcow2", str(image)], capture_output=True,
                         text=True, check=True).stdout
    mapped: dict[int, bool] = {}
    for extent in json.loads(out):
        for c in range(extent["start"] // 65536, (extent["start"] + extent["length"]) // 65536):
            mapped[c] = "offset" in extent
    return mapped


def test_two_queues_share_qcow2_clusters(guest: Guest, tmp_path: Path) -> None:
    image = create(tmp_path / "disk.qcow2", "qcow2", 16 * MIB)
    scenario(guest, "shared-clusters", image, "--ops", "300", queues=2, fmt="qcow2")
    assert_clean(image, "qcow2")
    assert_matches_model(image, "qcow2")


def test_two_queues_share_qcow2_clusters_fio_verify(guest: Guest, tmp_path: Path) -> None:
    image = create(tmp_path / "disk.qcow2", "qcow2", 16 * MIB)
    scenario(guest, "shared-clusters-fio", image, queues=2, fmt="qcow2", expect=False)
    assert_clean(image, "qcow2")


@pytest.mark.parametrize("fmt", FORMATS)
def test_sigkill_then_recover(guest: Guest, tmp_path: Path, fmt: str) -> None:
    image = create(tmp_path / f"disk.{fmt}", fmt, 32 * MIB)
    out = scenario(guest, "recover", image, fmt=fmt, queues=2)
    assert "state after SIGKILL: quiesced" in out, out
    assert_clean(image, fmt, leaks_allowed=True)
    assert_matches_model(image, fmt)


def test_list_and_delete(guest: Guest, tmp_path: Path) -> None:
    first = create(tmp_path / "first.qcow2", "qcow2")
    second = create(tmp_path / "second.raw", "raw")
    scenario(guest, "list-delete", first, "--image2", str(second), expect=False)
    assert_clean(first, "qcow2")


@pytest.mark.parametrize("fmt", FORMATS)
def test_partition_scan_at_start(guest: Guest, tmp_path: Path, fmt: str) -> None:
    raw = tmp_path / "disk.raw"
    create(raw, "raw", 32 * MIB)
    start, sectors = 2048, 40960
    entry = struct.pack("<B3sB3sII", 0, b"\0\0\0", 0x83, b"\0\0\0", start, sectors)
    with raw.open("r+b") as f:
        f.seek(446)
        f.write(entry)
        f.seek(510)
        f.write(b"\x55\xaa")
    image = raw
    if fmt != "raw":
        image = tmp_path / f"disk.{fmt}"
        subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", fmt, str(raw), str(image)], check=True)
    scenario(guest, "partitions", image, "--part-size", str(sectors * 512), fmt=fmt, expect=False)
    assert_clean(image, fmt)


def test_read_only(guest: Guest, tmp_path: Path) -> None:
    image = create(tmp_path / "disk.qcow2", "qcow2")
    out = scenario(guest, "read-only", image, fmt="qcow2", expect=False)
    assert "writing: Operation not permitted" in out, out


def test_stop_while_held_open(guest: Guest, tmp_path: Path) -> None:
    image = create(tmp_path / "disk.qcow2", "qcow2")
    out = scenario(guest, "stop-held", image, fmt="qcow2", expect=False)
    assert out.count("the holder's read after signal") == 2, out
    assert_clean(image, "qcow2")


def test_benchmark_ublk_target(guest: Guest, tmp_path: Path) -> None:
    """``aioblock benchmark`` with the ublk-fio target, on a kernel that has ublk: fio's requests through the
    device are measured for raw and qcow2, reads and overwrites."""
    suite = tmp_path / "ublk.toml"
    suite.write_text(f"""
name = "ublk"
repetitions = 1
requests = 400
disk_dir = "{tmp_path / 'images'}"

[targets]
engines = ["default"]
loops = ["uvloop"]
peers = ["ublk-fio"]

[matrix]
formats = ["raw", "qcow2"]
depths = [4]
locations = ["disk"]
size = "8M"

[[workloads]]
name = "read-4k"
kind = "read"

[[workloads]]
name = "overwrite-4k"
kind = "overwrite"
""")
    out = tmp_path / "run"
    argv = [sys.executable, "-m", "aioblock", "benchmark", "run", "--suite", str(suite), "--out", str(out),
            "--no-progress"]
    result = guest.run(shlex.join(argv), shares=[tmp_path], cwd=str(REPO), env={"PYTHONPATH": str(REPO)},
                       timeout=600)
    assert result.returncode == 0, result.output

    records = [r for r in json.loads((out / "results.json").read_text())["records"] if r["target"] == "ublk-fio"]
    assert {(r["format"], r["kind"]) for r in records} == {("raw", "read"), ("qcow2", "read"), ("raw", "overwrite"),
                                                           ("qcow2", "overwrite")}
    for r in records:
        assert r["median_ops_per_s"] and not r["failures"], r
