"""qcow2 check and repair, judged by ``qemu-img check`` 7.2: images made by QEMU's tools are damaged with
``struct`` patches at known offsets, then ``aioblock check --output=json`` must give qemu-img's counters and exit
status, and ``aioblock check -r leaks|all`` must leave what ``qemu-img check -r`` leaves on a copy (same double
check, same ``qemu-img check`` afterwards) without changing the guest data.

Known, deliberate differences from QEMU (each has its own test):

* a refcount block outside the file is not "repaired" by growing the file to the block's offset; the structure
  is rebuilt instead (QEMU counts one more fixed corruption, for the zeroed block it created);
* an unaligned refcount block or a refcount table entry with reserved bits makes QEMU's rebuild fail (EIO);
  aioblock's rebuild succeeds;
* freed clusters are not discarded from the file (QEMU punches holes, even where a broken entry still points).
"""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import pytest

from ..conftest import QEMU_IMG, QEMU_IO, aioblock_cli, needs_qemu

pytestmark = needs_qemu

KiB = 1024
MiB = 1024 * KiB
T = TypeVar("T")

COPIED = 1 << 63
COMPRESSED = 1 << 62
OFFSET_MASK = 0x00FFFFFFFFFFFE00


# ---- running the tools --------------------------------------------------------------------------------------

def _run(argv: list[str | Path], ok: tuple[int, ...] = (0,)) -> subprocess.CompletedProcess[str]:
    res = subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=300)
    assert res.returncode in ok, f"{' '.join(map(str, argv))} exited {res.returncode}\n{res.stdout}\n{res.stderr}"
    return res


def _img(*args: str | Path, ok: tuple[int, ...] = (0,)) -> subprocess.CompletedProcess[str]:
    assert QEMU_IMG is not None
    return _run([QEMU_IMG, *args], ok)


def _io(path: Path, *cmds: str, ok: tuple[int, ...] = (0,)) -> subprocess.CompletedProcess[str]:
    assert QEMU_IO is not None
    argv: list[str | Path] = [QEMU_IO, "-f", "qcow2"]
    for c in cmds:
        argv += ["-c", c]
    return _run([*argv, path], ok)


@dataclass
class Check:
    """One run of a check: exit status, the JSON report (None when the check failed), stdout, stderr."""

    status: int
    report: dict[str, Any] | None
    stdout: str
    stderr: str

    @property
    def outcome(self) -> tuple[int, dict[str, Any] | None]:
        return self.status, self.report


def _parse(res: subprocess.CompletedProcess[str], json_out: bool) -> Check:
    report = None
    if json_out and res.stdout.strip():
        report = json.loads(res.stdout)
        report.pop("filename", None)
    return Check(res.returncode, report, res.stdout, res.stderr)


def qemu_check(path: Path, *args: str, json_out: bool = True) -> Check:
    assert QEMU_IMG is not None
    argv = [QEMU_IMG, "check", *(["--output=json"] if json_out else []), *args, str(path)]
    return _parse(subprocess.run(argv, capture_output=True, text=True, timeout=300), json_out)


def our_check(path: Path, *args: str, json_out: bool = True) -> Check:
    res = aioblock_cli("check", *(["--output=json"] if json_out else []), *args, str(path), timeout=300)
    assert "Traceback" not in res.stderr, res.stderr
    return _parse(res, json_out)


_POOL = ThreadPoolExecutor(4)


def both(first: Callable[[], T], second: Callable[[], T]) -> tuple[T, T]:
    """Run two independent tool invocations at the same time (each on its own copy of an image)."""
    a, b = _POOL.submit(first), _POOL.submit(second)
    return a.result(), b.result()


def guest_data(path: Path) -> bytes | None:
    """The guest content as qemu-img convert reads it (None if QEMU cannot read the image)."""
    out = path.with_name(path.name + ".raw")
    assert QEMU_IMG is not None
    res = subprocess.run([QEMU_IMG, "convert", "-O", "raw", str(path), str(out)], capture_output=True, timeout=300)
    if res.returncode:
        return None
    data = out.read_bytes()
    out.unlink()
    return data


