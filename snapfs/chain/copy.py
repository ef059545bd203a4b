"""Copying guest content out of a chain into a new, independent image (clones).

The source chain is resolved into runs first (where each byte really lives); zero and
unallocated runs are skipped, so the copy stays sparse, and data runs stored uncompressed in a
file are copied with ``os.copy_file_range`` when the target is raw (server-side on NFS 4.2).
"""

from __future__ import annotations

from snapfs.chain import extent as ex
from snapfs.chain.image import Image, create_qcow2, create_raw
from snapfs.chain.qcow2 import Qcow2Image
from snapfs.chain.raw import RawImage
from snapfs.chain.resolve import resolve
from snapfs.io import checkpoint

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
                    await dst.copy_in(img.f, run.host, run.offset, run.length)
                else:
                    await dst.write(run.offset, await img.read(run.offset, run.length))
            await dst.start_writeback()  # the closing sync then waits for little
            pos += n
            if on_progress:
                on_progress(pos, source.size)
            await checkpoint()  # guest requests between chunks (a local copy never waits)
        await dst.flush()
    finally:
        await dst.close()
