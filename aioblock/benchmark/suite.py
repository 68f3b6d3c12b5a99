"""Benchmark suites: TOML files parsed and validated into a ``Suite`` of ``Cell`` s.

A suite names workloads, the matrix they are crossed with, the aioblock targets and the peers::

    name = "example"
    repetitions = 4               # every target runs once per repetition, all targets alternating
    duration = 0.5                # seconds per run (request count calibrated per target); or: requests = N

    [targets]
    engines = ["default", "uring"]                # aioblock engines ("default": aioblock's own choice)
    loops = ["uvloop"]                            # event loops: uvloop, asyncio
    peers = ["qemu-img-threads", "qemu-img-io_uring", "fio-io_uring", "fio-psync"]

    [matrix]                      # crossed with every workload, unless the workload sets the key itself
    formats = ["raw", "qcow2"]    # raw, qcow2, qed
    block_sizes = ["4k"]
    depths = [1, 32]
    caches = ["writeback"]        # writeback | none (O_DIRECT)
    locations = ["tmpfs"]         # disk (disk_dir, default /var/tmp) | tmpfs (tmpfs_dir, default /dev/shm)
    size = "1G"

    [[workloads]]
    name = "read-4k-strided"
    kind = "read"                 # read | overwrite | alloc (allocating writes into a fresh image)
    pattern = "strided"           # sequential (step = block size) | strided (step > block size)
    step = "64k"

    [[exclude]]                   # drop the cells matching every key (a value or a list of values) ...
    workload = "read-4k-strided"
    depth = 1
    target = "fio-psync"          # ... or, with target, only these targets from them

    [quick]                       # `--quick`: a subset (each list filters the full suite's values)
    repetitions = 2
    duration = 0.2
    workloads = ["read-4k-strided"]
    depths = [32]

Workloads may also set ``family`` (plots group a family into one figure), ``options`` (qcow2 open options
such as ``l2-cache-size``, given to both aioblock and qemu-img through ``--image-opts``), ``create_options``
(``qemu-img create -o``), ``fill = "sparse"`` with ``allocate_every = "512M"`` (read workloads: an image
with one allocated cluster per that many bytes instead of random data everywhere), and ``engines``,
``loops``, ``peers``, ``requests``, ``duration`` of their own.

Invariants of a parsed ``Suite``: every cell has at least one target; cell keys are unique; fio peers appear
only in raw cells; block sizes, steps and image sizes are multiples of 512 with size and step multiples of
the block size (so that no request crosses the end of the image); an allocating workload never sends more
requests than the fresh image has steps (its writes would wrap and overwrite). Every problem is an
``InvalidOptionError`` naming the suite file and the place in it, one line.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from ..errors import InvalidOptionError
from ..sizes import format_size, parse_size

__all__ = [
    "FORMATS", "KINDS", "LOCATIONS", "LOOPS", "PATTERNS", "PEERS", "Cell", "ImageSpec", "Suite",
    "aioblock_target", "engine_names", "load_suite", "parse_suite",
]

KINDS = ("read", "overwrite", "alloc")
PATTERNS = ("sequential", "strided")
FORMATS = ("raw", "qcow2", "qed")
CACHES = ("writeback", "none")
LOCATIONS = ("disk", "tmpfs")
LOOPS = ("uvloop", "asyncio")
FILLS = ("random", "sparse")
PEERS = ("qemu-img-threads", "qemu-img-io_uring", "fio-io_uring", "fio-psync", "ublk-fio")
#: the peers of a suite whose [targets] names none (ublk-fio needs a ublk kernel and root: only when asked)
DEFAULT_PEERS = PEERS[:4]
#: qcow2 open options a workload may set (aioblock's and qemu-img's names)
QCOW2_OPTIONS = ("l2-cache-size", "l2-cache-entry-size", "refcount-cache-size", "cache-clean-interval")
DEFAULT_DURATION = 0.5
DEFAULT_REPETITIONS = 4
DEFAULT_MAX_REQUESTS = 5_000_000
MAX_DEPTH = 4096

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_TOP_KEYS = ("name", "description", "repetitions", "requests", "duration", "calibration_requests",
             "max_requests", "disk_dir", "tmpfs_dir", "cdf", "targets", "matrix", "workloads", "exclude",
             "quick")
_TARGET_KEYS = ("engines", "loops", "peers")
_MATRIX_KEYS = ("formats", "block_sizes", "depths", "caches", "locations", "size")
_WORKLOAD_KEYS = ("name", "description", "family", "kind", "pattern", "step", "options", "create_options",
                  "fill", "allocate_every", "requests", "duration", *_MATRIX_KEYS, *_TARGET_KEYS)
_EXCLUDE_KEYS = ("workload", "family", "kind", "pattern", "format", "block_size", "depth", "cache", "location",
                 "target")
_QUICK_KEYS = ("repetitions", "requests", "duration", "workloads", "formats", "block_sizes", "depths", "caches",
               "locations", *_TARGET_KEYS)
_CDF_KEYS = ("workload", "format", "block_size", "depth", "cache", "location")
_DEFAULT_MATRIX: dict[str, Any] = {"formats": ["raw"], "block_sizes": ["4k"], "depths": [32],
                                   "caches": ["writeback"], "locations": ["tmpfs"], "size": "1G"}

T = TypeVar("T")


def engine_names() -> tuple[str, ...]:
    """The engine names a suite may use: "default" (None: aioblock's default) and every aioblock engine."""
    from ..io.engine import ENGINES
    return ("default", *ENGINES)


def aioblock_target(engine: str, loop: str) -> str:
    """The target name of aioblock with ``engine`` on ``loop``: ``aioblock-uring-uvloop``."""
    return f"aioblock-{engine}-{loop}"


@dataclass(frozen=True, slots=True)
class ImageSpec:
    """The image a read or overwrite cell runs on (cells with equal specs share one file).

    ``fill``: "random" (every byte random data: fully allocated, nothing a file system or format could skip)
    or "sparse" (an image with one allocated cluster per ``allocate_every`` bytes)."""

    format: str
    location: str
    size: int
    fill: str = "random"
    allocate_every: int | None = None
    create_options: tuple[tuple[str, str], ...] = ()

    @property
    def name(self) -> str:
        """A file name that tells the spec apart from every other."""
        parts = [self.fill, format_size(self.size).replace(" ", "")]
        if self.allocate_every:
            parts.append("every" + format_size(self.allocate_every).replace(" ", ""))
        parts += [f"{k}={v}" for k, v in self.create_options]
        return re.sub(r"[^A-Za-z0-9.=_-]", "_", "-".join(parts)) + "." + self.format


@dataclass(frozen=True, slots=True)
class Cell:
    """One point of the matrix: a workload on one format, block size, depth, cache mode and location, run by
    ``targets`` (aioblock targets first, then peers, in the suite's order).

    ``step``: bytes between consecutive requests' offsets (the block size for sequential workloads).
    Exactly one of ``requests`` (the same count for every target) and ``duration`` (seconds per run; the
    runner calibrates a count per target) is set."""

    workload: str
    family: str
    kind: str
    pattern: str
    format: str
    block_size: int
    step: int
    depth: int
    cache: str
    location: str
    size: int
    targets: tuple[str, ...]
    requests: int | None = None
    duration: float | None = None
    options: tuple[tuple[str, str], ...] = ()
    create_options: tuple[tuple[str, str], ...] = ()
    fill: str = "random"
    allocate_every: int | None = None

    @property
    def key(self) -> tuple[str, str, int, int, str, str]:
        """What identifies the cell within a suite (and matches it across two runs)."""
        return (self.workload, self.format, self.block_size, self.depth, self.cache, self.location)

    @property
    def label(self) -> str:
        return (f"{self.workload} {self.format} {format_size(self.block_size).replace(' ', '')} "
                f"d{self.depth} {self.cache} {self.location}")

    @property
    def writes(self) -> bool:
        return self.kind != "read"

    @property
    def max_requests(self) -> int | None:
        """For allocating writes: how many requests the fresh image has room for before wrapping."""
        return self.size // self.step if self.kind == "alloc" else None

    def image(self) -> ImageSpec:
        """The shared image of a read/overwrite cell, or the spec of the fresh image an alloc run gets."""
        fill = "empty" if self.kind == "alloc" else self.fill
        return ImageSpec(self.format, self.location, self.size, fill, self.allocate_every, self.create_options)


@dataclass(frozen=True, slots=True)
class Suite:
    """A parsed suite (``quick``: the ``[quick]`` subset was taken)."""

    name: str
    path: str
    cells: tuple[Cell, ...]
    repetitions: int
    targets: tuple[str, ...]
    description: str = ""
    quick: bool = False
    disk_dir: str = "/var/tmp"
    tmpfs_dir: str = "/dev/shm"
    calibration_requests: int | None = None
    max_requests: int = DEFAULT_MAX_REQUESTS
    cdf: Mapping[str, Any] = field(default_factory=dict)

    def location_dir(self, location: str) -> str:
        return self.disk_dir if location == "disk" else self.tmpfs_dir

    def workloads(self) -> list[str]:
        """Workload names in suite order."""
        return list(dict.fromkeys(c.workload for c in self.cells))

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "path": self.path, "description": self.description, "quick": self.quick,
                "repetitions": self.repetitions, "targets": list(self.targets), "cells": len(self.cells),
                "disk_dir": self.disk_dir, "tmpfs_dir": self.tmpfs_dir}


