"""Serve a BlockBackend as a ublk block device: ``async with serve(disk) as dev: ...``.

Lifecycle (ublk-uapi.md §8), every control command in a worker thread because they block:
ADD_DEV -> open /dev/ublkcN -> SET_PARAMS -> queue threads FETCH every tag -> START_DEV (the kernel reads the
partition table meanwhile, served by the queues) -> LIVE. Stop: STOP_DEV (the kernel flushes and removes
/dev/ublkbN, served by the queues; then every tag is aborted and the threads end) -> drain -> close
/dev/ublkcN -> DEL_DEV (it waits for that close). The queues keep serving through every blocking command, so
the server never deadlocks on its own device.

Choices (QEMU's qemu-storage-daemon and ublksrv are the reference points):

- Parameters: 512-byte logical and 4 KiB physical blocks; ``max_sectors`` from ``max_io``; the cluster size
  (formats with one of at least 64 KiB) as ``chunk_sectors`` and ``io_opt``, so that no request spans two
  clusters (smaller clusters would cut requests below 64 KiB: not worth it); discard and write-zeroes with the
  cluster (or 4 KiB) granularity, up to 1 GiB per request; a volatile cache with FUA, so the kernel sends
  FLUSH, which completes only when data and metadata are durable (``BlockBackend.flush``); read-only images
  give read-only devices.
- Recovery is on by default (``UBLK_F_USER_RECOVERY`` with REISSUE): if the server dies, the kernel keeps the
  device and queues its I/O until ``serve(..., recover=dev_id)`` reattaches, and applications see no error.
  ``recoverable=False`` makes a dead server's device fail its I/O instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno as _errno
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from ...backend import BackendStatistics, BlockBackend
from ...errors import InvalidOptionError, UblkError
from . import uapi
from .kernel import ControlChannel, DeviceChannel, Kernel, LinuxKernel
from .queue import Queue, QueueStatistics

__all__ = ["DeviceInfo", "UblkDevice", "UblkStatistics", "delete_device", "list_devices", "serve"]

T = TypeVar("T")

DEFAULT_DEPTH = 128
DEFAULT_MAX_IO = 512 << 10
MAX_IO_LIMIT = 32 << 20             # the kernel's per-tag buffer space (UBLK_IO_BUF_BITS)
_CHUNK_MIN = 64 << 10
_DISCARD_MAX_SECTORS = (1 << 30) >> 9
#: where a server notes which image serves which device (for ``--list``); removed when the device goes
STATE_DIR = os.environ.get("AIOBLOCK_UBLK_STATE_DIR", "/run/aioblock/ublk")


@dataclass
class UblkStatistics:
    dev_id: int
    queues: list[QueueStatistics]
    disk: BackendStatistics

    @property
    def requests(self) -> int:
        return sum(q.requests for q in self.queues)


@dataclass
class DeviceInfo:
    """What ``list_devices`` reports of one device."""

    dev_id: int
    state: str
    queues: int
    depth: int
    max_io: int
    size: int | None
    pid: int
    flags: list[str]
    #: the image, format and server pid noted by an aioblock server (None: not ours, or unknown)
    image: dict[str, Any] | None = field(default=None)


class UblkDevice:
    """A served device. ``path`` (``/dev/ublkbN``) and ``dev_id`` are set once it is live."""

    def __init__(self, disk: BlockBackend, *, queues: int, depth: int, max_io: int, recoverable: bool,
                 recover: int | None, kernel: Kernel) -> None:
        if not 1 <= queues <= uapi.MAX_QUEUES:
            raise InvalidOptionError(f"queues must be 1..{uapi.MAX_QUEUES}, not {queues}")
        if not 1 <= depth <= uapi.MAX_QUEUE_DEPTH:
            raise InvalidOptionError(f"depth must be 1..{uapi.MAX_QUEUE_DEPTH}, not {depth}")
        if not uapi.PAGE_SIZE <= max_io <= MAX_IO_LIMIT or max_io % uapi.PAGE_SIZE:
            raise InvalidOptionError(f"max-io must be a multiple of 4096 from 4 KiB to 32 MiB, not {max_io}")
        if disk.size < 512 and recover is None:
            raise InvalidOptionError("the image is smaller than one 512-byte sector")
        self.disk = disk
        self.nr_queues, self.depth, self.max_io = queues, depth, max_io
        self.recoverable = recoverable
        self._recover = recover
        self._kernel = kernel
        self.dev_id: int = -1
        self.path: str = ""
        self.flags = 0
        self.features: int | None = None
        self._ctrl: ControlChannel | None = None
        self._chan: DeviceChannel | None = None
        self._queues: list[Queue] = []
        self._started = False
        self._added = False
        self._stopped: asyncio.Future[Any] | None = None

    async def _call(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.to_thread(fn, *args)

    # ---- start ------------------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Create (or, with ``recover``, reattach to) the device and serve it; on failure nothing is left."""
        try:
            self._ctrl = ctrl = await self._call(self._kernel.control)
            self.features = await self._call(ctrl.get_features)
            if self._recover is None:
                await self._add(ctrl)
            else:
                await self._reattach(ctrl, self._recover)
        except BaseException:
            await asyncio.shield(self._teardown())
            raise

    async def _add(self, ctrl: ControlChannel) -> None:
        disk = self.disk
        flags = uapi.F_USER_RECOVERY | uapi.F_USER_RECOVERY_REISSUE if self.recoverable else 0
        info = await self._call(ctrl.add_dev, uapi.DevInfo(self.nr_queues, self.depth, uapi.S_DEV_DEAD,
                                                            self.max_io, uapi.DEV_ID_ANY, -1, flags))
        self._added = True
        self.dev_id, self.flags = info.dev_id, info.flags
        self.nr_queues, self.depth, self.max_io = info.nr_hw_queues, info.queue_depth, info.max_io_buf_bytes
        self._chan = await self._call(ctrl.open_device, self.dev_id)
        await self._call(ctrl.set_params, self.dev_id, self._params())
        await self._start_queues()
        await self._call(ctrl.start_dev, self.dev_id, os.getpid())
        self._started = True
        await self._live(disk)

    async def _reattach(self, ctrl: ControlChannel, dev_id: int) -> None:
        info = await self._call(ctrl.get_dev_info, dev_id)
        if info.state != uapi.S_DEV_QUIESCED:
            state = uapi.STATE_NAMES.get(info.state, str(info.state))
            raise UblkError(_errno.EBUSY, f"ublk device {dev_id} cannot be recovered: it is {state}, not "
                            "quiesced (a device is quiesced after its recoverable server died)")
        params = await self._call(ctrl.get_params, dev_id)
        if params.dev_sectors != self.disk.size >> 9:
            raise UblkError(_errno.EINVAL, f"ublk device {dev_id} has {params.dev_sectors} sectors, the image "
                            f"{self.disk.size >> 9}: recover it with the image it served")
        if bool(params.attrs & uapi.ATTR_READ_ONLY) != self.disk.read_only:
            raise UblkError(_errno.EINVAL, f"ublk device {dev_id} is "
                            f"{'read-only' if params.attrs & uapi.ATTR_READ_ONLY else 'writable'}: "
                            "open the image the same way")
        self.dev_id, self.flags = dev_id, info.flags
        self.nr_queues, self.depth, self.max_io = info.nr_hw_queues, info.queue_depth, info.max_io_buf_bytes
        self.recoverable = True
        await self._call(ctrl.start_user_recovery, dev_id)
        self._added = self._started = True      # from here on, a failure stops and deletes the device
        self._chan = await self._call(ctrl.open_device, dev_id)
        await self._start_queues()
        await self._call(ctrl.end_user_recovery, dev_id, os.getpid())
        await self._live(self.disk)

    def _params(self) -> uapi.Params:
        disk = self.disk
        cluster = disk.cluster_size or 0
        chunk = cluster if cluster >= _CHUNK_MIN and cluster & (cluster - 1) == 0 else 0
        attrs = uapi.ATTR_VOLATILE_CACHE | uapi.ATTR_FUA
        granularity = 0
        if disk.read_only:
            attrs |= uapi.ATTR_READ_ONLY
        else:
            granularity = max(cluster, uapi.PAGE_SIZE)
        return uapi.Params(
            dev_sectors=disk.size >> 9, logical_bs_shift=9, physical_bs_shift=12,
            io_opt_shift=(chunk or uapi.PAGE_SIZE).bit_length() - 1, io_min_shift=9,
            max_sectors=self.max_io >> 9, chunk_sectors=chunk >> 9, attrs=attrs,
            discard_granularity=granularity, max_discard_sectors=_DISCARD_MAX_SECTORS if granularity else 0,
            max_write_zeroes_sectors=_DISCARD_MAX_SECTORS if granularity else 0)

    async def _start_queues(self) -> None:
        assert self._chan is not None
        ioctl = bool(self.flags & uapi.F_CMD_IOCTL_ENCODE)
        for q_id in range(self.nr_queues):
            q = Queue(self._chan, self.disk, q_id, self.depth, self.max_io, ioctl, f"ublk{self.dev_id}")
            self._queues.append(q)
            q.start()
        await asyncio.gather(*(q.ready for q in self._queues))
        self._stopped = asyncio.ensure_future(asyncio.wait([q.stopped for q in self._queues],
                                                           return_when=asyncio.FIRST_COMPLETED))

    async def _live(self, disk: BlockBackend) -> None:
        path = uapi.block_path(self.dev_id)
        deadline = time.monotonic() + 5
        while not os.path.exists(path) and time.monotonic() < deadline and self._kernel_is_linux():
            await asyncio.sleep(0.01)
        self.path = path
        if self._kernel_is_linux():
            _note(self.dev_id, {"file": disk.filename, "format": disk.format, "pid": os.getpid(),
                                "read_only": disk.read_only})

    def _kernel_is_linux(self) -> bool:
        return isinstance(self._kernel, LinuxKernel)

    # ---- while serving ----------------------------------------------------------------------------------------

    def statistics(self) -> UblkStatistics:
        return UblkStatistics(self.dev_id, [q.statistics() for q in self._queues], self.disk.statistics())

    async def wait_stopped(self) -> None:
        """Return when a queue stops serving without us: the device was stopped or deleted by someone else.
        Raises UblkError if a queue's thread failed instead (its ring, or a bug); leaving the ``serve`` block
        then deletes the device as usual."""
        if self._stopped is not None:
            await asyncio.shield(self._stopped)
        for q in self._queues:
            if q.failure is not None:
                err = getattr(q.failure, "errno", None) or _errno.EIO
                raise UblkError(err, f"ublk device {self.dev_id}: queue {q.q_id} failed: {q.failure}")

    # ---- stop -------------------------------------------------------------------------------------------------

    async def stop(self) -> None:
        """Stop and delete the device; runs to its end even if the caller is cancelled (then re-raised)."""
        task = asyncio.ensure_future(self._teardown())
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            await task
            raise

    async def _teardown(self) -> None:
        ctrl = self._ctrl
        errors: list[BaseException] = []
        if ctrl is not None and self._started:
            try:
                await self._call(ctrl.stop_dev, self.dev_id)
            except UblkError as exc:
                if exc.errno != _errno.ENODEV:              # already gone: nothing to stop
                    errors.append(exc)
        if self._queues:
            if not self._started or errors:
                for q in self._queues:
                    q.abandon()
            done, _ = await asyncio.wait([q.stopped for q in self._queues], timeout=10)
            if len(done) < len(self._queues):              # the kernel did not abort every tag: end anyway
                for q in self._queues:
                    q.abandon()
                await asyncio.wait([q.stopped for q in self._queues], timeout=10)
            for q in self._queues:
                q.cancel()
                await q.drain()
        if self._chan is not None:
            self._chan.close()
            self._chan = None
        if ctrl is not None:
            if self._added:
                try:
                    await self._call(ctrl.del_dev, self.dev_id)
                except UblkError as exc:
                    if exc.errno != _errno.ENODEV:
                        errors.append(exc)
                if self._kernel_is_linux():
                    _forget(self.dev_id)
            ctrl.close()
            self._ctrl = None
        self._added = self._started = False
        if errors:
            raise errors[0]


