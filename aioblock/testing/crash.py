"""Crash states rebuilt from a recorded log, and the oracles that judge them (the dm-log-writes / CrashMonkey
method, without a kernel).

The harness is format-agnostic: it works on the bytes of the *file* under a format node, as the
:class:`aioblock.testing.faults.Recorder` logged them, and judges what the *guest* sees afterwards.

Recipe (every format driver's crash tests)::

    base = image.read_bytes()                        # or keep a copy of the file: base = copy_path
    inj = FaultInjector(record=True)
    model = GuestModel(size, log=inj.log)            # base guest content: zeroes unless given
    async with aioblock.open(image, fmt, options={"inject": inj}) as disk:
        io = ModelledDisk(disk, model)
        await io.write(0, pattern(0, 1)); await io.flush(); ...
    for state in [*prefix_states(inj.log), *power_loss_states(inj.log), *torn_write_states(inj.log)]:
        problems = await check_state(state, base, tmp_path / "state.img", fmt, model)
        assert not problems, problems

Crash models (each gives a list of :class:`CrashState`; each state is a sequence of log entries, or 512-byte
pieces of them, applied in log order to the base image):

* **Process crash** (:func:`prefix_states`): the page cache survives, so the file holds exactly the requests
  issued before the crash: every prefix of the log.
* **Power loss** (:func:`power_loss_states`): what a completed flush made durable survives (see
  :func:`aioblock.testing.faults.durable_seqs`); any subset of the later requests may have reached the disk.
  Every subset when there are at most ``log2(limit)`` of them, else a sample (see :func:`_subsets`).
* **Torn writes** (:func:`torn_write_states`): as power loss, but each later data write is split into its
  512-byte sectors, any subset of which may have reached the disk (how a 64 KiB L2 table or refcount block
  gets half written).

Replay follows the ``file`` node's semantics on a regular file: writes (and zero writes) past the end grow
the file, zero writes read as zeroes, discards punch a hole inside the file (past its end: nothing),
truncate sets the size. Entries that failed at the file are not replayed.

Oracles (reliability.md section 3.5), applied by :func:`check_state`:

* (a) **consistency**: after one read-write open and close by aioblock, ``qemu-img check`` exits 0 or 3
  (clean or leaks only); the same after one read-write open by ``qemu-io`` on a fresh copy of the state
  (QEMU must be able to use our images). A rw open is where a dirty qcow2 or a QED image with need_check
  gets repaired. Formats without a check (``CHECKLESS_FORMATS``: raw, vpc) skip this.
* (b) **data**: every 512-byte guest sector holds its base content or one of the contents the workload wrote
  to *that* sector (never garbage, never another sector's data); see :class:`GuestModel`.
* (c) **durability**: a guest write acknowledged before a guest flush that completed is visible (or a later
  write to the same sector is), in every state that contains every file request issued before that flush
  returned (``CrashState.prefix``): all prefix states from that point, and power-loss states.
* (d) **robust open**: aioblock opens the state read-only, and reads it whole, raising nothing but an
  :class:`aioblock.errors.AioblockError`; the read-write open of (a) must succeed.

States are built from the log as it is when the function is called. A format driver that flushes at close
makes the whole log durable: to study a power loss in the middle of a workload, build the states from the log
as it was then (``inj.log[:n]``, exact for sequential workloads), or crash the workload with a rule.
"""

from __future__ import annotations

import dataclasses
import os
import random
import shutil
import subprocess
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import AioblockError
from ..io.engine import FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, fallocate
from .faults import LogEntry, durable_seqs

if TYPE_CHECKING:
    from ..backend import BlockBackend

__all__ = [
    "CHECKLESS_FORMATS",
    "SECTOR",
    "CrashState",
    "GuestModel",
    "ModelledDisk",
    "aioblock_guest_content",
    "aioblock_rw_open",
    "check_state",
    "crash_states",
    "materialise",
    "power_loss_states",
    "prefix_states",
    "qemu_guest_content",
    "qemu_img_check",
    "qemu_io_rw_open",
    "replay",
    "torn_write_states",
]

