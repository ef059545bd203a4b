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
WRITEBACK_EVERY = 32 << 20


class Writeback:
    """Starts writing back what a long copy wrote, every WRITEBACK_EVERY bytes, so that the
    sync ending the copy finds little left to write.  A short copy (an active merge catching
    up with the guest's last writes, range by range) never pays a call for it."""

    def __init__(self, dst: Image):
        self.dst, self.written = dst, 0

    async def wrote(self, n: int) -> None:
        self.written += n
        if self.written >= WRITEBACK_EVERY:
            self.written = 0
            await self.dst.start_writeback()


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
        writeback = Writeback(dst)
        while pos < source.size:
            n = min(CHUNK, source.size - pos)
            for img, run in await resolve(source, pos, n):
                if img is None:
                    continue
                if fmt == "raw" and run.kind == ex.DATA:
                    await dst.copy_in(img.f, run.host, run.offset, run.length)
                else:
                    await dst.write(run.offset, await img.read(run.offset, run.length))
                await writeback.wrote(run.length)
            pos += n
            if on_progress:
                on_progress(pos, source.size)
            await checkpoint()  # guest requests between chunks (a local copy never waits)
        await dst.flush()
    finally:
        await dst.close()
