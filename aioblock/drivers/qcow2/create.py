"""Creating a new qcow2 image (``qemu-img create -f qcow2``), laid out exactly as QEMU 7.2 lays it out.

``create_image`` validates every option first (QEMU 7.2's messages, in QEMU's order of checks), then plans the
whole image in memory (``plan_image``: pure, no I/O) and finally writes it.

Layout (observed on qemu-img 7.2; the module reproduces it cluster for cluster, and byte for byte):

* cluster 0: the header. v3: 112 bytes (the compression-type byte at 104), then the header extensions: backing
  format (when given), the feature-name table (only with clusters larger than 4 KiB), the end marker, then the
  backing file name. v2: 72 bytes, then the same extensions except the feature table.
* cluster 1: the refcount table (one cluster); cluster 2: the first refcount block.
* the L1 table from cluster 3, ``size_to_l1`` entries. The file ends at ``l1_offset + 8 * l1_size``: the table is
  not padded to a whole cluster. A zero-sized image has no L1 table (offset 0) and is three clusters long.
* When allocating the L1 table (or preallocated metadata) needs more refcount blocks, or a bigger refcount
  table, they go where QEMU's allocator puts them. Allocation is first fit from a free-cluster index that only
  moves forward (except when clusters are freed); a missing refcount block is allocated at the first free
  cluster after what is being allocated, and the allocation then starts over from its first cluster (so the
  data may end up on either side of the new block). A refcount table that is too small is replaced by one of
  1.5 times the needed size (rounded up to whole clusters), placed with the new refcount blocks that describe
  it at the start of the first refcount-block range past everything allocated; the old table's clusters are
  freed and their bytes stay in the file. ``_Allocator`` models exactly this.
* ``preallocation=metadata``: for each L2 table in guest order, the L2 table (one cluster) then its data
  clusters, contiguous, allocated in requests of at most INT_MAX bytes (matters from 128 KiB clusters on).
  Data clusters are not written (they stay holes) except for the part of the last (sub)cluster past the end
  of the image, which is written with zeroes; the file ends at the end of that (sub)cluster.
* ``preallocation=falloc|full``: a refcount area (new refcount blocks + a new, exactly sized refcount table)
  right after the last cluster in use covers everything that follows; then all data clusters, contiguous;
  then the L2 tables, the first one in the freed cluster of the old refcount table, the others after the
  data. The data area is fallocated (falloc) or written with zeroes (full).

Every L2 entry of a preallocated cluster has the COPIED flag (extended L2: empty subcluster bitmaps), every L1
entry too. All metadata clusters have refcount 1.
"""

from __future__ import annotations

import bisect
import os
import re
import struct
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

from ...driver import BlockDriver
from ...errors import ImageTooLargeError, InvalidOptionError, NotSupportedError
from ...sizes import parse_size
from .. import QEMU_FORMAT_NAMES
from .layout import (
    COMPAT_LAZY_REFCOUNTS,
    COMPRESSION_ZLIB,
    COMPRESSION_ZSTD,
    EXT_BACKING_FORMAT,
    EXT_FEATURE_TABLE,
    FEATURE_NAMES,
    INCOMPAT_COMPRESSION,
    INCOMPAT_EXTL2,
    MAX_BACKING_NAME,
    MAX_CLUSTER_BITS,
    MAX_L1_BYTES,
    MAX_REFTABLE_BYTES,
    MIN_CLUSTER_BITS,
    OFLAG_COPIED,
    SUBCLUSTERS,
    V2_HEADER_LENGTH,
    V3_HEADER_WRITE_LENGTH,
    Header,
    l2_entry_size,
    set_refcount,
    size_to_l1,
)

__all__ = ["CREATE_OPTIONS", "CreateOptions", "ImagePlan", "create_image", "parse_create_options",
           "plan_image"]

#: The ``-o`` options ``create_image`` understands (``backing_file``/``backing_fmt`` may also come as arguments).
CREATE_OPTIONS = frozenset({"compat", "cluster_size", "refcount_bits", "lazy_refcounts", "compression_type",
                            "extended_l2", "preallocation", "backing_file", "backing_fmt"})

_COMPAT = {"0.10": 2, "v2": 2, "1.1": 3, "v3": 3}
_PREALLOC = ("off", "metadata", "falloc", "full")
_COMPRESSION = {"zlib": COMPRESSION_ZLIB, "zstd": COMPRESSION_ZSTD}
_BOOL = {"on": True, "yes": True, "true": True, "y": True, "off": False, "no": False, "false": False, "n": False}

