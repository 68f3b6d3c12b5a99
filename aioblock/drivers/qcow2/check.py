"""qcow2 check and repair: ``qemu-img check`` semantics (reliability.md §2.5), QEMU 7.2's counters and messages.

A pass rebuilds, from the metadata alone, the reference count every host cluster should have: the header
cluster, the active L1 table and everything it maps (L2 tables, data clusters, every host cluster a compressed
cluster's bytes touch, preallocated zero clusters), each internal snapshot's L1 table and what it maps (a table
shared by several L1 tables counts once per referencing L1), the snapshot table, the refcount table, the
persistent-bitmap directory, tables and data, and every refcount block. It then compares that with the stored
refcounts, cluster by cluster:

* stored > computed is a **leak** (``Leaked cluster N refcount=R reference=r``);
* stored < computed is a **corruption** (``ERROR cluster N refcount=R reference=r``); a stored refcount of 0
  for a referenced cluster, a refcount block that is unaligned, outside the file or not referenced exactly once
  mean the refcount structure itself is broken and must be **rebuilt**.

Besides, corruptions are counted for entries with reserved bits set, unaligned L2 tables and data clusters,
compressed entries with the COPIED flag, bad subcluster bitmaps, references to regions ending one cluster or
more past the end of the file (never counted: a stored refcount past the end of the file is ignored), a
refcount that would overflow the image's refcount width, and (in the active tables) OFLAG_COPIED flags that
disagree with ``refcount == 1``.

Repair (QEMU's ``BDRV_FIX_LEAKS`` / ``BDRV_FIX_ERRORS``):

* ``"leaks"`` lowers refcounts that are too high; OFLAG_COPIED flags are fixed only when nothing else is
  wrong. A broken refcount structure cannot be fixed this way: the check fails (``ERROR need to rebuild
  refcount structures``, exit status 1).
* ``"all"`` also raises refcounts that are too low, fixes OFLAG_COPIED flags, zeroes unaligned preallocated
  zero clusters and, when the structure is broken, rebuilds it: new refcount blocks and a new refcount table
  are placed in clusters nothing references (never over any of the old structures), written and synced, and
  only then does one synced header write switch to them (reliability.md §3.3 I5), so a crash leaves either the
  old or the new structure. The old structures then show up as leaks, which are freed. After a repair without
  remaining corruptions the dirty and corrupt bits are cleared, and the image is checked again: the result is
  that second pass plus the counts of what was fixed, as ``qemu-img check -r`` reports.

Memory: the array of computed refcounts has one entry per cluster of the file (plus the one cluster a
reference may reach past its end), in the image's refcount width, so a hostile offset never sizes an
allocation. Every table read is one cluster (L2, refcount block) or a table whose size the header parser has
already bounded (L1 tables).

Lock rule: ``check_image`` plugs the allocating-write queue (no allocation in flight during a check) and takes
``st.lock`` for the whole check (the caller must hold neither); the caller drains guest I/O first.

It works on the image state (:class:`.state.Qcow2State`), not the driver.
"""

from __future__ import annotations

import errno
import os
import struct
import sys
from array import array
from typing import TYPE_CHECKING

from ...driver import CheckResult
from ...errors import BlockIOError, ReadOnlyError
from . import layout as L
from .metaio import L1, L2, REFBLOCK, REFTABLE, OverlapError
from .refcount import load_table, pack_table

if TYPE_CHECKING:
    from .state import Qcow2State

__all__ = ["FIX_ERRORS", "FIX_LEAKS", "check_image"]

FIX_LEAKS = 1
FIX_ERRORS = 2
_REPAIR_MODES = {None: 0, "leaks": FIX_LEAKS, "all": FIX_LEAKS | FIX_ERRORS}

#: Messages kept per check (QEMU prints every one; a badly broken image of many clusters gives millions).
MAX_MESSAGES = 100_000

#: Standard (non-compressed) L2 entry bits that must be zero (bit 0 is the zero flag, bits 62/63 flags).
L2E_STD_RESERVED_MASK = 0x3F000000000001FE
#: Bitmap table entries (persistent dirty bitmaps): reserved bits, offset, "all ones" flag.
BME_RESERVED_MASK = 0xFF000000000001FE
BME_OFFSET_MASK = 0x00FFFFFFFFFFFE00
BME_ALL_ONES = 1
SC_ALL_ZEROES = L.SC_ALLOC_MASK << L.SC_ZERO_SHIFT

