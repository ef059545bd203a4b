"""Stable inode numbers for everything the mount shows.

Fixed inodes for the directories and control files; volumes, snapshot directories, snapshots
and request files get a number the first time they are seen and keep it for the mount's life.
"""

from __future__ import annotations

import pyfuse3

ROOT = pyfuse3.ROOT_INODE
SNAPSHOTS = ROOT + 1  # .snapshots/
META = ROOT + 2  # .snapfs/
CONTROL = ROOT + 3  # .snapfs/control
REQUESTS = ROOT + 4  # .snapfs/requests/
STATUS = ROOT + 5  # .snapfs/status
FIRST_DYNAMIC = 100

DIRS = {ROOT, SNAPSHOTS, META, REQUESTS}


class InodeTable:
    """Maps keys like ("vol", vid), ("sdir", vid), ("snap", vid, sid), ("req", name) to inode
    numbers and back."""

    def __init__(self) -> None:
        self._by_key: dict[tuple, int] = {}
        self._by_ino: dict[int, tuple] = {}
        self._next = FIRST_DYNAMIC

    def ino(self, key: tuple) -> int:
        ino = self._by_key.get(key)
        if ino is None:
            ino = self._next
            self._next += 1
            self._by_key[key] = ino
            self._by_ino[ino] = key
        return ino

    def known(self, key: tuple) -> int | None:
        """The inode number of ``key`` if the kernel may have seen it."""
        return self._by_key.get(key)

    def items(self) -> list[tuple[tuple, int]]:
        return list(self._by_key.items())

    def key(self, ino: int) -> tuple | None:
        return self._by_ino.get(ino)

    def drop(self, key: tuple) -> None:
        ino = self._by_key.pop(key, None)
        if ino is not None:
            self._by_ino.pop(ino, None)
