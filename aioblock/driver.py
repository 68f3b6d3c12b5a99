"""The driver interface: what a format or protocol node must do (QEMU's ``BlockDriver`` table).

An opened driver *is* a node of the graph: it has a ``file`` child (the node its bytes live in; ``None`` for a
protocol node such as :class:`aioblock.io.file.FileNode`) and, for formats with backing files, a ``backing``
child (another format node, attached by :mod:`aioblock.node` after ``open``).

Two kinds of callers:

* **Control path** (``open``, ``create``, ``close``, ``truncate``, ``check``, ``info``): called by the node graph
  and the public API, never concurrently for one node, and never while I/O is in flight on it except
  ``truncate`` (the backend drains first).
* **I/O path** (``pread``, ``pwrite``, ``pwrite_zeroes``, ``pdiscard``, ``flush``, ``block_status``):
  called by :class:`aioblock.backend.BlockBackend` or by a parent node, concurrently. The backend guarantees that
  every request lies inside the node (``0 <= offset``, ``offset + length <= size``) and is no longer than
  ``limits.max_transfer``; a parent node calling a child directly must keep the same promises. No alignment
  is required anywhere: the file node aligns O_DIRECT requests itself.

Buffers are single ``memoryview`` objects: every frontend (Python API, NBD, ublk) carries one buffer per
request, so a vector type would only add copies and slicing code. (DESIGN.md's ``preadv``/``pwritev`` are
``pread``/``pwrite`` here.)

Cancellation (:mod:`aioblock.cancellation`): a driver's request paths wait only through that module's
primitives (its ``Lock``, ``wait``, ``wait_event``) and the engines, so that a request cancelled before it
changed anything raises at once, and a committed one runs to its end; metadata is never left half updated.
"""

from __future__ import annotations

import abc
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Self

from .errors import NotSupportedError, ReadOnlyError

__all__ = ["BlockDriver", "CheckResult", "Extent", "Limits", "RepairMode", "read_backing"]

#: Largest single request a node accepts unless it says otherwise (QEMU: BDRV_REQUEST_MAX_BYTES, ~2 GiB).
MAX_REQUEST = (1 << 31) - (1 << 16)


@dataclass(frozen=True, slots=True)
class Limits:
    """Request limits of a node, fixed at open.

    Every node accepts requests of any offset and length (the file node does the read-modify-write that
    O_DIRECT needs, for every node above it). ``opt_alignment``: requests aligned to this avoid that
    read-modify-write (O_DIRECT's block size; 1 when nothing is gained). ``max_transfer``: the largest
    request; the backend splits bigger ones.
    """

    opt_alignment: int = 1
    max_transfer: int = MAX_REQUEST

    def __post_init__(self) -> None:
        a = self.opt_alignment
        if a < 1 or a & (a - 1):
            raise ValueError(f"opt_alignment must be a power of two, not {a}")
        if self.max_transfer < 1:
            raise ValueError("max_transfer must be positive")


@dataclass(frozen=True, slots=True)
class Extent:
    """Block status of ``[offset, offset + length)`` at one layer (QEMU's ``bdrv_co_block_status``).

    ``allocated``: this layer decides what the range reads as; when False, the caller asks the backing node
    (or reads zeroes when there is none). ``data`` / ``zero``: the range holds data / is known to read as
    zeroes (both may be False: unknown). ``host`` and ``host_offset``: the protocol node and byte offset where
    the bytes live, when known (what ``qemu-img map`` prints as "Mapped to" and "File").
    """

    offset: int
    length: int
    allocated: bool
    data: bool
    zero: bool
    host_offset: int | None = None
    host: BlockDriver | None = None


class RepairMode:
    """What ``check`` may repair: nothing, leaked clusters only, or everything (qemu-img ``-r``)."""

    NONE = None
    LEAKS = "leaks"
    ALL = "all"


