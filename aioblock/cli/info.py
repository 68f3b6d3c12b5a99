"""``aioblock info``: qemu-img info."""

from __future__ import annotations

import argparse
import time
from typing import Any

from .. import api
from ..backend import ImageInfo
from ..sizes import format_size
from .common import dump_json


def add_parser(sub: Any) -> None:
    p = sub.add_parser("info", help="show information about an image (qemu-img info)")
    p.add_argument("-f", dest="fmt", help="image format (probed when omitted)")
    p.add_argument("--output", choices=("human", "json"), default="human")
    p.add_argument("--backing-chain", action="store_true", help="show every image of the backing chain")
    p.add_argument("-U", "--force-share", action="store_true", help="accepted for compatibility; no effect")
    p.add_argument("filename")
    p.set_defaults(run=run)


async def run(args: argparse.Namespace) -> int:
    async with api.open(args.filename, args.fmt, read_only=True, engine="sync") as disk:
        info = await disk.info()
    images = info.chain() if args.backing_chain else [info]
    if args.output == "json":
        out = [i.to_json() for i in images]
        print(dump_json(out if args.backing_chain else out[0]))
    else:
        print("\n".join(human_info(i) for i in images), end="")
    return 0


def human_info(info: ImageInfo) -> str:
    """qemu-img info's human-readable block for one image."""
    lines = [f"image: {info.filename}", f"file format: {info.format}",
             f"virtual size: {format_size(info.virtual_size)} ({info.virtual_size} bytes)",
             f"disk size: {format_size(info.actual_size) if info.actual_size is not None else 'unavailable'}"]
    if info.cluster_size is not None:
        lines.append(f"cluster_size: {info.cluster_size}")
    if info.backing_filename is not None:
        line = f"backing file: {info.backing_filename}"
        if info.full_backing_filename and info.full_backing_filename != info.backing_filename:
            line += f" (actual path: {info.full_backing_filename})"
        lines.append(line)
        if info.backing_format is not None:
            lines.append(f"backing file format: {info.backing_format}")
    if info.snapshots:
        lines.append("Snapshot list:")
        lines.append("ID        TAG               VM SIZE                DATE     VM CLOCK     ICOUNT")
        lines += [_snapshot_line(sn) for sn in info.snapshots]
    if info.dirty:
        lines.append("cleanly shut down: no")
    if info.format_specific:
        lines.append("Format specific information:")
        for key, value in info.format_specific.items():
            text = str(value).lower() if isinstance(value, bool) else str(value)
            lines.append(f"    {key.replace('-', ' ')}: {text}")
    return "\n".join(lines) + "\n"


def _snapshot_line(sn: dict[str, Any]) -> str:
    """One row of qemu-img info's snapshot table (date in local time, VM clock as h:mm:ss.ms)."""
    date = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(sn["date-sec"]))
    secs = sn["vm-clock-sec"]
    clock = f"{secs // 3600:02d}:{secs // 60 % 60:02d}:{secs % 60:02d}.{sn['vm-clock-nsec'] // 1_000_000:03d}"
    icount = sn.get("icount")
    return (f"{sn['id']:<9} {sn['name']:<17} {format_size(sn['vm-state-size']):>7} {date} {clock} "
            f"{'' if icount is None else icount:>10}")
