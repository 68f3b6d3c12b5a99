"""How each target and peer is run on a cell, and how its output becomes a ``Measurement``.

Every tool gets the same requests: COUNT requests of the cell's block size, the request *i* at
``i * step`` (wrapping at the image size), DEPTH in flight, the cell's cache mode, on the same file:

* ``aioblock-ENGINE-LOOP``: ``python -m aioblock --loop LOOP bench ... -i ENGINE --json FILE`` (engine
  ``default``: no ``-i``, aioblock's default); everything is read from the JSON: its own ops/s (first request
  sent to last completion), the latency percentiles and HDR histogram, the disk's statistics;
* ``qemu-img-threads`` / ``qemu-img-io_uring``: ``qemu-img bench`` with its default aio (a thread pool) or
  ``-i io_uring``; ops/s from "Run completed in N.NNN seconds" (1 ms resolution); no latencies;
* ``ublk-fio`` (any format): the image served by ``aioblock serve ublk`` and fio (io_uring, O_DIRECT) on the
  device; needs a kernel with ublk and root (otherwise each of its runs fails with the reason, in one line);
* ``fio-io_uring`` / ``fio-psync`` (raw images only): one fio job (``rw=read`` or ``write``, ``:SKIP`` for a
  stride, ``io_size`` = COUNT blocks, ``invalidate=0`` so that the page cache stays as it is); psync has no
  queue, so depth D runs D threads of synchronous requests (``numjobs=D``, grouped), each doing COUNT/D of
  them over the same offsets; ops/s are fio's (total requests / run time, 1 ms resolution), latencies are
  fio's total-latency percentiles (submission to completion).

Writes use the byte 0xa5 everywhere (not zeroes, which a format could detect). A qcow2 cell with open
options passes them to aioblock and qemu-img alike as ``--image-opts driver=qcow2,file.filename=...``.
CPU seconds and peak RSS come from the child's resource usage (``child.py``): they include process start-up
(Python's import time for aioblock), which matters for short runs.
"""

from __future__ import annotations

import abc
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .child import ChildResult, run_child
from .suite import PEERS, Cell

__all__ = ["Measurement", "RunFailed", "Target", "make_target"]

WRITE_PATTERN = 0xA5


class RunFailed(Exception):
    """A run that produced no measurement (the tool failed, or its output could not be read)."""


@dataclass(frozen=True, slots=True)
class Measurement:
    """One run of one target on one cell."""

    requests: int
    elapsed_s: float            # the tool's own timing of the requests
    ops_per_s: float
    mib_per_s: float
    wall_s: float               # the whole child process, start-up included
    cpu_s: float                # user + system of the child (and its threads / waited-for children)
    max_rss_kib: int | None     # peak RSS of the child (None: not measurable, see child.py)
    latency_us: dict[str, float] | None = None
    histogram: str | None = None        # hdrh-encoded, nanoseconds
    statistics: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        return {"requests": self.requests, "elapsed_s": self.elapsed_s, "ops_per_s": self.ops_per_s,
                "mib_per_s": self.mib_per_s, "wall_s": self.wall_s, "cpu_s": self.cpu_s,
                "max_rss_kib": self.max_rss_kib, "latency_us": self.latency_us}


def image_opts(cell: Cell, path: str) -> str:
    """qemu's option string for the cell's image: ``driver=qcow2,file.filename=PATH,key=value...``."""
    parts = [f"driver={cell.format}", "file.filename=" + path.replace(",", ",,")]
    return ",".join(parts + [f"{k}={v}" for k, v in cell.options])


def _bench_args(cell: Cell, path: str, requests: int) -> list[str]:
    """The qemu-img bench options both qemu-img and aioblock bench take, image last."""
    args = ["-c", str(requests), "-d", str(cell.depth), "-s", str(cell.block_size), "-S", str(cell.step),
            "-t", cell.cache]
    if cell.writes:
        args += ["-w", f"--pattern={WRITE_PATTERN}"]
    return args + (["--image-opts", image_opts(cell, path)] if cell.options else ["-f", cell.format, path])


