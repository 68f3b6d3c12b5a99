"""BlockBackend: the user-facing handle on an opened node graph (QEMU's BlockBackend + block/io.c).

Generic request work is done here once for every driver:

* bounds checks (``OutOfRangeError``) and the closed check (``ClosedError``);
* splitting at the node's ``max_transfer`` (requests of any offset and length go down as they are: the file
  node does O_DIRECT's alignment and read-modify-write for every node, :mod:`aioblock.io.file`);
* in-flight accounting for ``drain`` and ``close``, and per-operation statistics.

Concurrency: any number of tasks may call any request method at once. ``truncate`` and ``close`` drain first.

Cancellation follows :mod:`aioblock.cancellation`: each request runs in a scope; a request cancelled before it
changed anything raises at once, a committed one completes first (a write is then wholly written), and either
way it stays in flight (``drain``) until the engines have finished its I/O. Cancellations are counted apart
from errors. ``close`` cancelled while draining leaves the disk open; after that it runs to the end.
"""

from __future__ import annotations

import asyncio
import time
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from . import cancellation
from .cancellation import CancelledError
from .driver import BlockDriver, CheckResult
from .drivers import QEMU_FORMAT_NAMES
from .errors import AioblockError, ClosedError, InvalidOptionError, NotSupportedError, OutOfRangeError, ReadOnlyError
from .node import close_graph, resolve_backing_name

__all__ = ["BackendStatistics", "BlockBackend", "ImageInfo", "MapEntry", "OpStatistics"]

_ZERO_CHUNK = 1 << 20
_OPS = ("read", "write", "write_zeroes", "discard", "flush")
_now_ns = time.perf_counter_ns
#: outcomes of a request, for the statistics
_OK, _ERROR, _CANCELLED = 0, 1, 2
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class MapEntry:
    """One run of ``qemu-img map``: where ``[start, start + length)`` comes from.

    ``depth``: how many backing layers down the answer was found; ``present``: some layer allocates it;
    ``zero``/``data``: reads as zeroes / holds data; ``offset`` and ``filename``: the host location, when known.
    """

    start: int
    length: int
    depth: int
    present: bool
    zero: bool
    data: bool
    offset: int | None = None
    filename: str | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"start": self.start, "length": self.length, "depth": self.depth,
                               "present": self.present, "zero": self.zero, "data": self.data}
        if self.offset is not None:
            out["offset"] = self.offset
        return out

    def continues(self, prev: MapEntry) -> bool:
        """Whether this entry extends ``prev`` seamlessly (qemu-img map merges such runs)."""
        if (prev.start + prev.length != self.start or prev.depth != self.depth or prev.present != self.present
                or prev.zero != self.zero or prev.data != self.data or prev.filename != self.filename
                or (prev.offset is None) != (self.offset is None)):
            return False
        return self.offset is None or (prev.offset is not None and prev.offset + prev.length == self.offset)


@dataclass(frozen=True, slots=True)
class OpStatistics:
    """Counters of one request type: completed ops and their bytes and latency (nanoseconds), failures, and
    cancelled requests (counted apart: a cancellation is the caller's choice, not an error)."""

    ops: int = 0
    bytes: int = 0
    errors: int = 0
    total_ns: int = 0
    max_ns: int = 0
    cancelled: int = 0

    @property
    def mean_latency_ns(self) -> float:
        return self.total_ns / self.ops if self.ops else 0.0


