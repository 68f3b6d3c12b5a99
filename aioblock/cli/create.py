"""``aioblock create``: qemu-img create."""

from __future__ import annotations

import argparse
from typing import Any

from .. import api
from ..sizes import parse_size
from .common import parse_options


def add_parser(sub: Any) -> None:
    p = sub.add_parser("create", help="create a new image (qemu-img create)")
    p.add_argument("-f", dest="fmt", default="raw", help="image format (default raw)")
    p.add_argument("-o", dest="options", action="append", help="format options k=v[,k=v...]")
    p.add_argument("-b", dest="backing", help="backing file")
    p.add_argument("-F", dest="backing_fmt", help="backing file format")
    p.add_argument("-q", dest="quiet", action="store_true", help="quiet")
    p.add_argument("filename")
    p.add_argument("size", nargs="?", help="virtual size, with optional k/M/G/T/P/E suffix")
    p.set_defaults(run=run)


async def run(args: argparse.Namespace) -> int:
    options = parse_options(args.options)
    backing = options.pop("backing_file", None) or args.backing
    backing_fmt = options.pop("backing_fmt", None) or args.backing_fmt
    size = parse_size(args.size) if args.size is not None else None
    api.validate_create(args.fmt, options, backing, size)
    if not args.quiet:
        shown = "".join(f" {k}={v}" for k, v in options.items())
        if backing:
            shown = f" backing_file={backing}" + (f" backing_fmt={backing_fmt}" if backing_fmt else "") + shown
        size_text = f" size={size}" if size is not None else ""
        print(f"Formatting '{args.filename}', fmt={args.fmt}{size_text}{shown}")
    await api.create(args.filename, args.fmt, size, backing=backing, backing_fmt=backing_fmt, options=options)
    return 0
