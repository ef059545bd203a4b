"""Opening a stack of images: the top one and, read-only, everything it backs onto.

Backing names come from image headers and are untrusted: only a bare name in the same directory
is followed, never a path, a symlink, a loop or an absurdly deep chain (DESIGN.md, Security).
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable

from snapfs.chain.image import FORMATS, Image, open_image, probe_format
from snapfs.errors import Corrupt, Invalid, NotFound, Unsupported

#: The deepest chain snapfs opens; upstream Cinder chains grow by one file per snapshot.
MAX_CHAIN_DEPTH = 256


def check_backing_name(name: str) -> None:
    """Refuse any backing name that is not a bare file name."""
    if not name or name in (".", "..") or "/" in name or "\0" in name or "\\" in name:
        raise Corrupt(f"backing file name {name!r} is not a bare file name")


async def open_chain(path: str, fmt: str | None = None, *, writable: bool = False,
                     allow_backing: Callable[[str, str], None] | None = None) -> Image:
    """Open ``path`` (writable if asked) and its backing chain (read-only).

    ``allow_backing(image_name, backing_name)`` may refuse a backing name by raising; the
    share layer uses it to keep a volume's chain within that volume's files.
    """
    if fmt is None:
        fmt = await probe_format(path)
    if fmt not in FORMATS:
        raise Invalid(f"unknown image format {fmt!r}")
    directory = os.path.dirname(os.path.abspath(path))
    top = await open_image(path, fmt, writable=writable)
    seen = {_identity(top)}
    cur = top
    try:
        depth = 1
        while cur.backing_name is not None:
            name = cur.backing_name
            check_backing_name(name)
            if allow_backing is not None:
                allow_backing(os.path.basename(cur.path), name)
            bfmt = cur.h.backing_format
            if bfmt is None:
                raise Unsupported(f"{os.path.basename(cur.path)} does not record the format of "
                                  f"its backing file {name!r}")
            if bfmt not in FORMATS:
                raise Unsupported(f"backing file {name!r} has unsupported format {bfmt!r}")
            depth += 1
            if depth > MAX_CHAIN_DEPTH:
                raise Corrupt(f"backing chain deeper than {MAX_CHAIN_DEPTH} images")
            bpath = os.path.join(directory, name)
            try:
                st = os.lstat(bpath)
            except FileNotFoundError:
                raise NotFound(f"backing file {name!r} of {os.path.basename(cur.path)} "
                               "is missing") from None
            if not stat.S_ISREG(st.st_mode):
                raise Corrupt(f"backing file {name!r} is not a regular file")
            if (st.st_dev, st.st_ino) in seen:
                raise Corrupt(f"backing chain loops at {name!r}")
            below = await open_image(bpath, bfmt, writable=False)
            seen.add(_identity(below))
            cur.backing = below
            cur = below
    except BaseException:
        await close_chain(top)
        raise
    return top


def _identity(img: Image) -> tuple[int, int]:
    st = os.fstat(img.f.fd)
    return st.st_dev, st.st_ino


async def close_chain(top: Image) -> None:
    """Close an image and everything below it."""
    await top.close()