class _Serving:
    """``serve``'s async context manager."""

    def __init__(self, device: UblkDevice) -> None:
        self._device = device

    async def __aenter__(self) -> UblkDevice:
        await self._device.start()
        return self._device

    async def __aexit__(self, *exc_info: object) -> None:
        await self._device.stop()


def serve(disk: BlockBackend, *, queues: int = 1, depth: int = DEFAULT_DEPTH, max_io: int = DEFAULT_MAX_IO,
          recoverable: bool = True, recover: int | None = None, kernel: Kernel | None = None) -> _Serving:
    """Serve ``disk`` as a ublk block device for the duration of an ``async with`` block::

        async with aioblock.open("disk.qcow2") as disk:
            async with aioblock.frontends.ublk.serve(disk, queues=2, depth=64) as dev:
                print(dev.path)                  # /dev/ublkbN
                await dev.wait_stopped()         # or do anything else meanwhile

    Leaving the block (normally, by an exception or by cancellation) stops and deletes the device. ``queues``
    (the kernel gives at most one per CPU), ``depth`` (tags per queue) and ``max_io`` (the largest request, in
    bytes) are the device's geometry. ``recover``: reattach to that quiesced device (its dead server's image
    must be ``disk``); its geometry is the device's own. ``kernel``: where to find ublk (the simulated kernel
    of :mod:`aioblock.testing.ublk` for tests). Errors: :class:`~aioblock.errors.UblkError`, before anything
    is created where ublk is missing or not permitted.
    """
    return _Serving(UblkDevice(disk, queues=queues, depth=depth, max_io=max_io, recoverable=recoverable,
                               recover=recover, kernel=kernel or LinuxKernel()))


