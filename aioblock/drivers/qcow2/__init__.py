"""The qcow2 format driver (QEMU's block/qcow2*.c as a design reference; spec: docs/interop/qcow2.rst).

The modules, split by concern as QEMU splits qcow2.c, the lock order and the guards of every field are listed in
``state.py``.
"""

from .driver import Qcow2Driver

__all__ = ["Qcow2Driver"]