@dataclass(frozen=True, slots=True)
class BackendStatistics:
    """An immutable snapshot of a backend's counters (``BlockBackend.statistics()``)."""

    read: OpStatistics
    write: OpStatistics
    write_zeroes: OpStatistics
    discard: OpStatistics
    flush: OpStatistics
    in_flight: int
    max_in_flight: int
    #: the root node's own counters (qcow2: metadata caches, the allocating-write queue, the metadata lock)
    driver: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class ImageInfo:
    """What ``qemu-img info`` shows about one image of a chain (``to_json`` gives its JSON keys)."""

    filename: str
    format: str
    virtual_size: int
    actual_size: int | None = None
    cluster_size: int | None = None
    backing_filename: str | None = None
    full_backing_filename: str | None = None
    backing_format: str | None = None
    dirty: bool = False
    format_specific: dict[str, Any] = field(default_factory=dict)
    snapshots: list[dict[str, Any]] = field(default_factory=list)
    backing: ImageInfo | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"snapshots": self.snapshots} if self.snapshots else {}
        out.update({"virtual-size": self.virtual_size, "filename": self.filename})
        if self.cluster_size is not None:
            out["cluster-size"] = self.cluster_size
        out["format"] = self.format
        if self.actual_size is not None:
            out["actual-size"] = self.actual_size
        if self.format_specific:
            out["format-specific"] = {"type": self.format, "data": self.format_specific}
        if self.backing_filename is not None:
            if self.full_backing_filename is not None:
                out["full-backing-filename"] = self.full_backing_filename
            out["backing-filename"] = self.backing_filename
            if self.backing_format is not None:
                out["backing-filename-format"] = self.backing_format
        out["dirty-flag"] = self.dirty
        return out

    def chain(self) -> list[ImageInfo]:
        """This image and its backing images, top first."""
        out: list[ImageInfo] = []
        info: ImageInfo | None = self
        while info is not None:
            out.append(info)
            info = info.backing
        return out