@dataclass(slots=True)
class CheckResult:
    """Outcome of a consistency check, with qemu-img check's counters (its JSON keys, hyphenated)."""

    filename: str = ""
    format: str = ""
    check_errors: int = 0
    corruptions: int = 0
    leaks: int = 0
    corruptions_fixed: int = 0
    leaks_fixed: int = 0
    image_end_offset: int | None = None
    total_clusters: int | None = None
    allocated_clusters: int | None = None
    fragmented_clusters: int | None = None
    compressed_clusters: int | None = None
    #: What the check reports on the way (qemu-img prints these on stderr).
    messages: list[str] = field(default_factory=list)
    #: Set when the check could not complete (qemu-img: "Check failed: <reason>", exit 1, no report).
    failed: str | None = None

    @property
    def exit_status(self) -> int:
        """qemu-img check's exit status: 1 check failed, 2 corruptions, 3 leaks only, 0 clean."""
        if self.check_errors or self.failed:
            return 1
        if self.corruptions:
            return 2
        if self.leaks:
            return 3
        return 0

    def to_json(self) -> dict[str, Any]:
        """The JSON object of ``qemu-img check --output=json``: counters appear only when non-zero."""
        out: dict[str, Any] = {}
        for key in ("image_end_offset", "total_clusters", "allocated_clusters", "fragmented_clusters",
                    "compressed_clusters"):
            value = getattr(self, key)
            if value is not None:
                out[key.replace("_", "-")] = value
        out["filename"] = self.filename
        out["format"] = self.format
        out["check-errors"] = self.check_errors
        for key in ("corruptions", "leaks", "corruptions_fixed", "leaks_fixed"):
            if getattr(self, key):
                out[key.replace("_", "-")] = getattr(self, key)
        return out