def _messages(stderr: str) -> list[str]:
    """Check messages, without the tools' own one-line errors."""
    return [line for line in stderr.splitlines()
            if line and not line.startswith(("qemu-img:", "aioblock:", "qcow2:"))]


# ---- reading and patching qcow2 files -----------------------------------------------------------------------

class Qcow2File:
    """Just enough of the qcow2 layout to damage an image at known offsets (the test's own parser)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.f = path.open("r+b")
        head = self.f.read(112)
        self.version = struct.unpack_from(">I", head, 4)[0]
        self.cluster_bits = struct.unpack_from(">I", head, 20)[0]
        self.cs = 1 << self.cluster_bits
        self.l1_size, self.l1_offset, self.rt_offset = struct.unpack_from(">IQQ", head, 36)
        self.rt_clusters = struct.unpack_from(">I", head, 56)[0]
        self.incompat = struct.unpack_from(">Q", head, 72)[0] if self.version >= 3 else 0
        self.order = struct.unpack_from(">I", head, 96)[0] if self.version >= 3 else 4
        self.esz = 16 if self.incompat & 16 else 8

    def close(self) -> None:
        self.f.close()

    def __enter__(self) -> Qcow2File:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def u64(self, offset: int) -> int:
        self.f.seek(offset)
        value: int = struct.unpack(">Q", self.f.read(8))[0]
        return value

    def put_u64(self, offset: int, value: int) -> None:
        self.f.seek(offset)
        self.f.write(struct.pack(">Q", value))
        self.f.flush()

    def l1_addr(self, index: int) -> int:
        return self.l1_offset + 8 * index

    def l2_entries(self) -> list[tuple[int, int]]:
        """(file offset, value) of every non-zero entry of the active L2 tables, in guest order."""
        out = []
        for i in range(self.l1_size):
            l2 = self.u64(self.l1_addr(i)) & OFFSET_MASK
            if not l2:
                continue
            self.f.seek(l2)
            raw = self.f.read(self.cs)
            for j in range(0, self.cs, self.esz):
                value = struct.unpack_from(">Q", raw, j)[0]
                if value:
                    out.append((l2 + j, value))
        return out

    def normal_entry(self) -> tuple[int, int]:
        return next(e for e in self.l2_entries() if e[1] & OFFSET_MASK and not e[1] & COMPRESSED)

    def compressed_entry(self) -> tuple[int, int]:
        return next(e for e in self.l2_entries() if e[1] & COMPRESSED)

    def unallocated_entry(self) -> int:
        """File offset of an all-zero entry of an active L2 table."""
        used = {addr for addr, _ in self.l2_entries()}
        tables = [self.u64(self.l1_addr(i)) & OFFSET_MASK for i in range(self.l1_size)]
        return next(a for l2 in tables if l2 for a in range(l2, l2 + self.cs, self.esz) if a not in used)

    def _refcount_pos(self, cluster: int) -> tuple[int, int, int]:
        bits = self.cluster_bits + 3 - self.order
        block = self.u64(self.rt_offset + 8 * (cluster >> bits)) & ~0x1FF
        assert block, f"no refcount block for cluster {cluster}"
        index = cluster & ((1 << bits) - 1)
        width = 1 << self.order
        return block + index * width // 8, (index * width) % 8, width

    def refcount(self, cluster: int) -> int:
        pos, shift, width = self._refcount_pos(cluster)
        self.f.seek(pos)
        if width >= 8:
            return int.from_bytes(self.f.read(width // 8), "big")
        return (self.f.read(1)[0] >> shift) & ((1 << width) - 1)

    def set_refcount(self, cluster: int, value: int) -> None:
        pos, shift, width = self._refcount_pos(cluster)
        self.f.seek(pos)
        if width >= 8:
            self.f.write(value.to_bytes(width // 8, "big"))
        else:
            byte = self.f.read(1)[0]
            mask = ((1 << width) - 1) << shift
            self.f.seek(pos)
            self.f.write(bytes([(byte & ~mask) | (value << shift)]))
        self.f.flush()

    def set_incompat_bits(self, bits: int) -> None:
        self.f.seek(72)
        self.f.write(struct.pack(">Q", self.incompat | bits))
        self.f.flush()


# ---- the images ---------------------------------------------------------------------------------------------

def _scattered(size: int, cs: int) -> list[str]:
    """qemu-io writes at scattered, deliberately out-of-order offsets (so that some clusters fragment)."""
    spots = [0, size // 2, size // 8, size - 64 * KiB, size // 3 + 512, size // 5]
    return [f"write -P {0x11 + i} {off} {max(cs, 4 * KiB) * (1 + i % 3)}" for i, off in enumerate(spots)]


def _build_default(path: Path) -> None:
    _img("create", "-q", "-f", "qcow2", path, "16M")
    _io(path, *_scattered(16 * MiB, 64 * KiB), "write -c -P 0x61 1M 64k", "write -c -P 0x62 1088k 64k",
        "write -z 4M 64k", "write -P 0x63 6M 4k")


def _build_c512(path: Path) -> None:
    # 512-byte clusters: many L2 tables and refcount blocks, a refcount table of several clusters
    _img("create", "-q", "-f", "qcow2", "-o", "cluster_size=512", path, "16M")
    _io(path, "write -P 0x21 0 9M", *_scattered(16 * MiB, 512), "write -c -P 0x22 10M 512", "write -P 0x23 15M 64k")


def _build_refcount(bits: int) -> Callable[[Path], None]:
    def build(path: Path) -> None:
        _img("create", "-q", "-f", "qcow2", "-o", f"refcount_bits={bits}", path, "8M")
        _io(path, *_scattered(8 * MiB, 64 * KiB), "write -c -P 0x31 2M 64k")
    return build


def _build_v2(path: Path) -> None:
    _img("create", "-q", "-f", "qcow2", "-o", "compat=0.10", path, "8M")
    _io(path, *_scattered(8 * MiB, 64 * KiB))
    _img("snapshot", "-c", "s1", path)
    _io(path, "write -P 0x41 0 64k")


def _build_extl2(path: Path) -> None:
    _img("create", "-q", "-f", "qcow2", "-o", "extended_l2=on", path, "8M")
    _io(path, "write -P 0x51 0 4k", "write -P 0x52 64k 64k", "write -z 128k 4k", "write -P 0x53 200k 8k",
        "write -c -P 0x54 256k 64k", "write -P 0x55 5M 12k")


def _build_snapshots(path: Path) -> None:
    _img("create", "-q", "-f", "qcow2", path, "8M")
    _io(path, "write -P 0x61 0 1M", "write -P 0x62 4M 64k")
    _img("snapshot", "-c", "s1", path)
    _io(path, "write -P 0x63 64k 64k", "write -c -P 0x64 6M 64k")
    _img("snapshot", "-c", "s2", path)
    _io(path, "write -P 0x65 128k 64k")


def _build_converted(path: Path) -> None:
    src = path.with_name("convert-src.qcow2")
    _build_default(src)
    _img("convert", "-c", "-O", "qcow2", src, path)
    src.unlink()


BUILDERS: dict[str, Callable[[Path], None]] = {
    "default": _build_default,
    "c512": _build_c512,
    "refcount1": _build_refcount(1),
    "refcount64": _build_refcount(64),
    "v2": _build_v2,
    "extl2": _build_extl2,
    "snapshots": _build_snapshots,
    "converted": _build_converted,
}


@pytest.fixture(scope="module")
def base_images(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """Builds each kind of image once per module (lazily) and returns its path; tests work on copies."""
    directory = tmp_path_factory.mktemp("qcow2-check-bases")
    built: dict[str, Path] = {}

    def get(kind: str) -> Path:
        if kind not in built:
            path = directory / f"{kind}.qcow2"
            BUILDERS[kind](path)
            assert qemu_check(path).status == 0
            built[kind] = path
        return built[kind]
    return get


# ---- damage -------------------------------------------------------------------------------------------------

def _leak(q: Qcow2File) -> None:
    """A cluster appended to the file with refcount 1 that nothing references (a leak whatever the width)."""
    q.f.seek(0, 2)
    end = q.f.tell()
    pad = -end % q.cs
    q.f.write(bytes(pad + q.cs))
    q.f.flush()
    q.set_refcount((end + pad) // q.cs, 1)


def _leak_raise(q: Qcow2File) -> None:
    """A referenced cluster's refcount raised by one."""
    _, entry = q.normal_entry()
    cluster = (entry & OFFSET_MASK) >> q.cluster_bits
    q.set_refcount(cluster, q.refcount(cluster) + 1)