SECTOR = 512
#: Formats that ``qemu-img check`` cannot check (it exits 63): oracle (a) is skipped for them.
CHECKLESS_FORMATS = frozenset({"raw", "vpc", "file"})
_ZERO_CHUNK = 1 << 20


# ---- crash states ------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CrashState:
    """One state the file may be in after a crash: ``ops`` applied in order to the base image.

    ``kind``: "prefix", "power-loss" or "torn". ``label``: says which entries were kept (for failure messages).
    ``ops``: log entries, or 512-byte pieces of write entries (same ``seq``, smaller range). ``prefix``: every
    ok modify entry with ``seq < prefix`` is applied in full; the durability oracle uses it.
    """

    kind: str
    label: str
    ops: tuple[LogEntry, ...]
    prefix: int

    def apply(self, image: bytearray) -> None:
        """Apply the state's ops to an in-memory copy of the base image."""
        for entry in self.ops:
            _apply_bytes(image, entry)

    def image(self, base: bytes) -> bytes:
        """The file's content in this state, built in memory from ``base``."""
        buf = bytearray(base)
        self.apply(buf)
        return bytes(buf)

    def materialise(self, base: bytes | str | os.PathLike[str], dest: str | os.PathLike[str]) -> Path:
        """Write the state into the file ``dest`` (see :func:`materialise`)."""
        return materialise(self, base, dest)


def materialise(state: CrashState, base: bytes | str | os.PathLike[str], dest: str | os.PathLike[str]) -> Path:
    """Create (or replace) the file ``dest`` holding ``state``: a copy of ``base`` (bytes, or the path of a
    copy of the image taken before recording; holes are kept) with the state's ops applied. Returns ``dest``."""
    path = Path(dest)
    if isinstance(base, bytes | bytearray):
        path.write_bytes(base)
    else:
        _copy_sparse(Path(base), path)
    fd = os.open(path, os.O_RDWR)
    try:
        for entry in state.ops:
            _apply_fd(fd, entry)
    finally:
        os.close(fd)
    return path


def replay(log: Sequence[LogEntry], base: bytes) -> bytes:
    """The file after every ok entry of ``log`` (what the recorded file itself should hold)."""
    buf = bytearray(base)
    for entry in log:
        if entry.ok and entry.modifies:
            _apply_bytes(buf, entry)
    return bytes(buf)


def prefix_states(log: Sequence[LogEntry]) -> list[CrashState]:
    """Process crash: one state per distinct prefix of ``log``: the empty prefix, then one ending at each ok
    modify entry (prefixes ending at a flush or a failed entry equal the one before and are left out)."""
    entries = [e for e in log if e.ok and e.modifies]
    states = [CrashState("prefix", "prefix: nothing", (), _first_seq(entries, 0, len(log)))]
    for i, entry in enumerate(entries):
        following = entries[i + 1].seq if i + 1 < len(entries) else len(log)
        states.append(CrashState("prefix", f"prefix: entries up to #{entry.seq} ({entry.op})",
                                 tuple(entries[:i + 1]), following))
    return states


def power_loss_states(log: Sequence[LogEntry], *, limit: int = 1024, seed: int = 0) -> list[CrashState]:
    """Power loss at the end of ``log``: the durable entries plus each chosen subset of the others.

    Durable: :func:`aioblock.testing.faults.durable_seqs` (for a sequential workload, everything before the
    last completed flush, plus FUA writes). Subsets: all ``2**n`` of the ``n`` later ok modify entries when that
    is at most ``limit``, else ``limit`` distinct subsets chosen by :func:`_subsets` with ``seed``."""
    durable = durable_seqs(log)
    base = [e for e in log if e.seq in durable]
    later = [e for e in log if e.ok and e.modifies and e.seq not in durable]
    mark = f"durable: {len(base)} entries" + (f" up to #{base[-1].seq}" if base else "")
    states = []
    for chosen in _subsets(len(later), limit, seed):
        picked = [later[i] for i in chosen]
        ops = tuple(sorted(base + picked, key=lambda e: e.seq))
        applied = {e.seq for e in ops}
        label = f"power-loss: {mark} + {[e.seq for e in picked]} of {len(later)} later entries"
        states.append(CrashState("power-loss", label, ops, _prefix(log, applied)))
    return states