_BITMAP_EXT = struct.Struct(">IIQQ")          # nb_bitmaps, reserved, directory size, directory offset
_BITMAP_DIR_ENTRY = struct.Struct(">QIIBBHI")   # table offset, table size, flags, type, gran. bits, name, extra
_BIG_ENDIAN = sys.byteorder == "big"
#: array typecode holding a refcount of each width (refcount_order -> code); orders 0-2 use bytes too
_TYPECODES = {0: "B", 1: "B", 2: "B", 3: "B", 4: "H", 5: "I", 6: "Q"}


class _CheckFailed(Exception):
    """The check cannot go on (QEMU's negative return from bdrv_check): ``qemu-img: Check failed: <reason>``."""

    def __init__(self, err: int) -> None:
        super().__init__(os.strerror(err))
        self.errno = err


async def check_image(drv: Qcow2State, repair: str | None) -> CheckResult:
    """Check ``drv``'s image (``repair``: None, "leaks" or "all"); see the module docstring.

    With a repair that fixed something, the result is a second, read-only pass (the "double check") with the
    first pass's ``leaks_fixed`` / ``corruptions_fixed`` and the messages of both passes. When the check could
    not complete, ``result.failed`` holds the reason (exit status 1, no counters shown, as qemu-img)."""
    if repair not in _REPAIR_MODES:
        raise ValueError(f"repair must be None, 'leaks' or 'all', not {repair!r}")
    fix = _REPAIR_MODES[repair]
    if fix and drv.read_only:
        raise ReadOnlyError("Block node is read-only: cannot repair", filename=drv.filename)
    async with drv.allocs.plugged(), drv.lock:
        if not drv.read_only:
            await drv.flush_caches()
        first = await _run_pass(drv, fix)
        if not fix or first.failed or not (first.leaks_fixed or first.corruptions_fixed):
            return first
        second = await _run_pass(drv, 0)
    second.leaks_fixed = first.leaks_fixed
    second.corruptions_fixed = first.corruptions_fixed
    second.messages[:0] = first.messages
    del second.messages[MAX_MESSAGES:]
    return second


async def _run_pass(drv: Qcow2State, fix: int) -> CheckResult:
    res = CheckResult(format="qcow2", filename=drv.filename)
    check = _Pass(drv, fix, res)
    try:
        await check.run()
    except _CheckFailed as exc:
        res.failed = str(exc)
        res.check_errors = max(res.check_errors, 1)
    except BlockIOError as exc:
        check.msg(f"ERROR: {exc}")
        res.failed = os.strerror(exc.errno or errno.EIO)
        res.check_errors += 1
    finally:
        if check.dropped:
            res.messages.append(f"({check.dropped} more messages not shown)")
    if fix and not res.failed and not drv.read_only:
        await drv.flush_caches()
    return res


