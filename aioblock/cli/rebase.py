"""``aioblock rebase``: qemu-img rebase, for every format with backing files (qcow2, QED).

**Safe mode** (the default) keeps what the image reads as: wherever the image itself allocates nothing, the
data its old backing chain gives is compared, one cluster at a time, with what the new backing file gives
(zeroes without one, and past its end); every cluster that differs is written into the image. Ranges both
chains report as zeroes are not read. Then the header is pointed at the new backing file and synced. **-u**
(unsafe) only rewrites the header: the old backing file need not exist and the data is not looked at.

Without ``-b`` (or with ``-b ""``) the image loses its backing file; in safe mode everything the old chain
provided is copied in first. Relative names are relative to the image's directory, as everywhere.

Where this differs from qemu-img 7.2, on purpose: everything is checked before anything is written (qemu-img's
safe mode copies first and only then finds that ``-F`` is missing, leaving a half-rebased image); a new backing
file that is the image itself, or whose chain leads back to it, is refused in both modes (qemu-img ``-u``
writes the loop); QED names longer than QEMU can read back (4095 bytes) are refused.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

from .. import api
from ..backend import BlockBackend
from ..driver import BlockDriver
from ..errors import AioblockError, BackingChainError, InvalidOptionError
from ..node import resolve_backing_name
from .common import cache_mode

__all__ = ["rebase"]

#: bytes compared per step (whole clusters of the image; at least this much is read at once)
CHUNK = 1 << 20


def add_parser(sub: Any) -> None:
    p = sub.add_parser("rebase", help="change an image's backing file (qemu-img rebase)")
    p.add_argument("-f", dest="fmt", help="image format (probed when omitted)")
    p.add_argument("-b", dest="backing", default=None, help="new backing file (none: remove the backing file)")
    p.add_argument("-F", dest="backing_fmt", help="format of the new backing file (required with -b)")
    p.add_argument("-u", dest="unsafe", action="store_true",
                   help="unsafe: only change the reference, copy nothing (the old backing file may be missing)")
    p.add_argument("-t", dest="cache", default="writeback", help="the image's cache mode (default writeback)")
    p.add_argument("-T", dest="src_cache", default="writeback",
                   help="the backing files' cache mode (default writeback)")
    p.add_argument("-p", dest="progress", action="store_true", help="print progress (qemu-img's format)")
    p.add_argument("-q", dest="quiet", action="store_true", help="quiet")
    p.add_argument("-U", "--force-share", action="store_true", help="accepted for compatibility; no effect")
    p.add_argument("filename")
    p.set_defaults(run=run)


async def run(args: argparse.Namespace) -> int:
    cache = cache_mode(args.cache)[0]
    src_cache = cache_mode(args.src_cache)[0]
    if args.backing and args.backing_fmt is None:     # before opening anything, as qemu-img
        raise InvalidOptionError(f"Could not change the backing file to '{args.backing}': backing format must "
                                 "be specified")
    async with api.open(args.filename, args.fmt, cache=cache,
                        options={"backing": "ignore"} if args.unsafe else None) as disk:
        name = disk.check_backing_file(args.backing, args.backing_fmt)
        path = resolve_backing_name(args.filename, name) if name is not None else None
        if args.unsafe:
            if path is not None and os.path.exists(path) and os.path.samefile(path, args.filename):
                raise BackingChainError(f"backing chain loop: '{name}' is the image itself")
        elif path is None:
            await rebase(disk, None, progress=args.progress and not args.quiet)
        else:
            assert name is not None
            try:
                new = await api.open(path, args.backing_fmt, read_only=True, cache=src_cache)
            except AioblockError as exc:
                raise AioblockError(f"Could not open new backing file '{name}': {exc.message}",
                                    filename=args.filename) from None
            try:
                _refuse_loop(new, args.filename, name)
                await rebase(disk, new, progress=args.progress and not args.quiet)
            finally:
                await new.close()
        await disk.change_backing_file(name, args.backing_fmt)
    return 0


def _refuse_loop(new: BlockBackend, filename: str, name: str) -> None:
    node: BlockDriver | None = new.root
    while node is not None:
        if os.path.samefile(node.filename, filename):
            raise BackingChainError(f"backing chain loop: '{name}' is, or is backed by, the image itself")
        node = node.backing


async def rebase(disk: BlockBackend, new: BlockBackend | None, *, progress: bool = False) -> None:
    """Safe mode's copy (see the module docstring): make ``disk`` read the same over ``new`` (None: no backing
    file) as it reads now over its old chain, by writing into it every cluster where the two differ. Does not
    change the stored reference (``BlockBackend.change_backing_file`` does) and ends with a flush."""
    size = disk.size
    unit = disk.cluster_size or 65536
    step = max(unit, CHUNK // unit * unit)
    old_buf, new_buf = bytearray(step), bytearray(step)
    top = disk.root
    pos = 0
    while pos < size:
        ext = await top.block_status(pos, min(size - pos, step))
        n = ext.length
        if not ext.allocated:
            n = min(size - pos, -(-(pos + n) // unit) * unit - pos)      # whole clusters
            await _copy_differences(disk, new, pos, n, memoryview(old_buf), memoryview(new_buf), unit)
        pos += n
        if progress:
            print(f"    ({pos * 100 / size:3.2f}/100%)\r", end="", flush=True)
    if progress:
        print()
    await disk.flush()


async def _copy_differences(disk: BlockBackend, new: BlockBackend | None, offset: int, length: int,
                            old_buf: memoryview, new_buf: memoryview, unit: int) -> None:
    """One range the image does not allocate (``length`` <= the buffers): write the clusters that differ."""
    old_st = await disk.block_status(offset, length)
    if old_st.zero and not old_st.data and old_st.length == length and await _reads_zero(new, offset, length):
        return
    old, cur = old_buf[:length], new_buf[:length]
    await disk.readinto(offset, old)
    new_size = new.size if new is not None else 0
    inside = max(0, min(length, new_size - offset))
    if inside:
        assert new is not None
        await new.readinto(offset, cur[:inside])
    cur[inside:] = bytes(length - inside)
    start = None                      # the run of differing clusters being gathered
    for at in range(0, length + unit, unit):
        differs = at < length and old[at:at + unit] != cur[at:at + unit]
        if differs and start is None:
            start = at
        elif not differs and start is not None:
            await disk.write(offset + start, old[start:at])
            start = None


async def _reads_zero(new: BlockBackend | None, offset: int, length: int) -> bool:
    if new is None or offset >= new.size:
        return True
    end = min(offset + length, new.size)
    while offset < end:
        st = await new.block_status(offset, end - offset)
        if not st.zero or st.data:
            return False
        offset += st.length
    return True
