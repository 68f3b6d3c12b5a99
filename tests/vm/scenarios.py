"""Scenarios that run inside the test guest against aioblock's ublk server: ``python -m tests.vm.scenarios NAME``.

Each scenario starts ``aioblock serve ublk`` as a child process (the guest runs as root), drives the block device
with O_DIRECT I/O, fio or a file system, checks what it reads back, stops the server and checks that the device is
gone. A failed check raises; the exit status is then 1 and the last line says what failed. Scenarios that write
keep a model of the device's contents in a sparse raw file (``--expect``) so that the host can compare the image
with it (``qemu-img compare``) after the guest has powered off.

Requests reach the ublk queue of the CPU that submits them, so with two queues the scenarios pin their writers to
CPU 0 and CPU 1 to load both queues at once.
"""

from __future__ import annotations

import argparse
import fcntl
import mmap
import os
import random
import re
import select
import shlex
import signal
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

SECTOR = 512
BLKDISCARD = 0x1277
BLKZEROOUT = 0x127F
BLKGETSIZE64 = 0x80081272
BLKROGET = 0x125E
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02


class ScenarioFailed(Exception):
    """A check inside a scenario did not hold."""


def check(condition: bool, message: str) -> None:
    if not condition:
        raise ScenarioFailed(message)


class Server:
    """One ``aioblock serve ublk`` child process; ``path`` and ``dev_id`` once the device is live.

    Its stderr goes to the guest's console, so a server's error shows in the test's output.
    """

    def __init__(self, image: str, *args: str, ready_timeout: float = 120) -> None:
        self.argv = [sys.executable, "-m", "aioblock", "serve", "ublk", *args, image]
        self.proc = subprocess.Popen(self.argv, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], ready_timeout)
        line = self.proc.stdout.readline() if ready else ""
        match = re.fullmatch(r"/dev/ublkb(\d+)\n", line)
        if match is None:
            self.proc.kill()
            raise ScenarioFailed(f"{shlex.join(self.argv)} printed {line!r} (exit {self.proc.wait()}), "
                                 "not a device path")
        self.path = line.strip()
        self.dev_id = int(match.group(1))
        check(Path(self.path).is_block_device(), f"{self.path} is not a block device")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 120) -> None:
        """Stop the server with ``sig``; it must exit 0 and leave neither device node behind."""
        self.proc.send_signal(sig)
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise ScenarioFailed(f"the server did not exit within {timeout:g} s of signal {sig}") from None
        check(rc == 0, f"the server exited {rc} after signal {sig}")
        self.check_gone()

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()

    def check_gone(self) -> None:
        for node in (f"/dev/ublkb{self.dev_id}", f"/dev/ublkc{self.dev_id}"):
            check(not os.path.exists(node), f"{node} is left after the server stopped")


@contextmanager
def serving(image: str, *args: str) -> Iterator[Server]:
    server = Server(image, *args)
    try:
        yield server
    except BaseException:
        server.kill()
        raise
    server.stop()


class Direct:
    """O_DIRECT access to a block device through page-aligned buffers."""

    def __init__(self, path: str, flags: int = os.O_RDWR) -> None:
        self.fd = os.open(path, flags | os.O_DIRECT)

    def size(self) -> int:
        size: int = struct.unpack("Q", fcntl.ioctl(self.fd, BLKGETSIZE64, b"\0" * 8))[0]
        return size

    def pwrite(self, data: bytes, offset: int, flags: int = 0) -> None:
        buf = mmap.mmap(-1, max(len(data), 1))
        buf[:len(data)] = data
        done = os.pwritev(self.fd, [memoryview(buf)[:len(data)]], offset, flags)
        check(done == len(data), f"short write at {offset}: {done} of {len(data)}")

    def pread(self, length: int, offset: int) -> bytes:
        buf = mmap.mmap(-1, max(length, 1))
        done = os.preadv(self.fd, [memoryview(buf)[:length]], offset)
        check(done == length, f"short read at {offset}: {done} of {length}")
        return bytes(buf[:length])

    def discard(self, offset: int, length: int) -> None:
        fcntl.ioctl(self.fd, BLKDISCARD, struct.pack("QQ", offset, length))

    def zeroout(self, offset: int, length: int) -> None:
        """BLKZEROOUT: WRITE_ZEROES with NOUNMAP."""
        fcntl.ioctl(self.fd, BLKZEROOUT, struct.pack("QQ", offset, length))

    def punch(self, offset: int, length: int) -> None:
        """fallocate(PUNCH_HOLE): WRITE_ZEROES that may unmap."""
        _fallocate(self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)

    def close(self) -> None:
        os.close(self.fd)


