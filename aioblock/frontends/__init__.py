"""Frontends: serve a :class:`~aioblock.BlockBackend` to others (``ublk``: a Linux block device)."""
