"""A simulated ublk driver, in-process: the kernel side of :mod:`aioblock.frontends.ublk` without a kernel.

It follows the driver's rules that the server depends on (ublk-uapi.md §3, §8): SET_PARAMS only before
START_DEV; START_DEV returns once every queue has fetched every tag; a request goes to a fetched tag, its
descriptor is set and, for a WRITE, its data copied into the tag's buffer before the fetch completes; COMMIT
copies a READ's data out of the buffer and re-arms the tag; STOP_DEV waits for the requests being served, then
aborts every tag with -ENODEV; DEL_DEV waits until the char device is closed; the char device has one opener.
Queue commands must come from the thread that fetched the queue's tags (EINVAL otherwise).

Requests come from :meth:`SimulatedDevice.submit` (any thread), which returns a ``concurrent.futures.Future``
of ``(result, data)``, or from :meth:`SimulatedDevice.send`, which calls a callback with them (cheaper, for
the benchmark). Used by the unit tests and by ``benchmarks/ublk_path.py``.
"""

from __future__ import annotations

import ctypes
import errno as _errno
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future

from ..errors import UblkError
from ..frontends.ublk import uapi

__all__ = ["SimulatedDevice", "SimulatedKernel"]

_F_ALL = 0x1FE          # what a 6.12 kernel reports


class SimulatedKernel:
    def __init__(self, cpus: int = 2, features: int = _F_ALL) -> None:
        self.cpus, self.features = cpus, features
        self.devices: dict[int, SimulatedDevice] = {}
        self.lock = threading.Lock()

    def control(self) -> SimulatedControl:
        return SimulatedControl(self)

    def device(self, dev_id: int) -> SimulatedDevice:
        with self.lock:
            dev = self.devices.get(dev_id)
        if dev is None:
            raise UblkError(_errno.ENODEV, f"ublk device {dev_id}: {_errno.errorcode[_errno.ENODEV]}")
        return dev


class _Request:
    __slots__ = ("data", "finish", "nr_sectors", "op_flags", "start")

    def __init__(self, op_flags: int, start: int, nr_sectors: int, data: bytes | None,
                 finish: Callable[[tuple[int, bytes]], object]) -> None:
        self.op_flags, self.start, self.nr_sectors, self.data = op_flags, start, nr_sectors, data
        self.finish = finish


class SimulatedDevice:
    def __init__(self, kernel: SimulatedKernel, dev_id: int, info: uapi.DevInfo) -> None:
        self.kernel, self.dev_id, self.info = kernel, dev_id, info
        self.params: uapi.Params | None = None
        self.cond = threading.Condition()
        self.queues: list[SimulatedQueue | None] = [None] * info.nr_hw_queues
        self.opened = False
        self.requests = 0

    @property
    def state(self) -> int:
        return self.info.state

    def submit(self, q_id: int, op: int, start: int, nr_sectors: int, data: bytes | None = None,
               flags: int = 0) -> Future[tuple[int, bytes]]:
        """Send a request to queue ``q_id``; the future gives (result, the data of a READ)."""
        future: Future[tuple[int, bytes]] = Future()
        self.send(q_id, op, start, nr_sectors, data, flags, future.set_result)
        return future

    def send(self, q_id: int, op: int, start: int, nr_sectors: int, data: bytes | None, flags: int,
             on_done: Callable[[tuple[int, bytes]], object]) -> None:
        """``submit`` without a future: ``on_done((result, data))`` is called when the request completes (on
        the queue's thread, or here if the device is not live)."""
        req = _Request(op | flags, start, nr_sectors, data, on_done)
        with self.cond:
            q = self.queues[q_id]
            if self.info.state != uapi.S_DEV_LIVE or q is None:
                on_done((-_errno.EIO, b""))
                return
            self.requests += 1
            q.backlog.append(req)
            q.dispatch()


