"""``aioblock bench --json`` (what the benchmark harness reads) and ``--image-opts`` (qemu-img's option string,
accepted by both tools). Functional only: no timing is asserted."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from aioblock.benchmark.latency import LatencyHistogram

from ..conftest import aioblock_cli, needs_qemu, qemu_img, qemu_io


def test_bench_json_fields(tmp_path: Path) -> None:
    img = tmp_path / "r.raw"
    img.write_bytes(b"\xa5" * (1 << 20))
    out = tmp_path / "bench.json"
    proc = aioblock_cli("bench", "-q", "-c", "500", "-d", "4", "-f", "raw", "-i", "sync", "--json", str(out),
                        str(img))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[-1].startswith("Run completed in")       # -q: qemu-img's output only
    doc = json.loads(out.read_text())
    s = doc["settings"]
    assert (s["count"], s["depth"], s["bufsize"], s["step"], s["write"]) == (500, 4, 4096, 4096, False)
    assert (s["format"], s["engine"], s["cache"], s["filename"]) == ("raw", "sync", "writeback", str(img))
    assert s["loop"] in ("uvloop", "asyncio")
    assert doc["elapsed_s"] > 0 and doc["ops_per_s"] > 0
    assert doc["mib_per_s"] == pytest.approx(doc["ops_per_s"] * 4096 / (1 << 20))
    assert set(doc["latency_us"]) == {"p50", "p90", "p99", "p99.9", "max"}
    h = doc["histogram"]
    assert (h["format"], h["unit"], h["count"]) == ("hdrh", "ns", 500)
    hist = LatencyHistogram.decode(h["data"])
    assert hist.count == 500
    pct = hist.percentiles_us()
    assert pct is not None and pct["p50"] == pytest.approx(doc["latency_us"]["p50"], rel=0.01)
    st = doc["statistics"]
    assert st["read"]["ops"] == 500 and st["read"]["bytes"] == 500 * 4096 and st["max_in_flight"] >= 1
    assert isinstance(st["driver"], dict)


def test_bench_json_write_statistics(tmp_path: Path) -> None:
    img = tmp_path / "w.raw"
    img.write_bytes(bytes(1 << 20))
    out = tmp_path / "bench.json"
    proc = aioblock_cli("bench", "-w", "-c", "64", "-d", "8", "-f", "raw", "--json", str(out), str(img))
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(out.read_text())
    assert doc["settings"]["write"] is True and doc["statistics"]["write"]["ops"] == 64
    assert doc["settings"]["engine"] is None              # aioblock's default engine


def test_bench_json_unwritable(tmp_path: Path) -> None:
    img = tmp_path / "r.raw"
    img.write_bytes(bytes(65536))
    proc = aioblock_cli("bench", "-c", "1", "-f", "raw", "--json", str(tmp_path / "no" / "x.json"), str(img))
    assert proc.returncode != 0
    assert proc.stderr.startswith("aioblock: ") and "cannot write" in proc.stderr
    assert len(proc.stderr.splitlines()) == 1


def _sparse_qcow2(tmp_path: Path) -> Path:
    """4 GiB qcow2, 64 KiB clusters, one allocated cluster per 512 MiB: eight L2 tables."""
    img = tmp_path / "s.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(img), "4G")
    proc = qemu_io(img, *(f"write -q -P 0x5a {i << 29} 64k" for i in range(8)), fmt="qcow2")
    assert proc.returncode == 0, proc.stderr
    return img


def _l2_stats(tmp_path: Path, spec: str) -> dict[str, int]:
    out = tmp_path / "b.json"
    proc = aioblock_cli("bench", "-q", "-c", "64", "-d", "1", "-S", "512M", "--json", str(out), "--image-opts", spec)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(out.read_text())
    assert doc["settings"]["format"] == "qcow2"
    stats: dict[str, int] = doc["statistics"]["driver"]["l2_cache"]
    return stats


@needs_qemu
def test_image_opts_reach_the_qcow2_driver(tmp_path: Path) -> None:
    img = _sparse_qcow2(tmp_path)
    # 8 tables read in turn; a 2-slice cache (8 KiB) misses every time, the default cache holds them all
    small = _l2_stats(tmp_path, f"driver=qcow2,file.filename={img},l2-cache-size=8k")
    assert small["misses"] == 64 and small["evictions"] >= 56
    large = _l2_stats(tmp_path, f"driver=qcow2,file.filename={img}")
    assert large["misses"] == 8 and large["evictions"] == 0
    # qemu-img bench takes the same string
    theirs = qemu_img("bench", "-c", "64", "-d", "1", "-S", "512M", "--image-opts",
                      f"driver=qcow2,file.filename={img},l2-cache-size=8k")
    assert theirs.stdout.splitlines()[-1].startswith("Run completed in")


@needs_qemu
def test_image_opts_raw_and_escaped_comma(tmp_path: Path) -> None:
    img = tmp_path / "a,b.raw"
    img.write_bytes(bytes(1 << 20))
    spec = f"driver=raw,file.driver=file,file.filename={str(img).replace(',', ',,')}"
    ours = aioblock_cli("bench", "-c", "10", "--image-opts", spec)
    assert ours.returncode == 0, ours.stderr
    theirs = qemu_img("bench", "-c", "10", "--image-opts", spec)
    assert ours.stdout.splitlines()[0] == theirs.stdout.splitlines()[0]


@pytest.mark.parametrize(("args", "message"), [
    (["-f", "raw", "--image-opts", "driver=raw,file.filename=X"], "--image-opts and --format are mutually"),
    (["--image-opts", "file.filename=X"], "Parameter 'driver' is missing"),
    (["--image-opts", "driver=vmdk,file.filename=X"], "Unknown driver 'vmdk'"),
    (["--image-opts", "driver=qcow2"], "names no file"),
    (["--image-opts", "driver=qcow2,file.filename=X,file.aio=native"], "unsupported option 'file.aio'"),
    (["--image-opts", "driver=qcow2,file.filename=X,file.driver=nbd"], "only file.driver=file"),
])
def test_image_opts_errors(args: list[str], message: str) -> None:
    proc = aioblock_cli("bench", "-c", "1", *args)
    assert proc.returncode != 0
    assert proc.stderr.startswith("aioblock: ") and message in proc.stderr
    assert len(proc.stderr.splitlines()) == 1


def test_image_opts_unknown_option_for_the_format(tmp_path: Path) -> None:
    img = tmp_path / "r.raw"
    img.write_bytes(bytes(65536))
    proc = aioblock_cli("bench", "-c", "1", "--image-opts", f"driver=raw,file.filename={img},l2-cache-size=1M")
    assert proc.returncode != 0 and "Invalid option(s) for format 'raw': l2-cache-size" in proc.stderr
    assert proc.stderr.startswith(f"aioblock: {img}: ")