_MAX_BACKING_FMT = 15                      # the header extension must be shorter than 16 bytes to be readable

#: QEMU's generic limit on a node's length (INT64_MAX aligned down to 1 GiB).
_MAX_LENGTH = (1 << 63) - (1 << 30)
#: Only clusters larger than this carry the feature-name table (observed: 4 KiB clusters have none).
_FEATURE_TABLE_MIN_CLUSTER = 4096 + 1

_HEX = re.compile(r"[ \t\n\v\f\r]*0[xX][0-9a-fA-F]+\Z")
_NUMBER = re.compile(r"[ \t\n\v\f\r]*([+-]?)(0[xX][0-9a-fA-F]+|0[0-7]*|[1-9][0-9]*)\Z")


def _err(msg: str) -> InvalidOptionError:
    return InvalidOptionError(msg)


# ---- options ------------------------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class CreateOptions:
    """Validated creation parameters."""

    size: int
    version: int = 3
    cluster_bits: int = 16
    refcount_order: int = 4
    lazy_refcounts: bool = False
    compression_type: int = COMPRESSION_ZLIB
    extended_l2: bool = False
    preallocation: str = "off"
    backing_file: str | None = None
    backing_format: str | None = None


def _parse_cluster_size(text: str) -> int:
    """A QemuOpts size: decimal (fractions allowed) with an optional k/M/G/T/P/E suffix, or hexadecimal."""
    try:
        if _HEX.match(text):
            return int(text, 16)
        if text != text.rstrip():
            raise InvalidOptionError(text)
        return parse_size(text)
    except InvalidOptionError as exc:
        if "too large" in exc.message:
            raise _err(f"Value '{text}' is out of range for parameter 'cluster_size'") from None
        raise _err("Parameter 'cluster_size' expects a non-negative number below 2^64\n"
                   "Optional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-\n"
                   "and exabytes, respectively.") from None


def _parse_number(text: str, name: str) -> tuple[int, int]:
    """A QemuOpts number (C ``strtoull``, base 0): (its unsigned 64-bit value, its value read as signed)."""
    m = _NUMBER.match(text)
    if not m:
        raise _err(f"Parameter '{name}' expects a number")
    sign, digits = m.groups()
    if digits[:2] in ("0x", "0X"):
        value = int(digits, 16)
    elif len(digits) > 1 and digits[0] == "0":
        value = int(digits, 8)
    else:
        value = int(digits)
    if value >= 1 << 64:
        raise _err(f"Value '{text}' is too large for parameter '{name}'")
    signed = -value if sign == "-" else value
    return signed % (1 << 64), signed


def _parse_bool(text: str, name: str) -> bool:
    try:
        return _BOOL[text]
    except KeyError:
        raise _err(f"Parameter '{name}' expects 'on' or 'off'") from None