class SimulatedControl:
    def __init__(self, kernel: SimulatedKernel) -> None:
        self.k = kernel

    def get_features(self) -> int | None:
        return self.k.features

    def add_dev(self, info: uapi.DevInfo) -> uapi.DevInfo:
        if not 1 <= info.queue_depth <= uapi.MAX_QUEUE_DEPTH or info.nr_hw_queues < 1:
            raise UblkError(_errno.EINVAL, "ublk ADD_DEV: Invalid argument")
        with self.k.lock:
            dev_id = next(i for i in range(1 << 20) if i not in self.k.devices)
            new = uapi.DevInfo(min(info.nr_hw_queues, self.k.cpus), info.queue_depth, uapi.S_DEV_DEAD,
                               info.max_io_buf_bytes // 4096 * 4096, dev_id, -1,
                               (info.flags & self.k.features) | uapi.F_CMD_IOCTL_ENCODE
                               | uapi.F_URING_CMD_COMP_IN_TASK)
            self.k.devices[dev_id] = SimulatedDevice(self.k, dev_id, new)
        return uapi.DevInfo.unpack(new.pack())

    def get_dev_info(self, dev_id: int) -> uapi.DevInfo:
        return uapi.DevInfo.unpack(self.k.device(dev_id).info.pack())

    def set_params(self, dev_id: int, params: uapi.Params) -> None:
        dev = self.k.device(dev_id)
        if dev.info.state != uapi.S_DEV_DEAD or dev.info.ublksrv_pid > 0:
            raise UblkError(_errno.EACCES, "ublk SET_PARAMS: Permission denied")
        if not 8 <= params.max_sectors <= dev.info.max_io_buf_bytes >> 9:
            raise UblkError(_errno.EINVAL, "ublk SET_PARAMS: Invalid argument")
        dev.params = uapi.Params.unpack(params.pack())

    def get_params(self, dev_id: int) -> uapi.Params:
        dev = self.k.device(dev_id)
        if dev.params is None:
            raise UblkError(_errno.EINVAL, "ublk GET_PARAMS: Invalid argument")
        return dev.params

    def _wait_ready(self, dev: SimulatedDevice) -> None:
        with dev.cond:
            if not dev.cond.wait_for(lambda: all(q is not None and q.ready() for q in dev.queues), timeout=30):
                raise UblkError(_errno.ETIMEDOUT, "queues never fetched their tags")

    def start_dev(self, dev_id: int, pid: int) -> None:
        dev = self.k.device(dev_id)
        if dev.params is None:
            raise UblkError(_errno.EINVAL, "ublk START_DEV: Invalid argument")
        self._wait_ready(dev)
        with dev.cond:
            dev.info.state, dev.info.ublksrv_pid = uapi.S_DEV_LIVE, pid

    def stop_dev(self, dev_id: int) -> None:
        dev = self.k.device(dev_id)
        with dev.cond:
            dev.info.state = uapi.S_DEV_DEAD
            dev.cond.wait_for(lambda: all(q is None or not q.busy for q in dev.queues), timeout=30)
            for q in dev.queues:
                if q is not None:
                    q.abort()

    def del_dev(self, dev_id: int) -> None:
        dev = self.k.device(dev_id)
        with dev.cond:
            if not dev.cond.wait_for(lambda: not dev.opened, timeout=30):
                raise UblkError(_errno.EBUSY, "ublk DEL_DEV: device still open")
        with self.k.lock:
            del self.k.devices[dev_id]

    def start_user_recovery(self, dev_id: int) -> None:
        raise UblkError(_errno.EOPNOTSUPP, "ublk START_USER_RECOVERY: not simulated")

    def end_user_recovery(self, dev_id: int, pid: int) -> None:
        raise UblkError(_errno.EOPNOTSUPP, "ublk END_USER_RECOVERY: not simulated")

    def open_device(self, dev_id: int, timeout: float = 5.0) -> SimulatedChar:
        dev = self.k.device(dev_id)
        with dev.cond:
            if dev.opened:
                raise UblkError(_errno.EBUSY, f"cannot open {uapi.char_path(dev_id)}: Device or resource busy")
            dev.opened = True
        return SimulatedChar(dev)

    def device_ids(self) -> list[int]:
        with self.k.lock:
            return sorted(self.k.devices)

    def close(self) -> None:
        pass