# ---- reading TOML values with their place in the file -----------------------------------------------------

class _Table:
    """A TOML table with the place it came from, for error messages; ``done()`` refuses unknown keys."""

    def __init__(self, data: Mapping[str, Any], where: str, allowed: Sequence[str]) -> None:
        self.data, self.where = data, where
        unknown = [k for k in data if k not in allowed]
        if unknown:
            raise InvalidOptionError(f"{where}: unknown key '{unknown[0]}' (expected one of: "
                                     f"{', '.join(allowed)})")

    def error(self, key: str, message: str) -> InvalidOptionError:
        return InvalidOptionError(f"{self.where}: '{key}' {message}")

    def has(self, key: str) -> bool:
        return key in self.data

    def string(self, key: str, default: str | None = None, *, choices: Sequence[str] | None = None) -> str:
        value = self.data.get(key, default)
        if value is None:
            raise self.error(key, "is required")
        if not isinstance(value, str):
            raise self.error(key, f"must be a string, not {_tname(value)}")
        if choices is not None and value not in choices:
            raise self.error(key, f"must be one of {', '.join(choices)}, not '{value}'")
        return value

    def integer(self, key: str, default: int | None = None, *, low: int = 1, high: int = 1 << 62) -> int:
        value = self.data.get(key, default)
        if value is None:
            raise self.error(key, "is required")
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.error(key, f"must be an integer, not {_tname(value)}")
        if not low <= value <= high:
            raise self.error(key, f"must be between {low} and {high}, not {value}")
        return value

    def number(self, key: str) -> float:
        value = self.data[key]
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self.error(key, f"must be a number of seconds, not {_tname(value)}")
        if not 0 < value <= 3600:
            raise self.error(key, f"must be between 0 and 3600 seconds, not {value}")
        return float(value)

    def size(self, key: str, value: Any = None) -> int:
        raw = self.data[key] if value is None else value
        if isinstance(raw, bool) or not isinstance(raw, str | int):
            raise self.error(key, f"must be a size such as \"4k\" or 4096, not {_tname(raw)}")
        try:
            out = parse_size(raw)
        except InvalidOptionError:
            raise self.error(key, f"has an invalid size '{raw}' (use k, M, G, T suffixes)") from None
        if out <= 0 or out % 512:
            raise self.error(key, f"must be a positive multiple of 512 bytes, not {raw!r}")
        return out

    def listing(self, key: str, default: Any = None) -> list[Any]:
        value = self.data.get(key, default)
        if value is None:
            raise self.error(key, "is required")
        if not isinstance(value, list):
            raise self.error(key, f"must be a list, not {_tname(value)}")
        if not value:
            raise self.error(key, "must not be empty")
        if len(set(map(repr, value))) != len(value):
            raise self.error(key, "lists a value twice")
        return value

    def choices(self, key: str, allowed: Sequence[str], default: Any = None) -> list[str]:
        out = self.listing(key, default)
        for v in out:
            if v not in allowed:
                raise self.error(key, f"has '{v}': expected one of {', '.join(allowed)}")
        return out

    def ints(self, key: str, low: int, high: int, default: Any = None) -> list[int]:
        out = self.listing(key, default)
        for v in out:
            if isinstance(v, bool) or not isinstance(v, int) or not low <= v <= high:
                raise self.error(key, f"has {v!r}: expected integers between {low} and {high}")
        return out

    def sizes(self, key: str, default: Any = None) -> list[int]:
        out = [self.size(key, v) for v in self.listing(key, default)]
        if len(set(out)) != len(out):
            raise self.error(key, "lists a size twice")
        return out

    def str_table(self, key: str) -> tuple[tuple[str, str], ...]:
        value = self.data.get(key, {})
        if not isinstance(value, dict):
            raise self.error(key, f"must be a table such as {{ l2-cache-size = \"1M\" }}, not {_tname(value)}")
        out = []
        for k, v in value.items():
            if isinstance(v, bool) or not isinstance(v, str | int | float):
                raise self.error(key, f"has {k} = {v!r}: values must be strings or numbers")
            if any(c in str(k) + str(v) for c in ",="):
                raise self.error(key, f"has {k} = {v!r}: keys and values may not contain ',' or '='")
            out.append((str(k), str(v)))
        return tuple(out)


