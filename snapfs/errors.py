"""Typed errors: every refusal carries an errno and a one-line reason.

The FUSE layer turns these into ``FUSEError(e.errno)``, the control file into its reply and the
CLI into an exit status; nothing else needs to know how a failure came about.
"""

import errno as _errno


class SnapfsError(Exception):
    """Base of every error snapfs raises on purpose."""

    errno = _errno.EIO

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message

    @property
    def errno_name(self) -> str:
        return _errno.errorcode.get(self.errno, "EIO")


class Invalid(SnapfsError):
    """A request or argument that makes no sense."""

    errno = _errno.EINVAL


class NotFound(SnapfsError):
    errno = _errno.ENOENT


class Exists(SnapfsError):
    errno = _errno.EEXIST


class Busy(SnapfsError):
    errno = _errno.EBUSY


class NoSpace(SnapfsError):
    errno = _errno.ENOSPC


class PastEnd(NoSpace):
    """A write beyond a volume's end: ENOSPC, as a block device answers; not a share fault."""


class ReadOnly(SnapfsError):
    errno = _errno.EROFS


class Corrupt(SnapfsError):
    """An image whose metadata cannot be trusted (damaged, hostile or truncated)."""

    errno = _errno.EIO


class Unsupported(SnapfsError):
    """A valid image using a feature snapfs refuses to serve (encryption, external data...)."""

    errno = _errno.EIO


class ShareIOError(SnapfsError):
    """The share itself failed an I/O call."""

    errno = _errno.EIO


def from_oserror(exc: OSError, what: str) -> SnapfsError:
    """Wrap an OSError from the share so callers see one error family."""
    code = exc.errno or _errno.EIO
    cls = {
        _errno.ENOSPC: NoSpace,
        _errno.EDQUOT: NoSpace,
        _errno.ENOENT: NotFound,
        _errno.EEXIST: Exists,
        _errno.EROFS: ReadOnly,
    }.get(code, ShareIOError)
    err = cls(f"{what}: {exc.strerror or exc}")
    return err


class Moved(SnapfsError):
    """The volume is owned by another daemon on the share: the request must go there."""

    def __init__(self, vid: str, host: str):
        super().__init__(f"volume {vid} is owned by the snapfs daemon of host {host}")
        self.vid = vid
        self.host = host


class NotOwner(SnapfsError):
    """A guest write reached a volume this daemon only follows (another daemon owns it)."""


def from_reply(errno_name: str, message: str) -> SnapfsError:
    """The error a daemon reported for a request it carried out for another one."""
    exc = SnapfsError(message)
    exc.errno = getattr(_errno, str(errno_name), _errno.EIO)
    return exc
