"""``aioblock bench``: qemu-img bench over aioblock's request path.

Options and semantics follow ``qemu-img bench`` (QEMU 7.2, observed as a black box):

* ``COUNT`` requests of ``BUFSIZE`` bytes, ``DEPTH`` of them in flight at all times (fewer only at the end);
* request *i* goes to ``OFFSET + i * STEP`` taken modulo the image size (``STEP`` 0 means ``BUFSIZE``); a
  request that then reaches past the end of the image fails the run, as in qemu-img;
* ``-w`` writes ``BUFSIZE`` bytes of ``--pattern`` (default 0) instead of reading;
* ``--flush-interval N`` (writes only, ``N >= DEPTH``): whenever the number of requests still to be sent is a
  multiple of N (the end of the run included), drain the queue and flush; with ``--no-drain`` the flush is
  sent alongside the requests instead;
* output: the same first line and the same "Run completed in N.NNN seconds." last line as qemu-img, then
  (unless ``-q``) throughput and latency percentiles. ``-q`` prints exactly what qemu-img prints;
* ``--image-opts``: the positional argument is qemu's option string instead of a file name,
  ``driver=FMT,file.filename=PATH[,key=value...]`` (``,,`` escapes a comma); ``driver`` is the format,
  every other key an open option of it (qcow2's ``l2-cache-size``...), as qemu-img bench accepts it;
* ``--json FILE`` (aioblock only): after the run, write the settings, elapsed time, ops/s, MiB/s, latency
  percentiles, an HDR histogram of the per-request latencies (``aioblock.benchmark.latency``, nanoseconds,
  so that runs can be merged) and ``statistics``, the disk's counters (``BlockBackend.statistics()``
  as a dict, taken before the disk is closed). This is what ``aioblock benchmark`` reads.

The request loop is kept lean: one pre-allocated buffer per in-flight slot, ``readinto`` for reads, and
``DEPTH`` worker tasks that each take the next offset when they send a request (so offsets are handed out in
sending order, as qemu-img does from its completion callback). The histogram for ``--json`` is built from
the latency list after the run, never inside the request loop.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import mmap
import os
import re
import sys
import time
from dataclasses import dataclass
from typing import Any

from .. import api
from ..backend import BlockBackend
from ..errors import AioblockError, InvalidOptionError
from ..io.engine import ENGINES
from ..sizes import parse_size
from .common import parse_options

__all__ = ["BenchResult", "BenchSettings", "add_parser", "parse_image_opts", "result_json", "run", "run_bench"]

_INT_MAX = (1 << 31) - 1
_DEFAULT_COUNT = 75000
_DEFAULT_DEPTH = 64
_DEFAULT_BUFSIZE = 4096
#: -i values: aioblock's engine names, plus qemu-img's aio names as aliases ("native" is Linux AIO in QEMU;
#: io_uring is the kernel-async engine aioblock has).
ENGINE_NAMES = {"hybrid": "hybrid", "uring": "uring", "io_uring": "uring", "native": "uring", "threads": "threads",
                "sync": "sync"}
_PERCENTILES = ((50.0, "p50"), (90.0, "p90"), (99.0, "p99"), (99.9, "p99.9"))


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "bench", help="run a simple image benchmark (qemu-img bench)",
        description="Send COUNT read (or write) requests of BUFSIZE bytes, DEPTH in parallel, and time them. "
                    "Options and output as qemu-img bench, followed by throughput and latency percentiles.")
    p.add_argument("-c", dest="count", default=str(_DEFAULT_COUNT), metavar="COUNT",
                   help=f"number of requests (default {_DEFAULT_COUNT})")
    p.add_argument("-d", dest="depth", default=str(_DEFAULT_DEPTH), metavar="DEPTH",
                   help=f"requests in flight at once (default {_DEFAULT_DEPTH})")
    p.add_argument("-f", dest="fmt", default=None, metavar="FMT", help="image format (default: probe)")
    p.add_argument("-s", dest="bufsize", default=str(_DEFAULT_BUFSIZE), metavar="BUFSIZE",
                   help="bytes per request, k/M/G suffixes allowed (default 4096)")
    p.add_argument("-S", dest="step", default="0", metavar="STEP",
                   help="distance between the offsets of consecutive requests (default: BUFSIZE)")
    p.add_argument("-o", dest="offset", default="0", metavar="OFFSET", help="offset of the first request")
    p.add_argument("-w", dest="write", action="store_true", help="write instead of reading")
    p.add_argument("-t", dest="cache", default=None, metavar="CACHE", help="cache mode: writeback | none")
    p.add_argument("-n", dest="native", action="store_true",
                   help="native AIO, as qemu-img's -i native (aioblock's kernel-async engine, uring); "
                        "needs -t none")
    p.add_argument("-i", dest="engine", default=None, metavar="ENGINE",
                   help="I/O engine: hybrid | uring | threads | sync (qemu's io_uring, native and threads are "
                        "accepted too; default: aioblock's default engine)")
    p.add_argument("--pattern", default="0", metavar="PATTERN", help="byte written by -w (default 0)")
    p.add_argument("--flush-interval", dest="flush_interval", default="0", metavar="N",
                   help="flush whenever the requests still to send are a multiple of N (writes only)")
    p.add_argument("--no-drain", dest="drain", action="store_false",
                   help="with --flush-interval: flush without waiting for requests in flight")
    p.add_argument("-q", dest="quiet", action="store_true",
                   help="print only what qemu-img bench prints (no throughput or latency lines)")
    p.add_argument("-U", dest="force_share", action="store_true", help="accepted for qemu-img compatibility")
    p.add_argument("--image-opts", dest="image_opts", action="store_true",
                   help="FILE is an option string, driver=FMT,file.filename=PATH[,option=value...] (as qemu-img)")
    p.add_argument("--json", dest="json_file", default=None, metavar="FILE",
                   help="write settings, throughput, latency percentiles, an HDR latency histogram and the "
                        "disk's statistics to FILE as JSON")
    p.add_argument("filename", help="image file (with --image-opts: the option string)")
    p.set_defaults(run=run)


@dataclass(frozen=True, slots=True)
class BenchSettings:
    """Validated options of one run (see the module docstring for their meaning)."""

    count: int = _DEFAULT_COUNT
    depth: int = _DEFAULT_DEPTH
    bufsize: int = _DEFAULT_BUFSIZE
    step: int = _DEFAULT_BUFSIZE
    offset: int = 0
    write: bool = False
    pattern: int = 0
    flush_interval: int = 0
    drain: bool = True

    def header(self) -> list[str]:
        """The lines qemu-img bench prints before it starts."""
        lines = [f"Sending {self.count} {'write' if self.write else 'read'} requests, {self.bufsize} bytes "
                 f"each, {self.depth} in parallel (starting at offset {self.offset}, step size {self.step})"]
        if self.flush_interval:
            lines.append(f"Sending flush every {self.flush_interval} requests")
        return lines


@dataclass(frozen=True, slots=True)
class BenchResult:
    """What a run measured: wall time and per-request latencies (nanoseconds, in completion order)."""

    settings: BenchSettings
    elapsed: float
    latencies_ns: list[int]

    @property
    def ops_per_second(self) -> float:
        return self.settings.count / self.elapsed if self.elapsed > 0 else 0.0

    @property
    def mib_per_second(self) -> float:
        return self.ops_per_second * self.settings.bufsize / (1 << 20)

    def percentiles_us(self) -> dict[str, float]:
        """p50/p90/p99/p99.9/max latency in microseconds (nearest rank); empty when nothing ran."""
        lat = sorted(self.latencies_ns)
        if not lat:
            return {}
        out = {}
        for pct, name in _PERCENTILES:
            rank = max(1, -(-len(lat) * pct // 100))          # nearest-rank: ceil(n * p / 100)
            out[name] = lat[int(rank) - 1] / 1000
        out["max"] = lat[-1] / 1000
        return out

    def summary(self) -> list[str]:
        """qemu-img's last line, then aioblock's throughput and latency lines."""
        lines = [f"Run completed in {self.elapsed:.3f} seconds."]
        lines.append(f"Throughput: {self.ops_per_second:.0f} ops/s, {self.mib_per_second:.1f} MiB/s")
        pct = self.percentiles_us()
        if pct:
            lines.append("Latency (us): " + ", ".join(f"{k} {v:.1f}" for k, v in pct.items()))
        else:
            lines.append("Latency (us): no requests")
        return lines


# ---- option parsing ---------------------------------------------------------------------------------------

def _int_option(text: str, low: int, high: int, what: str) -> int:
    try:
        value = int(text.strip(), 10)
    except ValueError:
        raise InvalidOptionError(f"Invalid {what} specified") from None
    if not low <= value <= high:
        raise InvalidOptionError(f"Invalid {what} specified")
    return value


def _size_option(text: str, high: int, what: str) -> int:
    try:
        value = parse_size(text)
    except InvalidOptionError:
        value = -1
    if not 0 <= value <= high:
        raise InvalidOptionError(f"Invalid {what} specified. You may use k, M, G, T, P or E suffixes for "
                                 "kilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes.")
    return value


def _pattern_option(text: str) -> int:
    """A byte value written like C's strtol with base 0: decimal, 0x hex or 0 octal."""
    t = text.strip()
    try:
        value = int(t, 8) if re.fullmatch(r"0[0-7]+", t) else int(t, 0)
    except ValueError:
        value = -1
    if not 0 <= value <= 255:
        raise InvalidOptionError("Invalid pattern byte specified")
    return value


