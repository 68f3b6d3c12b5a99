"""The node graph: probing, backing chains (relative names, loops, depth, policy), errors carrying filenames.

Raw has no backing files, so a tiny overlay format defined here (registered only for these tests) stands in
for the formats with backing files: a header naming the backing file and the size, and no data of its own.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, ClassVar, Self

import pytest

import aioblock
from aioblock.driver import BlockDriver, Extent
from aioblock.drivers import FORMATS
from aioblock.errors import BackingChainError, ImageOpenError
from aioblock.node import MAX_BACKING_DEPTH

MAGIC = b"OVERLAY\0"


class OverlayDriver(BlockDriver):
    """Test format: ``MAGIC | u64 size | u16 len | backing name``; every byte comes from the backing chain."""

    format_name: ClassVar[str] = "overlay"
    supports_backing: ClassVar[bool] = True

    def __init__(self, file: BlockDriver, size: int, backing: str | None, read_only: bool) -> None:
        self.file, self.filename, self.read_only = file, file.filename, read_only
        self._size, self.backing_filename = size, backing

    @classmethod
    def probe(cls, head: bytes, filename: str) -> int:
        return 100 if head.startswith(MAGIC) else 0

    @classmethod
    async def open(cls, file: BlockDriver, *, read_only: bool, options: Mapping[str, Any]) -> Self:
        head = bytearray(512)
        await file.pread(0, memoryview(head))
        size, n = struct.unpack_from(">QH", head, 8)
        return cls(file, size, head[18:18 + n].decode() or None, read_only)

    @property
    def size(self) -> int:
        return self._size

    async def pread(self, offset: int, buf: memoryview) -> None:
        buf[:] = bytes(len(buf))
        if self.backing is not None and offset < self.backing.size:
            n = min(len(buf), self.backing.size - offset)
            await self.backing.pread(offset, buf[:n])

    async def block_status(self, offset: int, length: int) -> Extent:
        return Extent(offset, length, False, False, False)


def make_overlay(path: Path, backing: str | None, size: int = 1 << 20) -> Path:
    name = (backing or "").encode()
    path.write_bytes(MAGIC + struct.pack(">QH", size, len(name)) + name + bytes(512))
    return path


@pytest.fixture(autouse=True)
def overlay_format() -> Iterator[None]:
    FORMATS["overlay"] = f"{__name__}:OverlayDriver"
    yield
    del FORMATS["overlay"]


async def test_chain_reads_from_base_and_maps_depth(tmp_path: Path) -> None:
    base = tmp_path / "base.raw"
    base.write_bytes(b"\xab" * 4096 + bytes(4096))
    (tmp_path / "sub").mkdir()
    make_overlay(tmp_path / "mid.ovl", "base.raw", size=8192)
    make_overlay(tmp_path / "sub" / "top.ovl", "../mid.ovl", size=16384)
    async with aioblock.open(str(tmp_path / "sub" / "top.ovl")) as disk:
        assert disk.format == "overlay"
        assert await disk.read(0, 4096) == b"\xab" * 4096
        assert await disk.read(8192, 8192) == bytes(8192)       # past the backing file's end
        entries = [e async for e in disk.map()]
        assert entries[0].depth == 2 and entries[0].data and entries[0].present
        assert entries[-1].start == 8192 and not entries[-1].present and entries[-1].zero
        info = await disk.info()
        chain = info.chain()
        assert [i.format for i in chain] == ["overlay", "overlay", "raw"]
        assert chain[0].full_backing_filename == str(tmp_path / "sub" / "../mid.ovl")
        assert chain[0].backing_filename == "../mid.ovl"


async def test_loop_is_refused(tmp_path: Path) -> None:
    make_overlay(tmp_path / "a.ovl", "b.ovl")
    make_overlay(tmp_path / "b.ovl", "a.ovl")
    with pytest.raises(BackingChainError, match="loop"):
        await aioblock.open(str(tmp_path / "a.ovl"))


async def test_self_reference_is_refused(tmp_path: Path) -> None:
    make_overlay(tmp_path / "a.ovl", "a.ovl")
    with pytest.raises(BackingChainError, match="loop"):
        await aioblock.open(str(tmp_path / "a.ovl"))


async def test_depth_limit(tmp_path: Path) -> None:
    (tmp_path / "img0.raw").write_bytes(bytes(512))
    for i in range(1, MAX_BACKING_DEPTH + 3):
        prev = f"img{i - 1}.raw" if i == 1 else f"img{i - 1}.ovl"
        make_overlay(tmp_path / f"img{i}.ovl", prev)
    with pytest.raises(BackingChainError, match="longer than"):
        await aioblock.open(str(tmp_path / f"img{MAX_BACKING_DEPTH + 2}.ovl"))
    async with aioblock.open(str(tmp_path / f"img{MAX_BACKING_DEPTH - 1}.ovl")) as disk:
        assert await disk.read(0, 512) == bytes(512)


async def test_policies_and_protocols(tmp_path: Path) -> None:
    (tmp_path / "base.raw").write_bytes(b"\x01" * 512)
    top = make_overlay(tmp_path / "top.ovl", "base.raw")
    with pytest.raises(BackingChainError, match="untrusted") as err:
        await aioblock.open(str(top), options={"backing": "deny"})
    assert err.value.filename == str(top)
    async with aioblock.open(str(top), options={"backing": "ignore"}) as disk:
        assert await disk.read(0, 512) == bytes(512)
    for name in ("json:{\"driver\":\"file\",\"filename\":\"/etc/passwd\"}", "nbd://localhost/x"):
        make_overlay(top, name)
        with pytest.raises(BackingChainError, match="local files only"):
            await aioblock.open(str(top))
    make_overlay(top, "file:base.raw")
    async with aioblock.open(str(top)) as disk:
        assert await disk.read(0, 512) == b"\x01" * 512


async def test_missing_backing_and_missing_image(tmp_path: Path) -> None:
    top = make_overlay(tmp_path / "top.ovl", "gone.raw")
    with pytest.raises(BackingChainError, match="backing file") as err:
        await aioblock.open(str(top))
    assert err.value.filename == str(top)
    with pytest.raises(ImageOpenError, match="No such file") as err2:
        await aioblock.open(str(tmp_path / "nothing"))
    assert err2.value.filename == str(tmp_path / "nothing")
    with pytest.raises(ImageOpenError, match="regular file"):
        await aioblock.open(str(tmp_path))


async def test_backing_opened_read_only(tmp_path: Path) -> None:
    (tmp_path / "base.raw").write_bytes(bytes(512))
    top = make_overlay(tmp_path / "top.ovl", "base.raw")
    async with aioblock.open(str(top)) as disk:
        assert disk.root.backing is not None and disk.root.backing.read_only
