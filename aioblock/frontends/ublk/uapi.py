"""The ublk userspace ABI (``include/uapi/linux/ublk_cmd.h``): numbers and struct layouts, no I/O.

Layouts are x86-64/arm64 little endian, as the kernel lays them out; the offsets are in
``shared/reference/ublk-uapi.md`` §4. Control commands exist in two encodings: the legacy numbers (6.0+, the
only ones 6.1 accepts) and ioctl-encoded ones (6.4+, ``_IOWR('u', nr, struct ublksrv_ctrl_cmd)``); a kernel
that answers ``GET_FEATURES`` (ioctl-encoded only) takes the ioctl encoding, which is what a kernel built
without ``CONFIG_BLKDEV_UBLK_LEGACY_OPCODES`` requires.
"""

from __future__ import annotations

import errno as _errno
import struct
from dataclasses import dataclass

# ---- control commands: (legacy number, ioctl-encoded number) -------------------------------------------------


def _ioc(direction: int, nr: int, size: int) -> int:
    return direction << 30 | size << 16 | ord("u") << 8 | nr


_IOR, _IOWR = 2, 3
CTRL_CMD_SIZE = 32
IO_CMD_SIZE = 16

#: control commands: name -> (legacy opcode or None, ioctl-encoded opcode)
CTRL_OPS: dict[str, tuple[int | None, int]] = {
    "GET_QUEUE_AFFINITY": (0x01, _ioc(_IOR, 0x01, CTRL_CMD_SIZE)),
    "GET_DEV_INFO": (0x02, _ioc(_IOR, 0x02, CTRL_CMD_SIZE)),
    "ADD_DEV": (0x04, _ioc(_IOWR, 0x04, CTRL_CMD_SIZE)),
    "DEL_DEV": (0x05, _ioc(_IOWR, 0x05, CTRL_CMD_SIZE)),
    "START_DEV": (0x06, _ioc(_IOWR, 0x06, CTRL_CMD_SIZE)),
    "STOP_DEV": (0x07, _ioc(_IOWR, 0x07, CTRL_CMD_SIZE)),
    "SET_PARAMS": (0x08, _ioc(_IOWR, 0x08, CTRL_CMD_SIZE)),
    "GET_PARAMS": (0x09, _ioc(_IOR, 0x09, CTRL_CMD_SIZE)),
    "START_USER_RECOVERY": (0x10, _ioc(_IOWR, 0x10, CTRL_CMD_SIZE)),
    "END_USER_RECOVERY": (0x11, _ioc(_IOWR, 0x11, CTRL_CMD_SIZE)),
    "GET_FEATURES": (None, _ioc(_IOR, 0x13, CTRL_CMD_SIZE)),
    "DEL_DEV_ASYNC": (None, _ioc(_IOR, 0x14, CTRL_CMD_SIZE)),     # 6.9+; _IOR although it acts
}

#: I/O commands on /dev/ublkcN: name -> (legacy, ioctl-encoded)
IO_OPS: dict[str, tuple[int, int]] = {
    "FETCH_REQ": (0x20, _ioc(_IOWR, 0x20, IO_CMD_SIZE)),
    "COMMIT_AND_FETCH_REQ": (0x21, _ioc(_IOWR, 0x21, IO_CMD_SIZE)),
}


def ctrl_op(name: str, ioctl: bool) -> int:
    legacy, encoded = CTRL_OPS[name]
    if ioctl:
        return encoded
    if legacy is None:
        raise ValueError(f"{name} has no legacy opcode")
    return legacy


def io_op(name: str, ioctl: bool) -> int:
    legacy, encoded = IO_OPS[name]
    return encoded if ioctl else legacy


# ---- feature flags (dev_info.flags), states, I/O ops and flags ------------------------------------------------

F_SUPPORT_ZERO_COPY = 1 << 0
F_URING_CMD_COMP_IN_TASK = 1 << 1
F_NEED_GET_DATA = 1 << 2
F_USER_RECOVERY = 1 << 3
F_USER_RECOVERY_REISSUE = 1 << 4
F_UNPRIVILEGED_DEV = 1 << 5
F_CMD_IOCTL_ENCODE = 1 << 6
F_USER_COPY = 1 << 7
F_ZONED = 1 << 8