def _fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    if libc.fallocate(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


class Model:
    """The expected contents of the device, in memory; ``close`` writes them to a sparse raw file for the host."""

    def __init__(self, path: str, size: int) -> None:
        self.path = path
        self.data = bytearray(size)
        self.lock = threading.Lock()

    def write(self, data: bytes, offset: int) -> None:
        with self.lock:
            self.data[offset:offset + len(data)] = data

    def zero(self, offset: int, length: int) -> None:
        self.write(bytes(length), offset)

    def read(self, length: int, offset: int) -> bytes:
        with self.lock:
            return bytes(self.data[offset:offset + length])

    def close(self) -> None:
        chunk = 1 << 20
        with open(self.path, "wb") as f:
            f.truncate(len(self.data))
            for offset in range(0, len(self.data), chunk):
                piece = self.data[offset:offset + chunk]
                if piece.count(0) != len(piece):
                    f.seek(offset)
                    f.write(piece)


def pattern(rng: random.Random, length: int) -> bytes:
    return rng.randbytes(length)


def compare(dev: Direct, model: Model, offset: int, length: int, what: str) -> None:
    got = dev.pread(length, offset)
    want = model.read(length, offset)
    if got != want:
        first = next(i for i in range(length) if got[i] != want[i])
        raise ScenarioFailed(f"{what}: byte {offset + first} reads {got[first]:#x}, expected {want[first]:#x}")


def pinned(cpu: int, fn: Callable[[], None]) -> Callable[[], None]:
    """``fn`` run on ``cpu`` only (its requests then go to that CPU's ublk queue)."""

    def run() -> None:
        os.sched_setaffinity(0, {cpu % os.cpu_count()})  # type: ignore[operator]
        fn()

    return run


def run_threads(fns: Sequence[Callable[[], None]]) -> None:
    """Run ``fns`` in threads at once; re-raise the first failure."""
    errors: list[BaseException] = []

    def wrap(fn: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            try:
                fn()
            except BaseException as exc:
                errors.append(exc)

        return run

    threads = [threading.Thread(target=wrap(fn)) for fn in fns]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


# -- scenarios ---------------------------------------------------------------------------------------------------

SIZES = (512, 1024, 3584, 4096, 4608, 8192, 65024, 65536, 66048, 131072, 262144, 524288, 524800, 1048576,
         1049088, 2 * 1048576 + 4096)


def scenario_pattern(args: argparse.Namespace) -> None:
    """O_DIRECT pattern writes of many sizes and alignments (plain, FUA and followed by flushes) from one writer
    per queue, each read back at once and the whole device read back at the end in other chunk sizes."""
    with serving(args.image, *args.serve) as server:
        dev = Direct(server.path)
        size = dev.size()
        model = Model(args.expect, size)
        writers = args.queues

        def writer(index: int) -> Callable[[], None]:
            def run() -> None:
                rng = random.Random(index)
                region = size // writers
                base = index * region
                for n in range(args.ops):
                    length = SIZES[n % len(SIZES)]
                    align = rng.choice((SECTOR, 4096, 65536))
                    offset = base + rng.randrange(0, (region - length) // align) * align
                    data = pattern(rng, length)
                    flags = os.RWF_DSYNC if n % 7 == 3 else 0      # a FUA write
                    dev.pwrite(data, offset, flags)
                    model.write(data, offset)
                    if n % 11 == 5:
                        os.fsync(dev.fd)                           # FLUSH
                    compare(dev, model, offset, length, f"read back of write {n} of writer {index}")

            return pinned(index, run)

        run_threads([writer(i) for i in range(writers)])
        os.fsync(dev.fd)
        rng = random.Random(99)
        offset = 0
        while offset < size:
            length = min(size - offset, rng.choice((4096, 65536, 1048576, 3 * 1048576)))
            compare(dev, model, offset, length, "final read back")
            offset += length
        dev.close()
        model.close()


def scenario_fio(args: argparse.Namespace) -> None:
    """fio writes with ``--verify`` (crc32c, many block sizes, libaio at depth 16), one job per queue."""
    with serving(args.image, *args.serve) as server:
        probe = Direct(server.path)
        size = probe.size()
        probe.close()
        region = size // args.queues
        jobs = []
        for i in range(args.queues):
            jobs += [f"--name=writer{i}", f"--offset={i * region}", f"--size={region}", f"--cpus_allowed={i}"]
        fio(["--filename=" + server.path, "--direct=1", "--ioengine=libaio", "--iodepth=16", "--rw=randwrite",
             "--bssplit=512/10:4k/40:16k/10:64k/20:192k/10:1m/10", "--verify=crc32c", "--verify_fatal=1",
             "--fsync=32", *jobs])


def fio(argv: Sequence[str]) -> None:
    result = subprocess.run(["fio", "--output-format=terse", "--terse-version=3", *argv], capture_output=True,
                            text=True)
    sys.stdout.write(result.stderr)
    check(result.returncode == 0, f"fio exited {result.returncode}: {result.stdout.strip()[-500:]}")
    for line in result.stdout.splitlines():
        fields = line.split(";")
        if len(fields) > 4:
            check(fields[4] == "0", f"fio job {fields[2]} reports error {fields[4]}")


def scenario_ext4(args: argparse.Namespace) -> None:
    """mkfs.ext4, mount, copy a tree of files, unmount, fsck -n; remount and compare the copies."""
    source = Path(args.tree)
    mnt = "/tmp/mnt"
    os.makedirs(mnt, exist_ok=True)
    with serving(args.image, *args.serve) as server:
        sh(f"mkfs.ext4 -q -F {server.path}")
        sh(f"mount {server.path} {mnt}")
        sh(f"cp -a {shlex.quote(str(source))} {mnt}/tree && sync")
        sh(f"umount {mnt}")
        sh(f"fsck.ext4 -n -f {server.path}")
    with serving(args.image, *args.serve) as server:
        sh(f"mount -o ro {server.path} {mnt}")
        sh(f"diff -r {shlex.quote(str(source))} {mnt}/tree")
        sh(f"umount {mnt}")


def sh(command: str) -> None:
    result = subprocess.run(command, shell=True, capture_output=True, text=True)
    check(result.returncode == 0, f"{command!r} exited {result.returncode}: {(result.stdout + result.stderr)[-800:]}")


def scenario_discard(args: argparse.Namespace) -> None:
    """Discard (BLKDISCARD, blkdiscard), write zeroes with NOUNMAP (BLKZEROOUT, blkdiscard -z) and with unmapping
    allowed (fallocate PUNCH_HOLE) over written data, at cluster and sub-cluster granularity."""
    mib = 1 << 20
    with serving(args.image, *args.serve) as server:
        dev = Direct(server.path)
        size = dev.size()
        model = Model(args.expect, size)
        rng = random.Random(5)
        data = pattern(rng, 16 * mib)
        dev.pwrite(data, 0)
        model.write(data, 0)
        os.fsync(dev.fd)
        # [0, 4 MiB): discards; [4, 8): NOUNMAP zeroes; [8, 12): unmapping zeroes; [12, 16): blkdiscard tools.
        # Discards are whole clusters (the advertised granularity): what a smaller one leaves is not defined
        # (qcow2 keeps the data, as QEMU does). Write-zeroes must zero any range.
        zeroes = ((0, mib), (mib + 4096, 8192), (2 * mib + 65536 - 4096, 65536 + 8192))  # cluster-sized and not
        discards = ((0, mib), (2 * mib + 65536, 65536))
        for base, op, ranges in ((0, dev.discard, discards), (4 * mib, dev.zeroout, zeroes),
                                 (8 * mib, dev.punch, zeroes)):
            for start, length in ranges:
                op(base + start, length)
                model.zero(base + start, length)
        os.fsync(dev.fd)
        dev.close()
        sh(f"blkdiscard -o {12 * mib} -l {mib} {server.path}")
        sh(f"blkdiscard -z -o {13 * mib} -l {mib} {server.path}")
        model.zero(12 * mib, 2 * mib)
        dev = Direct(server.path)
        compare(dev, model, 0, 16 * mib, "read back after discards and zeroes")
        dev.close()
        model.close()


def scenario_shared_clusters(args: argparse.Namespace) -> None:
    """Two writers on two queues over the same few L2 and refcount entries: whole-cluster and partial writes,
    discards, zeroes and flushes, each read back at once. Writer i owns the even or the odd clusters, so while one
    frees a cluster the other allocates: a freed cluster punched out after it was reallocated would erase data."""
    cluster = args.cluster
    clusters = 32
    with serving(args.image, *args.serve) as server:
        dev = Direct(server.path)
        model = Model(args.expect, dev.size())

        def writer(index: int) -> Callable[[], None]:
            def run() -> None:
                rng = random.Random(1000 + index)
                mine = [c for c in range(clusters) if c % 2 == index]
                for n in range(args.ops):
                    choice = rng.random()
                    start = rng.choice(mine) * cluster
                    if choice < 0.6:
                        length = rng.choice((4096, cluster // 2, cluster))
                        offset = start + rng.randrange(0, cluster - length + 1, 4096)
                        data = pattern(rng, length)
                        dev.pwrite(data, offset)
                        model.write(data, offset)
                        compare(dev, model, start, cluster, f"writer {index} op {n}: write")
                    elif choice < 0.85:
                        op = rng.choice((dev.discard, dev.zeroout, dev.punch))
                        op(start, cluster)
                        model.zero(start, cluster)
                        compare(dev, model, start, cluster, f"writer {index} op {n}: {op.__name__}")
                    else:
                        os.fsync(dev.fd)

            return pinned(index, run)

        run_threads([writer(0), writer(1)])
        os.fsync(dev.fd)
        compare(dev, model, 0, clusters * cluster, "final read back")
        dev.close()
        model.close()


def scenario_shared_clusters_fio(args: argparse.Namespace) -> None:
    """fio's own verify on two queues, its two jobs interleaved cluster by cluster over the same 32 clusters,
    trimming some of the blocks they wrote (which must then read zeroes) and flushing."""
    cluster = args.cluster
    region = 32 * cluster
    block = 4096
    with serving(args.image, *args.serve) as server:
        jobs = []
        for i in range(2):
            jobs += [f"--name=job{i}", f"--offset={i * cluster}", f"--cpus_allowed={i}"]
        fio([f"--filename={server.path}", "--direct=1", "--ioengine=psync", "--rw=randwrite", f"--bs={block}",
             f"--size={region}", "--zonemode=strided", f"--zonesize={cluster}", f"--zonerange={2 * cluster}",
             f"--zoneskip={cluster}", "--verify=crc32c", "--verify_fatal=1", "--trim_percentage=30",
             "--trim_backlog=4", "--trim_verify_zero=1", "--fsync=16", "--loops=4", *jobs])


def scenario_recover(args: argparse.Namespace) -> None:
    """Kill the server with SIGKILL while a reader and a writer hold the device open, then ``--recover`` it: both
    go on without seeing an error and every flushed write is there."""
    mib = 1 << 20
    server = Server(args.image, *args.serve)
    dev_id = server.dev_id
    path = server.path
    probe = Direct(path)
    model = Model(args.expect, probe.size())
    probe.close()
    stop = threading.Event()
    done = {"reads": 0, "writes": 0}

    def reader() -> None:
        dev = Direct(path, os.O_RDONLY)
        rng = random.Random(1)
        while not stop.is_set():
            offset = rng.randrange(8 * mib // 4096) * 4096 + 8 * mib
            got = dev.pread(65536, offset)
            check(got == model.read(65536, offset), f"reader: wrong data at {offset}")
            done["reads"] += 1
        dev.close()

    def writer() -> None:
        dev = Direct(path)
        rng = random.Random(2)
        n = 0
        while not stop.is_set():
            offset = (n % 128) * 65536
            data = pattern(rng, 65536)
            dev.pwrite(data, offset)
            model.write(data, offset)
            if n % 8 == 7:
                os.fsync(dev.fd)
            n += 1
            done["writes"] += 1
        os.fsync(dev.fd)
        compare(dev, model, 0, 8 * mib, "writer's region after recovery")
        dev.close()

    seed = Direct(path)
    data = pattern(random.Random(3), 8 * mib)
    seed.pwrite(data, 8 * mib)
    model.write(data, 8 * mib)
    os.fsync(seed.fd)
    seed.close()
    errors: list[BaseException] = []

    def guarded(fn: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            try:
                fn()
            except BaseException as exc:
                errors.append(exc)
                stop.set()

        return run

    threads = [threading.Thread(target=guarded(fn)) for fn in (reader, writer)]
    for t in threads:
        t.start()
    time.sleep(2)
    before = dict(done)
    server.kill()
    state = ublk_state(dev_id)
    time.sleep(1)
    recovered = Server(args.image, *args.serve, "--recover", str(dev_id))
    check(recovered.path == path, f"--recover served {recovered.path}, not {path}")
    time.sleep(2)
    stop.set()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    check(done["reads"] > before["reads"] and done["writes"] > before["writes"],
          f"no I/O completed after recovery ({before} before the kill, {done} at the end)")
    print(f"state after SIGKILL: {state}; I/O before the kill {before}, at the end {done}")
    recovered.stop()
    model.close()


def ublk_state(dev_id: int) -> str:
    listing = subprocess.run([sys.executable, "-m", "aioblock", "serve", "ublk", "--list"], capture_output=True,
                             text=True, check=True).stdout
    for line in listing.splitlines()[1:]:
        fields = line.split()
        if fields and fields[0] == str(dev_id):
            return fields[1]
    raise ScenarioFailed(f"device {dev_id} is not listed:\n{listing}")


def scenario_list_delete(args: argparse.Namespace) -> None:
    """Two servers: ``--list`` shows both with their images; ``--delete`` of one stops its server (exit 0) and
    leaves the other serving."""
    first = Server(args.image, *args.serve)
    second = Server(args.image2, *args.serve, "-r")
    listing = subprocess.run([sys.executable, "-m", "aioblock", "serve", "ublk", "--list"], capture_output=True,
                             text=True, check=True).stdout
    print(listing, end="")
    rows = {line.split()[0]: line for line in listing.splitlines()[1:]}
    for server, image in ((first, args.image), (second, args.image2)):
        row = rows.get(str(server.dev_id), "")
        check(" live " in row and image in row, f"--list row of device {server.dev_id} is {row!r}")
    check("read-only" in rows[str(second.dev_id)], "the -r device is not listed read-only")
    subprocess.run([sys.executable, "-m", "aioblock", "serve", "ublk", "--delete", str(first.dev_id)], check=True)
    rc = first.proc.wait(60)
    check(rc == 0, f"the deleted device's server exited {rc}")
    first.check_gone()
    dev = Direct(second.path, os.O_RDONLY)
    dev.pread(4096, 0)
    dev.close()
    second.stop()


def scenario_partitions(args: argparse.Namespace) -> None:
    """An image with a partition table: the partition scan at START_DEV is served and ``ublkbNp1`` appears."""
    with serving(args.image, *args.serve) as server:
        part = f"{server.path}p1"
        for _ in range(100):
            if os.path.exists(part):
                break
            time.sleep(0.1)
        check(Path(part).is_block_device(), f"{part} did not appear")
        dev = Direct(part, os.O_RDONLY)
        check(dev.size() == args.part_size, f"{part} has {dev.size()} bytes, expected {args.part_size}")
        dev.close()


def scenario_stop_held(args: argparse.Namespace) -> None:
    """SIGTERM, then SIGINT, while another program holds the device open: each server still stops, deletes the
    device and exits 0; the holder's I/O then fails instead of hanging."""
    for sig in (signal.SIGTERM, signal.SIGINT):
        server = Server(args.image, *args.serve)
        holder = Direct(server.path, os.O_RDONLY)
        holder.pread(4096, 0)
        server.stop(sig)
        try:
            got = os.preadv(holder.fd, [mmap.mmap(-1, 4096)], 0)
        except OSError as exc:
            print(f"the holder's read after signal {sig}: {exc.strerror}")
        else:
            check(got == 0, f"a read of the deleted device returned {got} bytes")
            print(f"the holder's read after signal {sig}: end of device")
        finally:
            holder.close()


def scenario_read_only(args: argparse.Namespace) -> None:
    """``-r``: the device is read-only to the kernel, reads work, writes fail."""
    with serving(args.image, *args.serve, "-r") as server:
        ro = subprocess.run(["blockdev", "--getro", server.path], capture_output=True, text=True, check=True)
        check(ro.stdout.strip() == "1", f"blockdev --getro says {ro.stdout.strip()!r}")
        dev = Direct(server.path, os.O_RDONLY)
        check(dev.pread(4096, 0) == bytes(4096), "an empty image does not read zeroes")
        dev.close()
        dev = Direct(server.path, os.O_RDWR)
        try:
            dev.pwrite(bytes(4096), 0)
        except OSError as exc:
            print(f"writing: {exc.strerror}")
        else:
            raise ScenarioFailed("a write to a read-only device succeeded")
        finally:
            dev.close()


SCENARIOS = {name[len("scenario_"):].replace("_", "-"): fn for name, fn in globals().items()
             if name.startswith("scenario_")}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.vm.scenarios")
    parser.add_argument("scenario", choices=sorted(SCENARIOS))
    parser.add_argument("image")
    parser.add_argument("--image2")
    parser.add_argument("--expect", help="the model of the device's contents to write (raw)")
    parser.add_argument("--queues", type=int, default=1)
    parser.add_argument("--ops", type=int, default=200)
    parser.add_argument("--cluster", type=int, default=65536)
    parser.add_argument("--tree", help="files to copy (ext4)")
    parser.add_argument("--part-size", type=int)
    parser.add_argument("--serve", default="", help="more options of aioblock serve ublk")
    args = parser.parse_args(argv)
    args.serve = [*shlex.split(args.serve), "--queues", str(args.queues)]
    # The images are served from a copy on the guest's tmpfs, copied back at the end: the share (9p) has no
    # fallocate, so a raw image's discards would be no-ops there, and it is slow.
    shared = [(name, getattr(args, name)) for name in ("image", "image2") if getattr(args, name)]
    local = Path("/tmp/images")
    local.mkdir(exist_ok=True)
    for name, path in shared:
        setattr(args, name, str(local / Path(path).name))
        sh(f"cp --sparse=always {shlex.quote(path)} {shlex.quote(getattr(args, name))}")
    try:
        SCENARIOS[args.scenario](args)
    except ScenarioFailed as exc:
        print(f"scenario {args.scenario} failed: {exc}", flush=True)
        return 1
    finally:
        for name, path in shared:
            sh(f"cp --sparse=always {shlex.quote(getattr(args, name))} {shlex.quote(path)}")
    print(f"scenario {args.scenario} passed", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
