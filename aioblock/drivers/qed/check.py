"""QED check and repair (QEMU's qed-check.c, with qemu-img check's counters and exit codes).

Every cluster of the file (up to ``file_end``) is marked in a bitmap as it is found in use: the header, the L1
table, each L2 table the L1 table names, each data cluster an L2 table names. Then:

* an L1 entry that is not a valid table offset (unaligned, in the header, past the end of the file, over the L1
  table) and an L2 entry that is not a valid data offset (unaligned, past the end, or over the header, the L1 or
  an L2 table) are corruptions; with ``repair="all"`` (or ``"leaks"``, as qemu-img's QED check does) the entry is
  zeroed, so the range reads as unallocated again. QEMU's check misses data entries that point at an L2 table
  (it counts them as clusters used twice and cannot fix them); they are zeroed here like any other bad entry;
* a cluster named twice (two L1 entries sharing a table, two L2 entries sharing a data cluster) is a corruption
  that cannot be fixed;
* clusters in use by nothing are leaks, which QED cannot repair (there is no free map; appending is the only
  allocator), so ``-r all`` still reports them and exits 3, as qemu-img does.

When nothing but leaks remains and the image is writable, NEED_CHECK is cleared. Memory: one bit per cluster of
the file plus one chunk of an L2 table at a time.
"""

from __future__ import annotations

from array import array
from typing import TYPE_CHECKING

from ...driver import CheckResult
from . import layout as L

if TYPE_CHECKING:
    from .driver import QedDriver

__all__ = ["check_image"]

#: L2 tables are read and fixed in chunks of at most this many bytes
_CHUNK = 1 << 20


async def check_image(drv: QedDriver, repair: str | None) -> CheckResult:
    """Check (and repair) ``drv``'s tables. The node must have no I/O in flight (open, or ``aioblock check``).
    After a repair the image is checked again and that result reported (qemu-img: "Double checking the fixed
    image now..."), with the count of what was fixed."""
    fix = repair is not None and not drv.read_only
    async with drv.lock:
        res = await _scan(drv, fix)
        if res.corruptions_fixed:
            fixed = res.corruptions_fixed
            res = await _scan(drv, False)
            res.corruptions_fixed = fixed
        h = drv.h
        drv.damaged = bool(res.corruptions or res.check_errors)
        if fix and h.need_check and not res.corruptions:
            h.features &= ~L.F_NEED_CHECK
            await drv.write_header()
    return res


async def _scan(drv: QedDriver, fix: bool) -> CheckResult:
    """One pass over the tables, zeroing bad entries with ``fix``. Lock held."""
    h, cs = drv.h, drv.cs
    res = CheckResult(filename=drv.filename, format="qed", total_clusters=-(-h.image_size // cs))
    nclusters = drv.file_end // cs
    used = bytearray((nclusters + 7) // 8)

    def mark(offset: int, count: int) -> bool:
        """Mark clusters in use; False (a corruption) if one was already."""
        ok = True
        c = offset // cs
        for k in range(c, c + count):
            if used[k >> 3] >> (k & 7) & 1:
                ok = False
            used[k >> 3] |= 1 << (k & 7)
        if not ok:
            res.corruptions += 1
        return ok

    await drv.l2cache.flush()
    mark(0, h.header_size)
    mark(h.l1_table_offset, h.table_size)
    l1_fixed = False
    tables: list[int] = []
    for i, e in enumerate(drv.l1):
        if e == 0:
            continue
        if not drv.table_ok(e):
            if fix:
                drv.l1[i] = 0
                l1_fixed = True
                res.corruptions_fixed += 1
            else:
                res.corruptions += 1
            continue
        if mark(e, h.table_size):
            tables.append(e)
    drv.tables = array("q", sorted(set(tables)))
    allocated = fragmented = last = 0
    for t in tables:
        for pos in range(0, h.table_bytes, _CHUNK):
            n = min(_CHUNK, h.table_bytes - pos)
            chunk = bytearray(n)
            await drv.file.pread(t + pos, memoryview(chunk))
            entries = L.load_table(chunk)
            changed = False
            for j, d in enumerate(entries):
                if d in (0, L.ZERO_CLUSTER):
                    continue
                allocated += 1
                if last and d != last + cs:
                    fragmented += 1
                last = d
                if not drv.data_ok(d):
                    if fix:
                        entries[j] = 0
                        changed = True
                        res.corruptions_fixed += 1
                        allocated -= 1
                    else:
                        res.corruptions += 1
                    continue
                mark(d, 1)
            if changed:
                await drv.file.pwrite(t + pos, memoryview(L.table_bytes(entries)))
    res.allocated_clusters, res.fragmented_clusters = allocated, fragmented
    if l1_fixed:
        await drv.file.pwrite(h.l1_table_offset, memoryview(L.table_bytes(drv.l1)))
    if fix and (l1_fixed or res.corruptions_fixed):
        drv.l2cache.clear()
        await drv.sync()
    res.leaks = nclusters - int.from_bytes(used, "little").bit_count()
    return res
