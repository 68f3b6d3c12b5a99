"""``aioblock convert``: qemu-img convert.

Copies the source's contents into a new image. Like qemu-img, ranges the source reports as zero are skipped,
and within data ranges every ``-S``-aligned block (default 4 KiB) that is all zeroes is left unwritten, so the
target stays sparse; ``-S 0`` writes everything. ``-m`` requests run concurrently (default 8). The target is
written with cache mode ``unsafe`` unless ``-t`` says otherwise, as qemu-img does: no flushes at all, so that
the conversion never waits for the disk (``-t writeback`` flushes once at the end).
``-c`` writes compressed clusters (formats with compression only).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import Any

from tqdm import tqdm

from .. import api
from ..backend import BlockBackend
from ..drivers import driver_class
from ..errors import InvalidOptionError, NotSupportedError
from ..sizes import parse_size
from .common import cache_mode, parse_options

CHUNK = 2 << 20
_ZEROES = memoryview(bytes(CHUNK))


def add_parser(sub: Any) -> None:
    p = sub.add_parser("convert", help="convert an image to another format (qemu-img convert)")
    p.add_argument("-f", dest="fmt", help="source format (probed when omitted)")
    p.add_argument("-O", dest="out_fmt", default="raw", help="output format (default raw)")
    p.add_argument("-o", dest="options", action="append", help="output format options k=v[,k=v...]")
    p.add_argument("-c", dest="compress", action="store_true", help="write compressed clusters")
    p.add_argument("-p", dest="progress", action="store_true", help="show a progress bar")
    p.add_argument("-m", dest="parallel", type=int, default=8, help="concurrent requests (default 8)")
    p.add_argument("-S", dest="sparse", default="4k", help="minimum zero run left unallocated (default 4k)")
    p.add_argument("-W", dest="out_of_order", action="store_true",
                   help="allow out-of-order writes (default: in order, as qemu-img)")
    p.add_argument("-t", dest="cache", default="unsafe",
                   help="target cache mode: unsafe (default, as qemu-img: no flushes), writeback, none, "
                        "writethrough, directsync")
    p.add_argument("-T", dest="src_cache", default="writeback",
                   help="source cache mode (default writeback; none: O_DIRECT)")
    p.add_argument("-q", dest="quiet", action="store_true", help="quiet")
    p.add_argument("-U", "--force-share", action="store_true", help="accepted for compatibility; no effect")
    p.add_argument("filename")
    p.add_argument("target")
    p.set_defaults(run=run)


async def run(args: argparse.Namespace) -> int:
    if not 1 <= args.parallel <= 1024:
        raise InvalidOptionError("Invalid number of coroutines. Allowed number of coroutines is between 1 and 1024")
    sparse = parse_size(args.sparse)
    options = parse_options(args.options)
    cache, fua, _ = cache_mode(args.cache)
    src_cache = cache_mode(args.src_cache)[0]
    async with api.open(args.filename, args.fmt, read_only=True, cache=src_cache) as src:
        if args.compress and not driver_class(args.out_fmt).supports_compression:
            raise NotSupportedError("Compression not supported for this file format")
        await api.create(args.target, args.out_fmt, src.size, options=options)
        async with api.open(args.target, args.out_fmt, cache=cache) as dst:
            await convert(src, dst, parallel=args.parallel, sparse=sparse, compress=args.compress,
                          in_order=not args.out_of_order, progress=args.progress and not args.quiet, fua=fua)
            if args.compress:
                await dst.write_compressed(0, b"")     # end of the compressed stream (qemu-img sends it too)
            await dst.flush()                          # (nothing with -t unsafe)
    return 0


async def convert(src: BlockBackend, dst: BlockBackend, *, parallel: int = 8, sparse: int = 4096,
                  compress: bool = False, in_order: bool = True, progress: bool = False, fua: bool = False) -> None:
    """Copy ``src`` into the freshly created (zero-reading) ``dst``.

    ``parallel`` jobs read at once; with ``in_order`` (qemu-img's default) each job writes only after the job
    before it has written, so that the target's clusters are allocated in guest order, as qemu-img lays them
    out (compressed clusters packed one after the other, incompressible ones contiguous). ``fua`` (cache modes
    writethrough and directsync): each job is durable before the next one's turn."""
    chunk = CHUNK
    cluster = dst.cluster_size or 65536
    if compress:
        chunk = max(cluster, CHUNK // cluster * cluster)
    queue: asyncio.Queue[tuple[int, int, int] | None] = asyncio.Queue(maxsize=parallel * 2)
    written = 0                                # with in_order: jobs below this number have written
    turn = asyncio.Condition()
    bar = tqdm(total=src.size, unit="B", unit_scale=True, unit_divisor=1024, file=sys.stdout,
               disable=not progress, leave=True, desc="converting")

    async def my_turn(seq: int) -> None:
        async with turn:
            await turn.wait_for(lambda: written == seq)

    async def worker() -> None:
        nonlocal written
        buf = bytearray(chunk)                  # reused: each job is written before the next is read
        view = memoryview(buf)
        while (job := await queue.get()) is not None:
            seq, offset, length = job
            await src.readinto(offset, view[:length])
            if in_order:
                await my_turn(seq)
            if compress:
                await _write_compressed(dst, offset, buf, length)
                if fua:
                    await dst.flush()
            else:
                await _write_sparse(dst, offset, buf, length, sparse, fua)
            if in_order:
                async with turn:
                    written += 1
                    turn.notify_all()
            bar.update(length)

    unit = cluster if compress else 1      # compressed writes take whole clusters: keep jobs aligned to them

    async def produce() -> None:
        pos = seq = 0
        while pos < src.size:
            st = await src.block_status(pos, min(src.size - pos, chunk))
            if st.zero and not st.data and st.length >= unit:
                n = st.length // unit * unit
                bar.update(n)
            else:
                n = min(src.size - pos, -(-st.length // unit) * unit)
                await queue.put((seq, pos, n))
                seq += 1
            pos += n

    try:
        async with asyncio.TaskGroup() as tg:
            workers = [tg.create_task(worker()) for _ in range(parallel)]
            await produce()
            for _ in workers:
                await queue.put(None)
    except BaseExceptionGroup as group:        # report the first failure as itself (one line in the CLI)
        first: BaseException = group
        while isinstance(first, BaseExceptionGroup):
            first = first.exceptions[0]
        raise first from None
    bar.close()


def _is_zero(buf: bytearray, pos: int, n: int) -> bool:
    """Whether ``buf[pos:pos + n]`` holds only zero bytes (a memcmp per ``CHUNK``: ``startswith`` with a zero
    view)."""
    end = pos + n
    while end - pos > CHUNK:
        if not buf.startswith(_ZEROES, pos):
            return False
        pos += CHUNK
    return buf.startswith(_ZEROES[:end - pos], pos)


def _data_runs(buf: bytearray, length: int, offset: int, block: int) -> list[tuple[int, int]]:
    """The ``(start, end)`` positions in ``buf[:length]`` (which holds the image's bytes at ``offset``) of the
    runs of ``block``-aligned blocks that are not all zero. One strided slice takes the first byte of every
    block, so a block of data is usually ruled out without a comparison; only blocks that start with a zero
    byte are compared."""
    head = min(length, -offset % block)         # a partial block before the first aligned one
    firsts = buf[head:length:block]
    i = firsts.find(0)
    if i < 0 and not (head and _is_zero(buf, 0, head)):
        return [(0, length)]                    # the common case for data: no block starts with a zero byte
    if not firsts.strip(b"\0") and _is_zero(buf, 0, length):
        return []
    starts = ([0] if head else []) + list(range(head, length, block))
    zero = [False] * len(starts)
    if head:
        zero[0] = _is_zero(buf, 0, head)
    while i >= 0:
        k = i + bool(head)
        zero[k] = _is_zero(buf, starts[k], min(block, length - starts[k]))
        i = firsts.find(0, i + 1)
    runs: list[tuple[int, int]] = []
    for k, pos in enumerate(starts):
        if zero[k]:
            continue
        end = starts[k + 1] if k + 1 < len(starts) else length
        if runs and runs[-1][1] == pos:
            runs[-1] = (runs[-1][0], end)
        else:
            runs.append((pos, end))
    return runs


async def _write_sparse(dst: BlockBackend, offset: int, buf: bytearray, length: int, sparse: int,
                        fua: bool) -> None:
    """Write the non-zero ``sparse``-aligned blocks of ``buf[:length]`` (all of it when ``sparse`` is 0)."""
    view = memoryview(buf)
    if sparse <= 0:
        await dst.write(offset, view[:length], fua=fua)
        return
    for start, end in _data_runs(buf, length, offset, sparse):
        await dst.write(offset + start, view[start:end], fua=fua)


async def _write_compressed(dst: BlockBackend, offset: int, buf: bytearray, length: int) -> None:
    cluster = dst.cluster_size or length
    view = memoryview(buf)
    for pos in range(0, length, cluster):
        n = min(cluster, length - pos)
        if not _is_zero(buf, pos, n):
            await dst.write_compressed(offset + pos, view[pos:pos + n])
