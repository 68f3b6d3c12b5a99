"""The ublk server against the simulated kernel (aioblock.testing.ublk): lifecycle, every operation, errors per
request, teardown on exceptions and cancellation. The real kernel judges the same server in tests/vm/."""

from __future__ import annotations

import asyncio
import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest

import aioblock
from aioblock.errors import InvalidOptionError, UblkError
from aioblock.frontends import ublk
from aioblock.frontends.ublk import uapi
from aioblock.testing.faults import FaultInjector
from aioblock.testing.ublk import SimulatedDevice, SimulatedKernel

MiB = 1 << 20


async def submit(dev: SimulatedDevice, q: int, op: int, offset: int, length: int, data: bytes | None = None,
                 flags: int = 0) -> tuple[int, bytes]:
    return await asyncio.wrap_future(dev.submit(q, op, offset >> 9, length >> 9, data, flags))


@pytest.fixture
def kernel() -> SimulatedKernel:
    return SimulatedKernel(cpus=2)


async def test_lifecycle_and_every_operation(tmp_path: Path, kernel: SimulatedKernel) -> None:
    path = tmp_path / "a.raw"
    await aioblock.create(str(path), "raw", 16 * MiB)
    async with aioblock.open(str(path)) as disk:
        async with ublk.serve(disk, kernel=kernel, queues=2, depth=8) as dev:
            assert dev.path == f"/dev/ublkb{dev.dev_id}" and dev.nr_queues == 2
            sim = kernel.device(dev.dev_id)
            assert sim.state == uapi.S_DEV_LIVE
            assert sim.params is not None and sim.params.dev_sectors == 16 * MiB >> 9
            assert sim.params.attrs & uapi.ATTR_VOLATILE_CACHE and sim.params.attrs & uapi.ATTR_FUA
            assert sim.info.flags & uapi.F_USER_RECOVERY
            pattern = bytes(range(256)) * 64
            assert await submit(sim, 0, uapi.OP_WRITE, MiB, len(pattern), pattern) == (len(pattern), b"")
            assert await submit(sim, 1, uapi.OP_READ, MiB, len(pattern)) == (len(pattern), pattern)
            assert (await submit(sim, 0, uapi.OP_WRITE, 0, 4096, b"\xaa" * 4096, uapi.IO_F_FUA))[0] == 4096
            assert (await submit(sim, 1, uapi.OP_FLUSH, 0, 0))[0] == 0
            assert (await submit(sim, 0, uapi.OP_WRITE_ZEROES, MiB, 4096))[0] == 0
            assert await submit(sim, 0, uapi.OP_READ, MiB, 8192) == (8192, bytes(4096) + pattern[4096:8192])
            assert (await submit(sim, 1, uapi.OP_DISCARD, 0, 4096))[0] == 0
            assert (await submit(sim, 1, uapi.OP_READ, 0, 4096))[1] == bytes(4096)
            assert (await submit(sim, 0, uapi.OP_WRITE_SAME, 0, 4096))[0] == -errno.EOPNOTSUPP
            stats = dev.statistics()
            assert stats.requests == 9
            assert stats.queues[0].ops == {"write": 2, "write_zeroes": 1, "read": 1, "write_same": 1}
            assert stats.queues[1].ops == {"read": 2, "flush": 1, "discard": 1}
            assert stats.queues[0].errors == 1
        assert kernel.devices == {}                 # stopped and deleted
    assert subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "raw", str(path), str(path)]).returncode == 0


