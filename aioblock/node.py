"""The node graph: open an image as a format node on a protocol node, then its backing chain.

``open_image`` is what ``aioblock.open`` and the CLI use. Graph-level options (consumed here, never passed to a
driver):

* ``backing``: ``"open"`` (default) opens the backing chain; ``"ignore"`` opens the image alone (unallocated
  areas read as zeroes, QEMU's ``backing=null``); ``"deny"`` refuses any image that names a backing file, for
  untrusted images (CVE-2024-4467 class).
* a *filter* option registered with ``register_filter`` (``inject``: an
  :class:`aioblock.testing.faults.FaultInjector`, registered by that module): the filter's node goes between the
  top format node and its file.
* ``check``: open the top image for ``check`` (``BlockDriver.open_for_check``, QEMU's BDRV_O_CHECK).

Backing files: a relative name is resolved against the directory of the image that names it; names with a
protocol prefix (``json:``, ``nbd:``...) are refused, since aioblock opens local files only; the chain is at
most ``MAX_BACKING_DEPTH`` images long and a file may appear in it only once. Backing nodes are opened
read-only, as QEMU does.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Callable, Mapping
from typing import Any

from .driver import BlockDriver
from .drivers import PROBE_BYTES, driver_class, probe_format
from .errors import AioblockError, BackingChainError, ImageOpenError, InvalidOptionError
from .io.file import FileNode

__all__ = ["MAX_BACKING_DEPTH", "close_graph", "open_image", "register_filter", "resolve_backing_name"]

#: Longest backing chain aioblock opens (QEMU has no fixed limit; 64 is far beyond real use).
MAX_BACKING_DEPTH = 64
BACKING_POLICIES = ("open", "ignore", "deny")
_PROTOCOL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):")

#: graph option -> factory(file node, option value) -> filter node put between the top format node and its file
_FILTERS: dict[str, Callable[[BlockDriver, Any], BlockDriver]] = {}


def register_filter(option: str, factory: Callable[[BlockDriver, Any], BlockDriver]) -> None:
    """Make ``option`` a graph option of ``open_image``: its value and the top image's file node go to
    ``factory``, whose node is then the format node's file (e.g. ``inject`` and the fault-injection filter)."""
    _FILTERS[option] = factory


def resolve_backing_name(image_filename: str, backing: str) -> str:
    """The path a backing file name refers to: relative names are relative to the image's directory.

    Raises BackingChainError for protocol prefixes other than ``file:``."""
    match = _PROTOCOL.match(backing)
    if match:
        if match.group(1) != "file":
            raise BackingChainError(f"backing file '{backing}' uses the '{match.group(1)}:' protocol; "
                                    "aioblock opens local files only")
        backing = backing[len("file:"):]
    if not backing:
        raise BackingChainError("empty backing file name")
    if os.path.isabs(backing):
        return backing
    return os.path.join(os.path.dirname(image_filename), backing)


async def open_image(filename: str, fmt: str | None = None, *, read_only: bool = False,
                     engine: str | None = None, cache: str = "writeback",
                     options: Mapping[str, Any] | None = None) -> BlockDriver:
    """Open ``filename`` (probing its format unless ``fmt`` is given) and its backing chain.

    Errors carry the filename of the image that failed. Everything opened so far is closed on failure."""
    opts = dict(options or {})
    policy = opts.pop("backing", "open")
    if policy not in BACKING_POLICIES:
        raise InvalidOptionError(f"invalid backing policy '{policy}' (choose from {', '.join(BACKING_POLICIES)})")
    filters = [(_FILTERS[name], opts.pop(name)) for name in list(opts) if name in _FILTERS]
    for_check = bool(opts.pop("check", False))
    return await _open_node(filename, fmt, read_only=read_only, engine=engine, cache=cache, options=opts,
                            policy=policy, filters=filters, chain=[], for_check=for_check)


async def _open_node(filename: str, fmt: str | None, *, read_only: bool, engine: str | None, cache: str,
                     options: dict[str, Any], policy: str,
                     filters: list[tuple[Callable[[BlockDriver, Any], BlockDriver], Any]], chain: list[str],
                     for_check: bool = False) -> BlockDriver:
    real = os.path.realpath(filename)
    if real in chain:
        raise BackingChainError(f"backing chain loop: '{filename}' is already in the chain", filename=filename)
    if len(chain) > MAX_BACKING_DEPTH:
        raise BackingChainError(f"backing chain longer than {MAX_BACKING_DEPTH} images", filename=filename)
    file = await FileNode.open_file(filename, read_only=read_only, engine=engine, cache=cache)
    node: BlockDriver | None = None
    try:
        proto: BlockDriver = file
        for factory, value in filters:
            if value is not None:
                proto = factory(proto, value)
        if fmt is None:
            head = bytearray(min(PROBE_BYTES, file.size))
            if head:
                await file.pread(0, memoryview(head))
            fmt = probe_format(bytes(head), filename)
        cls = driver_class(fmt)
        unknown = set(options) - cls.open_options
        if unknown:
            raise InvalidOptionError(f"Invalid option(s) for format '{fmt}': {', '.join(sorted(unknown))}")
        opener = cls.open_for_check if for_check else cls.open
        node = await opener(proto, read_only=read_only, options=options)
        if node.backing_filename is not None and policy != "ignore":
            if policy == "deny":
                raise BackingChainError(f"image names a backing file ('{node.backing_filename}'), which is "
                                        "refused for untrusted images")
            path = resolve_backing_name(filename, node.backing_filename)
            try:
                node.backing = await _open_node(path, node.backing_format, read_only=True, engine=engine,
                                                cache=cache, options={}, policy=policy, filters=[],
                                                chain=[*chain, real])
            except ImageOpenError as exc:
                raise BackingChainError(f"Could not open backing file: {exc.message}") from None
        return node
    except AioblockError as exc:
        await _close_quietly(node if node is not None else file)
        raise exc.with_filename(filename) from None
    except BaseException:
        await _close_quietly(node if node is not None else file)
        raise


async def close_graph(node: BlockDriver) -> None:
    """Close ``node`` and then its children (file, backing), depth first. Every node is closed even if some
    fail; the first error is raised afterwards."""
    first: BaseException | None = None
    try:
        await node.close()
    except BaseException as exc:
        first = exc
    for child in node.children():
        try:
            await close_graph(child)
        except BaseException as exc:
            first = first or exc
    if first is not None:
        raise first


async def _close_quietly(node: BlockDriver) -> None:
    with contextlib.suppress(Exception):
        await close_graph(node)
