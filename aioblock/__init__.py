"""aioblock: an asyncio block layer for disk images, modelled on QEMU's coroutine block layer.

    async with aioblock.open("disk.img") as disk:
        await disk.write(0, b"hello")
        data = await disk.read(0, 5)
"""

from . import errors
from .api import OpenContext, create, open
from .backend import BackendStatistics, BlockBackend, ImageInfo, MapEntry, OpStatistics
from .driver import CheckResult
from .errors import AioblockError

__all__ = [
    "AioblockError",
    "BackendStatistics",
    "BlockBackend",
    "CheckResult",
    "ImageInfo",
    "MapEntry",
    "OpStatistics",
    "OpenContext",
    "create",
    "errors",
    "open",
]

__version__ = "0.1.0"
