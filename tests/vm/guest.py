"""Run commands in a Linux guest that has ublk, booted under qemu (TCG), for tests that need a real kernel.

The guest is Debian's ``linux-image-6.12-amd64`` kernel (the current version is resolved through that meta
package) with a tiny initramfs: static busybox, the modules the harness needs and an ``/init`` that mounts the
host's ``/`` read-only over 9p at ``/newroot`` and chroots into it. So the guest runs the host's programs (its
Python, the project's checkout) unchanged; only directories passed as ``shares`` are writable, and only they
carry results back. Each run is a fresh boot.

``python -m tests.vm.guest [--smp N] -- COMMAND...`` runs one command by hand and exits with its exit status.
"""

from __future__ import annotations

import argparse
import fcntl
import gzip
import hashlib
import lzma
import os
import re
import secrets
import shlex
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

KERNEL_META_PACKAGE = "linux-image-6.12-amd64"
BUSYBOX_PACKAGE = "busybox-static"
# what the guest loads, in addition to whatever these depend on (read from each module's .modinfo); ext4 asks the
# crypto API for crc32c at mount time, which the guest cannot modprobe, so crc32c_generic is loaded up front
MODULES = ("9pnet_virtio", "9p", "ublk_drv", "ext4", "crc32c_generic")
KERNEL_APPEND = "console=ttyS0 quiet loglevel=3 panic=-1"
_NINEP = "trans=virtio,version=9p2000.L,msize=524288"

# The initramfs's /init. {insmod} is replaced by one insmod line per module, in load order. The run's own
# steps (writable shares, the command, the exit-status marker) come from /ctl/run.sh, written by Guest.run.
# Any change to this text (or to MODULES) yields a new cache key, so cached initramfs images never go stale.
_INIT = f"""#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
die() {{ echo "aioblock-vm: $*" >&2; poweroff -f; }}
mount -t proc proc /proc || die "cannot mount /proc"
mount -t sysfs sysfs /sys || die "cannot mount /sys"
mount -t devtmpfs devtmpfs /dev || die "cannot mount /dev"
{{insmod}}
mount -t 9p -o {_NINEP},ro,cache=none ctl /ctl || die "cannot mount the run's control share"
mount -t 9p -o {_NINEP},ro,cache=loose root /newroot || die "cannot mount the host's root"
for d in dev proc sys; do mount -o bind /$d /newroot/$d || die "cannot bind /$d"; done
mkdir -p /dev/shm
for d in run tmp dev/shm; do mount -t tmpfs tmpfs /newroot/$d || die "cannot mount a tmpfs on /$d"; done
. /ctl/run.sh
poweroff -f
"""
_CACHE_KEY = hashlib.sha256(f"{_INIT}\0{MODULES}".encode()).hexdigest()[:12]
_CHECKOUT = Path(__file__).resolve().parents[2]
_GUEST_TMPFS = (Path("/tmp"), Path("/run"), Path("/dev/shm"))
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class GuestUnavailable(Exception):
    """The guest cannot be had on this machine; ``str(exc)`` is a one-line reason (for pytest.skip)."""


class GuestError(Exception):
    """A run produced no exit status (timeout, setup failure in the guest, kernel panic, qemu failure).

    ``console`` holds everything the guest printed on its serial console, for diagnosis; the message ends with
    its last lines.
    """

    def __init__(self, message: str, console: str) -> None:
        tail = "\n".join(console.splitlines()[-30:])
        super().__init__(f"{message}\n--- last lines of the guest's console ---\n{tail}")
        self.console = console


@dataclass(frozen=True)
class GuestResult:
    """The outcome of one :meth:`Guest.run`.

    ``returncode`` is the command's exit status (0-255); ``output`` is its stdout and stderr, interleaved as
    printed on the serial console (line ends normalised to ``\\n``; severe kernel messages printed while it ran
    may appear in it); ``duration`` is the wall time of the whole run in seconds, boot and power-off included.
    """

    returncode: int
    output: str
    duration: float


