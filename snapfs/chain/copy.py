"""Copying guest content out of a chain into a new, independent image (clones).

The source chain is resolved into runs first (where each byte really lives); zero and
unallocated runs are skipped, so the copy stays sparse, and data runs stored uncompressed in a
file are copied with ``os.copy_file_range`` when the target is raw (server-side on NFS 4.2).
"""

from __future__ import annotations

import os

from snapfs.chain import extent as ex
from snapfs.chain.image import Image, create_qcow2, create_raw
from snapfs.chain.qcow2 import Qcow2Image
from snapfs.chain.raw import RawImage
from snapfs.chain.resolve import resolve
from snapfs.errors import from_oserror
from snapfs.io import BlockFile, checkpoint, run_blocking

CHUNK = 8 << 20


async def clone_image(source: Image, path: str, size: int, fmt: str, mode: int,
                      on_progress=None) -> None:
    """Create ``path`` (format ``fmt``, ``size`` bytes) holding ``source``'s guest content."""
    if fmt == "raw":
        await create_raw(path, size, mode=mode)
    else:
        await create_qcow2(path, size, mode=mode)
    dst = await (RawImage.open(path, writable=True) if fmt == "raw"
                 else Qcow2Image.open(path, writable=True))
    try:
        pos = 0
        while pos < source.size:
            n = min(CHUNK, source.size - pos)
            for img, run in await resolve(source, pos, n):
                if img is None:
                    continue
                if fmt == "raw" and run.kind == ex.DATA:
                    await _copy_range(img.f, run.host, dst.f, run.offset, run.length)
                else:
                    await dst.write(run.offset, await img.read(run.offset, run.length))
            pos += n
            if on_progress:
                on_progress(pos, source.size)
            await checkpoint()  # guest requests between chunks (a local copy never waits)
        await dst.flush()
        if fmt == "raw":
            await dst.f.fsync()
    finally:
        await dst.close()


async def _copy_range(src: BlockFile, src_off: int, dst: BlockFile, dst_off: int,
                      length: int) -> None:
    """copy_file_range, falling back to read and write; short source files read as zeros."""
    def copy() -> None:
        s, d, left = src_off, dst_off, length
        while left:
            try:
                n = os.copy_file_range(src.fd, dst.fd, left, s, d)
            except OSError as exc:
                if exc.errno not in (18, 22, 38, 95):  # EXDEV, EINVAL, ENOSYS, EOPNOTSUPP
                    raise
                n = -1
            if n <= 0:
                data = os.pread(src.fd, min(left, CHUNK), s)
                if not data:
                    return  # beyond the end of the source file: zeros, already sparse
                os.pwrite(dst.fd, data, d)
                n = len(data)
            s, d, left = s + n, d + n, left - n
    try:
        await run_blocking(src.inline and dst.inline, "copying", copy)
    except OSError as exc:
        raise from_oserror(exc, "copying") from None
