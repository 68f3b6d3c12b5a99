"""QED on-disk structures: pure code, no I/O (spec: QEMU ``docs/interop/qed_spec.rst``).

Everything read from an image passes through here first. ``parse_header`` validates every header field against
the spec's and QEMU's limits (reliability.md §2.3, §4.3) and against the file's length before any table is read
or any memory sized by a field is allocated; its messages are QEMU's.

Layout: a header of ``header_size`` clusters at offset 0 (64 bytes of fields, then the backing file name), the
L1 table, and L2 tables and data clusters in any order after them. Tables are ``table_size`` clusters of
little-endian u64 entries: 0 is unallocated, 1 (data entries only) a zero cluster that stops backing reads, any
other value the cluster-aligned host offset of an L2 table or a data cluster. There are no refcounts: the file's
length, rounded down to a cluster, is where the next cluster is allocated.
"""

from __future__ import annotations

import struct
import sys
from array import array
from dataclasses import dataclass

from ...errors import ImageFormatError, InvalidOptionError, UnsupportedFeatureError

__all__ = [
    "Header",
    "build_header",
    "create_layout",
    "decode_backing_name",
    "load_table",
    "max_image_size",
    "parse_header",
    "validate_geometry",
]

MAGIC = 0x00444551                      # "QED\0" read as a little-endian u32
_HEADER = struct.Struct("<IIIIQQQQQII")
HEADER_BYTES = _HEADER.size             # 64

F_BACKING_FILE = 0x01
F_NEED_CHECK = 0x02
F_BACKING_FORMAT_NO_PROBE = 0x04
FEATURES_KNOWN = F_BACKING_FILE | F_NEED_CHECK | F_BACKING_FORMAT_NO_PROBE
COMPAT_KNOWN = 0
AUTOCLEAR_KNOWN = 0

MIN_CLUSTER = 4 << 10
MAX_CLUSTER = 64 << 20
DEFAULT_CLUSTER = 64 << 10
MIN_TABLE = 1
MAX_TABLE = 16
DEFAULT_TABLE = 4
#: the zero-cluster marker of a data entry
ZERO_CLUSTER = 1
#: what a run of L2 entries reads as (``QedDriver.lookup``)
UNALLOC, ZERO, DATA = 0, 1, 2
#: bytes of an L2 table per slice of the metadata cache
SLICE = 4096
#: field offsets used for in-place header rewrites
FEATURES_OFFSET = 16
UINT32_MAX = (1 << 32) - 1
#: longest backing file name read from a header (QEMU keeps it in a PATH_MAX buffer)
MAX_BACKING_NAME = 4095


@dataclass(slots=True)
class Header:
    """The header's fields (``image_size`` in bytes, ``header_size`` and ``table_size`` in clusters) and the
    backing file name, decoded. ``features`` changes at run time (NEED_CHECK); nothing else does but
    ``image_size`` (grow) and the backing file (rebase)."""

    cluster_size: int
    table_size: int
    header_size: int
    features: int
    compat_features: int
    autoclear_features: int
    l1_table_offset: int
    image_size: int
    backing_filename_offset: int = 0
    backing_filename_size: int = 0
    backing_filename: str | None = None

    @property
    def cluster_bits(self) -> int:
        return self.cluster_size.bit_length() - 1

    @property
    def table_bytes(self) -> int:
        return self.table_size * self.cluster_size

    @property
    def table_entries(self) -> int:
        return self.table_bytes // 8

    @property
    def header_bytes(self) -> int:
        return self.header_size * self.cluster_size

    @property
    def need_check(self) -> bool:
        return bool(self.features & F_NEED_CHECK)

    @property
    def backing_format(self) -> str | None:
        """The backing file's format as the header gives it: "raw" with the no-probe flag, else probed."""
        return "raw" if self.features & F_BACKING_FORMAT_NO_PROBE else None


def _power_of_two(n: int) -> bool:
    return n > 0 and not n & (n - 1)


