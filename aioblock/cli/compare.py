"""``aioblock compare``: qemu-img compare (exit 0 identical, 1 different, 2 error).

Order of checks, as qemu-img: in strict mode a size difference fails first; then the common part is compared
(and, in strict mode, its allocation status); then the part only the larger image has must read as zeroes.
A mismatch is reported at the start of the first differing 512-byte sector, as qemu-img does.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from .. import api
from ..backend import BlockBackend
from ..errors import AioblockError

SECTOR = 512
CHUNK = 1 << 20


def add_parser(sub: Any) -> None:
    p = sub.add_parser("compare", help="compare the contents of two images (qemu-img compare)")
    p.add_argument("-f", dest="fmt_a", help="format of the first image")
    p.add_argument("-F", dest="fmt_b", help="format of the second image")
    p.add_argument("-s", dest="strict", action="store_true", help="strict: sizes and allocation must match too")
    p.add_argument("-q", dest="quiet", action="store_true", help="quiet")
    p.add_argument("-U", "--force-share", action="store_true", help="accepted for compatibility; no effect")
    p.add_argument("filename")
    p.add_argument("filename2")
    p.set_defaults(run=run)


async def run(args: argparse.Namespace) -> int:
    try:
        async with api.open(args.filename, args.fmt_a, read_only=True, engine="sync") as a, \
                api.open(args.filename2, args.fmt_b, read_only=True, engine="sync") as b:
            message, status = await compare(a, b, strict=args.strict)
    except AioblockError as exc:
        print(f"aioblock: {exc.filename or args.filename}: {exc}", file=sys.stderr)
        return 2
    if not args.quiet:
        print(message)
    return status


async def compare(a: BlockBackend, b: BlockBackend, *, strict: bool = False) -> tuple[str, int]:
    """(message, exit status) for two open disks, as ``qemu-img compare`` reports them."""
    if strict and a.size != b.size:
        return "Strict mode: Image size mismatch!", 1
    common = min(a.size, b.size)
    mismatch = await _first_difference(a, b, 0, common, strict)
    if mismatch is not None:
        return mismatch, 1
    if a.size != b.size:
        print("Warning: Image size mismatch!")
        longer = a if a.size > b.size else b
        pos = await _first_nonzero(longer, common, longer.size)
        if pos is not None:
            return f"Content mismatch at offset {pos}!", 1
    return "Images are identical.", 0


async def _first_difference(a: BlockBackend, b: BlockBackend, start: int, end: int, strict: bool) -> str | None:
    pos = start
    while pos < end:
        sa = await a.block_status(pos, min(end - pos, CHUNK))
        sb = await b.block_status(pos, sa.length)
        n = sb.length
        if strict and sa.present != sb.present:
            return f"Strict mode: Offset {pos} block status mismatch!"
        if not (sa.zero and sb.zero and not sa.data and not sb.data):
            da, db = await a.read(pos, n), await b.read(pos, n)
            if da != db:
                return f"Content mismatch at offset {_sector_of_difference(da, db, pos)}!"
        pos += n
    return None


async def _first_nonzero(disk: BlockBackend, start: int, end: int) -> int | None:
    pos = start
    while pos < end:
        st = await disk.block_status(pos, min(end - pos, CHUNK))
        if not (st.zero and not st.data):
            data = await disk.read(pos, st.length)
            stripped = data.lstrip(b"\0")
            if stripped:
                first = pos + len(data) - len(stripped)
                return first // SECTOR * SECTOR
        pos += st.length
    return None


def _sector_of_difference(da: bytes, db: bytes, base: int) -> int:
    lo, hi = 0, len(da)
    while hi - lo > SECTOR:                      # binary search on prefix equality, then sector granularity
        mid = (lo + hi) // 2
        if da[lo:mid] == db[lo:mid]:
            lo = mid
        else:
            hi = mid
    first = next(i for i in range(lo, hi) if da[i] != db[i])
    return (base + first) // SECTOR * SECTOR