def parse_create_options(size: int, backing: str | None, backing_fmt: str | None,
                         options: Mapping[str, str]) -> CreateOptions:
    """Validate everything before anything is written, with QEMU 7.2's messages and in its order: the typed
    options in the order given, the enumerations, then the combinations, then the size and the backing name.
    Raises InvalidOptionError."""
    unknown = sorted(set(options) - CREATE_OPTIONS)
    if unknown:
        raise _err(f"Invalid parameter '{unknown[0]}'")
    if backing is None:
        backing = options.get("backing_file")
    if backing_fmt is None:
        backing_fmt = options.get("backing_fmt")

    # 1. typed options (QemuOpts), in the caller's order
    cluster_size = 1 << 16
    refcount_text: str | None = None
    lazy = extended = False
    for key, value in options.items():
        if key == "cluster_size":
            cluster_size = _parse_cluster_size(value)
        elif key == "refcount_bits":
            _parse_number(value, "refcount_bits")
            refcount_text = value
        elif key == "lazy_refcounts":
            lazy = _parse_bool(value, "lazy_refcounts")
        elif key == "extended_l2":
            extended = _parse_bool(value, "extended_l2")
    if backing == "":
        raise _err("Expected backing file name, got empty string")

    # 2. enumerations and integers (QAPI), in the order of QEMU's BlockdevCreateOptionsQcow2
    compat = options.get("compat", "1.1")
    if compat not in _COMPAT:
        raise _err(f"Parameter 'version' does not accept value '{compat}'")
    version = _COMPAT[compat]
    if backing_fmt is not None and (backing_fmt not in QEMU_FORMAT_NAMES or len(backing_fmt) > _MAX_BACKING_FMT):
        raise _err(f"Parameter 'backing-fmt' does not accept value '{backing_fmt}'")
    prealloc = options.get("preallocation", "off")
    if prealloc not in _PREALLOC:
        raise _err(f"Parameter 'preallocation' does not accept value '{prealloc}'")
    refcount_bits = 16
    if refcount_text is not None:
        _, refcount_bits = _parse_number(refcount_text, "refcount_bits")
        if not -(1 << 63) <= refcount_bits < 1 << 63:
            raise _err("Parameter 'refcount-bits' expects integer")
    compression = options.get("compression_type", "zlib")
    if compression not in _COMPRESSION:
        raise _err(f"Parameter 'compression-type' does not accept value '{compression}'")

    # 3. combinations
    if size < 0 or size % 512:
        raise _err("Image size must be a multiple of 512 bytes")
    if (cluster_size & (cluster_size - 1) or
            not 1 << MIN_CLUSTER_BITS <= cluster_size <= 1 << MAX_CLUSTER_BITS):
        raise _err("Cluster size must be a power of two between 512 and 2048k")
    cluster_bits = cluster_size.bit_length() - 1
    if extended:
        if version < 3:
            raise _err("Extended L2 entries are only supported with compatibility level 1.1 and above "
                       "(use version=v3 or greater)")
        if cluster_size < 16384:
            raise _err("Extended L2 entries are only supported with cluster sizes of at least 16384 bytes")
    if backing_fmt is not None and backing is None:
        raise _err("Backing format cannot be used without backing file")
    if backing is not None and prealloc != "off" and not extended:
        raise _err("Backing file and preallocation can only be used at the same time if extended_l2 is on")
    if lazy and version < 3:
        raise _err("Lazy refcounts only supported with compatibility level 1.1 and above "
                   "(use version=v3 or greater)")
    if refcount_bits <= 0 or refcount_bits > 64 or refcount_bits & (refcount_bits - 1):
        raise _err("Refcount width must be a power of two and may not exceed 64 bits")
    if version < 3 and refcount_bits != 16:
        raise _err("Different refcount widths than 16 bits require compatibility level 1.1 or above "
                   "(use version=v3 or greater)")
    if version < 3 and compression != "zlib":
        raise _err("Non-zlib compression type is only supported with compatibility level 1.1 and above "
                   "(use version=v3 or greater)")

    # 4. the size (QEMU checks it when it grows the new image to its size)
    if size > _MAX_LENGTH:
        raise _err(f"Could not resize image: offset({size}) exceeds maximum({_MAX_LENGTH})")
    if size_to_l1(size, cluster_bits, extended) > MAX_L1_BYTES // 8:
        raise _err("The image size is too large for file format 'qcow2' (try using a larger cluster size)")

    opts = CreateOptions(size=size, version=version, cluster_bits=cluster_bits,
                         refcount_order=refcount_bits.bit_length() - 1, lazy_refcounts=lazy,
                         compression_type=_COMPRESSION[compression], extended_l2=extended,
                         preallocation=prealloc, backing_file=backing, backing_format=backing_fmt)

    # 5. the backing file name (QEMU records it last)
    if backing is not None:
        name = backing.encode("utf-8", "surrogateescape")
        why = None
        if len(name) > MAX_BACKING_NAME:
            why = "Invalid argument"
        elif len(_header_cluster_bytes(_header(opts))) > cluster_size:
            why = "No space left on device"
        if why:
            raise _err(f"Could not assign backing file '{backing}' with format '{backing_fmt or ''}': {why}")
    return opts


# ---- the header cluster -------------------------------------------------------------------------------------

