"""``aioblock benchmark``: a tiny suite run end to end against qemu-img bench (run, report, compare, dry run,
errors). Functional only: no timing is asserted."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from ..conftest import QEMU_IMG, aioblock_cli, needs_qemu

PNG = b"\x89PNG\r\n\x1a\n"


def tiny_suite(tmp_path: Path) -> Path:
    suite = tmp_path / "tiny.toml"
    suite.write_text(f"""
name = "tiny"
repetitions = 2
requests = 400
disk_dir = "{tmp_path / 'images'}"

[targets]
engines = ["sync"]
loops = ["asyncio"]
peers = ["qemu-img-threads"]

[matrix]
formats = ["raw"]
block_sizes = ["4k"]
depths = [1, 4]
caches = ["writeback"]
locations = ["disk"]
size = "4M"

[[workloads]]
name = "read-4k"
kind = "read"
""")
    return suite


@pytest.fixture(scope="module")
def recorded(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    if QEMU_IMG is None:
        pytest.skip("qemu-img not installed")
    tmp = tmp_path_factory.mktemp("bench")
    out = tmp / "run"
    proc = aioblock_cli("benchmark", "run", "--suite", str(tiny_suite(tmp)), "--out", str(out), "--no-progress",
                        timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert not list((tmp / "images").glob("aioblock-benchmark-*/*")), "test images left behind"
    return out, json.loads((out / "results.json").read_text())


@needs_qemu
def test_results_json(recorded: tuple[Path, dict[str, Any]]) -> None:
    out, doc = recorded
    assert doc["schema"] == "aioblock-benchmark/1" and doc["complete"] is True
    assert doc["suite"]["name"] == "tiny" and doc["suite"]["repetitions"] == 2
    machine = doc["machine"]
    for key in ("cpu", "cores", "memory", "kernel", "python", "uvloop", "aioblock", "qemu", "fio", "date"):
        assert key in machine
    assert machine["cores"] >= 1 and machine["qemu"].startswith("qemu-img version")
    assert machine["locations"]["disk"]["filesystem"]
    recs = doc["records"]
    assert sorted((r["target"], r["depth"]) for r in recs) == [
        ("aioblock-sync-asyncio", 1), ("aioblock-sync-asyncio", 4), ("qemu-img-threads", 1),
        ("qemu-img-threads", 4)]
    for r in recs:
        assert (r["workload"], r["format"], r["kind"], r["pattern"], r["block_size"], r["cache"], r["location"]) \
            == ("read-4k", "raw", "read", "sequential", 4096, "writeback", "disk")
        assert r["failures"] == []
        assert len(r["ops_per_s"]) == 2 and r["requests"] == [400, 400]
        assert r["spread"]["min"] <= r["median_ops_per_s"] <= r["spread"]["max"]
        assert r["mib_per_s"] > 0 and len(r["cpu_s"]) == 2 and all(c > 0 for c in r["cpu_s"])
        if r["target"].startswith("aioblock-"):
            assert set(r["latency_us"]) == {"p50", "p90", "p99", "p99.9"} and r["latency_source"] == "hdr"
            assert r["ratio_vs_peer"] is not None and r["ratio_vs_peer"] > 0
            assert r["ratios"]["qemu-img-threads"] == r["ratio_vs_peer"]
            assert r["statistics"]["read"]["ops"] == 400
            assert r["statistics"]["driver"]["file"]["engine"]["name"] == "sync"
        else:
            assert r["latency_us"] is None and r["statistics"] is None and r["ratio_vs_peer"] is None
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == sorted(doc["plots"]) and {"ops-read-4k.png", "latency-read-4k.png", "latency-cdf.png"} <= \
        set(pngs)
    for name in pngs:
        assert (out / name).read_bytes()[:8] == PNG


@needs_qemu
def test_report(recorded: tuple[Path, dict[str, Any]]) -> None:
    out, _ = recorded
    proc = aioblock_cli("benchmark", "report", str(out))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("# aioblock benchmark: tiny")
    assert "| raw | writeback | disk | 4K | 1 | **aioblock-sync-asyncio** |" in proc.stdout
    assert "Block-layer statistics" in proc.stdout


@needs_qemu
def test_compare(recorded: tuple[Path, dict[str, Any]], tmp_path: Path) -> None:
    out, doc = recorded
    same = aioblock_cli("benchmark", "compare", str(out), str(out))
    assert same.returncode == 0, same.stderr
    assert "0 regressions" in same.stdout and "1.000" in same.stdout
    # B: every aioblock repetition 10x slower, far beyond the spread
    slower = json.loads(json.dumps(doc))
    for r in slower["records"]:
        if r["target"].startswith("aioblock-"):
            r["ops_per_s"] = [v / 10 for v in r["ops_per_s"]]
            r["median_ops_per_s"] /= 10
            r["spread"] = {k: v / 10 for k, v in r["spread"].items()}
    (tmp_path / "results.json").write_text(json.dumps(slower))
    worse = aioblock_cli("benchmark", "compare", str(out), str(tmp_path))
    assert worse.returncode == 1, worse.stderr
    assert worse.stdout.count("**REGRESSION**") == 2 and "2 regressions" in worse.stdout
    # the other way round it is an improvement, not a regression
    better = aioblock_cli("benchmark", "compare", str(tmp_path), str(out))
    assert better.returncode == 0 and better.stdout.count("improvement") == 2


def test_dry_run_lists_cells_and_estimate(tmp_path: Path) -> None:
    proc = aioblock_cli("benchmark", "run", "--suite", str(tiny_suite(tmp_path)), "--dry-run")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == 3 and lines[0].startswith("read-4k raw 4KiB d1 writeback disk")
    assert "suite tiny: 2 cells, 2 repetitions, 8 runs + 0 calibration runs; estimated" in lines[-1]
    assert not (tmp_path / "images").exists()


def test_shipped_suites_dry_run() -> None:
    proc = aioblock_cli("benchmark", "run", "--dry-run")          # the default suite
    assert proc.returncode == 0, proc.stderr
    assert "suite default:" in proc.stdout.splitlines()[-1] and "minutes" in proc.stdout
    quick = aioblock_cli("benchmark", "run", "--quick", "--dry-run")
    assert quick.returncode == 0 and "suite default (quick):" in quick.stdout


@pytest.mark.parametrize(("args", "message"), [
    (["run", "--suite", "{tmp}/none.toml"], "cannot read the suite"),
    (["run", "--suite", "{tmp}/bad.toml"], "bad.toml: [[workloads]] #1 'r': 'kind' must be one of"),
    (["report", "{tmp}"], "cannot read results"),
    (["compare", "{tmp}", "{tmp}"], "cannot read results"),
])
def test_errors_are_one_line(tmp_path: Path, args: list[str], message: str) -> None:
    (tmp_path / "bad.toml").write_text("[[workloads]]\nname = 'r'\nkind = 'scan'\n")
    proc = aioblock_cli("benchmark", *(a.format(tmp=tmp_path) for a in args))
    assert proc.returncode == (2 if args[0] == "compare" else 1)
    assert proc.stderr.startswith("aioblock: ") and message in proc.stderr, proc.stderr
    assert len(proc.stderr.splitlines()) == 1 and "Traceback" not in proc.stderr


@needs_qemu
def test_ublk_target_says_why_it_cannot_run(tmp_path: Path) -> None:
    """Where the kernel has no ublk (or this is not root), every ublk-fio run fails with the reason in one line;
    the other targets are measured and the run exits 1."""
    if Path("/dev/ublk-control").exists() and os.geteuid() == 0:
        pytest.skip("this kernel has ublk: tests/vm/test_ublk.py measures ublk-fio")
    suite = tiny_suite(tmp_path)
    suite.write_text(suite.read_text().replace('peers = ["qemu-img-threads"]', 'peers = ["ublk-fio"]'))
    out = tmp_path / "run"
    proc = aioblock_cli("benchmark", "run", "--suite", str(suite), "--out", str(out), "--no-progress", timeout=300)
    assert proc.returncode == 1, proc.stderr
    records = json.loads((out / "results.json").read_text())["records"]
    ublk = [r for r in records if r["target"] == "ublk-fio"]
    assert len(ublk) == 2 and all(r["median_ops_per_s"] is None for r in ublk)
    for record in ublk:
        for failure in record["failures"]:
            assert "ublk-fio: cannot run here: " in failure and "\n" not in failure, failure
    assert all(r["median_ops_per_s"] for r in records if r["target"] != "ublk-fio")
