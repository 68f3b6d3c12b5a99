"""Metadata cache shared by the format drivers: the slice cache and the background flusher.

:class:`SliceCache` (:mod:`.slices`) caches fixed-size slices of on-disk tables with LRU eviction, pinning, dirty
tracking and write ordering between caches; :class:`Flusher` (:mod:`.flusher`) writes dirty metadata back in the
background, batched, under the owner's metadata lock. Neither knows any format: the owner supplies the I/O
(:class:`CacheIO`) and the ordered write-back.
"""

from .flusher import Flusher
from .slices import CacheIO, CacheStats, Slice, SliceCache

__all__ = ["CacheIO", "CacheStats", "Flusher", "Slice", "SliceCache"]
