"""``aioblock check``: qemu-img check (exit 0 clean, 1 check failed, 2 corruptions, 3 leaks, 63 no check)."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from .. import api
from ..driver import CheckResult
from ..errors import AioblockError, NotSupportedError
from .common import dump_json

EXIT_NO_CHECK = 63


def add_parser(sub: Any) -> None:
    p = sub.add_parser("check", help="check an image for consistency (qemu-img check)")
    p.add_argument("-f", dest="fmt", help="image format (probed when omitted)")
    p.add_argument("-r", dest="repair", choices=("leaks", "all"), help="repair leaks, or everything")
    p.add_argument("--output", choices=("human", "json"), default="human")
    p.add_argument("-q", dest="quiet", action="store_true", help="quiet")
    p.add_argument("-U", "--force-share", action="store_true", help="accepted for compatibility; no effect")
    p.add_argument("filename")
    p.set_defaults(run=run)


async def run(args: argparse.Namespace) -> int:
    try:
        async with api.open(args.filename, args.fmt, read_only=args.repair is None, engine="sync",
                            options={"backing": "ignore", "check": True}) as disk:
            result = await disk.check(args.repair)
    except NotSupportedError as exc:
        print(f"aioblock: {args.filename}: {exc}", file=sys.stderr)
        return EXIT_NO_CHECK
    except AioblockError as exc:
        print(f"aioblock: {exc.filename or args.filename}: {exc}", file=sys.stderr)
        return 1
    for message in result.messages:            # qemu-img prints these on stderr, whatever the output format
        print(message, file=sys.stderr)
    if result.failed:
        print(f"aioblock: {args.filename}: Check failed: {result.failed}", file=sys.stderr)
        return 1
    if args.output == "json":
        print(dump_json(result.to_json()))
    elif not args.quiet:
        print(human_check(result), end="")
    if result.check_errors:
        print(f"aioblock: {args.filename}: Check failed", file=sys.stderr)
    return result.exit_status


def human_check(r: CheckResult) -> str:
    """qemu-img check's human-readable report (stdout; the messages go to stderr)."""
    out: list[str] = []
    if r.corruptions_fixed or r.leaks_fixed:
        out.append(f"The following inconsistencies were found and repaired:\n\n    {r.leaks_fixed} leaked clusters\n"
                   f"    {r.corruptions_fixed} corruptions\n\nDouble checking the fixed image now...")
    if not (r.corruptions or r.leaks or r.check_errors):
        out.append("No errors were found on the image.")
    else:
        if r.corruptions:
            out.append(f"\n{r.corruptions} errors were found on the image.\nData may be corrupted, or further "
                       "writes to the image may corrupt it.")
        if r.leaks:
            out.append(f"\n{r.leaks} leaked clusters were found on the image.\nThis means waste of disk space, "
                       "but no harm to data.")
        if r.check_errors:
            out.append(f"\n{r.check_errors} internal errors have occurred during the check.")
    if r.total_clusters and r.allocated_clusters:
        t, a = r.total_clusters, r.allocated_clusters
        out.append(f"{a}/{t} = {a * 100 / t:0.2f}% allocated, {(r.fragmented_clusters or 0) * 100 / a:0.2f}% "
                   f"fragmented, {(r.compressed_clusters or 0) * 100 / a:0.2f}% compressed clusters")
    if r.image_end_offset:
        out.append(f"Image end offset: {r.image_end_offset}")
    return "\n".join(out) + "\n"