class BlockBackend:
    """A disk: the root node of a graph plus the generic request layer. Create with ``aioblock.open``.

    State: ``_in_flight``/``_idle`` (drain) and the statistics are touched
    only from the event loop, between awaits: no lock is needed.
    """

    def __init__(self, root: BlockDriver, *, read_only: bool) -> None:
        self.root = root
        self.filename = root.filename
        self.format = root.format_name
        self.read_only = read_only
        self._max = root.limits.max_transfer
        self._in_flight = 0
        self._max_in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._closing = False
        self._closed = False
        self._close_lock = asyncio.Lock()
        #: per op: ops, bytes, errors, total_ns, max_ns, cancelled (OpStatistics' fields)
        self._stats: dict[str, list[int]] = {op: [0, 0, 0, 0, 0, 0] for op in _OPS}

    # ---- properties -----------------------------------------------------------------------------------------

    @property
    def size(self) -> int:
        """Virtual size in bytes."""
        return self.root.size

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def cluster_size(self) -> int | None:
        """The format's allocation unit (None for formats without one, such as raw)."""
        return self.root.cluster_size

    @property
    def vm_state_offset(self) -> int:
        """Where the format keeps internal snapshots' VM state (qemu-io's ``info``; 0 if it has none)."""
        return self.root.vm_state_offset

    def statistics(self) -> BackendStatistics:
        ops = {op: OpStatistics(*values) for op, values in self._stats.items()}
        return BackendStatistics(**ops, in_flight=self._in_flight, max_in_flight=self._max_in_flight,
                                 driver=self.root.statistics())

    # ---- request bookkeeping --------------------------------------------------------------------------------

    def _begin(self, offset: int, length: int, *, write: bool) -> int:
        if self._closing:
            raise ClosedError("disk is closed", filename=self.filename)
        if write and self.read_only:
            raise ReadOnlyError("Block node is read-only", filename=self.filename)
        if offset < 0 or length < 0 or offset + length > self.root.size:
            raise OutOfRangeError(f"request {offset}+{length} is outside the image (size {self.root.size})",
                                  filename=self.filename)
        n = self._in_flight = self._in_flight + 1
        if n > self._max_in_flight:
            self._max_in_flight = n
        if n == 1:                                  # _idle is set exactly when nothing is in flight
            self._idle.clear()
        return _now_ns()

    def _end(self, op: str, nbytes: int, start_ns: int, outcome: int) -> None:
        s = self._stats[op]
        if outcome == _OK:
            elapsed = _now_ns() - start_ns
            s[0] += 1
            s[1] += nbytes
            s[3] += elapsed
            if elapsed > s[4]:
                s[4] = elapsed
        elif outcome == _ERROR:
            s[2] += 1
        else:
            s[5] += 1
        n = self._in_flight = self._in_flight - 1
        if not n:
            self._idle.set()

    async def _request(self, op: str, offset: int, length: int, write: bool,
                       fn: Callable[[], Awaitable[T]]) -> T:
        """Run one request ``fn()`` in a cancellation scope, with the bookkeeping (``read``/``write`` do the
        same inline: they are the hot path)."""
        t0 = self._begin(offset, length, write=write)
        scope, token = cancellation.enter()
        try:
            result = await fn()
        except BaseException as exc:
            self._end(op, length, t0, _CANCELLED if scope.cancelled or isinstance(exc, CancelledError) else _ERROR)
            cancellation.leave(scope, token)
            raise
        self._end(op, length, t0, _CANCELLED if scope.cancelled else _OK)
        cancellation.leave(scope, token)
        return result

    # ---- reads ----------------------------------------------------------------------------------------------

    async def read(self, offset: int, length: int) -> bytes:
        """Read ``length`` bytes at ``offset``."""
        if length < 0 or length > self.root.size:             # before allocating anything
            raise OutOfRangeError(f"request {offset}+{length} is outside the image (size {self.root.size})",
                                  filename=self.filename)
        buf = bytearray(length)
        await self.readinto(offset, buf)
        return bytes(buf)

    async def readinto(self, offset: int, buffer: Any) -> None:
        """Fill ``buffer`` (any writable bytes-like object) with the bytes at ``offset``."""
        buf = memoryview(buffer).cast("B")
        length = len(buf)
        t0 = self._begin(offset, length, write=False)
        try:
            if length <= self._max:                   # the common case, one frame less
                if length:
                    await self.root.pread(offset, buf)
            else:
                await self._split_read(offset, buf)
        except BaseException as exc:
            self._end("read", length, t0, _CANCELLED if isinstance(exc, CancelledError) else _ERROR)
            raise
        self._end("read", length, t0, _OK)

    async def _split_read(self, offset: int, buf: memoryview) -> None:
        if len(buf) <= self._max:
            await self.root.pread(offset, buf)
            return
        for pos in range(0, len(buf), self._max):
            await self.root.pread(offset + pos, buf[pos:pos + self._max])

    # ---- writes ---------------------------------------------------------------------------------------------

    async def write(self, offset: int, data: Any, *, fua: bool = False) -> None:
        """Write ``data`` (any bytes-like object) at ``offset``; with ``fua`` it is durable on return."""
        buf = memoryview(data).cast("B")
        length = len(buf)
        t0 = self._begin(offset, length, write=True)
        scope, token = cancellation.enter()
        try:
            if length <= self._max:                   # the common case, one frame less
                if length:
                    await self.root.pwrite(offset, buf, fua=fua)
            else:
                await self._split_write(offset, buf, fua)
        except BaseException as exc:
            self._end("write", length, t0, _CANCELLED if scope.cancelled or isinstance(exc, CancelledError)
                      else _ERROR)
            cancellation.leave(scope, token)
            raise
        self._end("write", length, t0, _CANCELLED if scope.cancelled else _OK)
        cancellation.leave(scope, token)

    async def _split_write(self, offset: int, buf: memoryview, fua: bool) -> None:
        if len(buf) <= self._max:
            await self.root.pwrite(offset, buf, fua=fua)
            return
        for pos in range(0, len(buf), self._max):
            await self.root.pwrite(offset + pos, buf[pos:pos + self._max], fua=fua)

    async def write_zeroes(self, offset: int, length: int, *, may_unmap: bool = False, fua: bool = False) -> None:
        """Make the range read as zeroes; with ``may_unmap`` it may also be deallocated."""
        async def run() -> None:
            try:
                await self.root.pwrite_zeroes(offset, length, may_unmap=may_unmap, fua=fua)
                return
            except NotSupportedError:
                pass
            zeroes = memoryview(bytes(min(length, _ZERO_CHUNK)))
            for pos in range(0, length, _ZERO_CHUNK):
                n = min(_ZERO_CHUNK, length - pos)
                await self.root.pwrite(offset + pos, zeroes[:n], fua=fua)
        await self._request("write_zeroes", offset, length, True, run)

    async def write_compressed(self, offset: int, data: Any) -> None:
        """Write whole clusters compressed (formats with compression only; NotSupportedError otherwise)."""
        buf = memoryview(data).cast("B")
        await self._request("write", offset, len(buf), True, lambda: self.root.pwrite_compressed(offset, buf))

    async def discard(self, offset: int, length: int) -> None:
        """Tell the image the range is unused. The whole range goes to the driver, which discards what its
        granularity allows (raw punches exactly these bytes, as QEMU's file protocol does)."""
        async def run() -> None:
            if length:
                await self.root.pdiscard(offset, length)
        await self._request("discard", offset, length, True, run)

    async def flush(self) -> None:
        """Make every write completed so far durable (data and metadata)."""
        if self.read_only:
            self._end("flush", 0, self._begin(0, 0, write=False), _OK)
            return
        await self._request("flush", 0, 0, False, self.root.flush)

    # ---- block status ---------------------------------------------------------------------------------------

    async def block_status(self, offset: int, length: int) -> MapEntry:
        """Where a prefix of ``[offset, offset + length)`` comes from, walking the backing chain the way
        ``qemu-img map`` does. The entry starts at ``offset`` and is at most ``length`` long."""
        if self._closing:
            raise ClosedError("disk is closed", filename=self.filename)
        if offset < 0 or length <= 0 or offset + length > self.size:
            raise OutOfRangeError(f"request {offset}+{length} is outside the image (size {self.size})",
                                  filename=self.filename)
        node, depth = self.root, 0
        while True:
            ext = await node.block_status(offset, length)
            length = ext.length
            if ext.data or ext.zero:
                host = ext.host
                return MapEntry(offset, length, depth, True, ext.zero, ext.data, ext.host_offset,
                                host.filename if host is not None and ext.host_offset is not None else None)
            if not node.supports_backing:
                return MapEntry(offset, length, depth, ext.allocated, False, False)
            backing = node.backing
            if backing is None or offset >= backing.size:         # reads as zeroes; a host offset if known
                host = ext.host
                return MapEntry(offset, length, depth, False, True, False, ext.host_offset,
                                host.filename if host is not None and ext.host_offset is not None else None)
            length = min(length, backing.size - offset)
            node, depth = backing, depth + 1

    async def map(self, offset: int = 0, length: int | None = None) -> AsyncIterator[MapEntry]:
        """Merged ``block_status`` runs covering the range (``qemu-img map``'s entries)."""
        end = self.size if length is None else offset + length
        if end == offset == 0:
            yield MapEntry(0, 0, 0, False, False, False)
            return
        prev: MapEntry | None = None
        pos = offset
        while pos < end:
            entry = await self.block_status(pos, end - pos)
            pos += entry.length
            if prev is not None and entry.continues(prev):
                prev = MapEntry(prev.start, prev.length + entry.length, prev.depth, prev.present, prev.zero,
                                prev.data, prev.offset, prev.filename)
                continue
            if prev is not None:
                yield prev
            prev = entry
        if prev is not None:
            yield prev

    # ---- control --------------------------------------------------------------------------------------------

    async def drain(self) -> None:
        """Wait until no request is in flight."""
        while self._in_flight:
            await self._idle.wait()

    async def truncate(self, size: int) -> None:
        """Change the virtual size (grow, or shrink where the format allows)."""
        if self._closing:
            raise ClosedError("disk is closed", filename=self.filename)
        if self.read_only:
            raise ReadOnlyError("Block node is read-only", filename=self.filename)
        if size < 0:
            raise OutOfRangeError(f"invalid size {size}", filename=self.filename)
        await self.drain()
        await self.root.truncate(size)

    def check_backing_file(self, name: str | None, fmt: str | None) -> str | None:
        """Raise if ``change_backing_file(name, fmt)`` would be refused (without changing anything: ``rebase``
        asks before it copies); returns the name as it would be stored (None for none)."""
        if self._closing:
            raise ClosedError("disk is closed", filename=self.filename)
        if self.read_only:
            raise ReadOnlyError("Block node is read-only", filename=self.filename)
        name = name or None
        if not self.root.supports_backing:
            raise NotSupportedError(f"Could not change the backing file to '{name or ''}': format '{self.format}' "
                                    "has no backing file", filename=self.filename)
        if name is None:
            return None
        if fmt is None:
            raise InvalidOptionError(f"Could not change the backing file to '{name}': backing format must be "
                                     "specified", filename=self.filename)
        if fmt not in QEMU_FORMAT_NAMES:
            raise InvalidOptionError(f"Invalid format name: '{fmt}'", filename=self.filename)
        try:
            self.root.check_backing_file(name, fmt)
        except AioblockError as exc:
            raise exc.with_filename(self.filename) from None
        return name

    async def change_backing_file(self, name: str | None, fmt: str | None) -> None:
        """Store a new backing file reference in the image (``name`` None or "": none), as ``qemu-img rebase
        -u`` does: the data is not touched and the backing node opened with the disk stays attached until it is
        closed. ``fmt`` is required with a name (QEMU 7.2 refuses to probe a backing file's format) and must be
        a format name QEMU knows."""
        name = self.check_backing_file(name, fmt)
        await self.drain()
        await self.root.change_backing_file(name, fmt if name is not None else None)

    async def info(self) -> ImageInfo:
        """qemu-img info's facts about this image and, in ``.backing``, its backing chain."""
        return await _node_info(self.root)

    async def check(self, repair: str | None = None) -> CheckResult:
        """Check (and repair with ``repair="leaks"`` or ``"all"``) the image; NotSupportedError for formats
        without a check (qemu-img exits 63 for those)."""
        if repair not in (None, "leaks", "all"):
            raise ValueError(f"repair must be None, 'leaks' or 'all', not {repair!r}")
        await self.drain()
        result = await self.root.check(repair)
        result.filename = result.filename or self.filename
        result.format = result.format or self.format
        return result

    async def close(self) -> None:
        """Drain, flush and close every node. Idempotent; closes even when the final flush fails (then that
        error is raised). New requests are refused from the start.

        Cancellation: cancelled while requests are still in flight, it raises and the disk stays open (and
        accepts requests again): close it again later. Once they have drained, the flush and the closing of
        the nodes run to their end and the cancellation is raised afterwards."""
        async with self._close_lock:
            if self._closed:
                return
            self._closing = True
            try:
                await self.drain()
            except BaseException:
                self._closing = False
                raise
            scope, token = cancellation.enter()
            scope.committed = True
            try:
                await close_graph(self.root)
            finally:
                self._closed = True
                cancellation.leave(scope, token)

    def __del__(self) -> None:
        if not getattr(self, "_closed", True):
            warnings.warn(f"disk {self.filename!r} was never closed: writes the format driver still caches "
                          "may be lost", ResourceWarning, source=self, stacklevel=1)

    async def __aenter__(self) -> BlockBackend:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    def __repr__(self) -> str:
        return f"<BlockBackend {self.format} {self.filename!r} size={self.size}>"


async def _node_info(node: BlockDriver) -> ImageInfo:
    full = None
    if node.backing_filename is not None:
        try:
            full = resolve_backing_name(node.filename, node.backing_filename)
        except Exception:
            full = None
    info = ImageInfo(filename=node.filename, format=node.format_name, virtual_size=node.size,
                     actual_size=await node.actual_size(), cluster_size=node.cluster_size,
                     backing_filename=node.backing_filename, full_backing_filename=full,
                     backing_format=node.backing_format, dirty=node.dirty, format_specific=node.info(),
                     snapshots=node.snapshot_info())
    if node.backing is not None:
        info.backing = await _node_info(node.backing)
    return info