def _refcount_low(q: Qcow2File) -> None:
    """A data cluster's refcount lowered by one (to 0 unless shared with a snapshot: then a rebuild)."""
    entries = [e for _, e in q.l2_entries() if e & OFFSET_MASK and not e & COMPRESSED]
    if entries:
        shared = [e for e in entries if not e & COPIED]
        host = (shared or entries)[0] & OFFSET_MASK
    else:                                         # only compressed clusters: the host cluster of the first one
        host = q.compressed_entry()[1] & ((1 << (70 - q.cluster_bits)) - 1)
    cluster = host >> q.cluster_bits
    q.set_refcount(cluster, q.refcount(cluster) - 1)


def _l2_refcount_zero(q: Qcow2File) -> None:
    q.set_refcount((q.u64(q.l1_addr(0)) & OFFSET_MASK) >> q.cluster_bits, 0)


def _reserved_l2(q: Qcow2File) -> None:
    addr, entry = q.normal_entry()
    q.put_u64(addr, entry | (1 << 56) | 2)


def _reserved_l1(q: Qcow2File) -> None:
    q.put_u64(q.l1_addr(0), q.u64(q.l1_addr(0)) | (1 << 56))


def _past_eof(q: Qcow2File) -> None:
    q.put_u64(q.unallocated_entry(), COPIED | (1 << 30))


