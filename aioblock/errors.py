"""The one exception hierarchy of aioblock.

Every error the library raises on purpose derives from :class:`AioblockError`::

    AioblockError
    ├── ImageOpenError              the file cannot be opened at all (missing, directory, permission)
    ├── ImageFormatError            not this format, or a header/table that breaks the format's rules
    │   └── CorruptImageError       metadata found inconsistent (at open or while doing I/O)
    ├── UnsupportedFeatureError     a valid image using a feature aioblock does not implement (names it)
    ├── ImageTooLargeError          a size beyond the format's or the implementation's limits
    ├── BackingChainError           backing file missing, a loop, too deep, or refused by policy
    ├── OutOfRangeError             a request outside the image
    ├── ReadOnlyError               a write to a read-only node
    ├── NotSupportedError           an operation the format cannot do (e.g. compressed writes on raw)
    ├── InvalidOptionError          a bad option or argument from the caller
    ├── BlockIOError                an I/O error from the layer below (carries the errno)
    │   └── InjectedFaultError      an error made on purpose by the fault-injection node
    │       └── SimulatedCrashError the fault-injection node "crashed": every later request fails too
    ├── ClosedError                 a request on a closed disk
    └── UblkError                   the kernel's ublk driver refused or is missing (carries the errno)

Each error carries ``errno`` (what an NBD or ublk frontend reports for it) and ``exit_status`` (what the CLI
exits with), and an optional ``filename`` that the CLI prints as ``aioblock: <filename>: <message>``.
"""

from __future__ import annotations

import errno as _errno
import os

__all__ = [
    "AioblockError",
    "BackingChainError",
    "BlockIOError",
    "ClosedError",
    "CorruptImageError",
    "ImageFormatError",
    "ImageOpenError",
    "ImageTooLargeError",
    "InjectedFaultError",
    "InvalidOptionError",
    "NotSupportedError",
    "OutOfRangeError",
    "ReadOnlyError",
    "SimulatedCrashError",
    "UblkError",
    "UnsupportedFeatureError",
]


class AioblockError(Exception):
    """Base of every error aioblock raises on purpose."""

    errno: int = _errno.EIO
    exit_status: int = 1

    def __init__(self, message: str, *, filename: str | None = None) -> None:
        super().__init__(message)
        self.filename = filename

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else ""

    def with_filename(self, filename: str) -> AioblockError:
        """Attach ``filename`` if none is set yet; returns self (for ``raise exc.with_filename(f)``)."""
        if self.filename is None:
            self.filename = filename
        return self


class ImageOpenError(AioblockError):
    """The file behind an image cannot be opened (missing, a directory, no permission...)."""


class ImageFormatError(AioblockError):
    """The data is not in the requested format, or a header field or table breaks the format's rules."""

    errno = _errno.EINVAL


class CorruptImageError(ImageFormatError):
    """Metadata is inconsistent: found at open, or while serving a request (then the request fails with EIO)."""

    errno = _errno.EIO


class UnsupportedFeatureError(AioblockError):
    """A valid image uses a feature aioblock does not implement; the message names the feature."""

    errno = _errno.ENOTSUP


class ImageTooLargeError(AioblockError):
    """A size beyond the format's or aioblock's limits."""

    errno = _errno.EFBIG


class BackingChainError(AioblockError):
    """A backing file could not be opened: missing, a loop, a chain too deep, or refused by policy."""


class OutOfRangeError(AioblockError):
    """A request (offset, length) that is negative or reaches past the end of the image."""

    errno = _errno.EIO


class ReadOnlyError(AioblockError):
    """A modifying request on a node opened read-only."""

    errno = _errno.EPERM


class NotSupportedError(AioblockError):
    """The operation is not supported by this format or node (e.g. compressed writes on raw)."""

    errno = _errno.ENOTSUP


class InvalidOptionError(AioblockError):
    """A bad option, size or argument given by the caller."""

    errno = _errno.EINVAL


class BlockIOError(AioblockError):
    """An I/O error from the layer below; ``errno`` is the OS error number."""

    def __init__(self, errno: int, message: str | None = None, *, filename: str | None = None) -> None:
        super().__init__(message or os.strerror(errno), filename=filename)
        self.errno = errno

    @classmethod
    def from_os_error(cls, exc: OSError, *, filename: str | None = None) -> BlockIOError:
        return cls(exc.errno or _errno.EIO, exc.strerror or str(exc), filename=filename)


class InjectedFaultError(BlockIOError):
    """An error injected on purpose by the fault-injection node (tests)."""


class SimulatedCrashError(InjectedFaultError):
    """The fault-injection node simulated a crash: this request and every later one fail."""

    def __init__(self, message: str = "simulated crash", *, filename: str | None = None) -> None:
        super().__init__(_errno.EIO, message, filename=filename)


class ClosedError(AioblockError):
    """A request on a disk or node that has been closed."""

    errno = _errno.ESHUTDOWN


class UblkError(AioblockError):
    """The ublk driver is missing, not permitted, or refused a control command; ``errno`` is the kernel's."""

    def __init__(self, errno: int, message: str) -> None:
        super().__init__(message)
        self.errno = errno


def strerror(exc: BaseException) -> str:
    """The qemu-io style text for a failed request: the errno's text ("Input/output error")."""
    if isinstance(exc, AioblockError):
        return os.strerror(exc.errno)
    if isinstance(exc, OSError) and exc.errno:
        return os.strerror(exc.errno)
    return str(exc)
