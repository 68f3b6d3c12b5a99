"""qcow2 on-disk structures: pure code, no I/O (spec: QEMU ``docs/interop/qcow2.rst``).

Everything read from an image passes through here first. ``parse_header`` validates every header field
against the spec's and QEMU's limits (reliability.md §2.1, §4.3) and against the file's length *before* any
table is read or any memory sized by a field is allocated; its error messages are QEMU's where QEMU has one.
The table-entry helpers decode L1/L2/reftable entries, compressed-cluster descriptors, extended-L2 bitmaps and
refcounts of every width (1..64 bits).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from ...errors import CorruptImageError, ImageFormatError, ImageTooLargeError, UnsupportedFeatureError

__all__ = [
    "Extension",
    "Header",
    "Snapshot",
    "build_header_cluster",
    "compressed_descriptor",
    "count_nonzero_refcounts",
    "encode_compressed",
    "get_refcount",
    "l2_entry_size",
    "parse_header",
    "parse_snapshots",
    "set_refcount",
    "size_to_l1",
]

MAGIC = b"QFI\xfb"
V2_HEADER_LENGTH = 72
V3_HEADER_LENGTH = 104
#: What QEMU writes for v3: 104 bytes + the compression-type byte, padded to 8.
V3_HEADER_WRITE_LENGTH = 112

MIN_CLUSTER_BITS = 9
MAX_CLUSTER_BITS = 21
MAX_BACKING_NAME = 1023

# QEMU's implementation limits (block/qcow2.h)
MAX_L1_BYTES = 32 << 20
MAX_REFTABLE_BYTES = 8 << 20
MAX_SNAPSHOTS = 65536
MAX_SNAPSHOT_TABLE_BYTES = 64 << 20
MAX_SNAPSHOT_EXTRA = 1024
MAX_CLUSTER_OFFSET = (1 << 56) - 1
INT64_MAX = (1 << 63) - 1
INT_MAX = (1 << 31) - 1

# entry flags and masks
OFLAG_COPIED = 1 << 63
OFLAG_COMPRESSED = 1 << 62
OFLAG_ZERO = 1
L1E_OFFSET_MASK = 0x00FFFFFFFFFFFE00
L2E_OFFSET_MASK = 0x00FFFFFFFFFFFE00
L1E_RESERVED_MASK = 0x7F000000000001FF
L2E_RESERVED_MASK = 0x3F000000000001FE
REFT_OFFSET_MASK = 0xFFFFFFFFFFFFFE00
REFT_RESERVED_MASK = 0x1FF

# feature bits
INCOMPAT_DIRTY = 1 << 0
INCOMPAT_CORRUPT = 1 << 1
INCOMPAT_DATA_FILE = 1 << 2
INCOMPAT_COMPRESSION = 1 << 3
INCOMPAT_EXTL2 = 1 << 4
INCOMPAT_KNOWN = 0x1F
COMPAT_LAZY_REFCOUNTS = 1 << 0
AUTOCLEAR_BITMAPS = 1 << 0
AUTOCLEAR_DATA_FILE_RAW = 1 << 1

# header extension types
EXT_END = 0
EXT_BACKING_FORMAT = 0xE2792ACA
EXT_FEATURE_TABLE = 0x6803F857
EXT_BITMAPS = 0x23852875
EXT_CRYPTO = 0x0537BE77
EXT_DATA_FILE = 0x44415441

COMPRESSION_ZLIB = 0
COMPRESSION_ZSTD = 1
COMPRESSION_NAMES = {COMPRESSION_ZLIB: "zlib", COMPRESSION_ZSTD: "zstd"}

#: The feature-name table QEMU writes into every v3 image: (type, bit) -> name; type 0 incompatible,
#: 1 compatible, 2 autoclear.
FEATURE_NAMES: dict[tuple[int, int], str] = {
    (0, 0): "dirty bit", (0, 1): "corrupt bit", (0, 2): "external data file", (0, 3): "compression type",
    (0, 4): "extended L2 entries", (1, 0): "lazy refcounts", (2, 0): "bitmaps", (2, 1): "raw external data",
}

# extended L2: 32 subclusters; bitmap bits 0-31 allocated, 32-63 reads-as-zero
SUBCLUSTERS = 32
SC_ALLOC_MASK = 0xFFFFFFFF
SC_ZERO_SHIFT = 32

_HDR = struct.Struct(">4sIQIIQIIQQIIQQQQII")      # the 104 bytes of a v3 header (v2 uses the first 72)
_EXT = struct.Struct(">II")
_SNAP = struct.Struct(">QIHHIIQII")               # 40-byte snapshot header


@dataclass(slots=True)
class Extension:
    """A header extension kept verbatim (unknown ones are preserved when the header is rewritten)."""

    type: int
    data: bytes


@dataclass(slots=True)
class Header:
    """The qcow2 header, its extensions and the backing file name (the whole first cluster).

    Invariant after ``parse_header``: every field is within the limits checked there."""

    version: int = 3
    backing_file_offset: int = 0
    backing_file_size: int = 0
    cluster_bits: int = 16
    size: int = 0
    crypt_method: int = 0
    l1_size: int = 0
    l1_table_offset: int = 0
    refcount_table_offset: int = 0
    refcount_table_clusters: int = 0
    nb_snapshots: int = 0
    snapshots_offset: int = 0
    incompatible_features: int = 0
    compatible_features: int = 0
    autoclear_features: int = 0
    refcount_order: int = 4
    header_length: int = V3_HEADER_WRITE_LENGTH
    compression_type: int = COMPRESSION_ZLIB
    backing_file: str | None = None
    backing_format: str | None = None
    #: (type, bit) -> name from the image's feature-name table
    feature_names: dict[tuple[int, int], str] = field(default_factory=dict)
    #: extensions other than backing format and feature table, in file order, kept verbatim
    other_extensions: list[Extension] = field(default_factory=list)

    # ---- derived values --------------------------------------------------------------------------------------

    @property
    def cluster_size(self) -> int:
        return 1 << self.cluster_bits

    @property
    def extended_l2(self) -> bool:
        return bool(self.incompatible_features & INCOMPAT_EXTL2)

    @property
    def l2_entry_size(self) -> int:
        return l2_entry_size(self.extended_l2)

    @property
    def l2_entries(self) -> int:
        """Entries per L2 table."""
        return self.cluster_size // self.l2_entry_size

    @property
    def refcount_bits(self) -> int:
        return 1 << self.refcount_order

    @property
    def refblock_entries(self) -> int:
        """Refcounts per refcount block."""
        return (self.cluster_size * 8) >> self.refcount_order

    @property
    def reftable_entries(self) -> int:
        return self.refcount_table_clusters * self.cluster_size // 8

    @property
    def lazy_refcounts(self) -> bool:
        return bool(self.compatible_features & COMPAT_LAZY_REFCOUNTS)

    @property
    def dirty(self) -> bool:
        return bool(self.incompatible_features & INCOMPAT_DIRTY)

    @property
    def corrupt(self) -> bool:
        return bool(self.incompatible_features & INCOMPAT_CORRUPT)

    def pack_fixed(self) -> bytes:
        """The fixed part of the header (``header_length`` bytes; v2: 72)."""
        raw = _HDR.pack(MAGIC, self.version, self.backing_file_offset, self.backing_file_size, self.cluster_bits,
                        self.size, self.crypt_method, self.l1_size, self.l1_table_offset,
                        self.refcount_table_offset, self.refcount_table_clusters, self.nb_snapshots,
                        self.snapshots_offset, self.incompatible_features, self.compatible_features,
                        self.autoclear_features, self.refcount_order, self.header_length)
        if self.version == 2:
            return raw[:V2_HEADER_LENGTH]
        tail = bytes([self.compression_type]) if self.header_length > V3_HEADER_LENGTH else b""
        return (raw + tail).ljust(self.header_length, b"\0")


def l2_entry_size(extended: bool) -> int:
    return 16 if extended else 8


def size_to_l1(size: int, cluster_bits: int, extended_l2: bool = False) -> int:
    """L1 entries needed to map ``size`` guest bytes."""
    l2_bits = cluster_bits - (4 if extended_l2 else 3)
    shift = cluster_bits + l2_bits
    return (size + (1 << shift) - 1) >> shift


def _bad(msg: str) -> ImageFormatError:
    return ImageFormatError(msg)


def parse_header(buf: bytes, file_size: int, *, for_check: bool = False) -> Header:
    """Parse and validate the first cluster of a qcow2 image.

    ``buf``: the image's first bytes, at least up to the end of its first cluster where the file is that long
    (bytes past the end of the file read as zeroes, as QEMU's file driver does); ``file_size``: the file's
    length. ``for_check``: allow a missing refcount table (``qemu-img check`` can rebuild it).

    Raises ImageFormatError (not qcow2 / malformed), UnsupportedFeatureError (a feature aioblock does not
    implement, named), ImageTooLargeError; nothing is sized from a field before the field is validated."""
    if len(buf) < 4 or buf[:4] != MAGIC:
        raise _bad("Image is not in qcow2 format")
    buf = bytes(buf)
    fixed = buf[:V3_HEADER_LENGTH].ljust(V3_HEADER_LENGTH, b"\0")
    (_, version, bf_off, bf_size, cluster_bits, size, crypt, l1_size, l1_off, rt_off, rt_clusters, nb_snap,
     snap_off, incompat, compat, autoclear, refcount_order, header_length) = _HDR.unpack(fixed)
    if version not in (2, 3):
        raise UnsupportedFeatureError(f"Unsupported qcow2 version {version}")
    if not MIN_CLUSTER_BITS <= cluster_bits <= MAX_CLUSTER_BITS:
        raise UnsupportedFeatureError(f"Unsupported cluster size: 2^{cluster_bits}")
    cluster_size = 1 << cluster_bits
    if version == 2:
        incompat = compat = autoclear = 0
        refcount_order = 4
        header_length = V2_HEADER_LENGTH
    else:
        if header_length < V3_HEADER_LENGTH:
            raise _bad("qcow2 header too short")
        if header_length > cluster_size:
            raise _bad("qcow2 header exceeds cluster size")
    buf = buf[:cluster_size].ljust(min(cluster_size, max(len(buf), header_length)), b"\0")
    compression_type = buf[V3_HEADER_LENGTH] if header_length > V3_HEADER_LENGTH else COMPRESSION_ZLIB
    if bf_off > cluster_size:
        raise _bad("Invalid backing file offset")

    hdr = Header(version=version, backing_file_offset=bf_off, backing_file_size=bf_size, cluster_bits=cluster_bits,
                 size=size, crypt_method=crypt, l1_size=l1_size, l1_table_offset=l1_off,
                 refcount_table_offset=rt_off, refcount_table_clusters=rt_clusters, nb_snapshots=nb_snap,
                 snapshots_offset=snap_off, incompatible_features=incompat, compatible_features=compat,
                 autoclear_features=autoclear, refcount_order=refcount_order, header_length=header_length,
                 compression_type=compression_type)
    _parse_extensions(hdr, buf, bf_off if bf_off else cluster_size)     # v2 images may carry them too

    if incompat & ~INCOMPAT_KNOWN:
        raise UnsupportedFeatureError("Unsupported qcow2 feature(s): " + _unknown_features(hdr, incompat))
    if incompat & INCOMPAT_DATA_FILE:
        raise UnsupportedFeatureError("qcow2 images with an external data file (incompatible feature "
                                      "'external data file') are not supported")
    if refcount_order > 6:
        raise _bad("Reference count entry width too large; may not exceed 64 bits")
    if crypt == 1 or crypt == 2:
        raise UnsupportedFeatureError(f"encrypted qcow2 images ({'AES' if crypt == 1 else 'LUKS'}, "
                                      f"crypt_method {crypt}) are not supported")
    if crypt:
        raise UnsupportedFeatureError(f"Unsupported encryption method {crypt}")
    if compression_type not in COMPRESSION_NAMES:
        raise UnsupportedFeatureError(f"qcow2: unknown compression type: {compression_type}")
    if compression_type != COMPRESSION_ZLIB and not incompat & INCOMPAT_COMPRESSION:
        raise _bad("qcow2: Compression type incompatible feature bit must be set")
    if hdr.extended_l2 and cluster_size // SUBCLUSTERS < 512:
        raise UnsupportedFeatureError(f"Unsupported subcluster size: {cluster_size // SUBCLUSTERS}")

    if rt_clusters == 0 and not for_check:
        raise _bad("Image does not contain a reference count table")
    _validate_table(rt_off, rt_clusters * cluster_size, 1, MAX_REFTABLE_BYTES, cluster_size, file_size,
                    "Reference count table")
    if nb_snap > MAX_SNAPSHOTS:
        raise _bad("Snapshot table too large")
    if nb_snap and (snap_off % cluster_size or snap_off > INT64_MAX):
        raise _bad("Snapshot table offset invalid")
    if nb_snap and snap_off >= file_size:
        raise CorruptImageError("Snapshot table lies beyond the end of the file")
    _validate_table(l1_off, l1_size, 8, MAX_L1_BYTES, cluster_size, file_size, "Active L1 table")
    needed = size_to_l1(size, cluster_bits, hdr.extended_l2)
    if needed > INT_MAX:
        raise ImageTooLargeError("Image is too big")
    if l1_size < needed:
        raise _bad("L1 table is too small")

    if bf_off:
        if bf_size > MAX_BACKING_NAME:
            raise _bad("Backing file name too long")
        if bf_off + bf_size > cluster_size:
            raise _bad("Backing file name too long")
        name = buf[bf_off:bf_off + bf_size]
        hdr.backing_file = name.decode("utf-8", "surrogateescape") or None
    return hdr


def _validate_table(offset: int, entries: int, entry_len: int, max_bytes: int, cluster_size: int, file_size: int,
                    what: str) -> None:
    """QEMU's qcow2_validate_table, plus aioblock's rule that a table must lie inside the file."""
    if entries > max_bytes // entry_len:
        raise _bad(f"{what} too large")
    nbytes = entries * entry_len
    if offset % cluster_size or offset > INT64_MAX - nbytes:
        raise _bad(f"{what} offset invalid")
    if nbytes and offset + nbytes > file_size:
        raise CorruptImageError(f"{what} lies beyond the end of the file")


def _parse_extensions(hdr: Header, buf: bytes, end: int) -> None:
    offset = hdr.header_length
    end = min(end, len(buf))
    while offset < end:
        if end - offset < _EXT.size:
            raise _bad("Header extension too large")
        ext_type, ext_len = _EXT.unpack_from(buf, offset)
        offset += _EXT.size
        if ext_type == EXT_END:
            return
        if ext_len > end - offset:
            raise _bad("Header extension too large")
        data = buf[offset:offset + ext_len]
        offset += (ext_len + 7) & ~7
        if ext_type == EXT_BACKING_FORMAT:
            if ext_len >= 16:
                raise _bad(f"ERROR: ext_backing_format: len={ext_len} too large (>=16)")
            hdr.backing_format = data.decode("ascii", "surrogateescape") or None
        elif ext_type == EXT_FEATURE_TABLE:
            for i in range(0, ext_len - 47, 48):
                ftype, bit = data[i], data[i + 1]
                name = data[i + 2:i + 48].split(b"\0", 1)[0].decode("utf-8", "replace")
                hdr.feature_names[(ftype, bit)] = name
        else:
            hdr.other_extensions.append(Extension(ext_type, data))


def _unknown_features(hdr: Header, incompat: int) -> str:
    names = []
    mask = incompat & ~INCOMPAT_KNOWN
    for bit in range(64):
        if mask >> bit & 1 and (0, bit) in hdr.feature_names:
            names.append(hdr.feature_names[(0, bit)])
            mask &= ~(1 << bit)
    if mask:
        names.append(f"Unknown incompatible feature: {mask:x}")
    return ", ".join(names)


def build_header_cluster(hdr: Header, cluster_size: int | None = None) -> bytes:
    """Serialise the header, its extensions (backing format, feature table on v3, then every preserved
    extension) and the backing file name, as QEMU lays them out. Updates ``backing_file_offset`` and
    ``backing_file_size``. Raises ImageFormatError when it does not fit in the first cluster."""
    cluster_size = cluster_size or hdr.cluster_size
    try:
        # QEMU writes the feature-name table on v3 images with clusters over 4 KiB only
        return _build_header_cluster(hdr, cluster_size, feature_table=hdr.version >= 3 and cluster_size > 4096)
    except ImageFormatError:
        if hdr.version < 3:
            raise
    # like QEMU, leave the (optional) feature-name table out when it does not fit in a small first cluster
    return _build_header_cluster(hdr, cluster_size, feature_table=False)


def _build_header_cluster(hdr: Header, cluster_size: int, *, feature_table: bool) -> bytes:
    parts: list[bytes] = []
    if hdr.backing_format:
        parts.append(_ext(EXT_BACKING_FORMAT, hdr.backing_format.encode("ascii", "surrogateescape")))
    parts += [_ext(e.type, e.data) for e in hdr.other_extensions if e.type == EXT_CRYPTO]
    if feature_table:                                            # the feature-name table is v3 only
        table = b"".join(bytes([t, b]) + n.encode()[:46].ljust(46, b"\0") for (t, b), n in sorted(
            {**FEATURE_NAMES, **hdr.feature_names}.items()))
        parts.append(_ext(EXT_FEATURE_TABLE, table))
    parts += [_ext(e.type, e.data) for e in hdr.other_extensions if e.type != EXT_CRYPTO]
    parts.append(bytes(8))                                       # end of extensions (always, as QEMU)
    name = (hdr.backing_file or "").encode("utf-8", "surrogateescape")
    if len(name) > MAX_BACKING_NAME:
        raise _bad("Backing file name too long")
    fixed_len = V2_HEADER_LENGTH if hdr.version == 2 else hdr.header_length
    ext_bytes = b"".join(parts)
    hdr.backing_file_offset = fixed_len + len(ext_bytes) if name else 0
    hdr.backing_file_size = len(name)
    out = hdr.pack_fixed() + ext_bytes + name
    if len(out) > cluster_size:
        raise _bad("Header extensions and backing file name do not fit in the first cluster")
    return out


def _ext(ext_type: int, data: bytes) -> bytes:
    return _EXT.pack(ext_type, len(data)) + data + bytes(-len(data) % 8)


# ---- snapshots ----------------------------------------------------------------------------------------------

@dataclass(slots=True)
class Snapshot:
    """One internal snapshot's table entry (what check, info and the overlap check need)."""

    l1_table_offset: int
    l1_size: int
    id: str
    name: str
    date_sec: int
    date_nsec: int
    vm_clock_nsec: int
    vm_state_size: int
    disk_size: int | None
    icount: int | None


def parse_snapshots(buf: bytes, count: int, cluster_size: int, file_size: int) -> tuple[list[Snapshot], int]:
    """Parse ``count`` snapshot entries from ``buf`` (read from the snapshot table offset; at most
    ``MAX_SNAPSHOT_TABLE_BYTES``); returns the snapshots and the table's length in bytes."""
    snaps: list[Snapshot] = []
    off = 0
    for i in range(count):
        if off + _SNAP.size > len(buf):
            raise _bad("Snapshot table is too big" if len(buf) >= MAX_SNAPSHOT_TABLE_BYTES
                       else "Snapshot table lies beyond the end of the file")
        (l1_off, l1_size, id_len, name_len, dsec, dnsec, vmclock, vmstate, extra_len) = _SNAP.unpack_from(buf, off)
        off += _SNAP.size
        if extra_len > MAX_SNAPSHOT_EXTRA:
            raise _bad(f"Too much extra metadata in snapshot table entry {i}")
        end = off + extra_len + id_len + name_len
        if end > len(buf):
            raise _bad("Snapshot table is too big" if len(buf) >= MAX_SNAPSHOT_TABLE_BYTES
                       else "Snapshot table lies beyond the end of the file")
        extra = buf[off:off + extra_len]
        large_vmstate = struct.unpack_from(">Q", extra, 0)[0] if extra_len >= 8 else None
        disk_size = struct.unpack_from(">Q", extra, 8)[0] if extra_len >= 16 else None
        icount = struct.unpack_from(">Q", extra, 16)[0] if extra_len >= 24 else None
        off += extra_len
        sid = buf[off:off + id_len].decode("utf-8", "replace")
        off += id_len
        name = buf[off:off + name_len].decode("utf-8", "replace")
        off = (end + 7) & ~7
        if l1_size > MAX_L1_BYTES // 8:
            raise _bad("Snapshot L1 table too large")
        if l1_off % cluster_size or l1_off > INT64_MAX - l1_size * 8:
            raise _bad("Snapshot L1 table offset invalid")
        if l1_size and l1_off + l1_size * 8 > file_size:
            raise CorruptImageError(f"Snapshot {sid} L1 table lies beyond the end of the file")
        snaps.append(Snapshot(l1_off, l1_size, sid, name, dsec, dnsec, vmclock,
                              large_vmstate if large_vmstate is not None else vmstate, disk_size, icount))
    return snaps, off


# ---- table entries -----------------------------------------------------------------------------------------

def compressed_descriptor(entry: int, cluster_bits: int) -> tuple[int, int]:
    """(host byte offset, compressed byte length) of a compressed L2 entry.

    The length covers from the offset to the end of the last 512-byte sector the descriptor names, so it is at
    most ``cluster_size + 512`` bytes... a bound on any buffer read for it."""
    x = 62 - (cluster_bits - 8)
    offset = entry & ((1 << x) - 1)
    sectors = ((entry >> x) & ((1 << (cluster_bits - 8)) - 1)) + 1
    return offset, sectors * 512 - (offset & 511)


def encode_compressed(host_offset: int, length: int, cluster_bits: int) -> int:
    """The L2 entry (with the compressed flag) for ``length`` bytes of compressed data at ``host_offset``."""
    x = 62 - (cluster_bits - 8)
    end = host_offset + length
    sectors = ((end + 511) >> 9) - (host_offset >> 9)
    return OFLAG_COMPRESSED | ((sectors - 1) << x) | host_offset


def get_refcount(block: bytes | bytearray, index: int, order: int) -> int:
    """Refcount ``index`` of a refcount block with ``1 << order``-bit entries (sub-byte entries LSB first)."""
    if order == 4:
        return (block[2 * index] << 8) | block[2 * index + 1]
    if order < 3:
        bits = 1 << order
        per_byte = 8 >> order
        return (block[index // per_byte] >> ((index % per_byte) * bits)) & ((1 << bits) - 1)
    width = 1 << (order - 3)
    return int.from_bytes(block[index * width:(index + 1) * width], "big")


def count_nonzero_refcounts(block: bytes | bytearray, n: int, order: int) -> int:
    """How many of the first ``n`` refcounts of a refcount block are not zero."""
    if order < 3:
        return sum(1 for i in range(n) if get_refcount(block, i, order))
    width = 1 << (order - 3)
    view = memoryview(block)[:n * width]
    if order == 3:
        return n - view.tobytes().count(0)
    words = view.cast("H") if width == 2 else view.cast("I") if width == 4 else view.cast("Q")
    return n - words.tolist().count(0)


def set_refcount(block: bytearray, index: int, order: int, value: int) -> None:
    """Store ``value`` (already checked to fit the width) as refcount ``index``."""
    if order < 3:
        bits = 1 << order
        per_byte = 8 >> order
        shift = (index % per_byte) * bits
        mask = ((1 << bits) - 1) << shift
        i = index // per_byte
        block[i] = (block[i] & ~mask) | (value << shift)
        return
    width = 1 << (order - 3)
    block[index * width:(index + 1) * width] = value.to_bytes(width, "big")