FEATURE_NAMES = {
    F_SUPPORT_ZERO_COPY: "zero_copy", F_URING_CMD_COMP_IN_TASK: "comp_in_task", F_NEED_GET_DATA: "need_get_data",
    F_USER_RECOVERY: "user_recovery", F_USER_RECOVERY_REISSUE: "recovery_reissue",
    F_UNPRIVILEGED_DEV: "unprivileged", F_CMD_IOCTL_ENCODE: "ioctl_encode", F_USER_COPY: "user_copy",
    F_ZONED: "zoned", 1 << 9: "recovery_fail_io", 1 << 10: "update_size", 1 << 11: "auto_buf_reg",
    1 << 12: "quiesce", 1 << 13: "per_io_daemon", 1 << 14: "buf_reg_off_daemon",
}

S_DEV_DEAD, S_DEV_LIVE, S_DEV_QUIESCED, S_DEV_FAIL_IO = 0, 1, 2, 3
STATE_NAMES = {S_DEV_DEAD: "dead", S_DEV_LIVE: "live", S_DEV_QUIESCED: "quiesced", S_DEV_FAIL_IO: "fail_io"}

OP_READ, OP_WRITE, OP_FLUSH, OP_DISCARD, OP_WRITE_SAME, OP_WRITE_ZEROES = 0, 1, 2, 3, 4, 5
OP_NAMES = {OP_READ: "read", OP_WRITE: "write", OP_FLUSH: "flush", OP_DISCARD: "discard",
            OP_WRITE_SAME: "write_same", OP_WRITE_ZEROES: "write_zeroes"}
IO_F_FUA = 1 << 13
IO_F_NOUNMAP = 1 << 15

#: FETCH/COMMIT completion results
IO_RES_OK, IO_RES_NEED_GET_DATA, IO_RES_ABORT = 0, 1, -_errno.ENODEV

# ---- ublk_params --------------------------------------------------------------------------------------------

PARAM_TYPE_BASIC, PARAM_TYPE_DISCARD, PARAM_TYPE_DEVT = 1, 2, 4
ATTR_READ_ONLY, ATTR_ROTATIONAL, ATTR_VOLATILE_CACHE, ATTR_FUA = 1, 2, 4, 8
#: the layout we send and read: header, basic, discard, devt (6.3+); longer than 6.1's 64 bytes, which the kernel
#: clamps (it copies min(len, its own size) and masks unknown types)
PARAMS_SIZE = 76

# ---- the per-queue descriptor mmap and limits -----------------------------------------------------------------

MAX_QUEUE_DEPTH = 4096
MAX_QUEUES = 4096
IO_DESC_SIZE = 24
PAGE_SIZE = 4096
CTRL_DEV = "/dev/ublk-control"
DEV_ID_ANY = 0xFFFFFFFF
QUEUE_ID_NONE = 0xFFFF


def desc_mmap_offset(q_id: int) -> int:
    """Offset of queue ``q_id``'s descriptor array in the char device (room is kept for the maximum depth)."""
    return q_id * _round_up(MAX_QUEUE_DEPTH * IO_DESC_SIZE, PAGE_SIZE)


def desc_mmap_length(depth: int) -> int:
    """The length the kernel insists on for a queue's descriptor mmap."""
    return _round_up(depth * IO_DESC_SIZE, PAGE_SIZE)


def _round_up(n: int, a: int) -> int:
    return (n + a - 1) // a * a


def char_path(dev_id: int) -> str:
    return f"/dev/ublkc{dev_id}"


def block_path(dev_id: int) -> str:
    return f"/dev/ublkb{dev_id}"


# ---- structs ------------------------------------------------------------------------------------------------

_CTRL_CMD = struct.Struct("<IHHQQQ")          # dev_id, queue_id, len, addr, data[0], data[1]
_DEV_INFO = struct.Struct("<HHHHIIiIQQII16x")  # 64 bytes
#: a whole 64-byte IORING_OP_URING_CMD SQE carrying a ``ublksrv_io_cmd``, packed in one call (the queue thread's
#: hot path): opcode, flags, ioprio, fd, cmd_op, pad, addr, len, uring_cmd_flags, user_data, buf_index,
#: personality, splice_fd_in, then the command at byte 48: q_id, tag, result, addr
IO_CMD_SQE = struct.Struct("<BBHiIIQIIQHHiHHiQ")
IO_DESC = struct.Struct("<IIQQ")              # op_flags, nr_sectors, start_sector, addr
_PARAMS_HEAD = struct.Struct("<II")
_BASIC = struct.Struct("<IBBBBIIQQ")          # 32 bytes
_DISCARD = struct.Struct("<IIIIHH")           # 20 bytes
_DEVT = struct.Struct("<IIII")                # char major/minor, disk major/minor


