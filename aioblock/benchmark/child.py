"""Run one measured child process and collect what the kernel accounted to it.

``run_child`` starts the command with its output in temporary files (no pipe can fill up and stall it),
reaps it with ``os.wait4`` and returns its exit status, output, wall time and resource usage: CPU seconds
(user + system, of the child and of the threads and processes it waited for: fio's job threads included)
and peak RSS. A child still running after ``timeout`` seconds is killed with its whole process group (its
run fails). The child runs in a session of its own (so that the whole group can be killed); if the harness
is interrupted while waiting, it kills that group before the interruption goes on.

Peak RSS needs a go-between: Linux starts a child's ``ru_maxrss`` at the RSS of the process it was forked
from (``exec`` records the old address space's high-water mark), so every child of the harness would show
at least the harness's own ~40 MiB. The command therefore runs under GNU time (``/usr/bin/time -f %M``),
a small process whose children start from its own ~1 MiB; its report is the child's true peak. Without GNU
time, ``max_rss_kib`` is None. The CPU time comes from ``wait4`` of the go-between (GNU time's own share is
about a millisecond), because GNU time prints it with 10 ms resolution only.
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

__all__ = ["ChildResult", "run_child"]


@dataclass(frozen=True, slots=True)
class ChildResult:
    """One finished child: ``returncode`` as subprocess reports it (negative: killed by that signal)."""

    argv: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str
    wall_s: float
    user_s: float
    sys_s: float
    max_rss_kib: int | None
    timed_out: bool = False

    @property
    def cpu_s(self) -> float:
        return self.user_s + self.sys_s

    def failure(self) -> str | None:
        """A one-line reason when the child did not succeed, else None."""
        if self.timed_out:
            return f"{self.argv[0]}: timed out after {self.wall_s:.0f} s"
        if self.returncode == 0:
            return None
        last = next((line for line in reversed(self.stderr.splitlines()) if line.strip()), "")
        return f"{os.path.basename(self.argv[0])} exited with {self.returncode}: {last.strip()}"


@functools.cache
def gnu_time() -> str | None:
    """The path of GNU time, or None if it is not installed."""
    path = shutil.which("time") or ("/usr/bin/time" if os.access("/usr/bin/time", os.X_OK) else None)
    if path is None:
        return None
    try:
        proc = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return path if "GNU" in proc.stdout + proc.stderr else None


def _rss_from(report: str) -> int | None:
    """GNU time's -o file: its last line is the %M value (earlier lines say how the command ended)."""
    lines = report.strip().splitlines()
    return int(lines[-1]) if lines and lines[-1].strip().isdigit() else None


def run_child(argv: list[str], *, timeout: float, env: dict[str, str] | None = None) -> ChildResult:
    """Run ``argv`` to its end (or until ``timeout``); never raises for a failing child (OSError if it
    cannot be started at all)."""
    timer_path = gnu_time()
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err, \
            tempfile.NamedTemporaryFile(prefix="aioblock-rss-") as rss:
        full = [timer_path, "-q", "-f", "%M", "-o", rss.name, *argv] if timer_path else argv
        start = time.perf_counter()
        proc = subprocess.Popen(full, stdin=subprocess.DEVNULL, stdout=out, stderr=err, env=env,
                                start_new_session=True)
        killed = threading.Event()

        def kill() -> None:
            killed.set()
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)

        timer = threading.Timer(timeout, kill)
        timer.daemon = True
        timer.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        except BaseException:          # Ctrl-C: its own session does not get the SIGINT, so stop it here
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            os.waitpid(proc.pid, 0)
            proc.returncode = -signal.SIGKILL
            raise
        finally:
            timer.cancel()
        wall = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)   # reaped here: Popen must not wait again
        if killed.is_set():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        out.seek(0)
        err.seek(0)
        max_rss = _rss_from(Path(rss.name).read_text(errors="replace")) if timer_path else None
        return ChildResult(tuple(argv), proc.returncode, out.read().decode(errors="replace"),
                           err.read().decode(errors="replace"), wall, usage.ru_utime, usage.ru_stime,
                           max_rss, killed.is_set())
