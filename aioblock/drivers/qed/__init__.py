"""The QED format (QEMU's qed.c): layout, the node, writes through the allocating-write queue, check."""

from .driver import QedDriver

__all__ = ["QedDriver"]
