"""Differential runs: the same qemu-io command list through ``qemu-io`` and through ``aioblock io``.

``run_differential`` creates twin images with ``qemu-img create`` (any format, any ``-o`` options, optionally
prepared further by a callback), runs the commands through both tools, normalises what legitimately differs
(timing figures), and checks with ``qemu-img compare`` that the two images end up with the same content.
The result keeps both runs so that a test chooses how strict to be: exact output, output with aio completion
lines sorted (completion order is not defined), or exit status and images only.

    diff = run_differential(["write -P 0xab 512 1k", "read -P 0xab 512 1k"], size="1M", tmp_path=tmp_path)
    diff.assert_same()

Later formats reuse it with ``fmt="qcow2", create_opts="cluster_size=4096"`` and the like.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..conftest import QEMU_IMG, QEMU_IO

__all__ = ["Differential", "ToolRun", "create_image", "normalise", "run_differential"]

# "4 KiB, 1 ops; 00.00 sec (5.766 MiB/sec and 737.9900 ops/sec)" and "... 0:00:03.31 (...)"
_STATS = re.compile(r"^(?P<head>.+, \d+ ops; )(?:\d\d\.\d\d sec|\d+:\d\d:\d\d\.\d\d) \(.+/sec and [0-9.]+ ops/sec\)$",
                    re.M)
# -C: "512,1,0:00:00.00,797530.149,1557.676"
_CSV = re.compile(r"^(?P<head>\d+,\d+,)\d+:\d\d:\d\d\.\d\d,[0-9.]+,[0-9.]+$", re.M)
# aioblock's one-line notice when io_uring is unavailable and the default engine falls back (not qemu-io's)
_ENGINE_NOTICE = re.compile(r"^aioblock: io_uring is unavailable here; using the '[a-z]+' engine\n", re.M)


def normalise(text: str) -> str:
    """Replace the timing figures of statistics lines by ``TIME (RATE)``; keep everything else."""
    text = _STATS.sub(r"\g<head>TIME (RATE)", text)
    return _CSV.sub(r"\g<head>TIME,RATE,RATE", text)


@dataclass(frozen=True)
class ToolRun:
    """One tool's run: its argv, exit status (negative: killed by that signal) and normalised output."""

    argv: list[str]
    returncode: int
    stdout: str
    stderr: str
    raw_stdout: str
    raw_stderr: str

    def sorted_stdout(self) -> list[str]:
        """The output lines in sorted order: for runs whose aio completions may come in any order."""
        return sorted(self.stdout.splitlines())

    def command_line(self) -> str:
        return shlex.join(self.argv)


@dataclass(frozen=True)
class Differential:
    """Both runs, both images, and what ``qemu-img compare`` said about the images."""

    qemu: ToolRun
    aioblock: ToolRun
    qemu_image: Path
    aioblock_image: Path
    images_identical: bool
    compare_output: str

    def describe(self) -> str:
        parts = []
        for label, run in (("qemu-io", self.qemu), ("aioblock io", self.aioblock)):
            parts.append(f"--- {label} (exit {run.returncode}): {run.command_line()[:300]}\n"
                         f"[stdout]\n{run.stdout[:4000]}[stderr]\n{run.stderr[:2000]}")
        parts.append(f"--- images identical: {self.images_identical} {self.compare_output}")
        return "\n".join(parts)

    def assert_same(self, *, sort_stdout: bool = False, stderr: bool = True, returncode: bool = True) -> None:
        """The two runs printed the same (after normalisation; with ``sort_stdout``, the same lines in any
        order) and exited alike."""
        if sort_stdout:
            same_out = self.qemu.sorted_stdout() == self.aioblock.sorted_stdout()
        else:
            same_out = self.qemu.stdout == self.aioblock.stdout
        assert same_out, "stdout differs\n" + _diff(self.qemu.stdout, self.aioblock.stdout) + self.describe()
        if stderr:
            assert self.qemu.stderr == self.aioblock.stderr, "stderr differs\n" + self.describe()
        if returncode:
            assert self.qemu.returncode == self.aioblock.returncode, "exit status differs\n" + self.describe()