def _copied_cleared(q: Qcow2File) -> None:
    addr, entry = next(e for e in q.l2_entries() if e[1] & COPIED and not e[1] & COMPRESSED)
    q.put_u64(addr, entry & ~COPIED)


def _l1_copied_cleared(q: Qcow2File) -> None:
    q.put_u64(q.l1_addr(0), q.u64(q.l1_addr(0)) & ~COPIED)


def _compressed_copied(q: Qcow2File) -> None:
    addr, entry = q.compressed_entry()
    q.put_u64(addr, entry | COPIED)


def _unaligned_data(q: Qcow2File) -> None:
    addr, entry = q.normal_entry()
    q.put_u64(addr, entry | 0x2A00)


def _double_reference(q: Qcow2File) -> None:
    """An unallocated entry pointing at a data cluster another entry maps (referenced twice, refcount 1)."""
    _, entry = q.normal_entry()
    q.put_u64(q.unallocated_entry(), COPIED | (entry & OFFSET_MASK))


def _reftable_entry(value: Callable[[int], int]) -> Callable[[Qcow2File], None]:
    def damage(q: Qcow2File) -> None:
        q.put_u64(q.rt_offset, value(q.u64(q.rt_offset)))
    return damage


def _corrupt_bit_and_leak(q: Qcow2File) -> None:
    _leak_raise(q)
    q.set_incompat_bits(2)


