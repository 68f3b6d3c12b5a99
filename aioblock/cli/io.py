"""Placeholder: registered by a later change."""

from __future__ import annotations

import argparse
from typing import Any


def add_parser(sub: Any) -> None:
    p = sub.add_parser("io", help="(not yet available)")
    p.set_defaults(run=_run)


async def _run(args: argparse.Namespace) -> int:
    raise SystemExit("aioblock: io: not implemented yet")