@dataclass(frozen=True)
class Guest:
    """A bootable guest: a kernel with ublk and an initramfs, both built by :func:`build_guest`."""

    kernel: Path
    initramfs: Path
    kernel_version: str
    qemu: str

    def run(self, command: str, *, smp: int = 1, memory_mb: int = 1024, timeout: float = 300,
            shares: Sequence[Path] = (), env: dict[str, str] | None = None,
            cwd: str | None = None) -> GuestResult:
        """Boot the guest, run ``command`` with ``/bin/sh -c`` in the chrooted host root, and power off.

        The command runs as root with stdin from /dev/null, in ``cwd`` (default: the host's current directory;
        if that does not exist in the guest, the shell exits non-zero saying so). Its environment is exactly
        PATH, PYTHONPATH, HOME and LANG copied from the host (those that are set), PYTHONDONTWRITEBYTECODE=1,
        then ``env`` on top. The root is read-only; /run, /tmp and /dev/shm are empty tmpfs. Each directory in
        ``shares`` is mounted writable (9p, cache=mmap) at the same absolute path, also under /tmp; writes made
        by the command are on the host when this returns.

        Returns the command's exit status and output. Raises GuestError when the run yields no exit status:
        after ``timeout`` seconds (qemu is killed), or when the guest failed to set up or crashed.
        """
        variables = {name: os.environ[name] for name in ("PATH", "PYTHONPATH", "HOME", "LANG") if name in os.environ}
        variables["PYTHONDONTWRITEBYTECODE"] = "1"
        variables.update(env or {})
        for name in variables:
            if not _ENV_NAME.fullmatch(name):
                raise ValueError(f"not an environment variable name: {name!r}")
        # the guest mounts tmpfs over /tmp, /run and /dev/shm: a checkout there (CI clones into /tmp) is shared
        if any(_CHECKOUT.is_relative_to(masked) for masked in _GUEST_TMPFS):
            shares = [*shares, _CHECKOUT]
        mounts = sorted({Path(os.path.abspath(share)) for share in shares}, key=lambda p: len(p.parts))
        for share in mounts:
            if not share.is_dir():
                raise ValueError(f"share is not a directory: {share}")
        token = f"aioblock-vm-{secrets.token_hex(8)}"
        script = [f"mkdir -p {shlex.quote(f'/newroot{share}')} && mount -t 9p -o {_NINEP},cache=mmap share{i} "
                  f"{shlex.quote(f'/newroot{share}')} || die {shlex.quote(f'cannot mount share {share}')}"
                  for i, share in enumerate(mounts)]
        inner = f"cd -- {shlex.quote(cwd if cwd is not None else os.getcwd())} || exit\n{command}"
        assignments = " ".join(shlex.quote(f"{name}={value}") for name, value in variables.items())
        script += [f"printf '%s begin\\n' {token}",
                   f"env -i {assignments} /bin/chroot /newroot /bin/sh -c {shlex.quote(inner)} </dev/null",
                   "rc=$?",
                   "sync",
                   f"printf '\\n%s rc=%d\\n' {token} \"$rc\""]
        with tempfile.TemporaryDirectory(prefix="aioblock-vm-") as ctl:
            Path(ctl, "run.sh").write_text("\n".join(script) + "\n")
            argv = [self.qemu, "-nodefaults", "-no-reboot", "-display", "none",
                    "-accel", "tcg,thread=multi", "-cpu", "max", "-m", str(memory_mb), "-smp", str(smp),
                    "-serial", "stdio", "-kernel", str(self.kernel), "-initrd", str(self.initramfs),
                    "-append", KERNEL_APPEND,
                    "-virtfs", "local,path=/,mount_tag=root,security_model=none,readonly=on,multidevs=remap",
                    "-virtfs", f"local,path={_qemu_escape(ctl)},mount_tag=ctl,security_model=none,readonly=on"]
            for i, share in enumerate(mounts):
                argv += ["-virtfs",
                         f"local,path={_qemu_escape(str(share))},mount_tag=share{i},security_model=none,multidevs=remap"]
            start = time.monotonic()
            with subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT) as qemu:
                try:
                    raw, _ = qemu.communicate(timeout=timeout)
                except subprocess.TimeoutExpired:
                    qemu.kill()
                    raw, _ = qemu.communicate()
                    raise GuestError(f"guest run timed out after {timeout:g} s: {command!r}", _text(raw)) from None
            duration = time.monotonic() - start
        console = _text(raw)
        begin = console.find(f"{token} begin\n")
        end = re.search(rf"\n{token} rc=(\d+)\n", console)
        if begin < 0 or end is None:
            raise GuestError(f"guest gave no exit status (qemu exited with {qemu.returncode}): {command!r}", console)
        output = console[begin + len(token) + len(" begin\n"):end.start()]
        return GuestResult(returncode=int(end.group(1)), output=output, duration=duration)


