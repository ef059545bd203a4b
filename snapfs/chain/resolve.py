"""Where a chain's guest content really lives, and a remembered answer for deep chains.

``resolve`` walks a chain once for a guest range; clones use it to copy only what is stored.
``FlatMap`` remembers the answer per cluster for the frozen part of a volume's chain (every
image below the active one), so that a read through sixteen snapshots costs one dictionary
lookup instead of sixteen table walks; a miss resolves a whole window of clusters in one walk,
so a random reader does not pay a walk per cluster while the map fills.  Frozen images never
change while they are frozen; the volume drops the map at every chain switch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from snapfs.chain import extent as ex
from snapfs.chain.extent import zeros

if TYPE_CHECKING:
    from snapfs.chain.image import Image

_ZERO = "zero"  # the whole granule reads as zeros
_MIXED = "mixed"  # not one run in one file (compressed, subclusters): read the slow way


async def resolve(img: Image, offset: int, length: int) -> list[tuple[Image | None, ex.Extent]]:
    """Where each part of a guest range lives: (image, run) with the run in that image's own
    terms, or (None, run) for zeros."""
    out: list[tuple[Image | None, ex.Extent]] = []
    for run in await img.map(offset, length):
        if run.kind == ex.UNALLOC:
            below = img.backing
            if below is None or run.offset >= below.size:
                out.append((None, ex.Extent(ex.ZERO, run.offset, run.length)))
                continue
            n = min(run.length, below.size - run.offset)
            out.extend(await resolve(below, run.offset, n))
            if n < run.length:
                out.append((None, ex.Extent(ex.ZERO, run.offset + n, run.length - n)))
        elif run.kind == ex.ZERO:
            out.append((None, run))
        else:
            out.append((img, run))
    return out


class FlatMap:
    """The guest content of a frozen chain (``img`` and its backing files), cluster by cluster:
    the file and offset holding each granule, looked up once and remembered."""

    MAX_ENTRIES = 32768  # per volume; forgotten all at once when full (2 GiB at 64 KiB)
    WINDOW = 256  # granules resolved together on a miss (16 MiB at 64 KiB)

    def __init__(self, img: Image, granule: int):
        self.img = img
        self.granule = granule
        self.entries: dict[int, object] = {}

    async def read(self, offset: int, length: int) -> bytes:
        """Read ``length`` bytes at ``offset`` (inside the image's size).

        Granules that follow each other in one file (or are all zeros) are read as one run:
        a guest's 1 MiB read of data one snapshot wrote in one piece is one read of the
        share, not sixteen reads of a cluster and a join."""
        g = self.granule
        parts = []
        pos, end = offset, offset + length
        run_img, run_host, run_start = None, 0, pos  # the run being gathered
        while pos < end:
            gi = pos // g
            gstart = gi * g
            stop = min(gstart + g, end)
            where = self.entries.get(gi)
            if where is None:
                where = await self._lookup(gi)
            if where is _MIXED:
                if pos > run_start:
                    parts.append(await self._read_run(run_img, run_host, pos - run_start))
                parts.append(await self.img.read(pos, stop - pos))
                run_img, run_start = None, stop
            elif where is _ZERO:
                if run_img is not None:
                    if pos > run_start:
                        parts.append(await self._read_run(run_img, run_host, pos - run_start))
                    run_img, run_start = None, pos
            else:
                img, host = where
                host += pos - gstart
                if img is not run_img or host != run_host + pos - run_start:
                    if pos > run_start:
                        parts.append(await self._read_run(run_img, run_host, pos - run_start))
                    run_img, run_host, run_start = img, host, pos
            pos = stop
        if end > run_start:
            parts.append(await self._read_run(run_img, run_host, end - run_start))
        return parts[0] if len(parts) == 1 else b"".join(parts)

    @staticmethod
    async def _read_run(img: Image | None, host: int, length: int) -> bytes:
        """A gathered run: zeros (no image), or ``length`` bytes at ``host`` in ``img``."""
        if img is None:
            return zeros(length)
        return await img.read_host(host, length)

    async def _lookup(self, gi: int):
        """Resolve the window of ``WINDOW`` granules around ``gi`` in one walk of the chain
        (empty stretches of a table are skipped at C speed, so a window costs little more
        than one granule) and remember every granule of it."""
        g, size = self.granule, self.img.size
        first = gi - gi % self.WINDOW
        start = first * g
        end = min(start + self.WINDOW * g, size)
        runs = await resolve(self.img, start, end - start)
        if len(self.entries) + self.WINDOW > self.MAX_ENTRIES:
            self.entries.clear()
        i = 0
        for k in range(first, -(-end // g)):
            gs, ge = k * g, min(k * g + g, size)
            while runs[i][1].offset + runs[i][1].length <= gs:
                i += 1
            img, run = runs[i]
            where: object = _MIXED  # cut by run boundaries, or compressed
            if run.offset + run.length >= ge:
                if img is None:
                    where = _ZERO
                elif run.kind == ex.DATA:
                    where = (img, run.host + gs - run.offset)
            self.entries[k] = where
        return self.entries[gi]
