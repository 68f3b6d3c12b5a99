"""The embedding API's shape: open as awaitable and as context manager, create, info, check, errors."""

from __future__ import annotations

from pathlib import Path

import pytest

import aioblock
from aioblock.errors import AioblockError, InvalidOptionError, NotSupportedError


async def test_open_awaitable_and_context_manager(tmp_path: Path) -> None:
    path = str(tmp_path / "a.raw")
    await aioblock.create(path, "raw", "64k")
    disk = await aioblock.open(path)
    try:
        await disk.write(0, b"abc")
    finally:
        await disk.close()
    assert disk.closed
    async with aioblock.open(path, "raw", read_only=True, engine="sync") as disk2:
        assert await disk2.read(0, 3) == b"abc"
        assert disk2.read_only
        info = await disk2.info()
        assert (info.format, info.virtual_size, info.filename) == ("raw", 65536, path)
        assert info.to_json()["dirty-flag"] is False
        with pytest.raises(NotSupportedError, match="does not support checks"):
            await disk2.check()
        with pytest.raises(ValueError):
            await disk2.check("bogus")
    assert disk2.closed


async def test_create_errors_and_options(tmp_path: Path) -> None:
    path = str(tmp_path / "b.raw")
    with pytest.raises(InvalidOptionError) as err:
        await aioblock.create(path, "raw")
    assert err.value.filename == path
    with pytest.raises(InvalidOptionError, match="Unknown file format"):
        await aioblock.create(path, "nope", 1024)
    await aioblock.create(path, "raw", options={"size": "8k"})
    async with aioblock.open(path) as disk:
        assert disk.size == 8192


async def test_unknown_open_option_is_refused(tmp_path: Path) -> None:
    path = str(tmp_path / "c.raw")
    await aioblock.create(path, "raw", 512)
    with pytest.raises(InvalidOptionError, match="l2-cache-size"):
        await aioblock.open(path, options={"l2-cache-size": "1M"})
    with pytest.raises(InvalidOptionError, match="cache mode"):
        await aioblock.open(path, cache="bogus")


def test_every_error_is_an_aioblock_error() -> None:
    import inspect

    from aioblock import errors
    classes = [c for _, c in inspect.getmembers(errors, inspect.isclass) if c.__module__ == errors.__name__]
    assert all(issubclass(c, AioblockError) for c in classes)
    assert {c.__name__ for c in classes} <= set(errors.__all__)
