"""Smoke tests of the VM harness: the guest's kernel, ublk, the host's Python, shares, env, cwd, exit status."""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path

from tests.vm.guest import Guest

REPO = Path(__file__).resolve().parents[2]


def test_kernel_is_6_12(guest: Guest) -> None:
    result = guest.run("uname -r")
    assert result.returncode == 0, result.output
    assert result.output == f"{guest.kernel_version}\n"
    assert result.output.startswith("6.12.")


def test_ublk_control_exists(guest: Guest) -> None:
    result = guest.run("test -c /dev/ublk-control && echo present")
    assert (result.returncode, result.output) == (0, "present\n")


def test_host_python_imports_checkout(guest: Guest) -> None:
    code = "import aioblock, sys; print(aioblock.__file__); print(sys.version)"
    result = guest.run(f"{shlex.quote(sys.executable)} -c {shlex.quote(code)}", env={"PYTHONPATH": str(REPO)})
    assert result.returncode == 0, result.output
    assert result.output == f"{REPO / 'aioblock' / '__init__.py'}\n{sys.version}\n"


def test_share_writes_reach_host(guest: Guest, tmp_path: Path) -> None:
    (tmp_path / "in.txt").write_text("from the host\n")
    result = guest.run(f"cat {shlex.quote(str(tmp_path))}/in.txt > {shlex.quote(str(tmp_path))}/out.txt "
                       f"&& echo 'from the guest' >> {shlex.quote(str(tmp_path))}/out.txt", shares=[tmp_path])
    assert result.returncode == 0, result.output
    assert (tmp_path / "out.txt").read_text() == "from the host\nfrom the guest\n"


def test_env_and_cwd(guest: Guest, tmp_path: Path) -> None:
    result = guest.run('pwd; printf "%s|" "$GREETING" "$PYTHONDONTWRITEBYTECODE" "$PATH"',
                       cwd=str(tmp_path), shares=[tmp_path], env={"GREETING": "it's a 'quoted' $value"})
    assert result.returncode == 0, result.output
    assert result.output == f"{tmp_path}\nit's a 'quoted' $value|1|{os.environ['PATH']}|"


def test_exit_status_propagates(guest: Guest) -> None:
    result = guest.run("echo before; exit 7")
    assert (result.returncode, result.output) == (7, "before\n")


def test_smp_2_has_two_cpus(guest: Guest) -> None:
    result = guest.run("nproc", smp=2)
    assert (result.returncode, result.output) == (0, "2\n")