def pack_ctrl_cmd(dev_id: int, queue_id: int = QUEUE_ID_NONE, length: int = 0, addr: int = 0,
                  data0: int = 0) -> bytes:
    return _CTRL_CMD.pack(dev_id, queue_id, length, addr, data0, 0)


@dataclass
class DevInfo:
    """``struct ublksrv_ctrl_dev_info`` (64 bytes)."""

    nr_hw_queues: int = 1
    queue_depth: int = 128
    state: int = S_DEV_DEAD
    max_io_buf_bytes: int = 512 << 10
    dev_id: int = DEV_ID_ANY
    ublksrv_pid: int = -1
    flags: int = 0
    ublksrv_flags: int = 0
    owner_uid: int = 0
    owner_gid: int = 0

    SIZE = _DEV_INFO.size

    def pack(self) -> bytes:
        return _DEV_INFO.pack(self.nr_hw_queues, self.queue_depth, self.state, 0, self.max_io_buf_bytes,
                              self.dev_id, self.ublksrv_pid, 0, self.flags, self.ublksrv_flags, self.owner_uid,
                              self.owner_gid)

    @classmethod
    def unpack(cls, data: bytes | bytearray | memoryview) -> DevInfo:
        (queues, depth, state, _pad0, max_io, dev_id, pid, _pad1, flags, srv_flags, uid,
         gid) = _DEV_INFO.unpack_from(data)
        return cls(queues, depth, state, max_io, dev_id, pid, flags, srv_flags, uid, gid)


@dataclass
class Params:
    """``struct ublk_params``: the basic and discard parts we set, and the devt part the kernel reports."""

    dev_sectors: int
    logical_bs_shift: int = 9
    physical_bs_shift: int = 12
    io_opt_shift: int = 12
    io_min_shift: int = 9
    max_sectors: int = (512 << 10) >> 9
    chunk_sectors: int = 0
    attrs: int = 0
    #: discard/write-zeroes limits; ``discard_granularity == 0`` leaves the DISCARD type out
    discard_granularity: int = 0
    discard_alignment: int = 0
    max_discard_sectors: int = 0
    max_write_zeroes_sectors: int = 0
    #: (char major, char minor, disk major, disk minor), as GET_PARAMS reports them (6.3+)
    devt: tuple[int, int, int, int] | None = None

    def pack(self) -> bytes:
        types = PARAM_TYPE_BASIC | (PARAM_TYPE_DISCARD if self.discard_granularity else 0)
        out = bytearray(PARAMS_SIZE)
        _PARAMS_HEAD.pack_into(out, 0, PARAMS_SIZE, types)
        _BASIC.pack_into(out, 8, self.attrs, self.logical_bs_shift, self.physical_bs_shift, self.io_opt_shift,
                         self.io_min_shift, self.max_sectors, self.chunk_sectors, self.dev_sectors, 0)
        if self.discard_granularity:
            _DISCARD.pack_into(out, 40, self.discard_alignment, self.discard_granularity,
                               self.max_discard_sectors, self.max_write_zeroes_sectors,
                               1 if self.max_discard_sectors else 0, 0)
        return bytes(out)

    @classmethod
    def unpack(cls, data: bytes | bytearray | memoryview) -> Params:
        length, types = _PARAMS_HEAD.unpack_from(data)
        attrs, lbs, pbs, opt, mins, max_sectors, chunk, dev_sectors, _vbm = _BASIC.unpack_from(data, 8)
        p = cls(dev_sectors, lbs, pbs, opt, mins, max_sectors, chunk, attrs)
        if types & PARAM_TYPE_DISCARD:
            (p.discard_alignment, p.discard_granularity, p.max_discard_sectors, p.max_write_zeroes_sectors,
             _segments, _r) = _DISCARD.unpack_from(data, 40)
        if types & PARAM_TYPE_DEVT and length >= 76 and len(data) >= 76:
            cmaj, cmin, dmaj, dmin = _DEVT.unpack_from(data, 60)
            p.devt = (cmaj, cmin, dmaj, dmin)
        return p


def describe_features(flags: int) -> list[str]:
    return [name for bit, name in sorted(FEATURE_NAMES.items()) if flags & bit]
