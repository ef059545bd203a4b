"""Giving memory back to the system.

A daemon serving hundreds of volumes frees large payload buffers after every burst of I/O;
glibc keeps freed heap memory for reuse and leaves the process large and fragmented.  Large
buffers are served from their own mappings (given back when freed), and the heap is trimmed
when a volume's last file closes, at most once a second.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import time

M_MMAP_THRESHOLD = -3  # mallopt(3)
TRIM_EVERY = 1.0  # seconds

try:
    _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    _mallopt = _libc.mallopt
    _malloc_trim = _libc.malloc_trim
except (OSError, AttributeError):  # not glibc: its own policy applies
    _mallopt = _malloc_trim = None
_last_trim = 0.0


def return_big_buffers() -> None:
    """Buffers of 256 KiB and more get mappings of their own.  glibc would otherwise raise
    that threshold after the first large free and carve later 1 MiB payloads out of the heap."""
    if _mallopt is not None:
        _mallopt(M_MMAP_THRESHOLD, 256 << 10)


def trim() -> None:
    """Give the free memory at the top and inside the heap back (rate-limited)."""
    global _last_trim
    now = time.monotonic()
    if _malloc_trim is not None and now - _last_trim >= TRIM_EVERY:
        _last_trim = now
        _malloc_trim(0)