class SimulatedChar:
    def __init__(self, dev: SimulatedDevice) -> None:
        self.dev = dev

    def queue(self, q_id: int, depth: int, ioctl: bool) -> SimulatedQueue:
        if depth != self.dev.info.queue_depth or not 0 <= q_id < self.dev.info.nr_hw_queues:
            raise UblkError(_errno.EINVAL, "mmap of the queue's descriptors: Invalid argument")
        q = SimulatedQueue(self.dev, q_id, depth)
        with self.dev.cond:
            self.dev.queues[q_id] = q
        return q

    def close(self) -> None:
        with self.dev.cond:
            self.dev.opened = False
            self.dev.cond.notify_all()


class SimulatedQueue:
    """One queue's kernel side. ``dispatch`` and the state below are guarded by the device's condition."""

    def __init__(self, dev: SimulatedDevice, q_id: int, depth: int) -> None:
        self.dev, self.q_id, self.depth = dev, q_id, depth
        self.addrs = [0] * depth
        self.fetched: deque[int] = deque()              # tags waiting for a request
        self.serving: dict[int, _Request] = {}          # tags handed to the server
        self.descs: list[tuple[int, int, int]] = [(0, 0, 0)] * depth
        self.backlog: deque[_Request] = deque()
        self.cqes: deque[tuple[int, int]] = deque()
        self.commands: list[tuple[int, int, int, int]] = []    # (kind, tag, result, addr), sent by wait
        self.daemon: int | None = None
        self.ever_fetched = 0
        self.woken = False
        self.aborted = False

    @property
    def busy(self) -> bool:
        return bool(self.serving)

    def ready(self) -> bool:
        return self.ever_fetched >= self.depth

    def dispatch(self) -> None:
        while self.backlog and self.fetched:
            req = self.backlog.popleft()
            tag = self.fetched.popleft()
            self.descs[tag] = (req.op_flags, req.nr_sectors, req.start)
            if req.op_flags & 0xFF == uapi.OP_WRITE and req.data is not None:
                ctypes.memmove(self.addrs[tag], req.data, len(req.data))
            self.serving[tag] = req
            self.cqes.append((tag, uapi.IO_RES_OK))
        if self.cqes:
            self.dev.cond.notify_all()

    def abort(self) -> None:
        self.aborted = True
        while self.fetched:
            self.cqes.append((self.fetched.popleft(), uapi.IO_RES_ABORT))
        for req in self.backlog:
            req.finish((-_errno.EIO, b""))
        self.backlog.clear()
        self.dev.cond.notify_all()

    # ---- QueueChannel --------------------------------------------------------------------------------------

    def descriptor(self, tag: int) -> tuple[int, int, int]:
        return self.descs[tag]

    def fetch(self, tag: int, addr: int) -> None:
        self.commands.append((0, tag, 0, addr))

    def commit(self, tag: int, result: int, addr: int) -> None:
        self.commands.append((1, tag, result, addr))

    def _send(self) -> None:
        me = threading.get_ident()
        if self.daemon is None:
            self.daemon = me
        for kind, tag, result, addr in self.commands:
            if me != self.daemon:
                self.cqes.append((tag, -_errno.EINVAL))
                continue
            self.addrs[tag] = addr
            if kind == 1:
                req = self.serving.pop(tag, None)
                if req is not None:
                    data = b""
                    if req.op_flags & 0xFF == uapi.OP_READ and result > 0:
                        data = ctypes.string_at(addr, result)
                    req.finish((result, data))
            else:
                self.ever_fetched += 1
            if self.aborted:
                self.cqes.append((tag, uapi.IO_RES_ABORT))
            else:
                self.fetched.append(tag)
        self.commands.clear()
        self.dispatch()
        self.dev.cond.notify_all()

    def wait(self, handle: Callable[[int, int], None], block: bool = True) -> None:
        with self.dev.cond:
            self._send()
            if block:
                self.dev.cond.wait_for(lambda: self.cqes or self.woken)
            self.woken = False
            cqes = list(self.cqes)
            self.cqes.clear()
        for tag, res in cqes:
            handle(tag, res)

    def wake(self) -> None:
        with self.dev.cond:
            self.woken = True
            self.dev.cond.notify_all()

    def close(self) -> None:
        with self.dev.cond:
            for req in self.serving.values():
                req.finish((-_errno.EIO, b""))
            self.serving.clear()
            self.dev.queues[self.q_id] = None
            self.dev.cond.notify_all()