# ---- administration (CLI --list / --delete) -------------------------------------------------------------------


def list_devices(kernel: Kernel | None = None) -> list[DeviceInfo]:
    """Every ublk device the kernel has, with what our servers noted about them."""
    ctrl = (kernel or LinuxKernel()).control()
    try:
        out = []
        for dev_id in ctrl.device_ids():
            try:
                info = ctrl.get_dev_info(dev_id)
            except UblkError:
                continue                                    # deleted meanwhile
            size = None
            with contextlib.suppress(UblkError):
                size = ctrl.get_params(dev_id).dev_sectors << 9
            out.append(DeviceInfo(dev_id, uapi.STATE_NAMES.get(info.state, str(info.state)), info.nr_hw_queues,
                                  info.queue_depth, info.max_io_buf_bytes, size, info.ublksrv_pid,
                                  uapi.describe_features(info.flags), _noted(dev_id)))
        return out
    finally:
        ctrl.close()


def delete_device(dev_id: int, kernel: Kernel | None = None, timeout: float = 30) -> None:
    """Remove a device. If one of our servers serves it, it is asked to stop (SIGTERM), so that it closes its
    image cleanly; otherwise (or if it does not stop in ``timeout`` seconds) the device is stopped and deleted
    here, and its server, if any, sees it go."""
    import signal

    note = _noted(dev_id)
    pid = note.get("pid") if note else None
    ctrl = (kernel or LinuxKernel()).control()
    try:
        ctrl.get_dev_info(dev_id)                           # UblkError(ENODEV) for no such device
        if isinstance(pid, int) and pid > 0 and pid != os.getpid():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGTERM)
                deadline = time.monotonic() + timeout
                while dev_id in ctrl.device_ids() and time.monotonic() < deadline:
                    time.sleep(0.05)
                if dev_id not in ctrl.device_ids():
                    return
        with contextlib.suppress(UblkError):
            ctrl.stop_dev(dev_id)
        ctrl.del_dev(dev_id)
        _forget(dev_id)
    finally:
        ctrl.close()


def _note_path(dev_id: int) -> str:
    return os.path.join(STATE_DIR, f"{dev_id}.json")


def _note(dev_id: int, data: dict[str, Any]) -> None:
    with contextlib.suppress(OSError):
        os.makedirs(STATE_DIR, exist_ok=True)
        tmp = _note_path(dev_id) + ".tmp"
        with open(tmp, "w") as f:
            json.dump(data, f)
        os.replace(tmp, _note_path(dev_id))


def _forget(dev_id: int) -> None:
    with contextlib.suppress(OSError):
        os.unlink(_note_path(dev_id))


def _noted(dev_id: int) -> dict[str, Any] | None:
    try:
        with open(_note_path(dev_id)) as f:
            data = json.load(f)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None
