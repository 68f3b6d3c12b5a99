"""The raw format: the guest sees the file's bytes as they are.

Every request passes straight to the ``file`` child at the same offset. ``create`` allocates the first block
of the image as QEMU does (so that the first block is data in ``map``, and O_DIRECT alignment probing works on
a new image) and supports ``preallocation=off|falloc|full``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, ClassVar, Self

from ..driver import BlockDriver, Extent
from ..errors import InvalidOptionError, NotSupportedError, ReadOnlyError

__all__ = ["RawDriver"]

_PREALLOC = ("off", "falloc", "full")


class RawDriver(BlockDriver):
    """Pass-through format node. No state of its own beyond ``file``; safe for any concurrency."""

    format_name: ClassVar[str] = "raw"
    create_options: ClassVar[frozenset[str]] = frozenset({"preallocation", "size"})

    def __init__(self, file: BlockDriver, *, read_only: bool) -> None:
        self.file = file
        self.filename = file.filename
        self.read_only = read_only
        self.limits = file.limits
        self._file = file

    @classmethod
    def probe(cls, head: bytes, filename: str) -> int:
        return 1            # anything can be raw: the lowest score, chosen only when nothing else matches

    @classmethod
    async def open(cls, file: BlockDriver, *, read_only: bool, options: Mapping[str, Any]) -> Self:
        return cls(file, read_only=read_only)

    @classmethod
    async def create(cls, file: BlockDriver, size: int, *, backing: str | None, backing_fmt: str | None,
                     options: Mapping[str, str]) -> None:
        prealloc = options.get("preallocation", "off")
        if prealloc not in _PREALLOC:
            raise InvalidOptionError(f"Invalid parameter '{prealloc}' for preallocation "
                                     f"(choose from {', '.join(_PREALLOC)})")
        await file.truncate(size)
        if prealloc == "full":
            chunk = bytes(1 << 20)
            for off in range(0, size, len(chunk)):
                n = min(len(chunk), size - off)
                await file.pwrite(off, memoryview(chunk)[:n])
        elif prealloc == "falloc":
            fd = getattr(file, "fd", None)
            if fd is None:
                raise NotSupportedError("preallocation=falloc needs a file")
            if size:
                os.posix_fallocate(fd, 0, size)
        elif size:
            # like QEMU: allocate the first block so that it reads as data and alignment can be probed
            await file.pwrite(0, memoryview(bytes(min(size, 4096))))
        await file.flush()

    @property
    def size(self) -> int:
        return self._file.size

    async def pread(self, offset: int, buf: memoryview) -> None:
        await self._file.pread(offset, buf)

    async def pwrite(self, offset: int, buf: memoryview, *, fua: bool = False) -> None:
        if self.read_only:
            raise ReadOnlyError("Block node is read-only")
        await self._file.pwrite(offset, buf, fua=fua)

    async def pwrite_zeroes(self, offset: int, length: int, *, may_unmap: bool = False,
                            fua: bool = False) -> None:
        if self.read_only:
            raise ReadOnlyError("Block node is read-only")
        await self._file.pwrite_zeroes(offset, length, may_unmap=may_unmap, fua=fua)

    async def pdiscard(self, offset: int, length: int) -> None:
        if self.read_only:
            raise ReadOnlyError("Block node is read-only")
        await self._file.pdiscard(offset, length)

    async def flush(self) -> None:
        await self._file.flush()

    async def block_status(self, offset: int, length: int) -> Extent:
        ext = await self._file.block_status(offset, length)
        return Extent(offset, ext.length, True, ext.data, ext.zero, ext.host_offset, ext.host)

    async def truncate(self, size: int) -> None:
        if self.read_only:
            raise ReadOnlyError("Block node is read-only")
        await self._file.truncate(size)
