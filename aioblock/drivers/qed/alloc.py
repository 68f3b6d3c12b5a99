"""QED writes: in place, allocating (one at a time, through the serial allocating-write queue), write-zeroes,
and the need-check protocol (QEMU's qed.c write path; reliability.md §3.3 Q1-Q4).

**A write** is cut into runs (``QedDriver.lookup``). A run of allocated clusters is written in place at once,
with no lock and no wait. Any other run needs an allocation: the request waits its turn in ``drv.allocs`` (serial:
one allocating write in flight), then looks its run up again, since the allocation before it may have mapped
those clusters (it then writes in place and gives its turn back). The owner appends the run's clusters at
``file_end`` and writes them whole in one write: the head and tail of the first and last cluster are copied from
the backing file or zeroed, the guest's bytes in between. Then it links them: the L2 entries are patched in their
cached slices (written back later), or, when the L1 entry is empty, a new L2 table holding them is appended and
written whole, synced, and only then linked by writing its L1 entry.

**Ordering, so that a crash at any point leaves an image that ``qemu-img check`` passes (at worst with leaks)
and that reads old or new data:**

* Without a backing file, NEED_CHECK is set in the header and **synced** before the first allocating write of a
  dirty period (QEMU writes it without a sync, so that a power loss can keep an L2 update but lose the flag:
  reliability.md §3.4). An L2 entry may then reach the disk before its data: the check that a NEED_CHECK image
  gets on its next read-write open drops entries past the end of the file, and clusters appended at the end of
  the file read as zeroes until written.
* With a backing file (where a lost data cluster would read as zeroes instead of the backing data), the data is
  synced before its L2 entry is written: the cache's depends-on-flush flag (one sync per write-back, for all the
  allocations it covers), or the sync before the L1 entry of a new table.
* NEED_CHECK is cleared ``need_check_timeout`` seconds after the last allocating write (a task that plugs the
  queue, so no allocation is in flight, writes back the L2 slices, syncs, clears the flag and rewrites the
  header) and at close.

**Write-zeroes**: whole clusters are made zero clusters (entry 1) where they are unallocated and a backing file
would show through, zeroed in place where they are allocated, and left alone where they already read as zeroes;
partial clusters at the ends are written as zero buffers.

Cancellation: a request that waits for its turn has changed nothing; once registered it is committed and runs to
its end (``AllocationQueue``). The allocation is always finished, in a ``finally``.
"""

from __future__ import annotations

import asyncio
import bisect
import contextvars
import logging
from array import array
from typing import TYPE_CHECKING

from ...allocation import Allocation, AllocState
from ...errors import AioblockError, NotSupportedError
from . import layout as L
from .layout import DATA, SLICE, UNALLOC, ZERO

if TYPE_CHECKING:
    from .driver import QedDriver

__all__ = ["stop_need_check_timer", "write", "write_zeroes"]

log = logging.getLogger("aioblock.qed")

_ZEROES = bytes(1 << 16)
#: the most guest bytes one allocation covers (bounds the buffer of a write that is not cluster-aligned)
ALLOC_MAX = 16 << 20


async def write(drv: QedDriver, offset: int, buf: memoryview) -> None:
    """A guest write of ``buf`` at ``offset``."""
    pos, total = 0, len(buf)
    claims = drv.allocs.units
    while pos < total:
        view = buf[pos:] if pos else buf
        at = offset + pos
        if claims and (blocker := claims.get(at >> drv.cb)) is not None:
            await drv.allocs.wait_for(blocker)   # its cluster is being allocated: wait, then look it up
        host = drv.mapped(at, total - pos)
        if host is not None:                   # the rest is one run of data clusters: in place
            drv.file.event("write_aio")
            await drv.file.pwrite(host, view)
            return
        kind, host, n = await drv.lookup(at, total - pos)
        if kind == DATA:
            drv.file.event("write_aio")
            await drv.file.pwrite(host, view[:n] if n != len(view) else view)
        else:
            n = await _allocating_write(drv, at, view, zero=False)
        pos += n


