"""The Linux side of ublk: the control device and the per-queue command rings, on our own io_uring.

Two small interfaces describe what the server needs from the kernel, so that the server can also run against
the simulated kernel of :mod:`aioblock.testing.ublk` (unit tests, the per-request cost benchmark):

- :class:`ControlChannel`: the control commands (``/dev/ublk-control``, an SQE128 ring). Every method blocks
  (START_DEV waits for the partition scan, DEL_DEV for the char device's release): call them from a worker
  thread, never from the event loop.
- :class:`QueueChannel`: one queue's commands on ``/dev/ublkcN``, used by the queue's own thread only (the
  kernel binds a queue to the thread that fetched its tags: that thread must issue every later command and wait
  for completions in ``io_uring_enter``), except ``wake``, which any thread may call.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno as _errno
import mmap
import os
import threading
from collections.abc import Callable
from typing import Protocol

from ...errors import UblkError
from ...io.uring import IORING_SETUP_SQE128, OP_READ, OP_URING_CMD, Ring
from . import uapi

__all__ = ["ControlChannel", "DeviceChannel", "Kernel", "LinuxKernel", "QueueChannel"]

_pack_cmd_sqe = uapi.IO_CMD_SQE.pack_into

#: user_data of the queue ring's eventfd read (tags are below 4096)
WAKE_USER_DATA = 1 << 32


class QueueChannel(Protocol):
    def descriptor(self, tag: int) -> tuple[int, int, int]:
        """The request a completed FETCH/COMMIT handed over: (op_flags, nr_sectors, start_sector)."""

    def fetch(self, tag: int, addr: int) -> None:
        """Queue FETCH_REQ for ``tag`` with its buffer's address (sent by the next ``wait``)."""

    def commit(self, tag: int, result: int, addr: int) -> None:
        """Queue COMMIT_AND_FETCH_REQ: complete ``tag``'s request with ``result`` and re-arm it."""

    def wait(self, handle: Callable[[int, int], None], block: bool = True) -> None:
        """Send the queued commands and (with ``block``) wait until at least one completion or a ``wake``;
        then call ``handle(tag, res)`` for every completed command."""

    def wake(self) -> None:
        """Make a blocked ``wait`` return (thread-safe)."""

    def close(self) -> None: ...


class DeviceChannel(Protocol):
    """An opened ``/dev/ublkcN``."""

    def queue(self, q_id: int, depth: int, ioctl: bool) -> QueueChannel: ...

    def close(self) -> None: ...


class ControlChannel(Protocol):
    def get_features(self) -> int | None:
        """The kernel's ``UBLK_F_*`` set, or None where GET_FEATURES does not exist (before 6.5)."""

    def add_dev(self, info: uapi.DevInfo) -> uapi.DevInfo: ...

    def get_dev_info(self, dev_id: int) -> uapi.DevInfo: ...

    def set_params(self, dev_id: int, params: uapi.Params) -> None: ...

    def get_params(self, dev_id: int) -> uapi.Params: ...

    def start_dev(self, dev_id: int, pid: int) -> None: ...

    def stop_dev(self, dev_id: int) -> None: ...

    def del_dev(self, dev_id: int) -> None: ...

    def start_user_recovery(self, dev_id: int) -> None: ...

    def end_user_recovery(self, dev_id: int, pid: int) -> None: ...

    def open_device(self, dev_id: int, timeout: float = 5.0) -> DeviceChannel:
        """Open the device's char node (waiting up to ``timeout`` for it to appear)."""

    def device_ids(self) -> list[int]:
        """The ids of the ublk devices that exist."""

    def close(self) -> None: ...


class Kernel(Protocol):
    def control(self) -> ControlChannel:
        """Open the control device; :class:`~aioblock.errors.UblkError` (one clear line) where ublk is not
        available or not permitted."""


# ---- Linux ----------------------------------------------------------------------------------------------------


class LinuxKernel:
    def control(self) -> LinuxControl:
        return LinuxControl()