def max_image_size(cluster_size: int, table_size: int) -> int:
    """The largest virtual size two levels of tables can map: (entries per table)^2 clusters."""
    entries = table_size * cluster_size // 8
    return entries * entries * cluster_size


def image_size_valid(size: int, cluster_size: int, table_size: int) -> bool:
    return size % 512 == 0 and 0 <= size <= max_image_size(cluster_size, table_size)


def parse_header(data: bytes, file_size: int) -> Header:
    """Decode and validate the header fields from the file's first bytes (at least 64). The backing file name
    is not decoded here: the caller reads ``[backing_filename_offset, +backing_filename_size)``, which this
    has checked to lie inside the header clusters, and passes it to ``decode_backing_name``. Raises
    ImageFormatError / UnsupportedFeatureError with QEMU's messages, in QEMU's order."""
    if len(data) < HEADER_BYTES:
        raise ImageFormatError("Image not in QED format")
    (magic, cluster_size, table_size, header_size, features, compat, autoclear, l1_offset, image_size,
     name_offset, name_size) = _HEADER.unpack_from(data)
    if magic != MAGIC:
        raise ImageFormatError("Image not in QED format")
    if features & ~FEATURES_KNOWN:
        raise UnsupportedFeatureError(f"Unsupported QED features: {features & ~FEATURES_KNOWN:x}")
    if not _power_of_two(cluster_size) or not MIN_CLUSTER <= cluster_size <= MAX_CLUSTER:
        raise ImageFormatError("QED cluster size is invalid")
    if not _power_of_two(table_size) or not MIN_TABLE <= table_size <= MAX_TABLE:
        raise ImageFormatError("QED table size is invalid")
    if not image_size_valid(image_size, cluster_size, table_size):
        raise ImageFormatError("QED image size is invalid")
    h = Header(cluster_size, table_size, header_size, features, compat, autoclear, l1_offset, image_size,
               name_offset, name_size)
    # QEMU checks the L1 offset against header_size * cluster_size computed in 32 bits, before it checks that
    # product for overflow; an empty header (which would put the L1 table over the fields) is refused too.
    if header_size == 0 or not _table_ok(h, l1_offset, file_size, (header_size * cluster_size) & UINT32_MAX):
        raise ImageFormatError("QED table offset is invalid")
    if header_size * cluster_size > UINT32_MAX:
        raise ImageFormatError("QED header size is too large")
    if features & F_BACKING_FILE and (name_offset < HEADER_BYTES or not 0 < name_size <= MAX_BACKING_NAME
                                      or name_offset + name_size > h.header_bytes):
        raise ImageFormatError("QED backing filename offset is invalid")
    return h


def decode_backing_name(raw: bytes) -> str:
    """The backing file name from its bytes in the header (up to a NUL, UTF-8)."""
    name = raw.split(b"\0", 1)[0]
    try:
        text = name.decode()
    except UnicodeDecodeError:
        raise ImageFormatError("QED backing file name is not valid UTF-8") from None
    if not text:
        raise ImageFormatError("QED backing filename offset is invalid")
    return text


def _table_ok(h: Header, offset: int, file_size: int, header_bytes: int) -> bool:
    if offset & (h.cluster_size - 1) or offset < header_bytes:
        return False
    return offset + h.table_bytes <= allocated_end(h, file_size)


def table_offset_valid(h: Header, offset: int, file_size: int) -> bool:
    """Whether a table (L1 or L2) at ``offset`` is cluster-aligned, after the header and wholly inside the
    file's allocated clusters (QEMU's ``qed_check_table_offset``)."""
    return _table_ok(h, offset, file_size, h.header_bytes)


def allocated_end(h: Header, file_size: int) -> int:
    """Where the next cluster is allocated: the file's length rounded down to a cluster (a torn tail cluster
    is not part of the image)."""
    return file_size & ~(h.cluster_size - 1)


