"""Fuzz targets for the QED code that reads untrusted bytes: the header parser, and whole images (header fields,
L1 and L2 entries mutated) opened, read, written and checked through the public API.

Oracle: a value that keeps the documented invariants, or an :class:`AioblockError`; nothing else, no hang, and
memory bounded by the file (the largest allocation is one table, which must lie inside the file)."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import struct
import subprocess
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import aioblock
from aioblock.drivers.qed import layout as L
from aioblock.errors import AioblockError

from ..conftest import QEMU_IMG, QEMU_IO, needs_qemu

FIELDS = [(4, "<I"), (8, "<I"), (12, "<I"), (16, "<Q"), (24, "<Q"), (32, "<Q"), (40, "<Q"), (48, "<Q"),
          (56, "<I"), (60, "<I")]
INTERESTING = [0, 1, 2, 3, 7, 511, 512, 4096, 65535, 65536, 1 << 20, 1 << 26, 1 << 31, (1 << 32) - 1, 1 << 32,
               1 << 40, (1 << 63) - 1, (1 << 64) - 1]


@given(st.binary(min_size=0, max_size=200), st.integers(min_value=0, max_value=1 << 40))
@settings(max_examples=400, deadline=None)
def test_parse_header_random_bytes(data: bytes, file_size: int) -> None:
    try:
        h = L.parse_header(data, file_size)
    except AioblockError:
        return
    assert L.MIN_CLUSTER <= h.cluster_size <= L.MAX_CLUSTER
    assert h.l1_table_offset + h.table_bytes <= file_size
    assert h.image_size <= L.max_image_size(h.cluster_size, h.table_size)


def _seed(tmp: Path) -> Path:
    assert QEMU_IMG is not None and QEMU_IO is not None
    img = tmp / "seed.qed"
    subprocess.run([QEMU_IMG, "create", "-q", "-f", "qed", "-o", "cluster_size=4k,table_size=2", str(img), "1M"],
                   check=True)
    subprocess.run([QEMU_IO, "-f", "qed", "-c", "write -P 7 0 12k", "-c", "write -P 8 512k 4k", str(img)],
                   check=True, capture_output=True)
    return img


@pytest.fixture(scope="module")
def seed_image() -> bytes:
    if QEMU_IMG is None or QEMU_IO is None:
        pytest.skip("qemu-utils not installed")
    tmp = Path(tempfile.mkdtemp())
    try:
        return _seed(tmp).read_bytes()
    finally:
        shutil.rmtree(tmp)


async def _exercise(path: Path, writable: bool) -> None:
    with contextlib.suppress(AioblockError):
        async with aioblock.open(str(path), "qed", read_only=not writable, engine="sync",
                                 options={"backing": "ignore"}) as disk:
            for off in (0, 4096, 8192, 512 << 10, disk.size - 512 if disk.size >= 512 else 0):
                with contextlib.suppress(AioblockError):
                    await disk.read(off, min(4096, max(0, disk.size - off)))
                    if writable:
                        await disk.write(off, b"\x09" * min(1024, max(0, disk.size - off)))
            with contextlib.suppress(AioblockError):
                await disk.check("all" if writable else None)


@needs_qemu
@given(st.lists(st.tuples(st.sampled_from(FIELDS), st.sampled_from(INTERESTING)), min_size=1, max_size=3),
       st.lists(st.tuples(st.integers(0, 3071), st.sampled_from([*INTERESTING, 4096 * 3, 4096 * 5, 8192 + 1])),
                max_size=4),
       st.booleans())
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_mutated_images(seed_image: bytes, fields: list[tuple[tuple[int, str], int]],
                        entries: list[tuple[int, int]], writable: bool) -> None:
    data = bytearray(seed_image)
    for (offset, fmt), value in fields:
        struct.pack_into(fmt, data, offset, value & ((1 << (8 * struct.calcsize(fmt))) - 1))
    l2 = struct.unpack_from("<Q", seed_image, 4096)[0]
    for index, value in entries:             # entries of the L1 table (at 4096, 1024 entries), then of its first L2
        at = 4096 + index * 8 if index < 1024 else l2 + (index - 1024) % ((len(data) - l2) // 8) * 8
        struct.pack_into("<Q", data, at, value)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "m.qed"
        path.write_bytes(data)
        asyncio.run(asyncio.wait_for(_exercise(path, writable), 20))
