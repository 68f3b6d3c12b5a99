"""Compressed clusters: deflate (raw, no zlib header) and zstd, with bounded output. Pure code.

A compressed cluster must decompress to exactly one cluster; anything else (garbage, a short stream, a stream
that would expand further) is a :class:`CompressedDataError`, which the driver turns into EIO as QEMU does
(the image is not marked corrupt: check cannot validate compressed payloads). Memory is bounded by the input
(at most about two clusters) and one cluster of output.
"""

from __future__ import annotations

import io
import zlib
from typing import Any

from ...errors import NotSupportedError
from .layout import COMPRESSION_ZLIB, COMPRESSION_ZSTD

__all__ = ["CompressedDataError", "compress_cluster", "decompress_cluster"]

#: QEMU compresses with a 4 KiB deflate window (wbits -12); any window up to 32 KiB decompresses.
_DEFLATE_WBITS = -12


class CompressedDataError(ValueError):
    """The compressed payload does not decompress to exactly one cluster."""


def decompress_cluster(ctype: int, data: bytes | bytearray | memoryview, cluster_size: int) -> bytes:
    if ctype == COMPRESSION_ZLIB:
        d = zlib.decompressobj(-15)
        try:
            out = d.decompress(data, cluster_size)
        except zlib.error as exc:
            raise CompressedDataError(f"bad deflate stream: {exc}") from None
        if len(out) != cluster_size:
            raise CompressedDataError(f"deflate stream gives {len(out)} bytes, not a cluster")
        return out
    if ctype == COMPRESSION_ZSTD:
        zstd = _zstd()
        try:
            reader = zstd.ZstdDecompressor(max_window_size=1 << 23).stream_reader(io.BytesIO(bytes(data)),
                                                                                  read_across_frames=False)
            out = reader.read(cluster_size)
            while len(out) < cluster_size:
                more = reader.read(cluster_size - len(out))
                if not more:
                    break
                out += more
        except zstd.ZstdError as exc:
            raise CompressedDataError(f"bad zstd stream: {exc}") from None
        if len(out) != cluster_size:
            raise CompressedDataError(f"zstd stream gives {len(out)} bytes, not a cluster")
        return bytes(out)
    raise CompressedDataError(f"unknown compression type {ctype}")


def compress_cluster(ctype: int, data: bytes | bytearray | memoryview, limit: int) -> bytes | None:
    """Compress one cluster; None when the result would not be shorter than ``limit`` bytes (then the
    cluster is written uncompressed, as QEMU does)."""
    if ctype == COMPRESSION_ZLIB:
        c = zlib.compressobj(zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED, _DEFLATE_WBITS)
        out = c.compress(data) + c.flush()
    elif ctype == COMPRESSION_ZSTD:
        out = _zstd().ZstdCompressor(level=3, write_content_size=True).compress(bytes(data))
    else:
        raise NotSupportedError(f"unknown compression type {ctype}")
    return out if len(out) < limit else None


def _zstd() -> Any:
    try:
        import zstandard
    except ImportError:                      # pragma: no cover - a declared dependency
        raise NotSupportedError("zstd compression needs the 'zstandard' package") from None
    return zstandard