@pytest.mark.parametrize("fmt", ["qcow2", "qed"])
async def test_image_written_through_the_device_is_read_by_qemu(tmp_path: Path, kernel: SimulatedKernel,
                                                                fmt: str) -> None:
    path = tmp_path / f"a.{fmt}"
    await aioblock.create(str(path), fmt, 8 * MiB)
    async with aioblock.open(str(path)) as disk, ublk.serve(disk, kernel=kernel, depth=16) as dev:
        sim = kernel.device(dev.dev_id)
        assert sim.params is not None
        assert (sim.params.chunk_sectors, sim.params.discard_granularity) == (128, 65536)
        assert sim.params.io_opt_shift == 16
        writes = [submit(sim, 0, uapi.OP_WRITE, i * 12288, 12288, bytes([i + 1]) * 12288) for i in range(40)]
        assert [r[0] for r in await asyncio.gather(*writes)] == [12288] * 40
        assert (await submit(sim, 0, uapi.OP_FLUSH, 0, 0))[0] == 0
    check = subprocess.run(["qemu-img", "check", str(path)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    for i in (0, 17, 39):
        io = subprocess.run(["qemu-io", "-f", fmt, "-c", f"read -P {i + 1} {i * 12288} 12288", str(path)],
                            capture_output=True, text=True)
        assert "Pattern verification failed" not in io.stdout and io.returncode == 0, io.stdout + io.stderr


async def test_a_failed_request_fails_alone(tmp_path: Path, kernel: SimulatedKernel) -> None:
    path = tmp_path / "a.raw"
    await aioblock.create(str(path), "raw", 4 * MiB)
    inj = FaultInjector()
    inj.fail(op="read", nth=2, errno=errno.EIO)
    inj.fail(op="write", nth=1, errno=errno.ENOSPC)
    async with aioblock.open(str(path), "raw", options={"inject": inj}) as disk, \
            ublk.serve(disk, kernel=kernel) as dev:
        sim = kernel.device(dev.dev_id)
        assert (await submit(sim, 0, uapi.OP_READ, 0, 4096))[0] == 4096
        assert (await submit(sim, 0, uapi.OP_READ, 0, 4096))[0] == -errno.EIO
        assert (await submit(sim, 0, uapi.OP_WRITE, 0, 4096, b"x" * 4096))[0] == -errno.ENOSPC
        assert (await submit(sim, 0, uapi.OP_WRITE, 0, 4096, b"y" * 4096))[0] == 4096
        assert await submit(sim, 0, uapi.OP_READ, 0, 4096) == (4096, b"y" * 4096)
        assert dev.statistics().queues[0].errors == 2


async def test_read_only_device(tmp_path: Path, kernel: SimulatedKernel) -> None:
    path = tmp_path / "a.raw"
    await aioblock.create(str(path), "raw", MiB)
    async with aioblock.open(str(path), read_only=True) as disk, ublk.serve(disk, kernel=kernel) as dev:
        sim = kernel.device(dev.dev_id)
        assert sim.params is not None and sim.params.attrs & uapi.ATTR_READ_ONLY
        assert sim.params.discard_granularity == 0 and sim.params.max_discard_sectors == 0
        assert (await submit(sim, 0, uapi.OP_WRITE, 0, 4096, b"x" * 4096))[0] == -errno.EPERM


async def test_exception_and_cancellation_delete_the_device(tmp_path: Path, kernel: SimulatedKernel) -> None:
    path = tmp_path / "a.raw"
    await aioblock.create(str(path), "raw", MiB)
    async with aioblock.open(str(path)) as disk:
        with pytest.raises(RuntimeError, match="boom"):
            async with ublk.serve(disk, kernel=kernel):
                assert len(kernel.devices) == 1
                raise RuntimeError("boom")
        assert kernel.devices == {}

        started = asyncio.Event()

        async def body() -> None:
            async with ublk.serve(disk, kernel=kernel, queues=2) as dev:
                started.set()
                await dev.wait_stopped()

        task = asyncio.create_task(body())
        await started.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert kernel.devices == {}


async def test_a_failed_queue_thread_is_reported(tmp_path: Path, kernel: SimulatedKernel) -> None:
    """A queue whose ring fails ends wait_stopped with a UblkError naming it; the device is still deleted."""
    path = tmp_path / "a.raw"
    await aioblock.create(str(path), "raw", MiB)
    async with aioblock.open(str(path)) as disk:
        with pytest.raises(UblkError, match=r"queue 1 failed: .*Bad file descriptor"):
            async with ublk.serve(disk, kernel=kernel, queues=2) as dev:
                sim = kernel.device(dev.dev_id)
                queue = sim.queues[1]
                assert queue is not None

                def broken(handle: object, block: bool = True) -> None:
                    raise OSError(errno.EBADF, os.strerror(errno.EBADF))

                queue.wait = broken  # type: ignore[method-assign]
                queue.wake()
                await asyncio.wait_for(dev.wait_stopped(), 10)
        assert kernel.devices == {}


async def test_several_devices_in_one_process(tmp_path: Path, kernel: SimulatedKernel) -> None:
    paths = [tmp_path / f"{i}.raw" for i in range(3)]
    for p in paths:
        await aioblock.create(str(p), "raw", MiB)
    disks = [await aioblock.open(str(p)) for p in paths]
    try:
        servers = [ublk.serve(d, kernel=kernel, depth=4) for d in disks]
        devs = [await s.__aenter__() for s in servers]
        assert sorted(d.dev_id for d in devs) == [0, 1, 2]
        for i, dev in enumerate(devs):
            await submit(kernel.device(dev.dev_id), 0, uapi.OP_WRITE, 0, 512, bytes([i + 1]) * 512)
        for s in servers:
            await s.__aexit__(None, None, None)
        assert kernel.devices == {}
    finally:
        for d in disks:
            await d.close()
    for i, p in enumerate(paths):
        assert p.read_bytes()[:512] == bytes([i + 1]) * 512


async def test_geometry_is_the_kernels(tmp_path: Path, kernel: SimulatedKernel) -> None:
    path = tmp_path / "a.raw"
    await aioblock.create(str(path), "raw", MiB)
    async with aioblock.open(str(path)) as disk:
        async with ublk.serve(disk, kernel=kernel, queues=4, max_io=64 << 10) as dev:
            assert dev.nr_queues == 2                    # clamped to the CPUs, as the kernel does
            sim = kernel.device(dev.dev_id)
            assert sim.params is not None and sim.params.max_sectors == 128
            assert (await submit(sim, 1, uapi.OP_READ, 0, 64 << 10))[0] == 64 << 10
        for bad in ({"depth": 0}, {"depth": 5000}, {"queues": 0}, {"max_io": 1000}, {"max_io": 64 << 20}):
            with pytest.raises(InvalidOptionError):
                ublk.serve(disk, kernel=kernel, **bad)   # type: ignore[arg-type]
        assert kernel.devices == {}


async def test_batches_hand_over_many_requests_at_once(tmp_path: Path, kernel: SimulatedKernel) -> None:
    path = tmp_path / "a.raw"
    await aioblock.create(str(path), "raw", MiB)
    async with aioblock.open(str(path)) as disk, ublk.serve(disk, kernel=kernel, depth=64) as dev:
        sim = kernel.device(dev.dev_id)
        results = await asyncio.gather(*(submit(sim, 0, uapi.OP_READ, (i % 256) * 4096, 4096)
                                         for i in range(2000)))
        assert all(r[0] == 4096 for r in results)
        q = dev.statistics().queues[0]
        assert q.requests == 2000 and q.batches < q.requests and q.max_batch > 1


async def test_failed_start_leaves_nothing(tmp_path: Path) -> None:
    class FailingStart(SimulatedKernel):
        def control(self):  # type: ignore[no-untyped-def]
            ctrl = super().control()

            def start_dev(dev_id: int, pid: int) -> None:
                raise UblkError(errno.EINVAL, "ublk START_DEV: Invalid argument")
            ctrl.start_dev = start_dev  # type: ignore[method-assign]
            return ctrl

    kernel = FailingStart()
    path = tmp_path / "a.raw"
    await aioblock.create(str(path), "raw", MiB)
    async with aioblock.open(str(path)) as disk:
        with pytest.raises(UblkError, match="START_DEV"):
            async with ublk.serve(disk, kernel=kernel):
                pytest.fail("not reached")
        assert kernel.devices == {}


def test_missing_driver_is_one_clear_line(tmp_path: Path) -> None:
    if os.path.exists(uapi.CTRL_DEV):
        pytest.skip("this kernel has ublk")
    image = tmp_path / "a.raw"
    image.write_bytes(bytes(MiB))
    res = subprocess.run([sys.executable, "-m", "aioblock", "serve", "ublk", str(image)], capture_output=True,
                         text=True)
    assert res.returncode == 1
    assert res.stdout == ""
    lines = res.stderr.splitlines()
    assert len(lines) == 1 and "ublk is not available" in lines[0] and "/dev/ublk-control" in lines[0]
