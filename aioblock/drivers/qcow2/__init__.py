"""The qcow2 format driver (QEMU's block/qcow2*.c as a design reference; spec: docs/interop/qcow2.rst).

Modules: ``layout`` (on-disk structures, pure), ``compress`` (compressed clusters, pure), ``metaio``
(metadata I/O with the overlap check), ``refcount`` (refcounts and the allocator), ``driver`` (the node:
mapping, reads, allocating writes, zeroes/discard, flush, truncate), ``check`` (check and repair),
``create``.
"""

from .driver import Qcow2Driver

__all__ = ["Qcow2Driver"]