def torn_write_states(log: Sequence[LogEntry], *, sector: int = SECTOR, limit: int = 1024,
                      seed: int = 0) -> list[CrashState]:
    """Power loss with torn writes: the durable entries, plus a subset of the *units* after them, where each
    later write is split into units at multiples of ``sector`` (the other later ops are one unit each).

    Subsets are chosen as in :func:`power_loss_states`. A state's ``prefix`` counts a write as applied only
    when all its units are kept."""
    durable = durable_seqs(log)
    base = [e for e in log if e.seq in durable]
    units: list[LogEntry] = []
    pieces: dict[int, int] = {}
    for entry in log:
        if not entry.ok or not entry.modifies or entry.seq in durable:
            continue
        split = _split(entry, sector) if entry.op == "write" else [entry]
        pieces[entry.seq] = len(split)
        units.extend(split)
    states = []
    for chosen in _subsets(len(units), limit, seed):
        picked = [units[i] for i in chosen]
        ops = tuple(sorted(base + picked, key=lambda e: (e.seq, e.offset)))
        counts: dict[int, int] = {}
        for unit in picked:
            counts[unit.seq] = counts.get(unit.seq, 0) + 1
        applied = {e.seq for e in base} | {s for s, n in counts.items() if n == pieces[s]}
        label = (f"torn: {len(base)} durable entries + {len(picked)} of {len(units)} later units: "
                 + ", ".join(f"#{u.seq}@{u.offset:#x}" for u in picked[:16]) + (" ..." if len(picked) > 16 else ""))
        states.append(CrashState("torn", label, ops, _prefix(log, applied)))
    return states


def crash_states(log: Sequence[LogEntry], *, limit: int = 1024, seed: int = 0,
                 torn: bool = True) -> list[CrashState]:
    """Prefix, power-loss and (with ``torn``) torn-write states of ``log``, in that order."""
    out = prefix_states(log) + power_loss_states(log, limit=limit, seed=seed)
    if torn:
        out += torn_write_states(log, limit=limit, seed=seed)
    return out


def _subsets(n: int, limit: int, seed: int) -> Iterator[tuple[int, ...]]:
    """Distinct subsets of ``range(n)`` (as sorted index tuples), at most ``max(limit, 2)`` of them.

    Every subset when ``2**n <= limit``. Otherwise, in this order until ``limit`` is reached: none, all, each
    single unit alone, all but each single unit, then random subsets (each unit kept with probability 1/2)
    drawn from ``random.Random(seed)``, so the sample is the same on every run."""
    if limit < 1:
        raise ValueError("limit must be at least 1")
    if n < 63 and 1 << n <= limit:
        for mask in range(1 << n):
            yield tuple(i for i in range(n) if mask >> i & 1)
        return
    seen: set[tuple[int, ...]] = set()
    everything = tuple(range(n))

    def fresh(subset: tuple[int, ...]) -> bool:
        if subset in seen or len(seen) >= limit:
            return False
        seen.add(subset)
        return True

    for subset in [(), everything]:
        if fresh(subset):
            yield subset
    for i in range(n):
        if fresh((i,)):
            yield (i,)
    for i in range(n):
        if fresh(everything[:i] + everything[i + 1:]):
            yield everything[:i] + everything[i + 1:]
    rng = random.Random(seed)
    attempts = 0
    while len(seen) < limit and attempts < 20 * limit:
        attempts += 1
        bits = rng.getrandbits(n)
        subset = tuple(i for i in range(n) if bits >> i & 1)
        if fresh(subset):
            yield subset


