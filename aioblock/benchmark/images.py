"""The images a benchmark runs on, made with QEMU's tools (neutral ground for every target) and removed after.

* ``random`` fill: every byte random data (fully allocated, nothing a file system or format can skip); qcow2
  and QED images are ``qemu-img convert`` of the raw one, so their clusters are allocated and in guest order;
* ``sparse`` fill: one cluster of data per ``allocate_every`` bytes (qcow2, QED: ``qemu-img create`` then one
  ``qemu-io`` writing every cluster, so that every L2 table the range needs exists);
* fresh images for allocating writes: an empty sparse raw file or a new ``qemu-img create`` image, made
  before each run and deleted after it.

Shared images are read once after they are made, so that runs with cache=writeback start page-cache hot.
Every image lives in ``<location dir>/aioblock-benchmark-<pid>/``, which ``cleanup`` removes.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from ..errors import AioblockError
from ..sizes import parse_size
from .suite import ImageSpec, Suite

__all__ = ["ImageStore", "make_hot_file", "warm"]

_CHUNK = 1 << 20
_PATTERN = 0xA5


def make_hot_file(path: str, size: int) -> None:
    """Make ``path`` a fully allocated file of ``size`` bytes of random data (not zeroes: no file system can
    skip it), unless it already is one, then read it once so that every page is in the page cache."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    st = os.stat(path) if os.path.exists(path) else None
    if st is None or st.st_size != size or st.st_blocks * 512 < size:
        block = os.urandom(_CHUNK)
        with open(path, "wb") as f:
            for i in range(size // _CHUNK):
                # a different first 8 bytes per MiB, so that no two chunks are equal (no dedup, no compression)
                f.write(i.to_bytes(8, "little") + block[8:])
            f.write(block[:size % _CHUNK])
            f.flush()
            os.fsync(f.fileno())
    warm(path)


def warm(path: str) -> None:
    """Read ``path`` once (its pages end up in the page cache)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        buf = bytearray(_CHUNK)
        while os.readv(fd, [buf]):
            pass
    finally:
        os.close(fd)


def _tool(argv: list[str]) -> None:
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=3600, check=False)
    except OSError as exc:
        raise AioblockError(f"cannot run {argv[0]}: {exc.strerror or exc}") from None
    if proc.returncode:
        last = (proc.stderr or proc.stdout).strip().splitlines()
        raise AioblockError(f"{' '.join(argv[:2])} failed: {last[-1] if last else proc.returncode}")


def _create_opts(spec: ImageSpec) -> list[str]:
    return ["-o", ",".join(f"{k}={v}" for k, v in spec.create_options)] if spec.create_options else []


class ImageStore:
    """Makes, shares and removes the images of one benchmark run."""

    def __init__(self, suite: Suite) -> None:
        self._dirs = {loc: Path(suite.location_dir(loc)) / f"aioblock-benchmark-{os.getpid()}"
                      for loc in ("disk", "tmpfs")}
        self._made: dict[ImageSpec, str] = {}

    def directory(self, location: str) -> Path:
        d = self._dirs[location]
        d.mkdir(parents=True, exist_ok=True)
        return d

    def shared(self, spec: ImageSpec) -> str:
        """The path of the (made once, then reused) image ``spec`` describes."""
        path = self._made.get(spec)
        if path is None:
            path = str(self.directory(spec.location) / spec.name)
            if spec.fill == "random":
                if spec.format == "raw":
                    make_hot_file(path, spec.size)
                else:
                    src = self.shared(ImageSpec("raw", spec.location, spec.size))
                    _tool(["qemu-img", "convert", "-f", "raw", "-O", spec.format, *_create_opts(spec), src, path])
                    warm(path)
            elif spec.fill == "sparse":
                self._sparse(spec, path)
                warm(path)
            else:
                raise AioblockError(f"no shared image for fill '{spec.fill}'")
            self._made[spec] = path
        return path

    def _sparse(self, spec: ImageSpec, path: str) -> None:
        assert spec.allocate_every is not None
        cluster = parse_size(dict(spec.create_options).get("cluster_size", "64k"))
        length = min(cluster, spec.allocate_every)
        offsets = range(0, spec.size, spec.allocate_every)
        if spec.format == "raw":
            with open(path, "wb") as f:
                f.truncate(spec.size)
                block = bytes([_PATTERN]) * length
                for off in offsets:
                    os.pwrite(f.fileno(), block, off)
            return
        _tool(["qemu-img", "create", "-q", "-f", spec.format, *_create_opts(spec), path, str(spec.size)])
        argv = ["qemu-io", "-f", spec.format]
        for off in offsets:
            argv += ["-c", f"write -q -P {_PATTERN} {off} {length}"]
        _tool([*argv, path])

    def fresh(self, spec: ImageSpec) -> str:
        """A new, empty image for one allocating run (replacing the previous one of the same spec)."""
        path = self.directory(spec.location) / ("fresh-" + spec.name)
        path.unlink(missing_ok=True)
        if spec.format == "raw":
            with open(path, "wb") as f:
                f.truncate(spec.size)
        else:
            _tool(["qemu-img", "create", "-q", "-f", spec.format, *_create_opts(spec), str(path), str(spec.size)])
        return str(path)

    def cleanup(self) -> None:
        """Remove every image this store made (and its directories)."""
        for d in self._dirs.values():
            shutil.rmtree(d, ignore_errors=True)
        self._made.clear()
