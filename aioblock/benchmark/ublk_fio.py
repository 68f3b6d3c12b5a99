"""The ``ublk-fio`` target's child: serve the image with ``aioblock serve ublk`` and run fio on the device.

    python -m aioblock.benchmark.ublk_fio -f FMT -t CACHE --depth D [-o OPTS] IMAGE -- FIO_OPTION...

fio gets ``--filename=/dev/ublkbN`` in addition to its options and runs with ``direct=1`` (set by the target),
so that it measures the server, not the page cache of the device; the server's own cache mode is the cell's.
Where the kernel has no ublk (or this is not root) the one-line reason goes to stderr and the exit status is 2,
before the image is touched: the harness records that line as the run's failure. The server is stopped with
SIGTERM after fio, and must exit 0; the exit status is fio's, or 1 if the server failed.
"""

from __future__ import annotations

import argparse
import re
import select
import signal
import subprocess
import sys
from collections.abc import Sequence

from ..errors import UblkError
from ..frontends.ublk.kernel import LinuxKernel


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m aioblock.benchmark.ublk_fio")
    ap.add_argument("-f", dest="fmt", required=True)
    ap.add_argument("-t", dest="cache", default="writeback")
    ap.add_argument("--depth", type=int, required=True)
    ap.add_argument("-o", dest="options", default=None)
    ap.add_argument("image")
    ap.add_argument("fio", nargs=argparse.REMAINDER)
    args = ap.parse_args(argv)
    fio_args = args.fio[1:] if args.fio[:1] == ["--"] else args.fio
    try:
        LinuxKernel().control().close()
    except UblkError as exc:
        print(f"ublk-fio: cannot run here: {exc}", file=sys.stderr)
        return 2
    serve = [sys.executable, "-m", "aioblock", "serve", "ublk", "-f", args.fmt, "-t", args.cache,
             "--depth", str(args.depth), *(["-o", args.options] if args.options else []), args.image]
    server = subprocess.Popen(serve, stdout=subprocess.PIPE, text=True)
    assert server.stdout is not None
    ready, _, _ = select.select([server.stdout], [], [], 60)
    line = server.stdout.readline() if ready else ""
    if not re.fullmatch(r"/dev/ublkb\d+\n", line):
        server.kill()
        print(f"ublk-fio: the server did not start (exit {server.wait()})", file=sys.stderr)
        return 1
    try:
        fio = subprocess.run(["fio", f"--filename={line.strip()}", *fio_args])
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            stopped = server.wait(60)
        except subprocess.TimeoutExpired:
            server.kill()
            stopped = server.wait()
    if stopped != 0:
        print(f"ublk-fio: the server exited {stopped}", file=sys.stderr)
        return 1
    return fio.returncode


if __name__ == "__main__":
    sys.exit(main())