class Target(abc.ABC):
    """A tool configuration that can run a cell."""

    name: str

    def applies(self, cell: Cell) -> bool:
        return True

    @abc.abstractmethod
    def command(self, cell: Cell, image: str, requests: int, scratch: Path) -> list[str]:
        """The argv that runs ``requests`` requests of ``cell`` on ``image`` (``scratch``: a private dir)."""

    @abc.abstractmethod
    def parse(self, cell: Cell, requests: int, child: ChildResult, scratch: Path) -> Measurement:
        """The measurement from a successful child; RunFailed if its output says nothing usable."""

    def run(self, cell: Cell, image: str, requests: int, scratch: Path, *, timeout: float) -> Measurement:
        """Run the cell once; RunFailed (one line) when the tool fails."""
        scratch.mkdir(parents=True, exist_ok=True)
        try:
            child = run_child(self.command(cell, image, requests, scratch), timeout=timeout)
        except OSError as exc:
            raise RunFailed(f"{self.name}: cannot start: {exc.strerror or exc}") from None
        failure = child.failure()
        if failure is not None:
            raise RunFailed(f"{self.name}: {failure}")
        return self.parse(cell, requests, child, scratch)


def _measurement(cell: Cell, child: ChildResult, requests: int, elapsed: float, **kw: Any) -> Measurement:
    if elapsed <= 0:
        raise RunFailed(f"{child.argv[0]}: the run was too short to time ({requests} requests); use more")
    ops = requests / elapsed
    return Measurement(requests=requests, elapsed_s=elapsed, ops_per_s=ops,
                       mib_per_s=ops * cell.block_size / (1 << 20), wall_s=child.wall_s, cpu_s=child.cpu_s,
                       max_rss_kib=child.max_rss_kib, **kw)


class AioblockTarget(Target):
    """``python -m aioblock --loop LOOP bench ... [-i ENGINE] --json FILE`` (a fresh process per run)."""

    def __init__(self, engine: str, loop: str) -> None:
        self.engine, self.loop = engine, loop
        self.name = f"aioblock-{engine}-{loop}"

    def command(self, cell: Cell, image: str, requests: int, scratch: Path) -> list[str]:
        engine = [] if self.engine == "default" else ["-i", self.engine]
        return [sys.executable, "-m", "aioblock", "--loop", self.loop, "bench", "-q", *engine,
                "--json", str(scratch / "bench.json"), *_bench_args(cell, image, requests)]

    def parse(self, cell: Cell, requests: int, child: ChildResult, scratch: Path) -> Measurement:
        try:
            doc = json.loads((scratch / "bench.json").read_text())
            elapsed = float(doc["elapsed_s"])
            hist = doc["histogram"]["data"]
            latency = doc.get("latency_us")
            statistics = doc.get("statistics")
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise RunFailed(f"{self.name}: unreadable --json output: {exc}") from None
        if latency:
            latency = {k: float(v) for k, v in latency.items() if k != "max"}
        return _measurement(cell, child, int(doc["settings"]["count"]), elapsed, latency_us=latency or None,
                            histogram=str(hist), statistics=statistics)


_RUN_COMPLETED = re.compile(r"^Run completed in ([0-9.]+) seconds\.$", re.MULTILINE)


class QemuImgTarget(Target):
    """``qemu-img bench`` with its default aio (``threads``) or ``-i io_uring``."""

    def __init__(self, aio: str) -> None:
        self.aio = aio
        self.name = f"qemu-img-{aio}"

    def command(self, cell: Cell, image: str, requests: int, scratch: Path) -> list[str]:
        aio = [] if self.aio == "threads" else ["-i", self.aio]
        return ["qemu-img", "bench", *aio, *_bench_args(cell, image, requests)]

    def parse(self, cell: Cell, requests: int, child: ChildResult, scratch: Path) -> Measurement:
        m = _RUN_COMPLETED.search(child.stdout)
        if m is None:
            raise RunFailed(f"{self.name}: no 'Run completed' line in its output")
        return _measurement(cell, child, requests, float(m.group(1)))


_FIO_PERCENTILES = (("50.000000", "p50"), ("90.000000", "p90"), ("99.000000", "p99"), ("99.900000", "p99.9"))


