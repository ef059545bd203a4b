"""Runs of a guest range: the one primitive reads, copies and merges are built on.

``Image.map`` cuts a guest range into ``Extent`` runs; nothing walks a chain byte by byte.
"""

from __future__ import annotations

from typing import NamedTuple

DATA = 0  # stored in this image at ``host``
ZERO = 1  # reads as zeros
UNALLOC = 2  # not in this image: the backing file (or zeros) shows through
COMPRESSED = 3  # a compressed cluster; ``host`` holds its raw L2 entry

KIND_NAMES = {DATA: "data", ZERO: "zero", UNALLOC: "unallocated", COMPRESSED: "compressed"}


class Extent(NamedTuple):
    kind: int
    offset: int
    length: int
    host: int = 0


def append(out: list[Extent], kind: int, offset: int, length: int, host: int = 0) -> None:
    """Append a run, merging it into the previous one when they continue each other."""
    if out:
        k, o, n, h = out[-1]
        if k == kind and o + n == offset and kind != COMPRESSED and (
                kind != DATA or h + n == host):
            out[-1] = Extent(k, o, n + length, h)
            return
    out.append(Extent(kind, offset, length, host))


ZEROS = bytes(1 << 21)


def zeros(n: int) -> bytes:
    return ZEROS[:n] if n <= len(ZEROS) else bytes(n)