class LinuxControl:
    """Control commands on ``/dev/ublk-control``. Thread-safe: commands are serialised by a lock."""

    def __init__(self, path: str = uapi.CTRL_DEV) -> None:
        try:
            self._fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            raise UblkError(_errno.ENODEV, f"ublk is not available: {path} does not exist (it needs a kernel "
                            "with CONFIG_BLK_DEV_UBLK, 6.0 or later, and the module loaded: modprobe "
                            "ublk_drv)") from None
        except PermissionError:
            raise UblkError(_errno.EPERM, f"permission denied opening {path}: serving a ublk device needs "
                            "root (CAP_SYS_ADMIN)") from None
        except OSError as exc:
            raise UblkError(exc.errno or _errno.EIO, f"cannot open {path}: {exc.strerror}") from None
        try:
            self._ring = Ring(4, flags=IORING_SETUP_SQE128)
        except OSError as exc:
            os.close(self._fd)
            raise UblkError(exc.errno or _errno.EIO, f"io_uring is not available: {exc.strerror}") from None
        self._lock = threading.Lock()
        self._ioctl: bool | None = None         # decided by the first command (GET_FEATURES)
        self._features: int | None = None

    # ---- plumbing -------------------------------------------------------------------------------------------

    def _command(self, name: str, dev_id: int, *, buf: bytearray | None = None, data0: int = 0,
                 queue_id: int = uapi.QUEUE_ID_NONE, ioctl: bool | None = None) -> int:
        if ioctl is None:
            ioctl = self._encoding()
        op = uapi.ctrl_op(name, ioctl)
        keep = (ctypes.c_char * len(buf)).from_buffer(buf) if buf is not None else None
        addr = ctypes.addressof(keep) if keep is not None else 0
        cmd = uapi.pack_ctrl_cmd(dev_id, queue_id, len(buf) if buf is not None else 0, addr, data0)
        with self._lock:
            ring = self._ring
            pos = ring.prep(OP_URING_CMD, self._fd, user_data=1)
            ring.sqes[pos + 8:pos + 12] = op.to_bytes(4, "little")       # cmd_op (union with off)
            ring.sqes[pos + 48:pos + 48 + len(cmd)] = cmd
            ring.submit(wait_nr=1)
            results: list[int] = []
            while not results:
                if not ring.reap(lambda _ud, res: results.append(res)):
                    ring.submit(wait_nr=1)
        del keep
        return results[0]

    def _check(self, name: str, dev_id: int, res: int) -> int:
        if res < 0:
            err = -res
            what = f"ublk {name}" + (f" (device {dev_id})" if dev_id != uapi.DEV_ID_ANY else "")
            if err in (_errno.EPERM, _errno.EACCES):
                raise UblkError(err, f"{what}: permission denied (serving a ublk device needs root)")
            raise UblkError(err, f"{what}: {os.strerror(err)}")
        return res

    def _encoding(self) -> bool:
        if self._ioctl is None:
            self.get_features()
        assert self._ioctl is not None
        return self._ioctl

    # ---- commands -------------------------------------------------------------------------------------------

    def get_features(self) -> int | None:
        if self._ioctl is None:
            buf = bytearray(8)
            res = self._command("GET_FEATURES", 0, buf=buf, ioctl=True)
            if res >= 0:
                self._ioctl, self._features = True, int.from_bytes(buf, "little")
            elif res in (-_errno.EPERM, -_errno.EACCES):
                self._check("GET_FEATURES", uapi.DEV_ID_ANY, res)
            else:                               # 6.1-6.4: no GET_FEATURES, legacy opcodes only
                self._ioctl, self._features = False, None
        return self._features

    def add_dev(self, info: uapi.DevInfo) -> uapi.DevInfo:
        buf = bytearray(info.pack())
        self._check("ADD_DEV", uapi.DEV_ID_ANY, self._command("ADD_DEV", info.dev_id, buf=buf))
        return uapi.DevInfo.unpack(buf)

    def get_dev_info(self, dev_id: int) -> uapi.DevInfo:
        buf = bytearray(uapi.DevInfo.SIZE)
        self._check("GET_DEV_INFO", dev_id, self._command("GET_DEV_INFO", dev_id, buf=buf))
        return uapi.DevInfo.unpack(buf)

    def set_params(self, dev_id: int, params: uapi.Params) -> None:
        buf = bytearray(params.pack())
        self._check("SET_PARAMS", dev_id, self._command("SET_PARAMS", dev_id, buf=buf))

    def get_params(self, dev_id: int) -> uapi.Params:
        buf = bytearray(uapi.PARAMS_SIZE)
        buf[0:4] = uapi.PARAMS_SIZE.to_bytes(4, "little")
        self._check("GET_PARAMS", dev_id, self._command("GET_PARAMS", dev_id, buf=buf))
        return uapi.Params.unpack(buf)

    def start_dev(self, dev_id: int, pid: int) -> None:
        self._check("START_DEV", dev_id, self._command("START_DEV", dev_id, data0=pid))

    def stop_dev(self, dev_id: int) -> None:
        self._check("STOP_DEV", dev_id, self._command("STOP_DEV", dev_id))

    def del_dev(self, dev_id: int) -> None:
        """Delete the device. DEL_DEV waits until the last opener of /dev/ublkbN has closed it, so where the kernel
        has DEL_DEV_ASYNC (6.9+) that is used instead: a program that holds the stopped device open (its I/O
        fails) must not keep the server from exiting; the kernel frees the id once the device is closed."""
        if self._encoding():
            res = self._command("DEL_DEV_ASYNC", dev_id)
            if res not in (-_errno.EOPNOTSUPP, -_errno.EINVAL, -_errno.ENOTTY):
                self._check("DEL_DEV_ASYNC", dev_id, res)
                return
        self._check("DEL_DEV", dev_id, self._command("DEL_DEV", dev_id))

    def start_user_recovery(self, dev_id: int) -> None:
        self._check("START_USER_RECOVERY", dev_id, self._command("START_USER_RECOVERY", dev_id))

    def end_user_recovery(self, dev_id: int, pid: int) -> None:
        self._check("END_USER_RECOVERY", dev_id, self._command("END_USER_RECOVERY", dev_id, data0=pid))

    def open_device(self, dev_id: int, timeout: float = 5.0) -> LinuxDevice:
        return LinuxDevice(dev_id, timeout)

    def device_ids(self) -> list[int]:
        ids = []
        for base in ("/sys/class/ublk-char-dev", "/dev"):
            with contextlib.suppress(OSError):
                for name in os.listdir(base):
                    if name.startswith("ublkc") and name[5:].isdigit():
                        ids.append(int(name[5:]))
            if ids:
                break
        return sorted(set(ids))

    def close(self) -> None:
        if self._fd >= 0:
            self._ring.close()
            os.close(self._fd)
            self._fd = -1