DAMAGES: dict[str, Callable[[Qcow2File], None]] = {
    "none": lambda q: None,
    "leak": _leak,
    "leak_raise": _leak_raise,
    "refcount_low": _refcount_low,
    "l2_refcount_zero": _l2_refcount_zero,
    "reserved_l2": _reserved_l2,
    "reserved_l1": _reserved_l1,
    "past_eof": _past_eof,
    "copied_cleared": _copied_cleared,
    "l1_copied_cleared": _l1_copied_cleared,
    "compressed_copied": _compressed_copied,
    "unaligned_data": _unaligned_data,
    "double_reference": _double_reference,
    "reftable_missing_block": _reftable_entry(lambda e: 0),
    "corrupt_bit_and_leak": _corrupt_bit_and_leak,
}

#: damages that leave the guest content as it was (the repair must not change it either)
DATA_PRESERVING = {"none", "leak", "leak_raise", "refcount_low", "l2_refcount_zero", "reserved_l1", "copied_cleared",
                   "l1_copied_cleared", "compressed_copied", "reftable_missing_block", "corrupt_bit_and_leak"}

CASES = [
    *[("default", d) for d in DAMAGES],
    *[("c512", d) for d in ("none", "leak", "leak_raise", "refcount_low", "l2_refcount_zero", "reserved_l2",
                            "past_eof", "copied_cleared", "compressed_copied", "double_reference",
                            "reftable_missing_block")],
    *[("refcount1", d) for d in ("none", "leak", "refcount_low", "double_reference", "copied_cleared")],
    *[("refcount64", d) for d in ("none", "leak_raise", "refcount_low", "l2_refcount_zero", "compressed_copied")],
    *[("v2", d) for d in ("none", "leak", "refcount_low", "l2_refcount_zero", "copied_cleared", "unaligned_data")],
    *[("extl2", d) for d in ("none", "leak_raise", "refcount_low", "reserved_l2", "compressed_copied",
                             "unaligned_data", "l2_refcount_zero")],
    *[("snapshots", d) for d in ("none", "leak_raise", "refcount_low", "l2_refcount_zero", "copied_cleared",
                                 "double_reference")],
    *[("converted", d) for d in ("none", "refcount_low", "compressed_copied", "l2_refcount_zero")],
]


def _damaged(base_images: Callable[[str], Path], tmp_path: Path, kind: str, damage: str) -> tuple[Path, bytes]:
    """A damaged copy of a base image, and the guest content of the undamaged image."""
    base = base_images(kind)
    path = tmp_path / f"{kind}-{damage}.qcow2"
    shutil.copy(base, path)
    with Qcow2File(path) as q:
        DAMAGES[damage](q)
    original = guest_data(base)
    assert original is not None
    return path, original


# ---- tests --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("kind", "damage"), CASES, ids=[f"{k}-{d}" for k, d in CASES])
def test_check_and_repair_match_qemu(base_images: Callable[[str], Path], tmp_path: Path, kind: str,
                                     damage: str) -> None:
    path, original = _damaged(base_images, tmp_path, kind, damage)
    theirs, ours = both(partial(qemu_check, path), partial(our_check, path))
    assert ours.outcome == theirs.outcome, f"stderr:\n{ours.stderr}\nqemu-img stderr:\n{theirs.stderr}"
    assert _messages(ours.stderr) == _messages(theirs.stderr)

    for mode in ("leaks", "all"):
        qcopy, ocopy = tmp_path / f"qemu-{mode}.qcow2", tmp_path / f"ours-{mode}.qcow2"
        shutil.copy(path, qcopy)
        shutil.copy(path, ocopy)
        theirs, ours = both(partial(qemu_check, qcopy, "-r", mode), partial(our_check, ocopy, "-r", mode))
        assert ours.outcome == theirs.outcome, (f"-r {mode}: stderr:\n{ours.stderr}\nqemu-img stderr:\n"
                                                f"{theirs.stderr}")
        after_theirs, after_ours = both(partial(qemu_check, qcopy), partial(qemu_check, ocopy))
        assert after_ours.outcome == after_theirs.outcome, f"-r {mode}, then qemu-img check:\n{after_ours.stderr}"
        data, qdata = both(partial(guest_data, ocopy), partial(guest_data, qcopy))
        if damage in DATA_PRESERVING:
            assert data == original, f"-r {mode} changed the guest data"
        elif qdata is not None:
            assert data == qdata, f"-r {mode}: guest data differs from QEMU's repaired copy"