def settings_from_args(args: argparse.Namespace) -> BenchSettings:
    """Validate the command line; InvalidOptionError with qemu-img's wording for bad values."""
    count = _int_option(args.count, 0, _INT_MAX, "request count")
    depth = _int_option(args.depth, 1, _INT_MAX, "queue depth")
    bufsize = _size_option(args.bufsize, _INT_MAX, "buffer size")
    step = _size_option(args.step, _INT_MAX, "step_size")
    offset = _size_option(args.offset, (1 << 63) - 1, "offset")
    pattern = _pattern_option(args.pattern)
    flush_interval = _int_option(args.flush_interval, 0, _INT_MAX, "flush interval")
    if flush_interval and not args.write:
        raise InvalidOptionError("--flush-interval is only available in write tests")
    if flush_interval and flush_interval < depth:
        raise InvalidOptionError("Flush interval can't be smaller than depth")
    return BenchSettings(count=count, depth=depth, bufsize=bufsize, step=step or bufsize, offset=offset,
                         write=args.write, pattern=pattern, flush_interval=flush_interval, drain=args.drain)


def _open_options(args: argparse.Namespace) -> tuple[str | None, str]:
    """(engine, cache) for aioblock.open from -i, -t and -n.

    ``-n`` is qemu-img's native AIO: the kernel-async engine (uring; Linux AIO is not implemented) unless
    ``-i`` names one, and, as in qemu-img, refused without ``-t none`` (native AIO needs O_DIRECT)."""
    engine = None
    if args.engine is not None:
        engine = ENGINE_NAMES.get(args.engine)
        if engine is None:
            raise InvalidOptionError(f"Invalid aio option: {args.engine} (choose from {', '.join(ENGINES)})")
    cache = args.cache or "writeback"
    if cache not in ("writeback", "none"):
        raise InvalidOptionError(f"Invalid cache mode '{cache}' (choose from writeback, none)")
    if args.native:
        if cache != "none":
            raise InvalidOptionError("aio=native was specified, but it requires cache.direct=on, which was "
                                     "not specified.")
        engine = engine or "uring"
    return engine, cache