def _diff(a: str, b: str) -> str:
    import difflib
    return "".join(difflib.unified_diff(a.splitlines(True), b.splitlines(True), "qemu-io", "aioblock io",
                                        n=2))[:6000] + "\n"


def create_image(path: Path, size: str | int, *, fmt: str = "raw", create_opts: str | None = None) -> Path:
    """``qemu-img create -q -f FMT [-o OPTS] PATH SIZE``."""
    assert QEMU_IMG is not None
    argv = [QEMU_IMG, "create", "-q", "-f", fmt]
    if create_opts:
        argv += ["-o", create_opts]
    subprocess.run([*argv, str(path), str(size)], check=True, capture_output=True, text=True)
    return path


def _start(argv: list[str], *, cwd: Path, stdin: str | None) -> subprocess.Popen[str]:
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=cwd,
                            stdin=subprocess.DEVNULL if stdin is None else subprocess.PIPE)


def _finish(proc: subprocess.Popen[str], *, timeout: float, stdin: str | None) -> ToolRun:
    try:
        stdout, stderr = proc.communicate(stdin, timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise
    assert isinstance(proc.args, list)
    stderr_kept = _ENGINE_NOTICE.sub("", stderr)
    return ToolRun(proc.args, proc.returncode, normalise(stdout), normalise(stderr_kept), stdout, stderr)


def run_differential(cmds: Sequence[str], *, size: str | int, tmp_path: Path, fmt: str = "raw",
                     create_opts: str | None = None, qemu_extra: Sequence[str] = (),
                     aioblock_extra: Sequence[str] = (), global_extra: Sequence[str] = (),
                     prepare: Callable[[Path], None] | None = None, check_images: bool = True,
                     stdin: str | None = None, name: str = "img", timeout: float = 120) -> Differential:
    """Run ``cmds`` (one qemu-io command each) through both tools on twin images.

    ``qemu_extra`` / ``aioblock_extra``: options for one tool only (e.g. ``("-t", "none")`` for both, or
    ``("--engine", "threads")`` for aioblock); ``global_extra``: options before aioblock's subcommand
    (``--loop asyncio``). ``prepare(path)`` runs on each new image before the commands (e.g. to seed data with
    qemu-io). ``stdin``: text fed to both tools' standard input (their interactive mode when ``cmds`` is
    empty). With ``check_images`` (the default) the images must compare identical; otherwise the result
    only records whether they do. Both tools run in ``tmp_path``, so relative names in commands work.
    """
    assert QEMU_IMG is not None and QEMU_IO is not None
    images = []
    for tool in ("qemu", "aioblock"):
        path = create_image(tmp_path / f"{name}-{tool}.{fmt}", size, fmt=fmt, create_opts=create_opts)
        if prepare is not None:
            prepare(path)
        images.append(path)
    qemu_img, aio_img = images
    c_args = [arg for cmd in cmds for arg in ("-c", cmd)]
    # both tools run at once (each on its own image): halves the wall time of a test
    procs = [_start([QEMU_IO, "-f", fmt, *qemu_extra, *c_args, str(qemu_img)], cwd=tmp_path, stdin=stdin),
             _start([sys.executable, "-m", "aioblock", *global_extra, "io", "-f", fmt, *aioblock_extra, *c_args,
                     str(aio_img)], cwd=tmp_path, stdin=stdin)]
    try:
        qemu = _finish(procs[0], timeout=timeout, stdin=stdin)
        ours = _finish(procs[1], timeout=timeout, stdin=stdin)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    cmp = subprocess.run([QEMU_IMG, "compare", "-f", fmt, "-F", fmt, str(qemu_img), str(aio_img)],
                         capture_output=True, text=True, timeout=timeout)
    result = Differential(qemu, ours, qemu_img, aio_img, cmp.returncode == 0,
                          (cmp.stdout + cmp.stderr).strip())
    if check_images:
        assert result.images_identical, "images differ\n" + result.describe()
    return result