def _header(opts: CreateOptions) -> Header:
    incompat = 0
    if opts.compression_type != COMPRESSION_ZLIB:
        incompat |= INCOMPAT_COMPRESSION
    if opts.extended_l2:
        incompat |= INCOMPAT_EXTL2
    return Header(version=opts.version, cluster_bits=opts.cluster_bits, size=opts.size,
                  incompatible_features=incompat,
                  compatible_features=COMPAT_LAZY_REFCOUNTS if opts.lazy_refcounts else 0,
                  refcount_order=opts.refcount_order,
                  header_length=V3_HEADER_WRITE_LENGTH if opts.version >= 3 else V2_HEADER_LENGTH,
                  compression_type=opts.compression_type, backing_file=opts.backing_file,
                  backing_format=opts.backing_format)


def _extension(ext_type: int, data: bytes) -> bytes:
    return struct.pack(">II", ext_type, len(data)) + data + bytes(-len(data) % 8)


def _header_cluster_bytes(hdr: Header) -> bytes:
    """Header, extensions and backing file name as QEMU writes them on creation (v2 included: it gets the
    backing-format extension and the end marker too). Sets ``backing_file_offset``/``backing_file_size``."""
    exts = b""
    if hdr.backing_format:
        exts += _extension(EXT_BACKING_FORMAT, hdr.backing_format.encode())
    if hdr.version >= 3 and hdr.cluster_size >= _FEATURE_TABLE_MIN_CLUSTER:
        exts += _extension(EXT_FEATURE_TABLE, b"".join(
            bytes([kind, bit]) + name.encode().ljust(46, b"\0") for (kind, bit), name in sorted(FEATURE_NAMES.items())))
    exts += bytes(8)                                        # end of the extensions
    name = (hdr.backing_file or "").encode("utf-8", "surrogateescape")
    fixed_len = V2_HEADER_LENGTH if hdr.version < 3 else hdr.header_length
    hdr.backing_file_offset = fixed_len + len(exts) if name else 0
    hdr.backing_file_size = len(name)
    return hdr.pack_fixed() + exts + name


# ---- the allocator model ------------------------------------------------------------------------------------

class _Runs:
    """A set of clusters kept as sorted, disjoint, non-touching runs ``[start, end)``."""

    def __init__(self) -> None:
        self.starts: list[int] = []
        self.ends: list[int] = []

    def add(self, start: int, end: int) -> None:
        if start >= end:
            return
        i = bisect.bisect_left(self.ends, start)            # first run that ends at or after start
        j = bisect.bisect_right(self.starts, end)           # runs [i, j) touch or overlap [start, end)
        if i < j:
            start = min(start, self.starts[i])
            end = max(end, self.ends[j - 1])
        self.starts[i:j] = [start]
        self.ends[i:j] = [end]

    def remove(self, start: int, end: int) -> None:
        i = bisect.bisect_right(self.ends, start)
        j = bisect.bisect_left(self.starts, end)
        if i >= j:
            return
        keep_s: list[int] = []
        keep_e: list[int] = []
        if self.starts[i] < start:
            keep_s.append(self.starts[i])
            keep_e.append(start)
        if self.ends[j - 1] > end:
            keep_s.append(end)
            keep_e.append(self.ends[j - 1])
        self.starts[i:j] = keep_s
        self.ends[i:j] = keep_e

    def find_free(self, start: int, n: int) -> int:
        """The first cluster ``c >= start`` with ``[c, c + n)`` free."""
        c = start
        i = bisect.bisect_right(self.starts, c) - 1
        if i >= 0 and self.ends[i] > c:
            c = self.ends[i]
        i += 1
        while i < len(self.starts) and self.starts[i] - c < n:
            c = self.ends[i]
            i += 1
        return c

    @property
    def end(self) -> int:
        """One past the last cluster in the set (0 when empty)."""
        return self.ends[-1] if self.ends else 0

    def overlapping(self, start: int, end: int) -> Iterator[tuple[int, int]]:
        i = bisect.bisect_right(self.ends, start)
        while i < len(self.starts) and self.starts[i] < end:
            yield max(self.starts[i], start), min(self.ends[i], end)
            i += 1


class _Restart(Exception):
    """A refcount block or table was created: the allocation starts over (QEMU's -EAGAIN)."""


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _refblocks_needed(clusters: int, per_block: int, per_table_cluster: int, generous: bool) -> int:
    """Refcount blocks needed to cover ``clusters`` clusters plus the refcount structures themselves (the
    fixed point of blocks and table clusters); ``generous`` adds room for half the table again, once."""
    blocks = table = 0
    previous = -1
    while True:
        blocks = _ceil_div(clusters + table + blocks, per_block)
        table = _ceil_div(blocks, per_table_cluster)
        total = clusters + blocks + table
        if total == previous:
            if not generous:
                return blocks
            clusters += _ceil_div(table, 2)
            generous = False
            previous = -1
        else:
            previous = total