def _split(entry: LogEntry, sector: int) -> list[LogEntry]:
    assert entry.data is not None
    out = []
    pos = entry.offset
    while pos < entry.end:
        nxt = min((pos // sector + 1) * sector, entry.end)
        chunk = entry.data[pos - entry.offset:nxt - entry.offset]
        out.append(dataclasses.replace(entry, offset=pos, length=nxt - pos, data=chunk))
        pos = nxt
    return out


def _first_seq(entries: Sequence[LogEntry], index: int, default: int) -> int:
    return entries[index].seq if index < len(entries) else default


def _prefix(log: Sequence[LogEntry], applied: set[int]) -> int:
    for entry in log:
        if entry.ok and entry.modifies and entry.seq not in applied:
            return entry.seq
    return len(log)


# ---- replay ------------------------------------------------------------------------------------------------


def _apply_bytes(image: bytearray, entry: LogEntry) -> None:
    op, off, end = entry.op, entry.offset, entry.end
    if op == "write":
        assert entry.data is not None
        if end > len(image):
            image.extend(bytes(end - len(image)))
        image[off:end] = entry.data
    elif op == "write_zeroes":
        if end > len(image):
            image.extend(bytes(end - len(image)))
        image[off:end] = bytes(end - off)
    elif op == "discard":
        end = min(end, len(image))
        if end > off:
            image[off:end] = bytes(end - off)
    elif op == "truncate":
        if off < len(image):
            del image[off:]
        else:
            image.extend(bytes(off - len(image)))


def _apply_fd(fd: int, entry: LogEntry) -> None:
    op, off, end = entry.op, entry.offset, entry.end
    if op == "write":
        assert entry.data is not None
        view = memoryview(entry.data)
        while view:
            n = os.pwrite(fd, view, off)
            view, off = view[n:], off + n
    elif op in ("write_zeroes", "discard"):
        size = os.fstat(fd).st_size
        if op == "write_zeroes" and end > size:
            os.ftruncate(fd, end)                     # the grown part reads as zeroes
        _zero_range(fd, off, min(end, size))
    elif op == "truncate":
        os.ftruncate(fd, off)


def _zero_range(fd: int, start: int, end: int) -> None:
    if end <= start:
        return
    try:
        fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, start, end - start)
    except OSError:
        zeroes = bytes(min(_ZERO_CHUNK, end - start))
        for pos in range(start, end, _ZERO_CHUNK):
            os.pwrite(fd, zeroes[:min(_ZERO_CHUNK, end - pos)], pos)


def _copy_sparse(src: Path, dst: Path) -> None:
    """Copy ``src`` to ``dst`` keeping holes (SEEK_DATA/SEEK_HOLE; a plain copy where those fail)."""
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        size = os.fstat(fin.fileno()).st_size
        fout.truncate(size)
        pos = 0
        try:
            while pos < size:
                try:
                    data = os.lseek(fin.fileno(), pos, os.SEEK_DATA)
                except OSError:                       # ENXIO: only a hole is left
                    break
                hole = os.lseek(fin.fileno(), data, os.SEEK_HOLE)
                fin.seek(data)
                fout.seek(data)
                left = hole - data
                while left:
                    chunk = fin.read(min(left, _ZERO_CHUNK))
                    if not chunk:
                        break
                    fout.write(chunk)
                    left -= len(chunk)
                pos = hole
        except OSError:
            fin.seek(0)
            fout.seek(0)
            shutil.copyfileobj(fin, fout)


# ---- the guest model (oracles b and c) ---------------------------------------------------------------------


class GuestModel:
    """What the guest may see, sector by sector, after a crash during a recorded workload.

    Each ``sector``-sized guest sector keeps its history: version 0 is the base content (``base`` or zeroes),
    and every acknowledged guest write, zero write or discard that touches the sector appends the sector's
    content after it. :meth:`flush` notes a completed guest flush and the log position when it returned.

    In a crash state a sector may hold any version of its history (oracle b); a sector that holds none is
    garbage or another sector's data. If the state contains every file request issued before the ``k``-th
    guest flush returned (``state.prefix >= log position``), a sector must hold the version current at that
    flush or a later one (oracle c). The oracle is exact for writes of whole sectors; an unaligned write adds
    the spliced sector as one version. A discard is modelled as reading zeroes afterwards (what raw, and
    qcow2/QED without a backing file, do); a workload on a format whose discards may keep data should avoid
    them or use a base of zeroes and write_zeroes instead.
    """

    def __init__(self, size: int, *, base: bytes | None = None, sector: int = SECTOR,
                 log: Sequence[LogEntry] | None = None) -> None:
        if base is not None and len(base) < size:
            base = base + bytes(size - len(base))
        self.size = size
        self.sector = sector
        self._base = base
        self._log = log
        self._zero = bytes(sector)
        #: sector -> [(flushes noted before the version became current, content)]; absent: base only
        self._versions: dict[int, list[tuple[int, bytes]]] = {}
        #: log position (len(log)) when each guest flush returned
        self.flushes: list[int] = []

    # ---- noting the workload -------------------------------------------------------------------------------

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """Note an acknowledged guest write."""
        data = bytes(data)
        self._check_range(offset, len(data))
        for i in self._sectors(offset, len(data)):
            start = i * self.sector
            lo, hi = max(offset, start), min(offset + len(data), start + self.sector)
            if lo == start and hi == start + self.sector:
                content = data[lo - offset:hi - offset]
            else:
                cur = bytearray(self.current(i))
                cur[lo - start:hi - start] = data[lo - offset:hi - offset]
                content = bytes(cur)
            self._push(i, content)

    def write_zeroes(self, offset: int, length: int) -> None:
        """Note acknowledged zero writes (``write_zeroes``, with or without unmap)."""
        self._note_zeroes(offset, length)

    def discard(self, offset: int, length: int) -> None:
        """Note an acknowledged discard; modelled as reading zeroes afterwards (see the class docstring)."""
        self._note_zeroes(offset, length)

    def _note_zeroes(self, offset: int, length: int) -> None:
        self._check_range(offset, length)
        start_s, end_s = offset // self.sector, -(-(offset + length) // self.sector)
        for i in range(start_s, end_s):
            s0 = i * self.sector
            if offset <= s0 and s0 + self.sector <= offset + length:
                self._push(i, self._zero)
            else:
                lo, hi = max(offset, s0), min(offset + length, s0 + self.sector)
                cur = bytearray(self.current(i))
                cur[lo - s0:hi - s0] = bytes(hi - lo)
                self._push(i, bytes(cur))

    def flush(self, log_position: int | None = None) -> None:
        """Note a guest flush that has returned. ``log_position``: how many log entries had been issued when
        it returned (default: the length of the ``log`` given to the model, now)."""
        if log_position is None:
            if self._log is None:
                raise ValueError("flush() needs log_position when the model has no log")
            log_position = len(self._log)
        self.flushes.append(log_position)

    # ---- queries -------------------------------------------------------------------------------------------

    def base_sector(self, i: int) -> bytes:
        if self._base is None:
            return self._zero
        return self._base[i * self.sector:(i + 1) * self.sector]

    def versions(self, i: int) -> list[bytes]:
        """Every content sector ``i`` had, oldest (the base) first."""
        return [self.base_sector(i)] + [c for _, c in self._versions.get(i, [])]

    def current(self, i: int) -> bytes:
        hist = self._versions.get(i)
        return hist[-1][1] if hist else self.base_sector(i)

    def expected(self) -> bytes:
        """The guest content after the whole workload (no crash)."""
        out = bytearray(self._base if self._base is not None else bytes(self.size))
        for i, hist in self._versions.items():
            out[i * self.sector:(i + 1) * self.sector] = hist[-1][1]
        return bytes(out[:self.size])

    def flushes_in_effect(self, state: CrashState | None) -> int:
        """How many guest flushes the durability oracle applies to ``state`` (0 for None)."""
        if state is None:
            return 0
        return sum(1 for pos in self.flushes if pos <= state.prefix)

    def violations(self, content: bytes, state: CrashState | None = None, *, durable_flushes: int | None = None,
                   max_reports: int = 8) -> list[str]:
        """Problems with guest ``content`` in ``state`` (oracles b and c); empty when it is fine.

        ``durable_flushes`` overrides the number of guest flushes whose writes must be visible (by default
        :meth:`flushes_in_effect` of ``state``). At most ``max_reports`` bad sectors are described."""
        m = self.flushes_in_effect(state) if durable_flushes is None else durable_flushes
        problems: list[str] = []
        if len(content) != self.size:
            problems.append(f"guest size is {len(content)}, expected {self.size}")
        sec = self.sector
        nsec = -(-min(len(content), self.size) // sec)
        bad: list[tuple[int, int]] = []                   # (sector, index of its oldest allowed version)
        touched = sorted(i for i in self._versions if i < nsec)
        # untouched sectors must hold their base content: compare whole runs at once
        for a, b in zip([-1, *touched], [*touched, nsec], strict=True):
            lo, hi = (a + 1) * sec, min(b * sec, len(content))
            if hi > lo and not self._is_base(content, lo, hi):
                bad += [(i, 0) for i in range(a + 1, b) if not self._is_base(content, i * sec, (i + 1) * sec)]
        for i in touched:
            got = content[i * sec:(i + 1) * sec]
            first = 0                                     # versions(i)[first:] are allowed
            for k, (flushes_before, _) in enumerate(self._versions[i]):
                if flushes_before < m:
                    first = k + 1
            if got not in self.versions(i)[first:]:
                bad.append((i, first))
        bad.sort()
        problems += [self._describe(i, content[i * sec:(i + 1) * sec], first) for i, first in bad[:max_reports]]
        if len(bad) > max_reports:
            problems.append(f"... and {len(bad) - max_reports} more bad sectors")
        return problems

    def _is_base(self, content: bytes, lo: int, hi: int) -> bool:
        hi = min(hi, len(content))
        if self._base is None:
            return content.count(0, lo, hi) == hi - lo
        return content[lo:hi] == self._base[lo:hi]

    def _describe(self, i: int, got: bytes, first: int) -> str:
        where = f"sector {i} (guest offset {i * self.sector:#x})"
        versions = self.versions(i)
        if got in versions:
            k = versions.index(got)
            return (f"{where}: holds version {k} of {len(versions) - 1}, but a completed flush made version "
                    f"{first} durable (lost durable write)")
        if any(got):
            for j, hist in self._versions.items():
                if j != i and any(c == got for _, c in hist):
                    return f"{where}: holds data written to sector {j} (guest offset {j * self.sector:#x})"
            return f"{where}: holds unknown data {got[:16].hex()}..."
        return f"{where}: reads as zeroes, which were never its content"

    def _push(self, i: int, content: bytes) -> None:
        self._versions.setdefault(i, []).append((len(self.flushes), content))

    def _sectors(self, offset: int, length: int) -> range:
        return range(offset // self.sector, -(-(offset + length) // self.sector))

    def _check_range(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise ValueError(f"{offset}+{length} is outside the modelled guest (size {self.size})")


class ModelledDisk:
    """A disk (``BlockBackend``) whose acknowledged requests are noted in a :class:`GuestModel`.

    Each method awaits the disk's request, then (only if it succeeded) notes it in the model; ``flush`` notes
    the log position after the flush returned."""

    def __init__(self, disk: BlockBackend, model: GuestModel) -> None:
        self.disk = disk
        self.model = model

    async def write(self, offset: int, data: bytes) -> None:
        await self.disk.write(offset, data)
        self.model.write(offset, data)

    async def write_zeroes(self, offset: int, length: int, *, may_unmap: bool = False) -> None:
        await self.disk.write_zeroes(offset, length, may_unmap=may_unmap)
        self.model.write_zeroes(offset, length)

    async def discard(self, offset: int, length: int) -> None:
        await self.disk.discard(offset, length)
        self.model.discard(offset, length)

    async def flush(self) -> None:
        await self.disk.flush()
        self.model.flush()

    async def read(self, offset: int, length: int) -> bytes:
        return await self.disk.read(offset, length)


# ---- oracles a and d ---------------------------------------------------------------------------------------


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise FileNotFoundError(f"{name} is not installed (apt-get install qemu-utils)")
    return path


def qemu_img_check(path: str | os.PathLike[str], fmt: str) -> subprocess.CompletedProcess[str]:
    """``qemu-img check -f fmt path`` (rc 0 clean, 2 corrupt, 3 leaks only, 63 no check for the format)."""
    return subprocess.run([_tool("qemu-img"), "check", "-f", fmt, os.fspath(path)], capture_output=True,
                          text=True, timeout=300)


def qemu_io_rw_open(path: str | os.PathLike[str], fmt: str) -> subprocess.CompletedProcess[str]:
    """Open the image read-write once with qemu-io and close it (QEMU repairs dirty / need_check images)."""
    return subprocess.run([_tool("qemu-io"), "-f", fmt, "-c", "quit", os.fspath(path)], capture_output=True,
                          text=True, timeout=300)


def qemu_guest_content(path: str | os.PathLike[str], fmt: str) -> bytes:
    """The guest content as QEMU reads it (``qemu-img convert -O raw``)."""
    with tempfile.TemporaryDirectory(prefix="aioblock-crash-") as tmp:
        out = os.path.join(tmp, "guest.raw")
        subprocess.run([_tool("qemu-img"), "convert", "-f", fmt, "-O", "raw", os.fspath(path), out],
                       capture_output=True, text=True, timeout=300, check=True)
        return Path(out).read_bytes()


async def aioblock_rw_open(path: str | os.PathLike[str], fmt: str) -> None:
    """Open the image read-write once with aioblock and close it (where recovery on open happens)."""
    from ..api import open as aioblock_open
    async with aioblock_open(os.fspath(path), fmt, engine="sync"):
        pass


async def aioblock_guest_content(path: str | os.PathLike[str], fmt: str) -> bytes:
    """The guest content as aioblock reads it, from a read-only open."""
    from ..api import open as aioblock_open
    async with aioblock_open(os.fspath(path), fmt, read_only=True, engine="sync") as disk:
        data: bytes = await disk.read(0, disk.size)
        return data


async def check_state(state: CrashState, base: bytes | str | os.PathLike[str], dest: str | os.PathLike[str],
                      fmt: str, model: GuestModel, *, qemu: bool = True) -> list[str]:
    """Materialise ``state`` at ``dest`` and apply oracles (a) to (d) (module docstring); the problems found,
    each prefixed with the state's label. Empty when the state is fine.

    ``qemu=False`` skips the QEMU tools (qemu-img check, the qemu-io rw open, and reading the guest content
    with qemu-img convert; aioblock then reads it). ``dest`` is overwritten; ``dest + ".qemu"`` is used for the
    qemu-io copy."""
    problems: list[str] = []
    path = materialise(state, base, dest)
    try:                                                      # (d): read-only open of the raw crash state
        await aioblock_guest_content(path, fmt)
    except AioblockError:
        pass                                                  # documented error: allowed before recovery
    except Exception as exc:
        problems.append(f"read-only open raised {type(exc).__name__}: {exc}")
    try:                                                      # (a): one rw open by aioblock, then check
        await aioblock_rw_open(path, fmt)
    except Exception as exc:
        problems.append(f"read-write open by aioblock failed: {type(exc).__name__}: {exc}")
    if qemu and fmt not in CHECKLESS_FORMATS:
        res = qemu_img_check(path, fmt)
        if res.returncode not in (0, 3):
            problems.append(f"qemu-img check after aioblock's rw open: rc {res.returncode}: "
                            f"{(res.stdout + res.stderr).strip()}")
    content: bytes | None = None
    try:                                                      # (b), (c) on the recovered image
        content = qemu_guest_content(path, fmt) if qemu else await aioblock_guest_content(path, fmt)
    except Exception as exc:
        problems.append(f"reading the guest content failed: {type(exc).__name__}: {exc}")
    if content is not None:
        problems += model.violations(content, state)
    if qemu and fmt not in CHECKLESS_FORMATS:                 # (a) again, QEMU recovering a fresh copy
        copy = materialise(state, base, os.fspath(dest) + ".qemu")
        res = qemu_io_rw_open(copy, fmt)
        if res.returncode != 0:
            problems.append(f"qemu-io rw open failed: {(res.stdout + res.stderr).strip()}")
        res = qemu_img_check(copy, fmt)
        if res.returncode not in (0, 3):
            problems.append(f"qemu-img check after qemu-io's rw open: rc {res.returncode}: "
                            f"{(res.stdout + res.stderr).strip()}")
    return [f"{state.label}: {p}" for p in problems]