def _text(raw: bytes) -> str:
    """Serial console bytes as text with the tty's ``\\r\\n`` line ends turned back into ``\\n``."""
    return raw.decode(errors="replace").replace("\r\n", "\n")


def _qemu_escape(value: str) -> str:
    """``value`` as one qemu option value (a comma is doubled so that it does not end the value)."""
    return value.replace(",", ",,")


def default_cache_dir() -> Path:
    """``$AIOBLOCK_VM_CACHE`` if set, else ``~/.cache/aioblock-vm``."""
    configured = os.environ.get("AIOBLOCK_VM_CACHE")
    return Path(configured) if configured else Path.home() / ".cache" / "aioblock-vm"


def build_guest(cache_dir: Path | None = None) -> Guest:
    """Return a guest with the current kernel of ``linux-image-6.12-amd64``, building it if not cached.

    The build (apt-get download of the kernel package and busybox-static, ``dpkg -x``, initramfs) lands in
    ``cache_dir`` (default :func:`default_cache_dir`) under a key of the kernel version and the initramfs recipe,
    and appears there atomically, so a later call only resolves the meta package. Concurrent builders (other
    processes) wait on a lock file and reuse the first one's result. Raises GuestUnavailable, with the reason,
    where a tool (qemu-system-x86_64, apt-cache, apt-get, dpkg) is missing or a step fails.
    """
    qemu = shutil.which("qemu-system-x86_64")
    if qemu is None:
        raise GuestUnavailable("qemu-system-x86_64 not found (apt-get install qemu-system-x86)")
    for tool in ("apt-cache", "apt-get", "dpkg"):
        if shutil.which(tool) is None:
            raise GuestUnavailable(f"{tool} not found: the VM guest is built from Debian packages")
    package = _resolve_kernel_package()
    kernel_version = package.removeprefix("linux-image-")
    cache = cache_dir if cache_dir is not None else default_cache_dir()
    built = cache / f"{kernel_version}-{_CACHE_KEY}"
    guest = Guest(kernel=built / "vmlinuz", initramfs=built / "initramfs.cpio.gz",
                  kernel_version=kernel_version, qemu=qemu)
    if built.is_dir():
        return guest
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not built.is_dir():
            with tempfile.TemporaryDirectory(prefix=".build-", dir=cache) as work:
                _build(Path(work), package, kernel_version)
                (Path(work) / "out").rename(built)
    return guest


def _resolve_kernel_package() -> str:
    """The concrete kernel package that the meta package depends on, e.g. ``linux-image-6.12.118+deb12-amd64``."""
    found = subprocess.run(["apt-cache", "depends", KERNEL_META_PACKAGE], capture_output=True, text=True)
    for line in found.stdout.splitlines():
        match = re.fullmatch(r"\s*Depends:\s*(linux-image-\S+)", line)
        if match:
            return match.group(1)
    raise GuestUnavailable(f"apt-cache cannot resolve {KERNEL_META_PACKAGE} (no Debian package lists? "
                           f"run apt-get update): {_last_line(found.stderr)}")