class BlockDriver(abc.ABC):
    """A node of the graph: one opened format or protocol driver.

    Class attributes are capabilities, fixed at class creation. Instance attributes ``file``, ``backing``,
    ``filename``, ``read_only`` and ``limits`` are set at open and read-only afterwards (no lock needed);
    ``backing`` is attached once by the node graph right after ``open``.
    """

    format_name: ClassVar[str]
    is_format: ClassVar[bool] = True
    supports_backing: ClassVar[bool] = False
    supports_compression: ClassVar[bool] = False
    has_check: ClassVar[bool] = False
    #: Options the driver accepts in ``open(options=...)``; others are refused by the node graph.
    open_options: ClassVar[frozenset[str]] = frozenset()
    #: Options ``create`` accepts (``qemu-img create -o``).
    create_options: ClassVar[frozenset[str]] = frozenset()

    filename: str
    read_only: bool
    file: BlockDriver | None = None
    backing: BlockDriver | None = None
    #: Backing file name and format as stored in the image (format drivers that support backing).
    backing_filename: str | None = None
    backing_format: str | None = None
    limits: Limits = Limits()

    # ---- control path -------------------------------------------------------------------------------------

    @classmethod
    def probe(cls, head: bytes, filename: str) -> int:
        """Pure: how sure (0..100) the driver is that an image starting with ``head`` is its format."""
        return 0

    @classmethod
    async def open(cls, file: BlockDriver, *, read_only: bool, options: Mapping[str, Any]) -> Self:
        """Open a format node on top of ``file``; validate every header field before using it.

        Raises ImageFormatError / UnsupportedFeatureError / ImageTooLargeError for bad images.
        """
        raise NotSupportedError(f"'{cls.format_name}' cannot be opened as a format")

    @classmethod
    async def create(cls, file: BlockDriver, size: int, *, backing: str | None, backing_fmt: str | None,
                     options: Mapping[str, str]) -> None:
        """Write a new, empty image of ``size`` bytes into the (empty, writable) protocol node ``file``."""
        raise NotSupportedError(f"format '{cls.format_name}' does not support image creation")

    @classmethod
    async def open_for_check(cls, file: BlockDriver, *, read_only: bool, options: Mapping[str, Any]) -> Self:
        """Open for ``check`` (QEMU's BDRV_O_CHECK): like ``open``, but a driver may accept damage that its check
        reports or repairs, and must not repair anything at open. The default is ``open``."""
        return await cls.open(file, read_only=read_only, options=options)

    async def close(self) -> None:
        """Flush what the driver caches and release its resources; children are closed by the graph.

        Idempotent. Closes even when the final flush fails (then that error is raised)."""

    @property
    @abc.abstractmethod
    def size(self) -> int:
        """Virtual size in bytes."""

    async def truncate(self, size: int) -> None:
        """Change the virtual size. The backend has drained the node first."""
        raise NotSupportedError(f"format '{self.format_name}' does not support resizing")

    def check_backing_file(self, name: str, fmt: str) -> None:
        """Raise if the image cannot store this backing file reference (name too long for the header...);
        changes nothing. Formats with ``supports_backing`` override it."""
        raise NotSupportedError(f"format '{self.format_name}' has no backing file")

    async def change_backing_file(self, name: str | None, fmt: str | None) -> None:
        """Rewrite the backing file name and format the image stores (``name`` None: no backing file), durably
        (synced). Only the stored reference changes: ``backing``, the opened node, stays as it was (``rebase``
        copies what differs first). The backend has drained the node and checked the pair first."""
        raise NotSupportedError(f"format '{self.format_name}' has no backing file")

    async def check(self, repair: str | None = None) -> CheckResult:
        """Check (and with ``repair`` = "leaks" / "all", repair) the image's consistency."""
        raise NotSupportedError("This image format does not support checks")

    def info(self) -> dict[str, Any]:
        """Format-specific information (qemu-img info's ``format-specific.data``); empty if none."""
        return {}

    def snapshot_info(self) -> list[dict[str, Any]]:
        """Internal snapshots, as qemu-img info's JSON ``snapshots`` entries (empty if the format has none)."""
        return []

    @property
    def cluster_size(self) -> int | None:
        """The format's allocation unit in bytes, if it has one (qemu-img info's cluster-size)."""
        return None

    @property
    def dirty(self) -> bool:
        """Whether the image is marked dirty on disk (qemu-img info's dirty-flag)."""
        return False

    @property
    def vm_state_offset(self) -> int:
        """Where internal snapshots' VM state is kept, in guest offsets (qemu-io's ``info``); 0 if nowhere."""
        return 0

    def statistics(self) -> dict[str, Any]:
        """The node's own counters (metadata caches, allocations, locks), as plain data, with its file node's
        under ``"file"`` (the I/O engine's). Drivers with counters of their own extend this dict."""
        return {"file": self.file.statistics()} if self.file is not None else {}

    async def actual_size(self) -> int | None:
        """Bytes the image uses on the host (qemu-img info's actual-size)."""
        return await self.file.actual_size() if self.file is not None else None

    def event(self, name: str) -> None:
        """Announce a named event (``l2_update``, ``cluster_alloc``...) to the fault-injection node, if any.

        Drivers call ``self.file.event(...)`` right before the I/O the event names (QEMU's BLKDBG_EVENT);
        nodes other than the fault-injection filter pass it down."""
        if self.file is not None:
            self.file.event(name)

    # ---- I/O path -----------------------------------------------------------------------------------------

    @abc.abstractmethod
    async def pread(self, offset: int, buf: memoryview) -> None:
        """Fill ``buf`` with the bytes at ``offset``."""

    async def pwrite(self, offset: int, buf: memoryview, *, fua: bool = False) -> None:
        """Write ``buf`` at ``offset``; with ``fua`` the data is durable when this returns."""
        raise ReadOnlyError("Block node is read-only")

    async def pwrite_zeroes(self, offset: int, length: int, *, may_unmap: bool = False,
                            fua: bool = False) -> None:
        """Make the range read as zeroes, deallocating it where ``may_unmap`` allows.

        Optional: NotSupportedError makes the backend write zeroed buffers instead."""
        raise NotSupportedError("write zeroes not supported")

    async def pwrite_compressed(self, offset: int, buf: memoryview) -> None:
        """Write whole clusters compressed (``write -c``); only formats with compression."""
        raise NotSupportedError(os.strerror(95))

    async def pdiscard(self, offset: int, length: int) -> None:
        """Hint that the range is unused. May do nothing; never fails for lack of support."""

    async def flush(self) -> None:
        """Make every completed write (data and metadata) durable."""

    @abc.abstractmethod
    async def block_status(self, offset: int, length: int) -> Extent:
        """Status of a prefix of the range at this layer only: ``allocated=False`` sends the caller to the
        backing node. The returned extent starts at ``offset`` and is at most ``length`` bytes long."""

    def children(self) -> list[BlockDriver]:
        """Child nodes, ``file`` first (closing order is parent before children)."""
        return [c for c in (self.file, self.backing) if c is not None]

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.format_name} {self.filename!r}>"


async def read_backing(backing: BlockDriver | None, offset: int, view: memoryview) -> None:
    """A format node's backing file's bytes at ``offset``: zeroes past its end, or without one."""
    n = len(view)
    if backing is None or offset >= backing.size:
        view[:] = bytes(n)
        return
    m = min(n, backing.size - offset)
    await backing.pread(offset, view[:m])
    if m < n:
        view[m:] = bytes(n - m)