# ---- the run ----------------------------------------------------------------------------------------------

def _aligned_buffer(size: int, fill: int) -> memoryview:
    """A page-aligned buffer (as qemu-img bench's blk_blockalign): with O_DIRECT the file node then hands it
    to the kernel without a bounce copy."""
    view = memoryview(mmap.mmap(-1, max(size, 1)))[:size]
    if fill:
        view[:] = bytes([fill]) * size
    return view


async def run_bench(disk: BlockBackend, s: BenchSettings) -> BenchResult:
    """Run the benchmark on an open disk. The first failed request stops the run and is raised (as
    ``AioblockError`` "Failed request: ..."); the other requests in flight are cancelled."""
    loop = asyncio.get_running_loop()
    size = disk.size
    count, step, interval = s.count, s.step, s.flush_interval
    workers = min(s.depth, count)
    first_check = workers            # qemu-img looks for flush points only after the first DEPTH requests
    latencies: list[int] = []
    record = latencies.append
    clock = time.perf_counter_ns
    issued = 0
    next_offset = s.offset
    gate: asyncio.Future[None] | None = None       # set while a drained flush is in progress
    last_flush_point = -1
    side_flushes: list[asyncio.Task[None]] = []    # --no-drain flushes

    def take_offset() -> int:
        """The next request's offset: offsets advance by STEP and wrap at the image size, as qemu-img's."""
        nonlocal issued, next_offset
        off = next_offset
        issued += 1
        nxt = off + step
        if nxt >= size:
            nxt = nxt % size if size else 0
        next_offset = nxt
        return off

    async def plain_worker(view: memoryview) -> None:
        op = disk.write if s.write else disk.readinto
        while issued < count:
            t0 = clock()
            await op(take_offset(), view)
            record(clock() - t0)

    async def flush_worker(view: memoryview) -> None:
        nonlocal gate, last_flush_point
        op = disk.write if s.write else disk.readinto
        while True:
            while gate is not None:
                await gate
            at_point = (issued >= first_check and (count - issued) % interval == 0
                        and issued != last_flush_point)
            if at_point:
                last_flush_point = issued
                if s.drain:
                    gate = loop.create_future()
                    try:
                        await disk.drain()
                        await disk.flush()
                    finally:
                        gate.set_result(None)
                        gate = None
                else:
                    side_flushes.append(loop.create_task(disk.flush()))
            if issued >= count:
                return
            t0 = clock()
            await op(take_offset(), view)
            record(clock() - t0)

    worker = flush_worker if interval else plain_worker
    buffers = [_aligned_buffer(s.bufsize, s.pattern) for _ in range(workers)]
    start = time.perf_counter()
    try:
        if workers == 1:
            await worker(buffers[0])
        elif workers:
            tasks = [loop.create_task(worker(b)) for b in buffers]
            try:
                done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
            finally:
                for t in tasks:
                    t.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
            for t in done:
                if not t.cancelled() and (error := t.exception()) is not None:
                    raise error
        if side_flushes:
            await asyncio.gather(*side_flushes)
    except AioblockError as exc:
        raise AioblockError(f"Failed request: {exc.message}", filename=exc.filename) from None
    except OSError as exc:
        raise AioblockError(f"Failed request: {exc.strerror or exc}") from None
    elapsed = time.perf_counter() - start
    return BenchResult(s, elapsed, latencies)