class _Allocator:
    """QEMU's cluster allocation on a new image, simulated: first fit from a moving free-cluster index,
    refcount blocks created on demand, the refcount table grown when too small. Every allocated cluster has
    refcount 1, so the state is the set of used clusters plus the refcount table."""

    def __init__(self, cluster_bits: int, refcount_order: int) -> None:
        self.cluster_size = 1 << cluster_bits
        self.per_block = (self.cluster_size * 8) >> refcount_order     # refcounts per refcount block
        self.per_table_cluster = self.cluster_size // 8                # reftable entries per cluster
        self.used = _Runs()
        self.used.add(0, 3)                                             # header, reftable, first refblock
        self.table: dict[int, int] = {0: 2}                             # reftable index -> refblock cluster
        self.table_size = self.per_table_cluster                        # entries
        self.table_start = 1
        self.free_index = 3
        #: (byte offset, bytes) of refcount tables that were freed: their bytes stay in the file
        self.stale: list[tuple[int, bytes]] = []

    def alloc(self, n: int) -> int:
        """Allocate ``n`` contiguous clusters; returns the first (a cluster index)."""
        while True:
            start = self.used.find_free(self.free_index, n)
            self.free_index = start + n
            try:
                self._take(start, n)
            except _Restart:
                continue
            return start

    def alloc_at(self, start: int, n: int) -> None:
        """Allocate ``[start, start + n)``, known to be free and covered by refcount blocks."""
        self._take(start, n)

    def _take(self, start: int, n: int) -> None:
        end = start + n
        c = start
        while c < end:
            try:
                self._ensure_block(c)
            except _Restart:                     # the search starts over from these clusters
                self.free_index = min(self.free_index, start)
                raise
            c = (c // self.per_block + 1) * self.per_block
        self.used.add(start, end)

    def _ensure_block(self, cluster: int) -> None:
        index = cluster // self.per_block
        if index < self.table_size and index in self.table:
            return
        block = self.used.find_free(self.free_index, 1)
        self.free_index = block + 1
        if block // self.per_block == index:
            self.used.add(block, block + 1)      # it describes itself
        else:
            self._take(block, 1)                 # may restart: the block then stays free
        if index < self.table_size:
            self.table[index] = block
            raise _Restart
        covered = _ceil_div(max(cluster + 1, block + 1), self.per_block)
        self.refcount_area(covered * self.per_block, 0, exact=False, new_index=index, new_block=block)
        raise _Restart

    def refcount_area(self, start: int, additional: int, *, exact: bool, new_index: int = 0,
                      new_block: int = 0) -> int:
        """Put new refcount blocks and a new refcount table at cluster ``start`` so that everything up to
        ``start + additional`` clusters (and the area itself) is covered; frees the old table. Returns the
        first cluster after the area."""
        total = _refblocks_needed(start + additional, self.per_block, self.per_table_cluster, not exact)
        size = total if exact else total + _ceil_div(total, 2)
        size = _ceil_div(size, self.per_table_cluster) * self.per_table_cluster
        table = {i: b for i, b in self.table.items() if i < size}
        if new_block:
            table[new_index] = new_block
        block = start
        for i in range(start // self.per_block, total):
            if i not in table:
                table[i] = block
                block += 1
        end = block + size // self.per_table_cluster
        self.used.add(start, end)
        old_start, old_clusters = self.table_start, self.table_size // self.per_table_cluster
        self.stale.append((old_start * self.cluster_size, self.table_bytes()))
        self.table, self.table_size, self.table_start = table, size, block
        self.used.remove(old_start, old_start + old_clusters)
        self.free_index = min(self.free_index, old_start)
        return end

    def table_bytes(self) -> bytes:
        entries = [0] * self.table_size
        for i, b in self.table.items():
            entries[i] = b * self.cluster_size
        return struct.pack(f">{self.table_size}Q", *entries)


# ---- the plan -----------------------------------------------------------------------------------------------

@dataclass(slots=True)
class ImagePlan:
    """Where everything of a new image goes (cluster indices unless said otherwise)."""

    header: Header
    header_cluster: bytes
    allocator: _Allocator
    l1_start: int
    l1_entries: int
    #: per L2 table in guest order: (L2 table cluster, runs of data clusters as (first cluster, count))
    l2_tables: list[tuple[int, list[tuple[int, int]]]] = field(default_factory=list)
    #: the byte range (offset, length) of data clusters to fallocate / write zeroes to (falloc, full)
    fill: tuple[int, int] | None = None
    #: the byte range [start, end) written with zeroes after the end of the guest data (metadata)
    zero_tail: tuple[int, int] | None = None
    length: int = 0                      # the file's final length in bytes


def plan_image(opts: CreateOptions) -> ImagePlan:
    """Lay out a new image as qemu-img 7.2 does (pure)."""
    cs = 1 << opts.cluster_bits
    alloc = _Allocator(opts.cluster_bits, opts.refcount_order)
    length = 3 * cs                      # header cluster, then the reftable and first refblock written whole
    l1_entries = size_to_l1(opts.size, opts.cluster_bits, opts.extended_l2)
    l1_start = 0
    if l1_entries:
        l1_start = alloc.alloc(_ceil_div(l1_entries * 8, cs))
        length = max(length, l1_start * cs + l1_entries * 8)
    l2_entries = cs // l2_entry_size(opts.extended_l2)
    data_clusters = _ceil_div(opts.size, cs)
    plan = ImagePlan(_header(opts), b"", alloc, l1_start, l1_entries)
    tables = _ceil_div(data_clusters, l2_entries)
    if opts.preallocation != "off":
        needed = _refblocks_needed(alloc.used.end + data_clusters + tables, alloc.per_block,
                                   alloc.per_table_cluster, True)
        if needed + _ceil_div(needed, 2) > MAX_REFTABLE_BYTES // 8:
            raise ImageTooLargeError(f"Preallocating {opts.size} bytes would need a refcount table larger than "
                                     f"{MAX_REFTABLE_BYTES >> 20} MiB (try a larger cluster size or narrower "
                                     "refcounts)")
    if opts.preallocation == "metadata":
        # QEMU preallocates at most INT_MAX bytes (whole clusters) per request, and never past an L2 table
        chunk = ((1 << 31) - 1) // cs
        for t in range(tables):
            l2 = alloc.alloc(1)
            left = min(l2_entries, data_clusters - t * l2_entries)
            runs = []
            while left:
                n = min(chunk, left)
                runs.append((alloc.alloc(n), n))
                left -= n
            plan.l2_tables.append((l2, runs))
        if tables:
            # The file is extended to the end of the last (sub)cluster, and the part of that (sub)cluster past
            # the end of the image is written with zeroes (QEMU's copy-on-write of the unwritten tail).
            last, n = plan.l2_tables[-1][1][-1]
            tail = opts.size - (data_clusters - n) * cs                  # guest bytes mapped by the last run
            grain = cs // SUBCLUSTERS if opts.extended_l2 else cs
            end = last * cs + _ceil_div(tail, grain) * grain
            if tail % grain:
                plan.zero_tail = (last * cs + tail, end)
            length = max(length, end)
    elif opts.preallocation in ("falloc", "full"):
        # the area starts after the last cluster in use
        first = alloc.refcount_area(alloc.used.end, data_clusters + tables, exact=True)
        alloc.alloc_at(first, data_clusters)
        plan.fill = (first * cs, data_clusters * cs)
        for t in range(tables):
            l2 = alloc.alloc(1)
            plan.l2_tables.append((l2, [(first + t * l2_entries, min(l2_entries, data_clusters - t * l2_entries))]))
        length = max(length, (first + data_clusters) * cs)
    # refcount blocks and tables and L2 tables are written whole; freed tables stay
    ends = [alloc.table_start * cs + alloc.table_size * 8, *((b + 1) * cs for b in alloc.table.values()),
            *(off + len(data) for off, data in alloc.stale), *((l2 + 1) * cs for l2, _ in plan.l2_tables)]
    plan.length = max(length, *ends)
    hdr = plan.header
    hdr.l1_size = l1_entries
    hdr.l1_table_offset = l1_start * cs
    hdr.refcount_table_offset = alloc.table_start * cs
    hdr.refcount_table_clusters = alloc.table_size // alloc.per_table_cluster
    plan.header_cluster = _header_cluster_bytes(hdr).ljust(cs, b"\0")
    return plan


def _ones(block: bytearray, first: int, end: int, order: int) -> None:
    """Set refcounts ``[first, end)`` of ``block`` to 1 (whole bytes at a time where possible)."""
    if order >= 3:
        width = 1 << (order - 3)
        block[first * width:end * width] = (1).to_bytes(width, "big") * (end - first)
        return
    per_byte = 8 >> order
    lo = min(_ceil_div(first, per_byte) * per_byte, end)
    hi = max(end // per_byte * per_byte, lo)
    for i in (*range(first, lo), *range(hi, end)):
        set_refcount(block, i, order, 1)
    if hi > lo:
        pattern = sum(1 << (k << order) for k in range(per_byte))
        block[lo // per_byte:hi // per_byte] = bytes([pattern]) * ((hi - lo) // per_byte)


def _refblock(alloc: _Allocator, index: int, order: int) -> bytes:
    block = bytearray(alloc.cluster_size)
    base = index * alloc.per_block
    for a, b in alloc.used.overlapping(base, base + alloc.per_block):
        _ones(block, a - base, b - base, order)
    return bytes(block)


def _l2_table(cs: int, runs: list[tuple[int, int]], extended: bool) -> bytes:
    entries = [(data + k) * cs | OFLAG_COPIED for data, n in runs for k in range(n)]
    if extended:
        packed = struct.pack(f">{2 * len(entries)}Q", *(v for e in entries for v in (e, 0)))
    else:
        packed = struct.pack(f">{len(entries)}Q", *entries)
    return packed.ljust(cs, b"\0")


# ---- writing ------------------------------------------------------------------------------------------------

async def create_image(file: BlockDriver, size: int, *, backing: str | None, backing_fmt: str | None,
                       options: Mapping[str, str]) -> None:
    """Write a new, empty qcow2 image of ``size`` bytes (a multiple of 512) into the empty, writable protocol
    node ``file``. Options are ``qemu-img create -o`` strings: ``compat``, ``cluster_size``,
    ``refcount_bits``, ``lazy_refcounts``, ``compression_type``, ``extended_l2``, ``preallocation``.

    Every option is checked before anything is written (InvalidOptionError with QEMU 7.2's message)."""
    opts = parse_create_options(size, backing, backing_fmt, options)
    if opts.preallocation == "falloc" and getattr(file, "fd", None) is None:
        raise NotSupportedError("preallocation=falloc needs a file")
    plan = plan_image(opts)
    await _write(file, plan, opts)


async def _write(file: BlockDriver, plan: ImagePlan, opts: CreateOptions) -> None:
    cs = 1 << opts.cluster_bits
    alloc = plan.allocator
    for offset, data in alloc.stale:                       # freed refcount tables keep their last contents
        await file.pwrite(offset, memoryview(data))
    for index in sorted(alloc.table):
        await file.pwrite(alloc.table[index] * cs, memoryview(_refblock(alloc, index, opts.refcount_order)))
    await file.pwrite(alloc.table_start * cs, memoryview(alloc.table_bytes()))
    if plan.l1_entries:                                   # written whole, zeroes included, as QEMU does
        l1 = bytearray(plan.l1_entries * 8)
        for t, (l2, _) in enumerate(plan.l2_tables):
            struct.pack_into(">Q", l1, 8 * t, l2 * cs | OFLAG_COPIED)
        await file.pwrite(plan.l1_start * cs, memoryview(l1))
    for l2, runs in plan.l2_tables:
        await file.pwrite(l2 * cs, memoryview(_l2_table(cs, runs, opts.extended_l2)))
    if plan.fill is not None and plan.fill[1]:
        start, length = plan.fill
        if opts.preallocation == "falloc":
            fd = getattr(file, "fd", None)
            assert fd is not None
            os.posix_fallocate(fd, start, length)
        else:
            chunk = bytes(min(length, 1 << 20))
            for off in range(start, start + length, len(chunk)):
                await file.pwrite(off, memoryview(chunk)[:min(len(chunk), start + length - off)])
    if plan.zero_tail is not None:
        start, end = plan.zero_tail
        await file.pwrite(start, memoryview(bytes(end - start)))
    await file.pwrite(0, memoryview(plan.header_cluster))
    if not getattr(file, "is_block_device", False):       # metadata preallocation: past the last write
        await file.truncate(plan.length)
    await file.flush()