def _tname(value: Any) -> str:
    return {dict: "a table", list: "a list", str: "a string", bool: "a boolean", int: "an integer",
            float: "a number"}.get(type(value), type(value).__name__)


def _tables(data: Mapping[str, Any], key: str, where: str) -> list[Mapping[str, Any]]:
    value = data.get(key, [])
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        raise InvalidOptionError(f"{where}: '{key}' must be an array of tables ([[{key}]])")
    return value


def _subtable(data: Mapping[str, Any], key: str, where: str) -> Mapping[str, Any]:
    value = data.get(key, {})
    if not isinstance(value, dict):
        raise InvalidOptionError(f"{where}: '{key}' must be a table ([{key}])")
    return value


def _run_length(t: _Table) -> tuple[int | None, float | None] | None:
    """(requests, duration) if the table sets one of them, None if neither; both is an error."""
    if t.has("requests") and t.has("duration"):
        raise InvalidOptionError(f"{t.where}: set either 'requests' or 'duration', not both")
    if t.has("requests"):
        return t.integer("requests"), None
    if t.has("duration"):
        return None, t.number("duration")
    return None


# ---- the suite --------------------------------------------------------------------------------------------

@dataclass
class _Workload:
    name: str
    family: str
    kind: str
    pattern: str
    step: int | None
    axes: dict[str, list[Any]]
    size: int
    run_length: tuple[int | None, float | None] | None
    options: tuple[tuple[str, str], ...]
    create_options: tuple[tuple[str, str], ...]
    fill: str
    allocate_every: int | None
    targets: list[str]