def test_human_output_matches_qemu(base_images: Callable[[str], Path], tmp_path: Path) -> None:
    for damage in ("none", "leak", "past_eof", "refcount_low"):
        path, _ = _damaged(base_images, tmp_path, "default", damage)
        theirs, ours = qemu_check(path, json_out=False), our_check(path, json_out=False)
        assert (ours.status, ours.stdout) == (theirs.status, theirs.stdout), damage
        for mode in ("leaks", "all"):
            qcopy, ocopy = tmp_path / "q.qcow2", tmp_path / "o.qcow2"
            shutil.copy(path, qcopy)
            shutil.copy(path, ocopy)
            theirs = qemu_check(qcopy, "-r", mode, json_out=False)
            ours = our_check(ocopy, "-r", mode, json_out=False)
            assert (ours.status, ours.stdout) == (theirs.status, theirs.stdout), f"{damage} -r {mode}"
            assert _messages(ours.stderr) == _messages(theirs.stderr), f"{damage} -r {mode}"


def test_rebuild_needed_fails_leaks_repair(base_images: Callable[[str], Path], tmp_path: Path) -> None:
    """``-r leaks`` cannot rebuild: "ERROR need to rebuild refcount structures", exit 1, no report."""
    path, _ = _damaged(base_images, tmp_path, "default", "l2_refcount_zero")
    ours = our_check(path, "-r", "leaks")
    assert ours.status == 1 and ours.report is None and not ours.stdout
    assert "ERROR need to rebuild refcount structures" in ours.stderr
    assert "Check failed: Input/output error" in ours.stderr


@pytest.mark.parametrize("damage", ["unaligned", "reserved_bits", "outside_file"])
def test_broken_refcount_table_entry_is_rebuilt(base_images: Callable[[str], Path], tmp_path: Path,
                                                damage: str) -> None:
    """A refcount table entry that is unaligned, has reserved bits set or points past the end of the file: the
    check agrees with qemu-img; ``-r all`` rebuilds the structure (where QEMU 7.2 fails, or grows the file to
    the bogus offset) and leaves an image qemu-img check finds clean, with the same data."""
    change = {"unaligned": lambda e: e | 0x2A00, "reserved_bits": lambda e: e | 1, "outside_file": lambda e: 1 << 30}
    path = tmp_path / "broken.qcow2"
    shutil.copy(base_images("default"), path)
    original = guest_data(path)
    with Qcow2File(path) as q:
        _reftable_entry(change[damage])(q)
    theirs, ours = qemu_check(path), our_check(path)
    assert ours.outcome == theirs.outcome, ours.stderr
    ours = our_check(path, "-r", "all")
    assert ours.status == 0, ours.stderr
    assert ours.report is not None and ours.report.get("corruptions-fixed", 0) >= 1
    assert qemu_check(path).status == 0
    assert guest_data(path) == original
    assert path.stat().st_size < 64 * MiB                     # no growth to the bogus offset


