"""``aioblock serve ublk``: serve an image as a Linux block device until SIGINT or SIGTERM.

    aioblock serve ublk [-f FMT] [-r] [--queues N] [--depth D] [--max-io BYTES] [--engine E] [-t CACHE]
                        [-o OPTS] [--recover DEV_ID] [--no-recovery] FILE
    aioblock serve ublk --list
    aioblock serve ublk --delete DEV_ID

Once the device is live its path (``/dev/ublkbN``) is printed alone on a line on stdout. On SIGINT or SIGTERM
the device is stopped and deleted, the image closed (metadata flushed) and the exit status is 0. The ublk
checks come first, then the image is opened, and only then is a device created: a missing driver, a missing
privilege or a bad image leaves nothing behind.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from typing import Any

from .. import api
from ..errors import InvalidOptionError
from ..frontends import ublk
from ..frontends.ublk.kernel import LinuxKernel
from ..sizes import format_size, parse_size
from .common import parse_options

__all__ = ["add_parser"]

_CACHES = ("writeback", "none", "unsafe")


def add_parser(sub: Any) -> None:
    p = sub.add_parser("serve", help="serve an image to others (ublk: a Linux block device)")
    frontends = p.add_subparsers(dest="frontend", metavar="FRONTEND", required=True)
    u = frontends.add_parser("ublk", help="serve the image as /dev/ublkbN through the kernel's ublk driver",
                             description="Serve FILE as a ublk block device until SIGINT or SIGTERM.")
    u.add_argument("-f", dest="fmt", default=None, metavar="FMT", help="image format (default: probe)")
    u.add_argument("-r", "--read-only", dest="read_only", action="store_true", help="a read-only device")
    u.add_argument("--queues", type=int, default=1, metavar="N",
                   help="hardware queues, one thread each (default 1; the kernel allows one per CPU)")
    u.add_argument("--depth", type=int, default=ublk.device.DEFAULT_DEPTH, metavar="D",
                   help=f"requests in flight per queue (default {ublk.device.DEFAULT_DEPTH})")
    u.add_argument("--max-io", dest="max_io", default=str(ublk.device.DEFAULT_MAX_IO), metavar="BYTES",
                   help="largest request (default 512K)")
    u.add_argument("--engine", choices=("hybrid", "uring", "threads", "sync"), default=None,
                   help="I/O engine of the image (default: see README)")
    u.add_argument("-t", "--cache", dest="cache", default="writeback", metavar="CACHE",
                   help="writeback (default), none (O_DIRECT) or unsafe (flushes do nothing)")
    u.add_argument("-o", dest="options", action="append", metavar="OPTS", help="format options (key=value,...)")
    u.add_argument("--recover", type=int, default=None, metavar="DEV_ID",
                   help="reattach to device DEV_ID, quiesced after its server died, and reissue its I/O")
    u.add_argument("--no-recovery", dest="recoverable", action="store_false",
                   help="if this server dies, fail the device's I/O instead of keeping it for --recover")
    u.add_argument("--list", action="store_true", help="list the ublk devices and exit")
    u.add_argument("--delete", type=int, default=None, metavar="DEV_ID", help="remove a device and exit")
    u.add_argument("filename", nargs="?", help="image file")
    u.set_defaults(run=run)


async def run(args: argparse.Namespace) -> int:
    if args.list:
        return _list()
    if args.delete is not None:
        await asyncio.to_thread(ublk.delete_device, args.delete)
        return 0
    if args.filename is None:
        raise InvalidOptionError("Expecting one image file name")
    if args.cache not in _CACHES:
        raise InvalidOptionError(f"Invalid cache option: {args.cache} (choose from {', '.join(_CACHES)})")
    max_io = parse_size(args.max_io)
    LinuxKernel().control().close()             # ublk present and permitted, before the image is touched
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        async with api.open(args.filename, args.fmt, read_only=args.read_only, engine=args.engine,
                            cache=args.cache, options=parse_options(args.options)) as disk, \
                ublk.serve(disk, queues=args.queues, depth=args.depth, max_io=max_io,
                           recoverable=args.recoverable, recover=args.recover) as dev:
            print(dev.path, flush=True)
            gone = asyncio.ensure_future(dev.wait_stopped())
            signalled = asyncio.ensure_future(stop.wait())
            await asyncio.wait([gone, signalled], return_when=asyncio.FIRST_COMPLETED)
            signalled.cancel()
            if gone.done():
                gone.result()                   # a failed queue: its UblkError, after the device is deleted
                print(f"aioblock: ublk device {dev.dev_id} was stopped from outside", file=sys.stderr)
            else:
                gone.cancel()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
    return 0


def _list() -> int:
    devices = ublk.list_devices()
    print(f"{'ID':>4}  {'STATE':<9} {'QUEUES':>6} {'DEPTH':>5} {'SIZE':>9} {'PID':>8}  IMAGE")
    for d in devices:
        size = format_size(d.size) if d.size is not None else "-"
        image = "-"
        if d.image:
            ro = ", read-only" if d.image.get("read_only") else ""
            image = f"{d.image.get('file')} ({d.image.get('format')}{ro})"
        print(f"{d.dev_id:>4}  {d.state:<9} {d.queues:>6} {d.depth:>5} {size:>9} {d.pid:>8}  {image}")
    return 0