def _targets(t: _Table, base: Mapping[str, list[str]]) -> tuple[dict[str, list[str]], list[str]]:
    """The engines/loops/peers lists (``t``'s or ``base``'s) and the target names they give."""
    lists = {"engines": t.choices("engines", engine_names(), base.get("engines")),
             "loops": t.choices("loops", LOOPS, base.get("loops")),
             "peers": (t.choices("peers", PEERS, base.get("peers")) if t.data.get("peers", base.get("peers"))
                       else [])}
    names = [aioblock_target(e, lp) for e in lists["engines"] for lp in lists["loops"]] + lists["peers"]
    return lists, names


def _workload(t: _Table, matrix: _Table, target_lists: Mapping[str, list[str]]) -> _Workload:
    name = t.string("name")
    if not _NAME.match(name):
        raise t.error("name", f"'{name}' may contain only letters, digits, '.', '_' and '-'")
    kind = t.string("kind", choices=KINDS)
    pattern = t.string("pattern", "sequential", choices=PATTERNS)

    def axis(key: str, read: Any) -> Any:
        return read(t, key) if t.has(key) else read(matrix, key)

    axes: dict[str, list[Any]] = {
        "formats": axis("formats", lambda x, k: x.choices(k, FORMATS, _DEFAULT_MATRIX[k])),
        "block_sizes": axis("block_sizes", lambda x, k: x.sizes(k, _DEFAULT_MATRIX[k])),
        "depths": axis("depths", lambda x, k: x.ints(k, 1, MAX_DEPTH, _DEFAULT_MATRIX[k])),
        "caches": axis("caches", lambda x, k: x.choices(k, CACHES, _DEFAULT_MATRIX[k])),
        "locations": axis("locations", lambda x, k: x.choices(k, LOCATIONS, _DEFAULT_MATRIX[k])),
    }
    size = t.size("size") if t.has("size") else matrix.size("size", matrix.data.get("size", "1G"))
    step: int | None = None
    if pattern == "strided":
        if not t.has("step"):
            raise t.error("step", "is required for pattern = \"strided\"")
        step = t.size("step")
        for bs in axes["block_sizes"]:
            if step <= bs or step % bs:
                raise t.error("step", f"({format_size(step)}) must be a multiple of the block size larger than "
                              f"it ({format_size(bs)})")
    elif t.has("step"):
        raise t.error("step", "is only for pattern = \"strided\" (sequential requests step by the block size)")
    for bs in axes["block_sizes"]:
        if size % bs:
            raise InvalidOptionError(f"{t.where}: the image size {format_size(size)} is not a multiple of the "
                                     f"block size {format_size(bs)}")
    if step is not None and step > size:
        raise t.error("step", f"({format_size(step)}) is larger than the image ({format_size(size)})")
    options = t.str_table("options")
    for k, _ in options:
        if k not in QCOW2_OPTIONS:
            raise t.error("options", f"has '{k}': expected qcow2 open options ({', '.join(QCOW2_OPTIONS)})")
    if options and axes["formats"] != ["qcow2"]:
        raise t.error("options", "are qcow2 open options: set formats = [\"qcow2\"] for this workload")
    create_options = t.str_table("create_options")
    if create_options and axes["formats"] == ["raw"]:
        raise t.error("create_options", "apply to qcow2 and qed images (raw has none)")
    fill = t.string("fill", "random", choices=FILLS)
    allocate_every: int | None = None
    if kind == "alloc" and (t.has("fill") or t.has("allocate_every")):
        raise InvalidOptionError(f"{t.where}: allocating writes always start from a fresh, empty image "
                                 "(no 'fill' or 'allocate_every')")
    if fill == "sparse":
        if kind != "read":
            raise t.error("fill", "= \"sparse\" is for read workloads only")
        if not t.has("allocate_every"):
            raise t.error("allocate_every", "is required with fill = \"sparse\"")
        allocate_every = t.size("allocate_every")
        if allocate_every > size or size % allocate_every:
            raise t.error("allocate_every", f"must divide the image size ({format_size(size)})")
    elif t.has("allocate_every"):
        raise t.error("allocate_every", "needs fill = \"sparse\"")
    _, targets = _targets(t, target_lists)
    return _Workload(name, t.string("family", name), kind, pattern, step, axes, size, _run_length(t), options,
                     create_options, fill, allocate_every, targets)


