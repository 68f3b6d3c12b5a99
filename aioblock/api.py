"""The embedding API: ``aioblock.open`` and ``aioblock.create``."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Generator, Mapping
from typing import Any

from .backend import BlockBackend
from .driver import BlockDriver
from .drivers import driver_class
from .errors import AioblockError, InvalidOptionError, NotSupportedError
from .io.file import FileNode
from .node import close_graph, open_image, resolve_backing_name
from .sizes import parse_size

__all__ = ["OpenContext", "create", "open", "validate_create"]


class OpenContext:
    """What ``aioblock.open`` returns: await it for a :class:`BlockBackend`, or use it as an async context
    manager that closes the disk on exit (like ``aiofiles.open``)."""

    def __init__(self, path: str, fmt: str | None, read_only: bool, engine: str | None, cache: str,
                 options: Mapping[str, Any] | None) -> None:
        self._args = (path, fmt, read_only, engine, cache, options)
        self._disk: BlockBackend | None = None

    async def _open(self) -> BlockBackend:
        path, fmt, read_only, engine, cache, options = self._args
        root = await open_image(path, fmt, read_only=read_only, engine=engine, cache=cache, options=options)
        return BlockBackend(root, read_only=read_only)

    def __await__(self) -> Generator[Any, None, BlockBackend]:
        return self._open().__await__()

    async def __aenter__(self) -> BlockBackend:
        self._disk = await self._open()
        return self._disk

    async def __aexit__(self, *exc_info: object) -> None:
        if self._disk is not None:
            await self._disk.close()


def open(path: str, fmt: str | None = None, *, read_only: bool = False, engine: str | None = None,
         cache: str = "writeback", options: Mapping[str, Any] | None = None) -> OpenContext:
    """Open a disk image.

    ``fmt``: the format (probed from the content when None). ``engine``: "hybrid", "uring", "threads" or "sync"
    (None: the default, see README "I/O engines"). ``cache``: "writeback" (page cache), "none" (O_DIRECT) or
    "unsafe" (page cache; flushes do nothing).
    ``options``: format options (e.g. qcow2's ``l2-cache-size``) and the graph options ``backing`` ("open" |
    "ignore" | "deny") and ``inject`` (a fault injector, for tests).

    ``disk = await aioblock.open(...)`` or ``async with aioblock.open(...) as disk:``.
    """
    return OpenContext(path, fmt, read_only, engine, cache, options)


async def create(path: str, fmt: str, size: int | str | None = None, *, backing: str | None = None,
                 backing_fmt: str | None = None, options: Mapping[str, str] | None = None) -> None:
    """Create a new image (``qemu-img create``). ``size`` is rounded up to whole 512-byte sectors; it may be
    omitted when ``backing`` is given and then defaults to the backing image's size. Errors carry the path of
    the image being created."""
    try:
        cls = validate_create(fmt, options, backing, size)
        opts = dict(options or {})
        if size is None and "size" in opts:
            size = opts.pop("size")
        opts.pop("size", None)
        if backing is not None and backing_fmt is None and cls.supports_backing:
            backing_fmt = await _probe_backing(path, backing)
        if size is None:
            if backing is None:
                raise InvalidOptionError("Image creation needs a size parameter")
            size = await _backing_size(path, backing, backing_fmt)
        nbytes = (parse_size(size) + 511) & ~511           # whole sectors, as qemu-img
        file = await FileNode.open_file(path, create=True, engine="sync")
        try:
            await cls.create(file, nbytes, backing=backing, backing_fmt=backing_fmt, options=opts)
        except BaseException:
            with contextlib.suppress(OSError):      # a refused or failed create leaves no file (as qemu-img)
                os.unlink(path)
            raise
        finally:
            await close_graph(file)
    except AioblockError as exc:
        raise exc.with_filename(path) from None


def validate_create(fmt: str, options: Mapping[str, str] | None, backing: str | None,
                    size: int | str | None) -> type[BlockDriver]:
    """Checks ``create`` makes before touching anything (qemu-img makes them before "Formatting ...")."""
    cls = driver_class(fmt)
    unknown = set(options or {}) - cls.create_options - {"size"}
    if unknown:
        raise InvalidOptionError(f"Invalid parameter '{sorted(unknown)[0]}'")
    if backing is not None and not cls.supports_backing:
        raise NotSupportedError(f"Backing file not supported for file format '{fmt}'")
    if size is None and backing is None and "size" not in (options or {}):
        raise InvalidOptionError("Image creation needs a size parameter")
    return cls


async def _probe_backing(path: str, backing: str) -> str:
    node = await open_image(resolve_backing_name(path, backing), read_only=True, options={"backing": "ignore"})
    try:
        return node.format_name
    finally:
        await close_graph(node)


async def _backing_size(path: str, backing: str, backing_fmt: str | None) -> int:
    node = await open_image(resolve_backing_name(path, backing), backing_fmt, read_only=True)
    try:
        return node.size
    finally:
        await close_graph(node)