class _Pass:
    """One check pass (QEMU's qcow2_check_refcounts plus marking the image clean after a repair)."""

    def __init__(self, drv: Qcow2State, fix: int, res: CheckResult) -> None:
        h = drv.header
        self.d = drv
        self.h = h
        self.fix = fix
        self.res = res
        self.cb = h.cluster_bits
        self.cs = h.cluster_size
        self.order = h.refcount_order
        self.rmax = (1 << (1 << self.order)) - 1
        self.tc = _TYPECODES[self.order]
        #: refcounts per refcount block, and log2 of it
        self.rb_bits = h.cluster_bits + 3 - self.order
        self.rb_entries = 1 << self.rb_bits
        self.ext = h.extended_l2
        self.esz = h.l2_entry_size
        self.tbl = array(self.tc)
        self.rebuild = False
        self.dropped = 0
        # what check_refcounts_l2 counts for the active tables
        self.allocated = self.fragmented = self.compressed = 0
        #: stored refcount blocks already decoded: reftable index -> refcounts, or None (unreadable)
        self._stored: dict[int, array[int] | None] = {}
        #: check errors counted while reading the stored refcounts (moot once the structure is rebuilt)
        self.stored_errors = 0

    # ---- helpers -------------------------------------------------------------------------------------------

    def msg(self, text: str) -> None:
        if len(self.res.messages) < MAX_MESSAGES:
            self.res.messages.append(text)
        else:
            self.dropped += 1

    @property
    def file_size(self) -> int:
        return self.d.file.size

    def _grow(self, n: int) -> None:
        """Make the computed table ``n`` entries long (zeroes)."""
        if n > len(self.tbl):
            self.tbl.frombytes(bytes((n - len(self.tbl)) * self.tbl.itemsize))

    async def _read(self, offset: int, length: int) -> bytearray:
        """Bytes of the file; what lies past its end reads as zeroes (as QEMU's file driver returns it)."""
        size = self.file_size
        if offset >= size:
            return bytearray(length)
        buf = await self.d.metaio.read(offset, min(length, size - offset))
        if len(buf) < length:
            buf.extend(bytes(length - len(buf)))
        return buf

    def inc(self, offset: int, size: int) -> None:
        """Count one reference to every cluster touching ``[offset, offset+size)`` (QEMU's inc_refcounts)."""
        if size <= 0:
            return
        if offset + size - self.file_size >= self.cs:
            self.msg("ERROR: counting reference for region exceeding the end of the file by one cluster or more: "
                     f"offset {offset:#x} size {size:#x}")
            self.res.corruptions += 1
            return
        cb, tbl, rmax = self.cb, self.tbl, self.rmax
        last = (offset + size - 1) >> cb
        if last >= len(tbl):
            self._grow(last + 1)
        for k in range(offset >> cb, last + 1):
            v = tbl[k]
            if v == rmax:
                self.msg(f"ERROR: overflow cluster offset={k << cb:#x}\nUse qemu-img amend to increase the refcount "
                         "entry width or qemu-img convert to create a clean copy if the image cannot be opened for "
                         "writing")
                self.res.corruptions += 1
                continue
            tbl[k] = v + 1

    def _entries(self, raw: bytes | bytearray) -> tuple[array[int], array[int] | None]:
        """L2 entries of a table and, with extended L2, their subcluster bitmaps."""
        words = load_table(raw)
        if self.ext:
            return words[0::2], words[1::2]
        return words, None

    # ---- the pass ------------------------------------------------------------------------------------------

    async def run(self) -> None:
        h, res, fix = self.h, self.res, self.fix
        cs = self.cs
        nb = -(-self.file_size // cs)
        if nb > L.INT_MAX:
            res.check_errors += 1
            raise _CheckFailed(errno.EFBIG)
        res.total_clusters = -(-h.size // cs) or None
        self._grow(nb)

        await self.calculate(fix)
        pre = _counters(res)
        highest = await self.compare(0)

        if self.rebuild and fix & FIX_ERRORS:
            old = _counters(res)
            self.msg("Rebuilding refcount structure")
            await self.rebuild_structure()
            res.check_errors -= self.stored_errors        # errors reading the structure just replaced
            res.corruptions = res.leaks = 0
            self.rebuild = False
            n = len(self.tbl)
            self.tbl = array(self.tc)
            self._grow(n)
            self.allocated = self.fragmented = self.compressed = 0
            await self.calculate(0)
            fresh_leaks = 0
            if fix & FIX_LEAKS:
                # the old structures are leaked now: free them; only leaks the rebuild itself made count
                saved = _counters(res)
                _set_counters(res, (0, 0, 0, 0, 0))
                highest = await self.compare(FIX_LEAKS)
                if self.rebuild:
                    self.msg("ERROR rebuilt refcount structure is still broken")
                fresh_leaks = res.leaks
                _set_counters(res, saved)
            if res.corruptions < old[1]:
                res.corruptions_fixed += old[1] - res.corruptions
            if res.leaks < old[2]:
                res.leaks_fixed += old[2] - res.leaks
            res.leaks += fresh_leaks
        elif fix:
            if self.rebuild:
                self.msg("ERROR need to rebuild refcount structures")
                res.check_errors += 1
                raise _CheckFailed(errno.EIO)
            if res.leaks or res.corruptions:
                _set_counters(res, pre)
                highest = await self.compare(fix)

        await self.check_copied(fix)
        res.image_end_offset = (highest + 1) * cs
        res.allocated_clusters = self.allocated or None
        res.fragmented_clusters = self.fragmented or None
        res.compressed_clusters = self.compressed or None

        if fix and not res.check_errors and not res.corruptions:
            await self.mark_clean()

    async def mark_clean(self) -> None:
        """After a successful repair: clear the dirty and corrupt bits (QEMU's mark_clean + mark_consistent)."""
        d, h = self.d, self.h
        bits = L.INCOMPAT_DIRTY | L.INCOMPAT_CORRUPT
        if h.version >= 3 and h.incompatible_features & bits:
            await d.write_header_bytes(72, struct.pack(">Q", h.incompatible_features & ~bits))
            h.incompatible_features &= ~bits
        d.lazy_dirty = False              # refcounts are exact on disk: the next lazy update marks it again

    # ---- computing the references ----------------------------------------------------------------------------

    async def calculate(self, fix: int) -> None:
        """Count every reference the metadata makes (QEMU's calculate_refcounts)."""
        d, h = self.d, self.h
        self.inc(0, self.cs)
        await self.l1_refs(h.l1_table_offset, h.l1_size, active=True, fix=fix)
        snap_bytes = 0
        if h.nb_snapshots:
            snap_bytes = await self._snapshot_table_size()
            for sn in d.snapshots:
                await self.l1_refs(sn.l1_table_offset, sn.l1_size, active=False, fix=fix)
        self.inc(h.snapshots_offset, snap_bytes)
        self.inc(h.refcount_table_offset, h.refcount_table_clusters * self.cs)
        await self.bitmap_refs()
        await self.refblock_refs()

    async def _snapshot_table_size(self) -> int:
        """Bytes of the snapshot table, walked entry by entry (each was validated at open). Entries start at
        multiples of 8; the table ends where the last entry ends (QEMU's snapshots_size: no padding after it)."""
        h = self.h
        pos = h.snapshots_offset
        for _ in range(h.nb_snapshots):
            pos = (pos + 7) & ~7
            head = await self._read(pos, 40)
            id_len, name_len = struct.unpack_from(">HH", head, 12)
            extra = struct.unpack_from(">I", head, 36)[0]
            pos += 40 + extra + id_len + name_len
        return pos - h.snapshots_offset

    async def l1_refs(self, l1_off: int, l1_size: int, *, active: bool, fix: int) -> None:
        """An L1 table, its L2 tables and everything they map (QEMU's check_refcounts_l1)."""
        self.inc(l1_off, l1_size * 8)
        if not l1_size:
            return
        try:
            table = load_table(await self._read(l1_off, l1_size * 8))
        except BlockIOError:
            self.msg("ERROR: I/O error in check_refcounts_l1")
            self.res.check_errors += 1
            raise _CheckFailed(errno.EIO) from None
        cs = self.cs
        for entry in table:
            if not entry:
                continue
            if entry & L.L1E_RESERVED_MASK:
                self.msg(f"ERROR found L1 entry with reserved bits set: {entry:x}")
                self.res.corruptions += 1
            l2_off = entry & L.L1E_OFFSET_MASK
            self.inc(l2_off, cs)
            if l2_off & (cs - 1):
                self.msg(f"ERROR l2_offset={l2_off:x}: Table is not cluster aligned; L1 entry corrupted")
                self.res.corruptions += 1
            await self.l2_refs(l2_off, active=active, fix=fix)

    async def l2_refs(self, l2_off: int, *, active: bool, fix: int) -> None:
        """One L2 table (QEMU's check_refcounts_l2); fragmentation counters for the active tables only."""
        res, cs, cb = self.res, self.cs, self.cb
        try:
            raw = await self._read(l2_off, cs)
        except BlockIOError:
            self.msg("ERROR: I/O error in check_refcounts_l2")
            res.check_errors += 1
            raise _CheckFailed(errno.EIO) from None
        entries, bitmaps = self._entries(raw)
        next_contiguous = 0
        for i, entry in enumerate(entries):
            bitmap = bitmaps[i] if bitmaps is not None else 0
            if not entry and not bitmap:
                continue
            if entry & L.OFLAG_COMPRESSED:
                if entry & L.OFLAG_COPIED:
                    coff = L.compressed_descriptor(entry, cb)[0]
                    self.msg(f"ERROR: coffset={coff:#x}: copied flag must never be set for compressed clusters")
                    entry &= ~L.OFLAG_COPIED
                    res.corruptions += 1
                if bitmap:
                    self.msg(f"ERROR compressed cluster {i} with non-zero subcluster allocation bitmap, "
                             f"entry={entry:#x}")
                    res.corruptions += 1
                    continue
                coff, csize = L.compressed_descriptor(entry, cb)
                self.inc(coff, csize)
                if active:
                    self.allocated += 1
                    self.compressed += 1
                    self.fragmented += 1
                continue
            if entry & L2E_STD_RESERVED_MASK:
                self.msg(f"ERROR found l2 entry with reserved bits set: {entry:x}")
                res.corruptions += 1
            offset = entry & L.L2E_OFFSET_MASK
            if not offset:
                if bitmap & L.SC_ALLOC_MASK:
                    self.msg("ERROR: Unallocated cluster has non-zero subcluster allocation map")
                    res.corruptions += 1
                continue
            # a normal cluster, or a preallocated zero cluster (zero flag, not with extended L2)
            if (bitmap >> L.SC_ZERO_SHIFT) & bitmap:
                self.msg(f"ERROR offset={offset:x}: Allocated cluster has corrupted subcluster allocation bitmap")
                res.corruptions += 1
            if offset & (cs - 1):
                res.corruptions += 1
                has_data = bool(bitmap & L.SC_ALLOC_MASK) if self.ext else not entry & L.OFLAG_ZERO
                if has_data:
                    self.msg(f"ERROR offset={offset:x}: Data cluster is not properly aligned; L2 entry corrupted.")
                else:
                    self.msg(f"{'Repairing' if fix & FIX_ERRORS else 'ERROR'} offset={offset:x}: Preallocated "
                             "cluster is not properly aligned; L2 entry corrupted.")
                    if fix & FIX_ERRORS and await self._zero_entry(l2_off, i, bitmap):
                        continue
            if active:
                self.allocated += 1
                if next_contiguous and offset != next_contiguous:
                    self.fragmented += 1
                next_contiguous = offset + cs
            self.inc(offset, cs)

    async def _zero_entry(self, l2_off: int, index: int, bitmap: int) -> bool:
        """Turn an unaligned preallocated zero cluster into a plain zero cluster (QEMU's fix_l2_entry_by_zero)."""
        d = self.d
        if self.ext:
            data = struct.pack(">QQ", 0, (bitmap | bitmap << L.SC_ZERO_SHIFT) & SC_ALL_ZEROES)
        else:
            data = struct.pack(">Q", L.OFLAG_ZERO)
        pos = l2_off + index * self.esz
        if self._overlap(pos, len(data), L2) is not None:
            self.msg("ERROR: Overlap check failed")
            self.res.check_errors += 1
            raise _CheckFailed(errno.EIO)
        try:
            await d.metaio.write(pos, data, L2)
            await d.metaio.sync()
        except BlockIOError as exc:
            self.msg(f"ERROR: Failed to overwrite L2 table entry: {exc}")
            self.res.check_errors += 1
            return False
        self._forget_l2(pos, len(data))
        self.res.corruptions -= 1
        self.res.corruptions_fixed += 1
        return True

    def _overlap(self, offset: int, length: int, kind: str) -> str | None:
        """Why writing ``kind`` metadata there would overwrite other metadata (None: it would not). Checked
        before check's own writes, so that a refused write fails the check without fencing the node."""
        try:
            self.d.metamap.check(offset, length, kind)
        except OverlapError as exc:
            return str(exc)
        return None

    def _forget_l2(self, offset: int, length: int) -> None:
        """Drop cached L2 slices of a range this module rewrote on disk."""
        ss = self.d.l2cache.slice_size
        start = offset - offset % ss
        self.d.l2cache.discard(start, offset + length - start)

    async def bitmap_refs(self) -> None:
        """The persistent-bitmap directory, tables and data (only when the bitmaps are valid, as QEMU)."""
        h = self.h
        if not h.autoclear_features & L.AUTOCLEAR_BITMAPS:
            return
        ext = next((e.data for e in h.other_extensions if e.type == L.EXT_BITMAPS), None)
        if ext is None or len(ext) < _BITMAP_EXT.size:
            return
        nb, _, dir_size, dir_off = _BITMAP_EXT.unpack_from(ext)
        if not nb:
            return
        self.inc(dir_off, dir_size)
        if dir_size > 64 << 20 or dir_off + dir_size > self.file_size:
            self.msg("ERROR bitmap directory is invalid")
            self.res.corruptions += 1
            return
        directory = await self._read(dir_off, dir_size)
        pos = 0
        cs = self.cs
        for _ in range(nb):
            if pos + _BITMAP_DIR_ENTRY.size > dir_size:
                self.msg("ERROR bitmap directory is invalid")
                self.res.corruptions += 1
                return
            t_off, t_size, _, _, _, name_len, extra = _BITMAP_DIR_ENTRY.unpack_from(directory, pos)
            pos += (_BITMAP_DIR_ENTRY.size + extra + name_len + 7) & ~7
            self.inc(t_off, t_size * 8)
            if t_off & (cs - 1) or t_size * 8 > 64 << 20 or t_off + t_size * 8 > self.file_size:
                self.res.corruptions += 1
                continue
            for entry in load_table(await self._read(t_off, t_size * 8)):
                offset = entry & BME_OFFSET_MASK
                if entry & BME_RESERVED_MASK or (offset and (entry & BME_ALL_ONES or offset & (cs - 1))):
                    self.res.corruptions += 1
                    continue
                if offset:
                    self.inc(offset, cs)

    async def refblock_refs(self) -> None:
        """Every refcount block: valid, inside the file, referenced exactly once (QEMU's check_refblocks)."""
        res, cs, cb = self.res, self.cs, self.cb
        for i, entry in enumerate(self.d.refcounts.reftable):
            offset = entry & L.REFT_OFFSET_MASK
            if entry & L.REFT_RESERVED_MASK:
                self.msg(f"ERROR refcount table entry {i} has reserved bits set")
                res.corruptions += 1
                self.rebuild = True
                continue
            if offset & (cs - 1):
                self.msg(f"ERROR refcount block {i} is not cluster aligned; refcount table entry corrupted")
                res.corruptions += 1
                self.rebuild = True
                continue
            if (offset >> cb) >= len(self.tbl):
                # QEMU's repair grows the file to make room for the block; a rebuild needs no such growth
                self.msg(f"ERROR refcount block {i} is outside image")
                res.corruptions += 1
                self.rebuild = True
                continue
            if offset:
                self.inc(offset, cs)
                if self.tbl[offset >> cb] != 1:
                    self.msg(f"ERROR refcount block {i} refcount={self.tbl[offset >> cb]}")
                    res.corruptions += 1
                    self.rebuild = True

    # ---- stored refcounts ------------------------------------------------------------------------------------

    async def _stored_block(self, ri: int) -> array[int] | None:
        """The stored refcounts of refcount block ``ri`` (zeroes where there is none), None if unreadable."""
        if ri in self._stored:
            return self._stored[ri]
        reftable = self.d.refcounts.reftable
        entry = reftable[ri] if ri < len(reftable) else 0
        offset = entry & L.REFT_OFFSET_MASK
        block: array[int] | None
        if offset & (self.cs - 1):
            block = None
        elif not offset:
            block = array(self.tc, bytes(self.rb_entries * self.tbl.itemsize))
        else:
            block = decode_refblock(await self._read(offset, self.cs), self.order)
        if len(self._stored) > 64:
            self._stored.clear()
        self._stored[ri] = block
        return block

    async def stored_refcount(self, cluster: int) -> int | None:
        block = await self._stored_block(cluster >> self.rb_bits)
        return None if block is None else block[cluster & (self.rb_entries - 1)]

    async def _sync_stored(self) -> None:
        """Write refcount changes made through the driver's cache, so that the blocks read from disk see them."""
        if not self.d.read_only:
            await self.d.refcounts.cache.flush()
        self._stored.clear()

    async def compare(self, fix: int) -> int:
        """Compare stored and computed refcounts; fix what ``fix`` allows (QEMU's compare_refcounts).

        Returns the highest cluster whose stored or computed refcount is non-zero (0 if none)."""
        res, cb, cs = self.res, self.cb, self.cs
        await self._sync_stored()
        self.stored_errors = 0
        n = len(self.tbl)
        per = self.rb_entries
        highest = 0
        changed = False
        for ri in range(-(-n // per)):
            start = ri * per
            end = min(n, start + per)
            block = await self._stored_block(ri)
            if block is None:
                for c in range(start, end):
                    self.msg(f"Can't get refcount for cluster {c}: Input/output error")
                res.check_errors += end - start
                self.stored_errors += end - start
                continue
            stored = block[:end - start]
            computed = self.tbl[start:end]
            if stored == computed:
                last = _last_nonzero(stored)
                if last >= 0:
                    highest = start + last
                continue
            for j in range(end - start):
                r1, r2 = stored[j], computed[j]
                if r1 or r2:
                    highest = start + j
                if r1 == r2:
                    continue
                repairing = False
                if r1 == 0:
                    self.rebuild = True
                else:
                    repairing = bool(fix & FIX_LEAKS if r1 > r2 else fix & FIX_ERRORS)
                kind = "Repairing" if repairing else "ERROR" if r1 < r2 else "Leaked"
                self.msg(f"{kind} cluster {start + j} refcount={r1} reference={r2}")
                if repairing:
                    try:
                        await self.d.refcounts.update((start + j) << cb, cs, r2 - r1)
                    except BlockIOError as exc:
                        self.msg(f"ERROR could not fix the refcount of cluster {start + j}: {exc}")
                    else:
                        if r1 > r2:
                            res.leaks_fixed += 1
                        else:
                            res.corruptions_fixed += 1
                        changed = True
                        continue
                if r1 < r2:
                    res.corruptions += 1
                else:
                    res.leaks += 1
        if changed:
            await self._sync_stored()
        return highest

    # ---- OFLAG_COPIED ----------------------------------------------------------------------------------------

    async def check_copied(self, fix: int) -> None:
        """In the active tables, COPIED must be set exactly where the refcount is 1 (QEMU's check_oflag_copied).

        Repaired with FIX_ERRORS, or with FIX_LEAKS when the refcounts are otherwise right."""
        d, res, cb, cs = self.d, self.res, self.cb, self.cs
        if fix & FIX_ERRORS:
            repair = True
        elif fix & FIX_LEAKS:
            repair = not (res.check_errors or res.corruptions or res.leaks)
        else:
            repair = False
        await self._sync_stored()
        word = "Repairing" if repair else "ERROR"
        for i in range(len(d.l1)):
            l1_entry = d.l1[i]
            l2_off = l1_entry & L.L1E_OFFSET_MASK
            if not l2_off:
                continue
            refcount = await self.stored_refcount(l2_off >> cb)
            if refcount is None:
                continue
            if (refcount == 1) != bool(l1_entry & L.OFLAG_COPIED):
                res.corruptions += 1
                self.msg(f"{word} OFLAG_COPIED L2 cluster: l1_index={i} l1_entry={l1_entry:x} refcount={refcount}")
                if repair:
                    new = l1_entry | L.OFLAG_COPIED if refcount == 1 else l1_entry & ~L.OFLAG_COPIED
                    await self._write_l1_entry(i, new)
                    res.corruptions -= 1
                    res.corruptions_fixed += 1
            try:
                raw = await self._read(l2_off, cs)
            except BlockIOError as exc:
                self.msg(f"ERROR: Could not read L2 table: {exc}")
                res.check_errors += 1
                raise _CheckFailed(errno.EIO) from None
            entries, _ = self._entries(raw)
            dirty = 0
            for j, entry in enumerate(entries):
                data_off = entry & L.L2E_OFFSET_MASK
                if entry & L.OFLAG_COMPRESSED or not data_off:
                    continue
                refcount = await self.stored_refcount(data_off >> cb)
                if refcount is None:
                    continue
                if (refcount == 1) != bool(entry & L.OFLAG_COPIED):
                    res.corruptions += 1
                    self.msg(f"{word} OFLAG_COPIED data cluster: l2_entry={entry:x} refcount={refcount}")
                    if repair:
                        new = entry | L.OFLAG_COPIED if refcount == 1 else entry & ~L.OFLAG_COPIED
                        struct.pack_into(">Q", raw, j * self.esz, new)
                        dirty += 1
            if dirty:
                why = self._overlap(l2_off, cs, L2)
                if why is not None:
                    self.msg(f"ERROR: Could not write L2 table; metadata overlap check failed: {why}")
                    res.check_errors += 1
                    raise _CheckFailed(errno.EIO)
                try:
                    await d.metaio.write(l2_off, raw, L2)
                except BlockIOError as exc:
                    self.msg(f"ERROR: Could not write L2 table: {exc}")
                    res.check_errors += 1
                    raise _CheckFailed(exc.errno or errno.EIO) from None
                self._forget_l2(l2_off, cs)
                res.corruptions -= dirty
                res.corruptions_fixed += dirty

    async def _write_l1_entry(self, index: int, value: int) -> None:
        d = self.d
        pos = self.h.l1_table_offset + index * 8
        why = self._overlap(pos, 8, L1)
        if why is not None:
            self.msg(f"ERROR: Could not write L1 table entry: {why}")
            self.res.check_errors += 1
            raise _CheckFailed(errno.EIO)
        old = d.l1[index]
        d.l1[index] = value
        try:
            await d.metaio.write(pos, struct.pack(">Q", value), L1)
            await d.metaio.sync()
        except BlockIOError as exc:
            d.l1[index] = old
            self.msg(f"ERROR: Could not write L1 table entry: {exc}")
            self.res.check_errors += 1
            raise _CheckFailed(exc.errno or errno.EIO) from None

    # ---- rebuilding the refcount structure -------------------------------------------------------------------

    async def rebuild_structure(self) -> None:
        """Write new refcount blocks and a new refcount table holding the computed refcounts, then switch the
        header to them (QEMU's rebuild_refcount_structure; the placement is first fit, as QEMU's).

        Nothing the old structure uses is overwritten (clusters the metadata map knows are never chosen) and
        the header switch is the last, synced write: a crash before it leaves the old structure in place."""
        d, h, cs, cb = self.d, self.h, self.cs, self.cb
        per = self.rb_entries
        rc = d.refcounts
        if rc.cache.dirty_count:
            await rc.cache.flush()
        rc.cache.clear()
        busy = set(d.metamap.clusters())
        for entry in rc.reftable:
            off = entry & L.REFT_OFFSET_MASK
            if off and not off & (cs - 1):
                busy.add(off >> cb)
        busy.update(range(h.refcount_table_offset >> cb, (h.refcount_table_offset >> cb) + h.refcount_table_clusters))

        tbl = self.tbl
        scan = 0                                       # every cluster below this one is in use

        def is_free(c: int) -> bool:
            return (c >= len(tbl) or not tbl[c]) and c not in busy

        def alloc(count: int, start: int) -> int:
            """First run of ``count`` unused clusters at or after ``start``; marks them used."""
            nonlocal scan
            c = max(start, scan)
            while True:
                if c < len(tbl):
                    try:
                        c = tbl.index(0, c)
                    except ValueError:
                        c = len(tbl)
                if not is_free(c):
                    c += 1
                    continue
                bad = next((k for k in range(1, count) if not is_free(c + k)), 0)
                if not bad:
                    break
                c += bad + 1
            if start <= scan:
                scan = c + count
            self._grow(c + count)
            for k in range(c, c + count):
                tbl[k] = 1
            return c

        blocks: dict[int, int] = {}                    # reftable index -> cluster of its new refcount block
        rt_start, rt_clusters = -1, 0
        while True:
            ri = 0
            while ri * per < len(tbl):                 # the table may grow while this runs
                if ri not in blocks and _last_nonzero(tbl[ri * per:(ri + 1) * per]) >= 0:
                    blocks[ri] = alloc(1, ri * per)
                ri += 1
            entries = max(blocks) + 1
            need = -(-entries * 8 // cs)
            if rt_start >= 0 and need <= rt_clusters:
                break
            if rt_start >= 0:                          # the table grew: give its clusters back, place it again
                for k in range(rt_start, rt_start + rt_clusters):
                    tbl[k] = 0
                scan = min(scan, rt_start)
            rt_clusters = need
            if rt_clusters * cs > L.MAX_REFTABLE_BYTES:
                self.msg("ERROR allocating reftable: File too large")
                self.res.check_errors += 1
                raise _CheckFailed(errno.EFBIG)
            rt_start = alloc(rt_clusters, 0)

        reftable = array("Q", bytes(rt_clusters * cs))
        for ri, c in blocks.items():
            reftable[ri] = c << cb
        try:
            for ri, c in sorted(blocks.items(), key=lambda x: x[1]):
                data = encode_refblock(tbl[ri * per:(ri + 1) * per], self.order, cs)
                await d.metaio.write(c << cb, data, REFBLOCK)
            await d.metaio.write(rt_start << cb, pack_table(reftable), REFTABLE)
            await d.metaio.sync()
            await d.write_header_bytes(48, struct.pack(">QI", rt_start << cb, rt_clusters))
        except BlockIOError as exc:
            self.msg(f"ERROR writing the new refcount structure: {exc}")
            self.res.check_errors += 1
            raise _CheckFailed(exc.errno or errno.EIO) from None

        # install the new structure
        mm = d.metamap
        mm.remove(h.refcount_table_offset, h.refcount_table_clusters * cs)
        for entry in rc.reftable:
            off = entry & L.REFT_OFFSET_MASK
            if off and not off & (cs - 1) and mm.kind_at(off) == REFBLOCK:
                mm.remove(off, cs)
        h.refcount_table_offset, h.refcount_table_clusters = rt_start << cb, rt_clusters
        rc.reftable = reftable
        rc.cache.clear()
        mm.add(rt_start << cb, rt_clusters * cs, REFTABLE)
        for c in blocks.values():
            mm.add(c << cb, cs, REFBLOCK)
        rc.end_cluster = max(rc.end_cluster, len(tbl))
        rc.free_hint = 0
        self._stored.clear()


# ---- pure helpers ------------------------------------------------------------------------------------------

def _counters(res: CheckResult) -> tuple[int, int, int, int, int]:
    return res.check_errors, res.corruptions, res.leaks, res.corruptions_fixed, res.leaks_fixed


def _set_counters(res: CheckResult, values: tuple[int, int, int, int, int]) -> None:
    res.check_errors, res.corruptions, res.leaks, res.corruptions_fixed, res.leaks_fixed = values


def _last_nonzero(values: array[int]) -> int:
    """Index of the last non-zero entry, -1 if there is none (C speed: strip the zero bytes at the end)."""
    raw = values.tobytes()
    used = len(raw.rstrip(b"\0"))
    return (used - 1) // values.itemsize if used else -1


def decode_refblock(raw: bytes | bytearray, order: int) -> array[int]:
    """All refcounts of a refcount block with ``1 << order``-bit entries, as a native array."""
    tc = _TYPECODES[order]
    if order >= 3:
        block = array(tc)
        block.frombytes(bytes(raw))
        if not _BIG_ENDIAN and block.itemsize > 1:
            block.byteswap()
        return block
    bits = 1 << order
    per_byte = 8 >> order
    mask = (1 << bits) - 1
    expand = [bytes((b >> (k * bits)) & mask for k in range(per_byte)) for b in range(256)]
    return array("B", b"".join(expand[b] for b in raw))


def encode_refblock(values: array[int], order: int, cluster_size: int) -> bytes:
    """A refcount block (``cluster_size`` bytes) holding ``values`` (shorter: the rest is zero)."""
    if order >= 3:
        part = array(values.typecode, values)
        if not _BIG_ENDIAN and part.itemsize > 1:
            part.byteswap()
        return part.tobytes().ljust(cluster_size, b"\0")
    bits = 1 << order
    per_byte = 8 >> order
    out = bytearray(cluster_size)
    for i, v in enumerate(values):
        if v:
            out[i // per_byte] |= v << ((i % per_byte) * bits)
    return bytes(out)