def parse_image_opts(text: str) -> tuple[str, str, dict[str, str]]:
    """``driver=qcow2,file.filename=PATH,l2-cache-size=1M`` -> (path, format, open options).

    As qemu-img's ``--image-opts``: ``driver`` names the format (``file`` means a raw file, then with
    ``filename=``), ``file.filename`` the image, ``file.driver`` may only be ``file``; every other key is an
    open option of the format (refused by ``aioblock.open`` if the format has no such option)."""
    opts = parse_options([text])
    driver = opts.pop("driver", None)
    if driver is None:
        raise InvalidOptionError("Parameter 'driver' is missing")
    if driver == "file":
        path, fmt = opts.pop("filename", None), "raw"
    elif driver in ("raw", "qcow2"):
        path, fmt = opts.pop("file.filename", None), driver
        if opts.pop("file.driver", "file") != "file":
            raise InvalidOptionError("only file.driver=file is supported (aioblock opens local files)")
    else:
        raise InvalidOptionError(f"Unknown driver '{driver}' (choose from raw, qcow2, file)")
    if not path:
        raise InvalidOptionError("the option string names no file (file.filename=PATH)")
    nested = sorted(k for k in opts if "." in k)
    if nested:
        raise InvalidOptionError(f"unsupported option '{nested[0]}' (aioblock opens local files: "
                                 "file.filename and file.driver=file only)")
    return path, fmt, opts


def result_json(result: BenchResult, *, fmt: str | None, engine: str | None, cache: str, filename: str,
                options: dict[str, str], statistics: dict[str, Any]) -> dict[str, Any]:
    """The ``--json`` document of a finished run (the histogram is built here, after the run)."""
    from ..benchmark.latency import HIGHEST_NS, SIGNIFICANT_DIGITS, LatencyHistogram
    loop_module = type(asyncio.get_running_loop()).__module__.split(".")[0]
    return {
        "tool": "aioblock bench",
        "settings": {**dataclasses.asdict(result.settings), "format": fmt, "engine": engine, "cache": cache,
                     "loop": "uvloop" if loop_module == "uvloop" else "asyncio", "filename": filename,
                     "options": options},
        "elapsed_s": result.elapsed,
        "ops_per_s": result.ops_per_second,
        "mib_per_s": result.mib_per_second,
        "latency_us": result.percentiles_us() or None,
        "histogram": {"format": "hdrh", "unit": "ns", "lowest": 1, "highest": HIGHEST_NS,
                      "significant_digits": SIGNIFICANT_DIGITS,
                      "count": len(result.latencies_ns),
                      "data": LatencyHistogram.of(result.latencies_ns).encode()},
        "statistics": statistics,
    }


async def run(args: argparse.Namespace) -> int:
    settings = settings_from_args(args)
    engine, cache = _open_options(args)
    filename, fmt = args.filename, args.fmt
    options: dict[str, str] = {}
    if args.image_opts:
        if fmt is not None:
            raise InvalidOptionError("--image-opts and --format are mutually exclusive")
        filename, fmt, options = parse_image_opts(args.filename)
        args.filename = filename                  # errors name the image, not the option string
    statistics: dict[str, Any] = {}
    async with api.open(filename, fmt, read_only=not settings.write, engine=engine, cache=cache,
                        options=options or None) as disk:
        out = sys.stdout
        out.write("\n".join(settings.header()) + "\n")
        out.flush()
        result = await run_bench(disk, settings)
        if args.json_file is not None:
            statistics = dataclasses.asdict(disk.statistics())
            fmt = fmt or disk.format
    lines = result.summary()
    out.write("\n".join(lines[:1] if args.quiet else lines) + "\n")
    out.flush()
    if args.json_file is not None:
        doc = result_json(result, fmt=fmt, engine=engine, cache=cache, filename=filename, options=options,
                          statistics=statistics)
        tmp = f"{args.json_file}.tmp{os.getpid()}"
        try:
            with open(tmp, "w") as f:
                json.dump(doc, f, indent=1, default=str)
            os.replace(tmp, args.json_file)
        except OSError as exc:
            raise AioblockError(f"cannot write {args.json_file}: {exc.strerror or exc}") from None
    return 0