def _last_line(text: str) -> str:
    """The last non-empty line of a tool's message, for a one-line reason."""
    lines = text.strip().splitlines()
    return lines[-1] if lines else "no message"


def _build(work: Path, package: str, kernel_version: str) -> None:
    """Download and unpack both packages in ``work`` and write ``work/out/{vmlinuz,initramfs.cpio.gz}``."""
    for name in (package, BUSYBOX_PACKAGE):
        fetched = subprocess.run(["apt-get", "download", name], cwd=work, capture_output=True, text=True)
        if fetched.returncode != 0:
            raise GuestUnavailable(f"apt-get download {name} failed: {_last_line(fetched.stderr)}")
    for deb in work.glob("*.deb"):
        unpacked = subprocess.run(["dpkg", "-x", str(deb), str(work / "root")], capture_output=True, text=True)
        if unpacked.returncode != 0:
            raise GuestUnavailable(f"dpkg -x {deb.name} failed: {_last_line(unpacked.stderr)}")
    root = work / "root"
    modules = _load_order(root / "lib" / "modules" / kernel_version, MODULES)
    archive = _Cpio()
    for directory in ("bin", "dev", "proc", "sys", "ctl", "newroot", "lib", "lib/modules"):
        archive.directory(directory)
    archive.char_device("dev/console", 5, 1)  # init's stdin/stdout/stderr, opened before devtmpfs is mounted
    archive.file("bin/busybox", (root / "bin" / "busybox").read_bytes(), 0o755)
    for name, image in modules:
        archive.file(f"lib/modules/{name}.ko", image, 0o644)
    insmod = "\n".join(f'insmod /lib/modules/{name}.ko || die "cannot load {name}"' for name, _ in modules)
    archive.file("init", _INIT.replace("{insmod}", insmod).encode(), 0o755)
    out = work / "out"
    out.mkdir()
    (out / "initramfs.cpio.gz").write_bytes(gzip.compress(archive.finish(), mtime=0))
    shutil.copyfile(root / "boot" / f"vmlinuz-{kernel_version}", out / "vmlinuz")


def _load_order(module_dir: Path, wanted: Sequence[str]) -> list[tuple[str, bytes]]:
    """``(name, uncompressed .ko)`` for ``wanted`` and their dependencies, each after what it depends on.

    Modules built into the kernel (``modules.builtin``) are left out. Raises GuestUnavailable for a module that
    is neither built in nor shipped as ``.ko`` or ``.ko.xz``.
    """
    def key(name: str) -> str:
        return name.replace("-", "_")

    listed = (module_dir / "modules.builtin").read_text().split()
    builtin = {key(Path(line).name.removesuffix(".ko")) for line in listed}
    files: dict[str, Path] = {}
    for path in (module_dir / "kernel").rglob("*.ko*"):
        match = re.fullmatch(r"(.+)\.ko(\.xz)?", path.name)
        if match:
            files[key(match.group(1))] = path
    order: list[tuple[str, bytes]] = []
    seen: set[str] = set()

    def add(name: str) -> None:
        if name in seen or name in builtin:
            return
        seen.add(name)
        if name not in files:
            raise GuestUnavailable(f"kernel {module_dir.name} has no module {name} (as .ko or .ko.xz)")
        data = files[name].read_bytes()
        image = lzma.decompress(data) if files[name].suffix == ".xz" else data
        for dependency in _modinfo_depends(image):
            add(key(dependency))
        order.append((name, image))

    for name in wanted:
        add(key(name))
    return order


