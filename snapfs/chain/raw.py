"""A raw image: the guest content is the file, byte for byte."""

from __future__ import annotations

import os

from snapfs.chain.extent import DATA, ZERO, Extent, zeros
from snapfs.chain.locks import lock_for_writing
from snapfs.errors import Invalid, ReadOnly
from snapfs.io import BlockFile, Lock, copy_range, run_blocking

ZERO_CHUNK = 1 << 20


class RawImage:
    format = "raw"
    backing = None
    backing_name = None

    def __init__(self, f: BlockFile, size: int):
        self.f = f
        self.path = f.path
        self.size = size
        self.writable = f.writable
        self.lock = Lock()
        self._dirty = False

    @classmethod
    async def open(cls, path: str, *, writable: bool = False) -> "RawImage":
        f = await BlockFile.open(path, writable=writable)
        try:
            if writable:
                lock_for_writing(f.fd, os.path.basename(path))
                f.relock = lambda fd: lock_for_writing(fd, os.path.basename(path))
            return cls(f, await f.size())
        except BaseException:
            await f.close()
            raise

    def _check(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise Invalid(f"range {offset}+{length} outside the image ({self.size} bytes)")

    async def map(self, offset: int, length: int) -> list[Extent]:
        """Data and holes (as zeros) of the file, from SEEK_DATA/SEEK_HOLE."""
        self._check(offset, length)
        if not length:
            return []
        return await run_blocking(self.f.inline, f"mapping {self.path}", self._map, offset,
                                  offset + length)

    def _map(self, pos: int, end: int) -> list[Extent]:
        out: list[Extent] = []
        fd = self.f.fd
        while pos < end:
            try:
                data = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:  # ENXIO: no data after pos (or SEEK_DATA unsupported: see below)
                data = end
            if data > pos:
                out.append(Extent(ZERO, pos, min(data, end) - pos))
                pos = min(data, end)
                if pos >= end:
                    break
            hole = min(os.lseek(fd, pos, os.SEEK_HOLE), end)
            if hole <= pos:
                hole = end
            out.append(Extent(DATA, pos, hole - pos, pos))
            pos = hole
        return out

    async def read(self, offset: int, length: int) -> bytes:
        self._check(offset, length)
        data = await self.f.pread(offset, length)
        if len(data) < length:
            data += zeros(length - len(data))
        return data

    async def read_host(self, host: int, length: int) -> bytes:
        data = await self.f.pread(host, length)
        return data if len(data) == length else data + zeros(length - len(data))

    def _check_write(self, offset: int, length: int) -> None:
        if not self.writable:
            raise ReadOnly(f"{self.path} is open read-only")
        self._check(offset, length)

    async def write(self, offset: int, data) -> None:
        self._check_write(offset, len(data))
        await self.f.pwrite(offset, data)
        self._dirty = True

    async def copy_in(self, src: BlockFile, host: int, offset: int, length: int) -> None:
        """Write what ``src`` holds at ``host`` to ``offset``, copied by the kernel (on NFS 4.2
        by the server) without passing through the daemon."""
        self._check_write(offset, length)
        n = await copy_range(src, host, self.f, offset, length)
        if n < length:  # past the end of the source file: reads as zeros
            await self.write_zeroes(offset + n, length - n)
        self._dirty = True

    async def write_zeroes(self, offset: int, length: int, unmap: bool = False) -> None:
        self._check_write(offset, length)
        end = offset + length
        while offset < end:
            n = min(ZERO_CHUNK, end - offset)
            await self.f.pwrite(offset, zeros(n))
            offset += n
        self._dirty = True

    async def discard(self, offset: int, length: int) -> None:
        await self.write_zeroes(offset, length, unmap=True)

    async def resize(self, size: int) -> None:
        if not self.writable:
            raise ReadOnly(f"{self.path} is open read-only")
        if size < self.size:
            raise Invalid("shrinking an image is not supported")
        await self.f.truncate(size)
        self.size = size
        self._dirty = True

    async def start_writeback(self) -> None:
        """Start writing what a long copy wrote so far (BlockFile.start_writeback)."""
        if self.writable and self._dirty:
            await self.f.start_writeback()

    async def flush(self) -> None:
        if self.writable and self._dirty:
            # Cleared first: a write that lands while the sync runs (in a worker thread) is
            # not covered by it and leaves the file dirty for the next flush.
            self._dirty = False
            try:
                await self.f.fdatasync()
            except BaseException:
                self._dirty = True
                raise

    async def finish_writing(self) -> None:
        await self.flush()

    async def revalidate(self) -> None:
        """A raw file another daemon writes: only its size can have changed."""
        if not self.writable:
            self.size = await self.f.size()

    async def allocated(self) -> int:
        st = await self.f.stat()
        return st.st_blocks * 512

    async def close(self) -> None:
        if self.f.closed:
            return
        try:
            await self.flush()
        finally:
            await self.f.close()

    def __repr__(self) -> str:
        return f"<RawImage {os.path.basename(self.path)} {self.size}>"