def _matches(rule: Mapping[str, Any], cell: Cell) -> bool:
    for key, want in rule.items():
        if key == "target":
            continue
        have = cell.workload if key == "workload" else getattr(cell, key)
        values = want if isinstance(want, list) else [want]
        if key == "block_size":
            values = [parse_size(v) for v in values]
        if have not in values:
            return False
    return True


def _exclude_rule(t: _Table, targets: Sequence[str]) -> dict[str, Any]:
    rule: dict[str, Any] = {}
    for key, value in t.data.items():
        values = value if isinstance(value, list) else [value]
        if not values:
            raise t.error(key, "must not be an empty list")
        for v in values:
            if key == "depth":
                if isinstance(v, bool) or not isinstance(v, int):
                    raise t.error(key, f"has {v!r}: expected integers")
            elif key == "block_size":
                t.size(key, v)
            elif not isinstance(v, str):
                raise t.error(key, f"has {v!r}: expected strings")
            elif key == "target" and v not in targets:
                raise t.error(key, f"has '{v}', which is not one of the suite's targets ({', '.join(targets)})")
        rule[key] = value
    if not set(rule) - {"target"}:
        raise InvalidOptionError(f"{t.where}: needs at least one key other than 'target'")
    return rule


def parse_suite(text: str, path: str = "<suite>", *, quick: bool = False) -> Suite:
    """Parse and validate a suite's TOML text; ``quick``: take its ``[quick]`` subset."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise InvalidOptionError(f"invalid TOML: {exc}", filename=path) from None
    try:
        return _parse(data, path, quick)
    except InvalidOptionError as exc:
        raise exc.with_filename(path) from None


def load_suite(path: str | Path, *, quick: bool = False) -> Suite:
    """``parse_suite`` of a file (ImageOpenError-free: a missing file is an InvalidOptionError too)."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise InvalidOptionError(f"cannot read the suite: {exc.strerror or exc}", filename=str(path)) from None
    except UnicodeDecodeError:
        raise InvalidOptionError("the suite is not UTF-8 text", filename=str(path)) from None
    return parse_suite(text, str(path), quick=quick)


