"""Shared fixtures: images made by qemu-img, QEMU's tools as judges, and the aioblock CLI as a subprocess."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

QEMU_IMG = shutil.which("qemu-img")
QEMU_IO = shutil.which("qemu-io")

needs_qemu = pytest.mark.skipif(QEMU_IMG is None or QEMU_IO is None,
                                reason="qemu-img/qemu-io not installed (apt-get install qemu-utils)")


def run(cmd: list[str], *, check: bool = False, input: bytes | None = None,
        timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run a command, capturing text output."""
    return subprocess.run(cmd, capture_output=True, text=True, check=check, timeout=timeout,
                          input=input.decode() if input is not None else None)


def aioblock_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run ``python -m aioblock ARGS`` (the same code as the ``aioblock`` console script)."""
    return run([sys.executable, "-m", "aioblock", *args], timeout=timeout)


def qemu_img(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    assert QEMU_IMG is not None
    return run([QEMU_IMG, *args], check=check)


def qemu_io(path: str | os.PathLike[str], *commands: str, fmt: str = "raw",
            extra: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    assert QEMU_IO is not None
    argv = [QEMU_IO, "-f", fmt, *extra]
    for c in commands:
        argv += ["-c", c]
    return run([*argv, str(path)])


@pytest.fixture
def make_image(tmp_path: Path) -> Callable[..., Path]:
    """``make_image("a.raw", "1M", fmt="raw", opts=None)`` -> path of a new image made by qemu-img create."""
    def make(name: str, size: str = "1M", *, fmt: str = "raw", opts: str | None = None) -> Path:
        path = tmp_path / name
        argv = ["create", "-q", "-f", fmt]
        if opts:
            argv += ["-o", opts]
        qemu_img(*argv, str(path), size)
        return path
    return make
