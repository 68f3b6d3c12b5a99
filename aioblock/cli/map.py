"""``aioblock map``: qemu-img map."""

from __future__ import annotations

import argparse
import json
from typing import Any

from .. import api
from ..backend import MapEntry
from ..errors import AioblockError


def add_parser(sub: Any) -> None:
    p = sub.add_parser("map", help="show where the image's data lives (qemu-img map)")
    p.add_argument("-f", dest="fmt", help="image format (probed when omitted)")
    p.add_argument("--output", choices=("human", "json"), default="human")
    p.add_argument("-U", "--force-share", action="store_true", help="accepted for compatibility; no effect")
    p.add_argument("filename")
    p.set_defaults(run=run)


def _hex(value: int) -> str:
    return f"{value:#x}" if value else "0"          # printf's %#x prints zero as "0"


async def run(args: argparse.Namespace) -> int:
    async with api.open(args.filename, args.fmt, read_only=True, engine="sync") as disk:
        if args.output == "json":
            rows = [json.dumps(e.to_json(), separators=(", ", ": ")).replace("{", "{ ", 1)
                    async for e in disk.map()]
            print("[" + ",\n".join(rows) + "]")
            return 0
        print(f"{'Offset':<16}{'Length':<16}{'Mapped to':<16}File")
        async for e in disk.map():
            _print_human(e)
    return 0


def _print_human(e: MapEntry) -> None:
    if not e.data:
        return
    if e.offset is None:
        raise AioblockError("File contains external, encrypted or compressed clusters.")
    print(f"{_hex(e.start):<16}{_hex(e.length):<16}{_hex(e.offset):<16}{e.filename}")