def _parse(data: Mapping[str, Any], path: str, quick: bool) -> Suite:
    top = _Table(data, "suite", _TOP_KEYS)
    name = top.string("name", Path(path).stem)
    repetitions = top.integer("repetitions", DEFAULT_REPETITIONS, high=1000)
    run_length = _run_length(top) or (None, DEFAULT_DURATION)
    tt = _Table(_subtable(data, "targets", "suite"), "[targets]", _TARGET_KEYS)
    defaults = {"engines": ["default"], "loops": ["uvloop"], "peers": list(DEFAULT_PEERS)}
    target_lists, all_targets = _targets(tt, defaults)
    matrix = _Table(_subtable(data, "matrix", "suite"), "[matrix]", _MATRIX_KEYS)
    if matrix.has("size"):
        matrix.size("size")

    workloads: list[_Workload] = []
    for i, raw in enumerate(_tables(data, "workloads", "suite"), 1):
        where = f"[[workloads]] #{i}" + (f" '{raw['name']}'" if isinstance(raw.get("name"), str) else "")
        w = _workload(_Table(raw, where, _WORKLOAD_KEYS), matrix, target_lists)
        if any(o.name == w.name for o in workloads):
            raise InvalidOptionError(f"{where}: workload name '{w.name}' is used twice")
        workloads.append(w)
    if not workloads:
        raise InvalidOptionError("suite: no workloads ([[workloads]] tables)")
    order = {t: i for i, t in enumerate(dict.fromkeys([*all_targets, *(t for w in workloads for t in w.targets)]))}

    cells = [c for w in workloads for c in _cells(w, run_length)]
    for i, raw in enumerate(_tables(data, "exclude", "suite"), 1):
        t = _Table(raw, f"[[exclude]] #{i}", _EXCLUDE_KEYS)
        rule = _exclude_rule(t, list(order))
        hit = [c for c in cells if _matches(rule, c)]
        if not hit:
            raise InvalidOptionError(f"{t.where}: matches no cell of the suite")
        if "target" in rule:
            drop = set(rule["target"] if isinstance(rule["target"], list) else [rule["target"]])
            cells = [_replace(c, targets=tuple(x for x in c.targets if x not in drop)) if _matches(rule, c) else c
                     for c in cells]
        else:
            cells = [c for c in cells if not _matches(rule, c)]
    cells = [c for c in cells if c.targets]
    if not cells:
        raise InvalidOptionError("suite: the excludes leave no cell to run")

    cdf: dict[str, Any] = {}
    if "cdf" in data:
        ct = _Table(_subtable(data, "cdf", "suite"), "[cdf]", _CDF_KEYS)
        cdf = _exclude_rule(ct, [])
        if not any(_matches(cdf, c) for c in cells):
            raise InvalidOptionError("[cdf]: selects no cell of the suite")

    if quick:
        if "quick" not in data:
            raise InvalidOptionError("suite: --quick needs a [quick] table in the suite")
        qt = _Table(_subtable(data, "quick", "suite"), "[quick]", _QUICK_KEYS)
        cells = _quick(qt, cells)
        repetitions = qt.integer("repetitions", repetitions, high=1000)
        ql = _run_length(qt)
        if ql is not None:
            cells = [_with_length(c, ql) for c in cells]
    elif "quick" in data:      # validate it even when not taken, so that a broken [quick] shows at once
        _quick(_Table(_subtable(data, "quick", "suite"), "[quick]", _QUICK_KEYS), cells)

    max_requests = top.integer("max_requests", DEFAULT_MAX_REQUESTS)
    for c in cells:
        cap = c.max_requests
        if c.requests is not None and cap is not None and c.requests > cap:
            raise InvalidOptionError(
                f"workload '{c.workload}': {c.requests} requests with step {format_size(c.step)} exceed the "
                f"{format_size(c.size)} image (allocating writes would wrap and overwrite); at most {cap}",
                filename=path)
        if c.requests is not None and c.requests > max_requests:
            raise InvalidOptionError(f"workload '{c.workload}': requests = {c.requests} is above max_requests "
                                     f"({max_requests})")
    if cdf and not any(_matches(cdf, c) for c in cells):
        cdf = {}                  # the quick subset left the [cdf] cell out: plots choose one themselves
    used = {t for c in cells for t in c.targets}
    return Suite(
        name=name, path=path, description=top.string("description", ""), quick=quick,
        cells=tuple(cells), repetitions=repetitions, targets=tuple(t for t in order if t in used),
        disk_dir=top.string("disk_dir", "/var/tmp"), tmpfs_dir=top.string("tmpfs_dir", "/dev/shm"),
        calibration_requests=(top.integer("calibration_requests") if top.has("calibration_requests") else None),
        max_requests=max_requests, cdf=cdf)


