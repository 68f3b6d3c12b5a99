"""The ublk ABI encodings against the layouts and numbers in shared/reference/ublk-uapi.md (§2-§4)."""

from __future__ import annotations

import struct

import pytest

from aioblock.frontends.ublk import uapi


@pytest.mark.parametrize(("name", "legacy", "encoded"), [
    ("GET_DEV_INFO", 0x02, 0x80207502), ("ADD_DEV", 0x04, 0xC0207504), ("DEL_DEV", 0x05, 0xC0207505),
    ("START_DEV", 0x06, 0xC0207506), ("STOP_DEV", 0x07, 0xC0207507), ("SET_PARAMS", 0x08, 0xC0207508),
    ("GET_PARAMS", 0x09, 0x80207509), ("START_USER_RECOVERY", 0x10, 0xC0207510),
    ("END_USER_RECOVERY", 0x11, 0xC0207511), ("GET_FEATURES", None, 0x80207513),
    ("DEL_DEV_ASYNC", None, 0x80207514),
])
def test_control_opcodes(name: str, legacy: int | None, encoded: int) -> None:
    assert uapi.ctrl_op(name, True) == encoded
    if legacy is None:
        with pytest.raises(ValueError):
            uapi.ctrl_op(name, False)
    else:
        assert uapi.ctrl_op(name, False) == legacy


def test_io_opcodes() -> None:
    assert uapi.io_op("FETCH_REQ", True) == 0xC0107520
    assert uapi.io_op("COMMIT_AND_FETCH_REQ", True) == 0xC0107521
    assert (uapi.io_op("FETCH_REQ", False), uapi.io_op("COMMIT_AND_FETCH_REQ", False)) == (0x20, 0x21)


def test_ctrl_cmd_layout() -> None:
    raw = uapi.pack_ctrl_cmd(7, 0xFFFF, 64, 0x1122334455667788, 4242)
    assert len(raw) == 32
    assert struct.unpack_from("<I", raw, 0)[0] == 7
    assert struct.unpack_from("<H", raw, 4)[0] == 0xFFFF
    assert struct.unpack_from("<H", raw, 6)[0] == 64
    assert struct.unpack_from("<Q", raw, 8)[0] == 0x1122334455667788
    assert struct.unpack_from("<Q", raw, 16)[0] == 4242
    assert raw[24:] == bytes(8)


def test_dev_info_layout_and_round_trip() -> None:
    info = uapi.DevInfo(nr_hw_queues=2, queue_depth=64, state=1, max_io_buf_bytes=1 << 20, dev_id=3,
                        ublksrv_pid=99, flags=0x18, ublksrv_flags=5, owner_uid=1000, owner_gid=100)
    raw = info.pack()
    assert len(raw) == 64
    assert struct.unpack_from("<HHH", raw, 0) == (2, 64, 1)
    assert struct.unpack_from("<IIi", raw, 8) == (1 << 20, 3, 99)
    assert struct.unpack_from("<QQ", raw, 24) == (0x18, 5)
    assert struct.unpack_from("<II", raw, 40) == (1000, 100)
    assert uapi.DevInfo.unpack(raw) == info


def test_params_layout() -> None:
    p = uapi.Params(dev_sectors=1 << 21, max_sectors=1024, chunk_sectors=128, attrs=uapi.ATTR_FUA,
                    io_opt_shift=16, discard_granularity=65536, max_discard_sectors=2048,
                    max_write_zeroes_sectors=4096)
    raw = p.pack()
    assert struct.unpack_from("<II", raw, 0) == (uapi.PARAMS_SIZE, uapi.PARAM_TYPE_BASIC | uapi.PARAM_TYPE_DISCARD)
    # basic @8: attrs, shifts, max_sectors, chunk_sectors, dev_sectors
    assert struct.unpack_from("<IBBBBIIQ", raw, 8) == (uapi.ATTR_FUA, 9, 12, 16, 9, 1024, 128, 1 << 21)
    # discard @40: alignment, granularity, max discard, max write zeroes, max segments
    assert struct.unpack_from("<IIIIH", raw, 40) == (0, 65536, 2048, 4096, 1)
    again = uapi.Params.unpack(raw)
    assert (again.dev_sectors, again.chunk_sectors, again.discard_granularity) == (1 << 21, 128, 65536)


def test_params_without_discard_leave_the_type_out() -> None:
    raw = uapi.Params(dev_sectors=8, attrs=uapi.ATTR_READ_ONLY).pack()
    assert struct.unpack_from("<I", raw, 4)[0] == uapi.PARAM_TYPE_BASIC
    assert raw[40:60] == bytes(20)


def test_io_command_sqe_and_descriptor_layout() -> None:
    """The SQE as io_uring reads it (opcode at 0, fd at 4, cmd_op at 8, user_data at 32) with the 16-byte
    ublksrv_io_cmd at 48 (q_id, tag, result, addr)."""
    sqe = bytearray(64)
    uapi.IO_CMD_SQE.pack_into(sqe, 0, 46, 0, 0, 9, 0xC0107521, 0, 0, 0, 0, 77, 0, 0, 0, 1, 77, -5, 0xABCDEF000)
    assert sqe[0] == 46 and struct.unpack_from("<i", sqe, 4)[0] == 9
    assert struct.unpack_from("<I", sqe, 8)[0] == 0xC0107521
    assert struct.unpack_from("<Q", sqe, 32)[0] == 77
    assert struct.unpack_from("<HHiQ", sqe, 48) == (1, 77, -5, 0xABCDEF000)
    assert sqe[12:32] == bytes(20) and sqe[40:48] == bytes(8)
    desc = struct.pack("<IIQQ", uapi.OP_WRITE | uapi.IO_F_FUA, 8, 1234, 0)
    assert uapi.IO_DESC.size == 24
    assert uapi.IO_DESC.unpack(desc)[:3] == (uapi.OP_WRITE | uapi.IO_F_FUA, 8, 1234)


def test_descriptor_mmap_geometry() -> None:
    assert uapi.desc_mmap_offset(0) == 0
    assert uapi.desc_mmap_offset(1) == 0x18000
    assert uapi.desc_mmap_length(128) == 4096
    assert uapi.desc_mmap_length(171) == 8192


def test_feature_names() -> None:
    assert uapi.describe_features(0x1FE) == ["comp_in_task", "need_get_data", "user_recovery",
                                             "recovery_reissue", "unprivileged", "ioctl_encode", "user_copy",
                                             "zoned"]