class FioTarget(Target):
    """fio with ``ioengine=io_uring`` (depth = iodepth) or ``psync`` (depth = that many synchronous threads);
    raw images only."""

    def __init__(self, ioengine: str) -> None:
        self.ioengine = ioengine
        self.name = f"fio-{ioengine}"

    def applies(self, cell: Cell) -> bool:
        return cell.format == "raw" and not cell.options

    def jobs(self, cell: Cell) -> int:
        return cell.depth if self.ioengine == "psync" else 1

    def command(self, cell: Cell, image: str, requests: int, scratch: Path) -> list[str]:
        return ["fio", f"--filename={image}", *self.options(cell, requests, scratch, direct=cell.cache == "none")]

    def options(self, cell: Cell, requests: int, scratch: Path, *, direct: bool) -> list[str]:
        """fio's options for the cell, all but the file name."""
        rw = "write" if cell.writes else "read"
        if cell.step != cell.block_size:
            rw += f":{cell.step - cell.block_size}"
        jobs = self.jobs(cell)
        per_job = -(-requests // jobs)
        argv = ["--name=bench", f"--rw={rw}", f"--bs={cell.block_size}",
                f"--ioengine={self.ioengine}", f"--iodepth={cell.depth if jobs == 1 else 1}",
                f"--direct={int(direct)}", f"--size={cell.size}",
                f"--io_size={per_job * cell.block_size}", "--thread", "--invalidate=0", "--fallocate=none",
                "--allow_file_create=0", "--lat_percentiles=1", "--percentile_list=50:90:99:99.9",
                "--output-format=json", f"--output={scratch / 'fio.json'}"]
        if jobs > 1:
            argv += [f"--numjobs={jobs}", "--group_reporting"]
        if cell.writes:
            argv.append(f"--buffer_pattern={WRITE_PATTERN:#x}")
        return argv

    def parse(self, cell: Cell, requests: int, child: ChildResult, scratch: Path) -> Measurement:
        try:
            doc = json.loads((scratch / "fio.json").read_text())
            job = doc["jobs"][0]
            if job.get("error"):
                raise RunFailed(f"{self.name}: fio reports error {job['error']}")
            side = job["write" if cell.writes else "read"]
            total = int(side["total_ios"])
            runtime_ms = float(side["runtime"])
            pct = side.get("lat_ns", {}).get("percentile") or {}
            latency = {name: float(pct[key]) / 1000 for key, name in _FIO_PERCENTILES if key in pct} or None
        except (OSError, ValueError, KeyError, TypeError, IndexError) as exc:
            raise RunFailed(f"{self.name}: unreadable JSON output: {exc}") from None
        return _measurement(cell, child, total, runtime_ms / 1000, latency_us=latency)


class UblkFioTarget(FioTarget):
    """``ublk-fio``: the image served by ``aioblock serve ublk`` (one queue, the cell's depth and cache mode)
    and fio (io_uring, O_DIRECT) on the block device; any format. The child is :mod:`.ublk_fio`; on a kernel
    without ublk, or without root, every run fails with that one line and the rest of the suite goes on."""

    def __init__(self) -> None:
        super().__init__("io_uring")
        self.name = "ublk-fio"

    def applies(self, cell: Cell) -> bool:
        return True

    def command(self, cell: Cell, image: str, requests: int, scratch: Path) -> list[str]:
        opts = ["-o", ",".join(f"{k}={v}" for k, v in cell.options)] if cell.options else []
        return [sys.executable, "-m", "aioblock.benchmark.ublk_fio", "-f", cell.format, "-t", cell.cache,
                "--depth", str(cell.depth), *opts, image, "--",
                *self.options(cell, requests, scratch, direct=True)]


def make_target(name: str) -> Target:
    """The target a suite names (``aioblock-ENGINE-LOOP`` or one of ``PEERS``)."""
    if name.startswith("aioblock-"):
        _, engine, loop = name.split("-", 2)
        return AioblockTarget(engine, loop)
    if name not in PEERS:
        raise ValueError(f"unknown target {name}")
    if name == "ublk-fio":
        return UblkFioTarget()
    tool, variant = name.rsplit("-", 1) if name.startswith("fio-") else ("qemu-img", name[len("qemu-img-"):])
    return FioTarget(variant) if tool == "fio" else QemuImgTarget(variant)