def test_lazy_refcounts_dirty_image(tmp_path: Path) -> None:
    """An image left dirty by a killed qemu-io (lazy refcounts): aioblock check reports what qemu-img check
    reports, ``-r all`` repairs as qemu-img does, and a read-write open by aioblock repairs it (then qemu-img
    check is clean and the dirty flag is cleared)."""
    path = tmp_path / "dirty.qcow2"
    _img("create", "-q", "-f", "qcow2", "-o", "lazy_refcounts=on", path, "8M")
    _io(path, "write -P 0x71 0 64k", "write -P 0x72 1M 128k", "write -c -P 0x73 3M 64k", "sigraise 9", ok=(-9, 137))
    info = json.loads(_img("info", "--output=json", path).stdout)
    assert info["dirty-flag"] is True
    theirs, ours = qemu_check(path), our_check(path)
    assert theirs.status == 2
    assert ours.outcome == theirs.outcome, ours.stderr

    qcopy, ocopy = tmp_path / "q.qcow2", tmp_path / "o.qcow2"
    shutil.copy(path, qcopy)
    shutil.copy(path, ocopy)
    theirs, ours = qemu_check(qcopy, "-r", "all"), our_check(ocopy, "-r", "all")
    assert ours.outcome == theirs.outcome, ours.stderr
    assert json.loads(_img("info", "--output=json", ocopy).stdout)["dirty-flag"] is False

    res = aioblock_cli("io", "-c", "read -P 0x72 1M 4k", str(path))
    assert res.returncode == 0, res.stdout + res.stderr
    assert qemu_check(path).outcome == qemu_check(qcopy).outcome
    assert qemu_check(path).status == 0
    assert json.loads(_img("info", "--output=json", path).stdout)["dirty-flag"] is False
    assert guest_data(path) == guest_data(qcopy)


def test_missing_refcount_table(base_images: Callable[[str], Path], tmp_path: Path) -> None:
    """refcount_table_clusters = 0: only check may open it; -r all rebuilds the structure, as QEMU does."""
    path = tmp_path / "nort.qcow2"
    shutil.copy(base_images("default"), path)
    original = guest_data(path)
    with Qcow2File(path) as q:
        q.f.seek(56)
        q.f.write(bytes(4))
    theirs, ours = qemu_check(path), our_check(path)
    assert ours.outcome == theirs.outcome, ours.stderr
    qcopy = tmp_path / "q.qcow2"
    shutil.copy(path, qcopy)
    theirs, ours = qemu_check(qcopy, "-r", "all"), our_check(path, "-r", "all")
    assert ours.outcome == theirs.outcome, ours.stderr
    assert qemu_check(path).outcome == qemu_check(qcopy).outcome
    assert guest_data(path) == original


def test_bitmaps_are_counted(tmp_path: Path) -> None:
    """Persistent dirty bitmaps (directory, tables, data clusters) hold references too."""
    path = tmp_path / "bitmaps.qcow2"
    _img("create", "-q", "-f", "qcow2", path, "8M")
    _img("bitmap", "--add", path, "b0")
    _io(path, "write 0 64k", "write 5M 64k")
    _img("bitmap", "--add", "-g", "512", path, "b1")
    assert our_check(path).outcome == qemu_check(path).outcome


def test_far_references_do_not_allocate(base_images: Callable[[str], Path], tmp_path: Path) -> None:
    """Entries pointing near the 56-bit limit are reported, never sized into memory."""
    path = tmp_path / "far.qcow2"
    shutil.copy(base_images("default"), path)
    with Qcow2File(path) as q:
        addr = q.unallocated_entry()
        q.put_u64(addr, COPIED | (OFFSET_MASK & ~0xFFFF))
        q.put_u64(addr + 8, COMPRESSED | ((1 << 54) - 512))
        q.put_u64(q.l1_addr(0) + 8 if q.l1_size > 1 else q.rt_offset + 8, COPIED | (OFFSET_MASK & ~0xFFFF))
    theirs, ours = qemu_check(path), our_check(path)
    assert ours.outcome == theirs.outcome, ours.stderr
    ocopy = tmp_path / "o.qcow2"
    shutil.copy(path, ocopy)
    assert our_check(ocopy, "-r", "all").status in (1, 2)
    assert ocopy.stat().st_size < 64 * MiB
