"""The ``aioblock`` command: qemu-img and qemu-io style subcommands over the public API.

Each subcommand lives in its own module with ``add_parser(subparsers)``, which registers the command and sets
``run`` (``async def run(args) -> int``, the exit status) as its default. Errors are one line
``aioblock: <file>: <message>`` on stderr and a non-zero exit; ``--debug`` shows tracebacks instead.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Callable, Coroutine
from typing import Any

from ..errors import AioblockError

__all__ = ["build_parser", "main", "run_coroutine"]

_COMMANDS = ("info", "create", "check", "compare", "convert", "rebase", "map", "io", "bench", "benchmark",
             "serve")


def build_parser() -> argparse.ArgumentParser:
    import importlib

    parser = argparse.ArgumentParser(prog="aioblock", description="asyncio block layer for disk images")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    parser.add_argument("--loop", choices=("asyncio", "uvloop"), default=None,
                        help="event loop (default: uvloop where installed)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in _COMMANDS:
        importlib.import_module(f"{__name__}.{name}").add_parser(sub)
    return parser


def run_coroutine(factory: Callable[[], Coroutine[Any, Any, int]], loop: str | None = None) -> int:
    """Run the command's coroutine on the chosen loop (uvloop by default where it imports)."""
    if loop in (None, "uvloop"):
        try:
            import uvloop
        except ImportError:
            if loop == "uvloop":
                raise AioblockError("uvloop is not installed") from None
        else:
            with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
                return runner.run(factory())
    return asyncio.run(factory())


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return run_coroutine(lambda: args.run(args), args.loop)
    except AioblockError as exc:
        if args.debug:
            raise
        name = exc.filename or getattr(args, "filename", None)
        prefix = f"aioblock: {name}: " if name else "aioblock: "
        print(f"{prefix}{exc}", file=sys.stderr)
        return exc.exit_status
    except KeyboardInterrupt:
        return 130
    except OSError as exc:
        if args.debug:
            raise
        name = exc.filename or getattr(args, "filename", None)
        print(f"aioblock: {name}: {exc.strerror or exc}" if name else f"aioblock: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