def _modinfo_depends(image: bytes) -> list[str]:
    """The ``depends=`` list of a kernel module's ``.modinfo`` ELF section (empty if it has none)."""
    if image[:6] != b"\x7fELF\x02\x01":
        raise GuestUnavailable("a kernel module is not a 64-bit little-endian ELF file")
    (section_table,) = struct.unpack_from("<Q", image, 0x28)
    entry_size, count, names_index = struct.unpack_from("<HHH", image, 0x3A)

    def section(index: int) -> tuple[int, int, int]:
        header = struct.unpack_from("<IIQQQQ", image, section_table + index * entry_size)
        return header[0], header[4], header[5]  # sh_name, sh_offset, sh_size

    _, names, _ = section(names_index)
    for index in range(count):
        name, offset, size = section(index)
        if image[names + name:image.index(b"\0", names + name)] == b".modinfo":
            for field in image[offset:offset + size].split(b"\0"):
                if field.startswith(b"depends="):
                    return [dependency for dependency in field[len(b"depends="):].decode().split(",") if dependency]
    return []


class _Cpio:
    """An archive in the cpio "newc" format (the one the kernel unpacks as initramfs), built in memory."""

    def __init__(self) -> None:
        self._data = bytearray()
        self._inode = 0

    def directory(self, name: str) -> None:
        """Add a directory (its parent must have been added already)."""
        self._entry(name, 0o040755, b"", nlink=2)

    def file(self, name: str, data: bytes, mode: int) -> None:
        """Add a regular file with permission bits ``mode``."""
        self._entry(name, 0o100000 | mode, data)

    def char_device(self, name: str, major: int, minor: int) -> None:
        """Add a character device node (readable and writable by root)."""
        self._entry(name, 0o020600, b"", rdev=(major, minor))

    def finish(self) -> bytes:
        """The archive with its trailer; nothing may be added afterwards."""
        self._entry("TRAILER!!!", 0, b"", inode=0)
        return bytes(self._data)

    def _entry(self, name: str, mode: int, data: bytes, *, nlink: int = 1, rdev: tuple[int, int] = (0, 0),
               inode: int | None = None) -> None:
        self._inode += 1
        encoded = name.encode() + b"\0"
        fields = (self._inode if inode is None else inode, mode, 0, 0, nlink, 0, len(data), 0, 0, *rdev,
                  len(encoded), 0)
        self._data += b"070701" + b"".join(b"%08x" % value for value in fields) + encoded
        self._pad()
        self._data += data
        self._pad()

    def _pad(self) -> None:
        self._data += b"\0" * (-len(self._data) % 4)


def guest_or_skip() -> Guest:
    """The guest from :func:`build_guest`, or ``pytest.skip`` with the reason it cannot be had."""
    try:
        return build_guest()
    except GuestUnavailable as exc:
        pytest.skip(f"VM guest unavailable: {exc}")


def _main(argv: Sequence[str] | None = None) -> int:
    """Run the command line's command in the guest, print its output; return its exit status (255: no run)."""
    parser = argparse.ArgumentParser(prog="python -m tests.vm.guest",
                                     description="Run a shell command in the ublk test guest; exit with its status "
                                                 "(255 if the guest could not run it).")
    parser.add_argument("--smp", type=int, default=1, help="number of vCPUs (default 1)")
    parser.add_argument("--memory", type=int, default=1024, metavar="MB", help="guest memory (default 1024)")
    parser.add_argument("--timeout", type=float, default=300, metavar="S", help="seconds (default 300)")
    parser.add_argument("--share", type=Path, action="append", default=[], metavar="DIR",
                        help="directory to mount writable at the same path (repeatable)")
    parser.add_argument("command", nargs="+", help="the command; several words are joined with spaces, as ssh does")
    args = parser.parse_args(argv)
    try:
        result = build_guest().run(" ".join(args.command), smp=args.smp, memory_mb=args.memory,
                                   timeout=args.timeout, shares=args.share)
    except (GuestUnavailable, GuestError) as exc:
        print(f"guest: {exc}", file=sys.stderr)
        return 255
    sys.stdout.write(result.output)
    print(f"[guest: exit status {result.returncode} after {result.duration:.1f} s]", file=sys.stderr)
    return result.returncode


if __name__ == "__main__":
    sys.exit(_main())