class LinuxDevice:
    """An opened ``/dev/ublkcN`` (exclusive: the kernel refuses a second opener with EBUSY)."""

    def __init__(self, dev_id: int, timeout: float) -> None:
        import time

        path = uapi.char_path(dev_id)
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
                break
            except FileNotFoundError:           # udev or devtmpfs has not made the node yet
                if time.monotonic() > deadline:
                    raise UblkError(_errno.ENODEV, f"{path} did not appear") from None
                time.sleep(0.01)
            except OSError as exc:
                raise UblkError(exc.errno or _errno.EIO, f"cannot open {path}: {exc.strerror}") from None
        self.dev_id = dev_id

    def queue(self, q_id: int, depth: int, ioctl: bool) -> LinuxQueue:
        return LinuxQueue(self.fd, q_id, depth, ioctl)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class LinuxQueue:
    """One queue's ring on ``/dev/ublkcN``: FETCH/COMMIT SQEs (64 bytes: the 16-byte command fits) and a read of
    an eventfd that ``wake`` signals. Created and used by the queue's thread (see the module docstring)."""

    def __init__(self, char_fd: int, q_id: int, depth: int, ioctl: bool) -> None:
        self.q_id = q_id
        self._fd = char_fd
        self._fetch_op = uapi.io_op("FETCH_REQ", ioctl)
        self._commit_op = uapi.io_op("COMMIT_AND_FETCH_REQ", ioctl)
        length = uapi.desc_mmap_length(depth)
        try:
            self._descs = mmap.mmap(char_fd, length, mmap.MAP_SHARED, mmap.PROT_READ,
                                    offset=uapi.desc_mmap_offset(q_id))
        except OSError as exc:
            raise UblkError(exc.errno or _errno.EIO, f"mmap of queue {q_id}'s descriptors: {exc.strerror}") from None
        self._ring = Ring(max(2 * depth + 2, 8))
        self._efd = os.eventfd(0, os.EFD_CLOEXEC)
        self._wake_buf = ctypes.create_string_buffer(8)
        self._arm_wake()
        self._unpack = uapi.IO_DESC.unpack_from

    def _arm_wake(self) -> None:
        self._ring.prep(OP_READ, self._efd, addr=ctypes.addressof(self._wake_buf), length=8,
                        user_data=WAKE_USER_DATA)

    def _cmd(self, op: int, tag: int, result: int, addr: int) -> None:
        ring = self._ring
        _pack_cmd_sqe(ring.sqes, ring.next_sqe(), OP_URING_CMD, 0, 0, self._fd, op, 0, 0, 0, 0, tag, 0, 0, 0,
                      self.q_id, tag, result, addr)

    def descriptor(self, tag: int) -> tuple[int, int, int]:
        op_flags, nr_sectors, start, _addr = self._unpack(self._descs, tag * uapi.IO_DESC_SIZE)
        return op_flags, nr_sectors, start

    def fetch(self, tag: int, addr: int) -> None:
        self._cmd(self._fetch_op, tag, 0, addr)

    def commit(self, tag: int, result: int, addr: int) -> None:
        self._cmd(self._commit_op, tag, result, addr)

    def wait(self, handle: Callable[[int, int], None], block: bool = True) -> None:
        woken = False

        def on_cqe(user_data: int, res: int) -> None:
            nonlocal woken
            if user_data == WAKE_USER_DATA:
                woken = True
            else:
                handle(user_data, res)

        ring = self._ring
        if ring.reap(on_cqe) or not block:
            ring.submit()
            ring.reap(on_cqe)
        else:
            ring.submit(wait_nr=1)
            ring.reap(on_cqe)
        if woken:
            self._arm_wake()

    def wake(self) -> None:
        os.eventfd_write(self._efd, 1)

    def close(self) -> None:
        self._ring.close()          # cancels what is still pending (the kernel aborts those commands)
        os.close(self._efd)
        self._descs.close()