def build_header(h: Header) -> bytes:
    """The header's first sector: the fields and, when there is one, the backing file name after them."""
    out = bytearray(512 if h.header_bytes >= 512 else h.header_bytes)
    _HEADER.pack_into(out, 0, MAGIC, h.cluster_size, h.table_size, h.header_size, h.features, h.compat_features,
                      h.autoclear_features, h.l1_table_offset, h.image_size, h.backing_filename_offset,
                      h.backing_filename_size)
    if h.backing_filename is not None:
        name = h.backing_filename.encode()
        end = h.backing_filename_offset + len(name)
        if end > len(out):
            out.extend(bytes(end - len(out)))
        out[h.backing_filename_offset:end] = name
    return bytes(out)


def validate_geometry(cluster_size: int, table_size: int, size: int) -> None:
    """``create``'s checks, with qemu-img's messages."""
    if not _power_of_two(cluster_size) or not MIN_CLUSTER <= cluster_size <= MAX_CLUSTER:
        raise InvalidOptionError(f"QED cluster size must be within range [{MIN_CLUSTER}, {MAX_CLUSTER}] "
                                 "and power of 2")
    if not _power_of_two(table_size) or not MIN_TABLE <= table_size <= MAX_TABLE:
        raise InvalidOptionError(f"QED table size must be within range [{MIN_TABLE}, {MAX_TABLE}] and power of 2")
    if not image_size_valid(size, cluster_size, table_size):
        raise InvalidOptionError("QED image size must be a non-zero multiple of cluster size and less than "
                                 f"{max_image_size(cluster_size, table_size)} bytes")


def create_layout(cluster_size: int, table_size: int, size: int, backing: str | None,
                  backing_raw: bool) -> Header:
    """The header of a new image: one header cluster, the L1 table right after it, the backing name at byte 64
    (it must fit in the header cluster)."""
    validate_geometry(cluster_size, table_size, size)
    h = Header(cluster_size, table_size, 1, 0, 0, 0, cluster_size, size)
    if backing is not None:
        name = backing.encode()
        if HEADER_BYTES + len(name) > cluster_size:
            raise InvalidOptionError("Backing file name too long")
        h.features |= F_BACKING_FILE | (F_BACKING_FORMAT_NO_PROBE if backing_raw else 0)
        h.backing_filename_offset, h.backing_filename_size = HEADER_BYTES, len(name)
        h.backing_filename = backing
    return h


def set_backing(h: Header, name: str | None, raw: bool) -> None:
    """Point ``h`` at a new backing file (``name`` None: none; ``raw``: the no-probe flag) as QEMU lays it out:
    the name at byte 64, inside the header clusters; clearing keeps the old offset with size 0. Names QEMU could
    not read back (over 4095 bytes; QEMU 7.2 writes them and then cannot open the image) are refused."""
    if name is None:
        h.features &= ~(F_BACKING_FILE | F_BACKING_FORMAT_NO_PROBE)
        h.backing_filename_size, h.backing_filename = 0, None
        return
    size = len(name.encode())
    if size > MAX_BACKING_NAME:
        raise InvalidOptionError(f"backing file name too long (QED allows {MAX_BACKING_NAME} bytes)")
    if not size:
        raise InvalidOptionError("empty backing file name")
    if HEADER_BYTES + size > h.header_bytes:
        raise InvalidOptionError("No space left in the file header")
    features = h.features | F_BACKING_FILE
    h.features = features | F_BACKING_FORMAT_NO_PROBE if raw else features & ~F_BACKING_FORMAT_NO_PROBE
    h.backing_filename_offset, h.backing_filename_size, h.backing_filename = HEADER_BYTES, size, name


def load_table(data: bytes | bytearray | memoryview) -> array[int]:
    """A table's entries (little-endian u64) as an array of ints."""
    table = array("Q")
    table.frombytes(bytes(data))
    if sys.byteorder != "little":
        table.byteswap()
    return table


def table_bytes(table: array[int], first: int = 0, end: int | None = None) -> bytes:
    """Entries ``[first, end)`` of ``table`` as little-endian bytes."""
    part = table[first:end]
    if sys.byteorder != "little":
        part.byteswap()
    return part.tobytes()
