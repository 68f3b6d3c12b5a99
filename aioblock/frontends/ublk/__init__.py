"""The ublk frontend: serve any image as a Linux block device (``/dev/ublkbN``) from pure Python.

``serve(disk)`` is the API (an async context manager); ``aioblock serve ublk FILE`` the command. Layers:
:mod:`.uapi` (the kernel ABI, no I/O), :mod:`.kernel` (control commands and queue rings on our io_uring),
:mod:`.queue` (a thread per queue, batched hand-offs to the event loop), :mod:`.device` (the lifecycle).
"""

from .device import DeviceInfo, UblkDevice, UblkStatistics, delete_device, list_devices, serve
from .queue import QueueStatistics

__all__ = ["DeviceInfo", "QueueStatistics", "UblkDevice", "UblkStatistics", "delete_device", "list_devices",
           "serve"]
