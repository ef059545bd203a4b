"""QEMU-compatible image locks, so that qemu-img and upstream Cinder's tools refuse to modify an
image snapfs is writing (and snapfs refuses an image a QEMU process is using).

QEMU (block/file-posix.c) takes open-file-description byte-range locks on every image it opens:
one shared lock at byte 100 + i for each permission bit i it holds, and one at byte 200 + i for
each permission it does not let others have.  Before taking them it tests the opposite bytes.
snapfs takes the locks of a writer: it reads, writes and resizes, and lets others only read.
"""

from __future__ import annotations

import errno
import fcntl
import struct

from snapfs.errors import Busy, from_oserror

PERM_BASE = 100
SHARED_BASE = 200
CONSISTENT_READ, WRITE, WRITE_UNCHANGED, RESIZE = 0, 1, 2, 3
ALL = (CONSISTENT_READ, WRITE, WRITE_UNCHANGED, RESIZE)
NAMES = {CONSISTENT_READ: "consistent read", WRITE: "write", WRITE_UNCHANGED: "write unchanged",
         RESIZE: "resize"}

WRITER_PERMS = (CONSISTENT_READ, WRITE, RESIZE)
WRITER_UNSHARED = (WRITE, RESIZE)

_F_OFD_GETLK = getattr(fcntl, "F_OFD_GETLK", 36)
_F_OFD_SETLK = getattr(fcntl, "F_OFD_SETLK", 37)
_F_OFD_SETLKW = getattr(fcntl, "F_OFD_SETLKW", 38)
_FLOCK = "hhqqi4x"  # struct flock on Linux x86-64 and aarch64


def _flock(fd: int, cmd: int, ltype: int, start: int) -> int:
    arg = struct.pack(_FLOCK, ltype, 0, start, 1, 0)
    res = fcntl.fcntl(fd, cmd, arg)
    return struct.unpack(_FLOCK, res)[0]


def try_byte(fd: int, byte: int, exclusive: bool = True) -> bool:
    """Take an OFD lock on one byte without waiting; False if another holder conflicts."""
    try:
        _flock(fd, _F_OFD_SETLK, fcntl.F_WRLCK if exclusive else fcntl.F_RDLCK, byte)
        return True
    except OSError as exc:
        if exc.errno in (errno.EAGAIN, errno.EACCES):
            return False
        raise


def wait_byte(fd: int, byte: int, exclusive: bool = True) -> None:
    """Take an OFD lock on one byte, waiting for other holders (who hold it briefly)."""
    _flock(fd, _F_OFD_SETLKW, fcntl.F_WRLCK if exclusive else fcntl.F_RDLCK, byte)


def unlock_byte(fd: int, byte: int) -> None:
    _flock(fd, _F_OFD_SETLK, fcntl.F_UNLCK, byte)


def byte_held(fd: int, byte: int) -> bool:
    """Whether another open file description holds a lock on ``byte``."""
    return _flock(fd, _F_OFD_GETLK, fcntl.F_WRLCK, byte) != fcntl.F_UNLCK


def _held_by_other(fd: int, byte: int) -> bool:
    return _flock(fd, _F_OFD_GETLK, fcntl.F_WRLCK, byte) != fcntl.F_UNLCK


def lock_for_writing(fd: int, name: str) -> None:
    """Take a writer's image locks on ``fd``; Busy if another process conflicts."""
    try:
        for p in WRITER_PERMS:
            if _held_by_other(fd, SHARED_BASE + p):
                raise Busy(f"{name} is in use by another process that does not share "
                           f"'{NAMES[p]}'")
        for p in WRITER_UNSHARED:
            if _held_by_other(fd, PERM_BASE + p):
                raise Busy(f"{name} is in use by another process holding '{NAMES[p]}'")
        for p in WRITER_PERMS:
            _flock(fd, _F_OFD_SETLK, fcntl.F_RDLCK, PERM_BASE + p)
        for p in WRITER_UNSHARED:
            _flock(fd, _F_OFD_SETLK, fcntl.F_RDLCK, SHARED_BASE + p)
    except OSError as exc:
        if exc.errno in (errno.EAGAIN, errno.EACCES):
            raise Busy(f"{name} is locked by another process") from None
        if exc.errno in (errno.EINVAL, errno.ENOLCK, errno.EOPNOTSUPP):
            return  # the file system cannot lock: nothing to protect against
        raise from_oserror(exc, f"locking {name}") from None


def unlock(fd: int) -> None:
    """Drop the image locks of ``fd`` (an image that is frozen and will not be written)."""
    for base in (PERM_BASE, SHARED_BASE):
        for p in ALL:
            try:
                _flock(fd, _F_OFD_SETLK, fcntl.F_UNLCK, base + p)
            except OSError:
                pass