async def write_zeroes(drv: QedDriver, offset: int, length: int) -> None:
    """Make ``[offset, offset + length)`` read as zeroes (see the module docstring)."""
    cs = drv.cs
    end = offset + length
    first = min(end, -(-offset // cs) * cs)
    last = max(first, end & ~(cs - 1))
    for a, b in ((offset, first), (last, end)):
        if a < b:
            await write(drv, a, memoryview(bytes(b - a)))
    pos = first
    while pos < last:
        kind, host, n = await drv.lookup(pos, last - pos)
        if kind == DATA:
            await _zero_in_place(drv, host, n)
        elif kind == UNALLOC and drv.backing is not None and pos < drv.backing.size:
            n = await _allocating_write(drv, pos, memoryview(bytes(0)), zero=True, length=n)
        pos += n


async def _zero_in_place(drv: QedDriver, host: int, n: int) -> None:
    drv.file.event("write_aio")
    try:
        await drv.file.pwrite_zeroes(host, n)
        return
    except NotSupportedError:         # no write-zeroes in the file node: write zero buffers
        pass
    done = 0
    while done < n:
        m = min(len(_ZEROES), n - done)
        await drv.file.pwrite(host + done, memoryview(_ZEROES)[:m])
        done += m


async def _allocating_write(drv: QedDriver, offset: int, buf: memoryview, *, zero: bool,
                            length: int | None = None) -> int:
    """Allocate (or, with ``zero``, mark as zero clusters) the run at ``offset`` and write ``buf``'s part of it;
    returns the bytes of the request it covered, or 0 when it waited for the allocation of its first cluster by
    another request (the caller then looks it up again). Waits for its turn first."""
    cs = drv.cs
    want = length if zero and length is not None else len(buf)
    unit = offset >> drv.cb
    blocker = drv.allocs.units.get(unit)
    if blocker is not None:
        await drv.allocs.wait_for(blocker)
        return 0
    alloc = Allocation(unit, 1)
    await drv.allocs.start(alloc)
    linked = False
    try:
        kind, host, n = await drv.lookup(offset, want)
        if kind == DATA or (zero and kind == ZERO):
            # the allocation before ours mapped it: give the turn back at once, then write in place like any
            # write to an allocated cluster (so that the requests queued behind one allocation do not write
            # one after the other)
            drv.allocs.finish(alloc, linked=False)
            if kind == ZERO:
                return n
            if zero:
                await _zero_in_place(drv, host, n)
            else:
                drv.file.event("write_aio")
                await drv.file.pwrite(host, buf[:n])
            return n
        n = min(n, max(cs, ALLOC_MAX))
        first = offset & ~(cs - 1)
        count = (offset + n - first + cs - 1) // cs
        alloc.advance(AllocState.FILLING)
        if zero:
            entries = [L.ZERO_CLUSTER] * count
        else:
            await _ensure_need_check(drv)
            new = drv.file_end
            drv.file_end += count * cs
            await _fill(drv, kind, first, count, new, offset - first, buf[:n])
            entries = [new + i * cs for i in range(count)]
        alloc.advance(AllocState.WRITTEN)
        await _link(drv, first, entries)
        linked = True
        return n
    finally:
        drv.allocs.finish(alloc, linked=linked)
        _after_allocation(drv)


async def _fill(drv: QedDriver, kind: int, first: int, count: int, host: int, head: int, data: memoryview) -> None:
    """Write the new clusters ``[host, host + count * cs)`` for guest ``first``: the guest's ``data`` at
    ``head`` bytes in, the rest from the backing file (unallocated clusters) or zeroes (zero clusters)."""
    cs = drv.cs
    total = count * cs
    tail = total - head - len(data)
    if head == 0 and tail == 0:
        drv.file.event("write_aio")
        await drv.file.pwrite(host, data)
        return
    whole = bytearray(total)
    view = memoryview(whole)
    if kind == UNALLOC and drv.backing is not None:
        drv.file.event("cow_read")
        if head:
            await drv.read_backing(first, view[:head])
        if tail:
            await drv.read_backing(first + total - tail, view[total - tail:])
    view[head:head + len(data)] = data
    drv.file.event("write_aio")
    await drv.file.pwrite(host, view)


async def _link(drv: QedDriver, first: int, entries: list[int]) -> None:
    """Point the L2 entries of guest clusters from ``first`` at ``entries`` (see the module docstring)."""
    l1i, l2i = drv.l2_position(first)
    async with drv.lock:
        l1e = drv.l1[l1i]
        if l1e == 0:
            await _new_table(drv, l1i, l2i, entries)
            return
        if not drv.table_ok(l1e):
            raise drv.bad_entry("L1", l1e)
        cache = drv.l2cache
        if drv.backing is not None:
            cache.set_depends_on_flush()
        i = 0
        while i < len(entries):
            pos = l2i + i
            soff = l1e + ((pos * 8) & ~(SLICE - 1))
            s = await cache.get(soff)
            try:
                j = pos & (SLICE // 8 - 1)
                n = min(len(entries) - i, SLICE // 8 - j)
                s.data[j * 8:(j + n) * 8] = L.table_bytes(_array(entries[i:i + n]))
                cache.mark_dirty(s)
            finally:
                cache.put(s)
            i += n


async def _new_table(drv: QedDriver, l1i: int, l2i: int, entries: list[int]) -> None:
    """Append a new L2 table holding ``entries`` from ``l2i``, write it whole, sync, then write its L1 entry.
    Lock held."""
    h = drv.h
    table = bytearray(h.table_bytes)
    table[l2i * 8:(l2i + len(entries)) * 8] = L.table_bytes(_array(entries))
    offset = drv.file_end
    drv.file_end += h.table_bytes
    drv.file.event("l2_alloc_write")
    await drv.file.pwrite(offset, memoryview(table))
    await drv.sync()
    sector = (l1i * 8) & ~511
    drv.l1[l1i] = offset
    try:
        drv.file.event("l1_update")
        await drv.file.pwrite(h.l1_table_offset + sector, memoryview(L.table_bytes(drv.l1, sector // 8,
                                                                                      sector // 8 + 64)))
    except BaseException:
        drv.l1[l1i] = 0
        raise
    bisect.insort(drv.tables, offset)
    # keep the slice just written in the cache, clean
    soff = offset + ((l2i * 8) & ~(SLICE - 1))
    s = await drv.l2cache.get_empty(soff)
    s.data[:] = table[soff - offset:soff - offset + SLICE]
    drv.l2cache.put(s)


def _array(values: list[int]) -> array[int]:
    return array("Q", values)


async def _ensure_need_check(drv: QedDriver) -> None:
    """Without a backing file: set NEED_CHECK and sync it before the first allocating write of a dirty period.
    The caller owns the allocating-write turn."""
    h = drv.h
    if drv.backing is not None or h.need_check:
        return
    async with drv.lock:
        h.features |= L.F_NEED_CHECK
        try:
            await drv.write_header()
        except BaseException:
            h.features &= ~L.F_NEED_CHECK
            raise


def _after_allocation(drv: QedDriver) -> None:
    """An allocation finished: (re)start the need-check timer when the flag is set."""
    loop = asyncio.get_running_loop()
    drv.last_alloc = loop.time()
    if drv.h.need_check and drv.need_check_timer is None and drv.need_check_task is None:
        drv.need_check_timer = loop.call_later(drv.need_check_timeout, _on_timer, drv,
                                               context=contextvars.Context())


def _on_timer(drv: QedDriver) -> None:
    drv.need_check_timer = None
    loop = asyncio.get_running_loop()
    left = drv.last_alloc + drv.need_check_timeout - loop.time()
    if left > 0:
        drv.need_check_timer = loop.call_later(left, _on_timer, drv, context=contextvars.Context())
        return
    drv.need_check_task = loop.create_task(_clear_need_check(drv), context=contextvars.Context())


async def _clear_need_check(drv: QedDriver) -> None:
    """Plug allocating writes, write back and sync the metadata, clear NEED_CHECK, rewrite the header."""
    try:
        async with drv.allocs.plugged(), drv.lock:
            if drv.h.need_check:
                await drv.flush_caches()
                drv.h.features &= ~L.F_NEED_CHECK
                try:
                    await drv.write_header()
                except BaseException:
                    drv.h.features |= L.F_NEED_CHECK
                    raise
    except AioblockError as exc:         # the flag stays set: the next open checks the image
        log.warning("qed: could not clear the need-check flag of %s: %s", drv.filename, exc)
    finally:
        drv.need_check_task = None


async def stop_need_check_timer(drv: QedDriver) -> None:
    """Cancel the timer and wait for a clear in progress (close does the clear itself)."""
    if drv.need_check_timer is not None:
        drv.need_check_timer.cancel()
        drv.need_check_timer = None
    task = drv.need_check_task
    if task is not None:
        await asyncio.shield(task)