def _replace(cell: Cell, **changes: Any) -> Cell:
    import dataclasses
    return dataclasses.replace(cell, **changes)


def _with_length(cell: Cell, length: tuple[int | None, float | None]) -> Cell:
    return _replace(cell, requests=length[0], duration=length[1])


def _cells(w: _Workload, default_length: tuple[int | None, float | None]) -> Iterable[Cell]:
    requests, duration = w.run_length or default_length
    a = w.axes
    for fmt in a["formats"]:
        targets = tuple(t for t in w.targets if fmt == "raw" or not t.startswith("fio-"))
        for bs in a["block_sizes"]:
            for cache in a["caches"]:
                for loc in a["locations"]:
                    for depth in a["depths"]:
                        yield Cell(workload=w.name, family=w.family, kind=w.kind, pattern=w.pattern, format=fmt,
                                   block_size=bs, step=w.step or bs, depth=depth, cache=cache, location=loc,
                                   size=w.size, targets=targets, requests=requests, duration=duration,
                                   options=w.options, create_options=w.create_options if fmt != "raw" else (),
                                   fill=w.fill, allocate_every=w.allocate_every)


def _quick(t: _Table, cells: list[Cell]) -> list[Cell]:
    """The cells (and targets) the [quick] lists keep; every listed value must occur in the full suite."""
    filters: list[tuple[str, list[Any]]] = []
    for key, attr in (("workloads", "workload"), ("formats", "format"), ("block_sizes", "block_size"),
                      ("depths", "depth"), ("caches", "cache"), ("locations", "location")):
        if not t.has(key):
            continue
        values: list[Any] = t.sizes(key) if key == "block_sizes" else t.listing(key)
        present = {getattr(c, attr) for c in cells}
        for v in values:
            if v not in present:
                shown = format_size(v) if key == "block_sizes" else repr(v)
                raise t.error(key, f"has {shown}, which no cell of the full suite uses")
        filters.append((attr, values))
    out = [c for c in cells if all(getattr(c, attr) in values for attr, values in filters)]
    keep: set[str] | None = None
    if any(t.has(k) for k in _TARGET_KEYS):
        present_targets = {x for c in cells for x in c.targets}
        engines = {x.split("-")[1] for x in present_targets if x.startswith("aioblock-")}
        loops = {x.split("-")[2] for x in present_targets if x.startswith("aioblock-")}
        peers = {x for x in present_targets if not x.startswith("aioblock-")}
        lists = {}
        for key, have in (("engines", engines), ("loops", loops), ("peers", peers)):
            if t.has(key):
                vals = t.listing(key) if t.data[key] else []
                for v in vals:
                    if v not in have:
                        raise t.error(key, f"has '{v}', which the full suite does not run")
                lists[key] = set(vals)
            else:
                lists[key] = have
        keep = {aioblock_target(e, lp) for e in lists["engines"] for lp in lists["loops"]} | lists["peers"]
    if keep is not None:
        out = [_replace(c, targets=tuple(x for x in c.targets if x in keep)) for c in out]
        out = [c for c in out if c.targets]
    if not out:
        raise InvalidOptionError("[quick]: selects no cell")
    return out
