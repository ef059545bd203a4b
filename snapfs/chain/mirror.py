"""What an active merge needs from guest writes while it copies the active image down.

The merge copies the active image into the image below while the guest goes on writing to
it.  At first each guest write only records its range, and the merge copies those ranges again
after its first pass.  That converges only while the merge copies faster than the guest
writes: a guest writing small blocks flat out (each a copy-on-write in the active image)
records ranges as fast as the merge copies them, every pass is longer than the one before, and
what is left falls to the switch, which copies it with guest I/O paused (seconds, measured).

So for its last pass the merge turns the mirror "write-blocking", as QEMU's mirror job can:
from then on each guest write goes to both images, and the pass copies only what was recorded
before that, which can no longer grow.  Guest writes and the pass's copies take one lock, so
that both images see overlapping writes in the same order and a copy of older data never
lands over a newer guest write in the image below.
"""

from __future__ import annotations

import logging

from snapfs.chain.image import Image
from snapfs.errors import SnapfsError
from snapfs.io import Lock

log = logging.getLogger(__name__)


class Mirror:
    def __init__(self) -> None:
        self.written: list[tuple[int, int]] = []  # guest writes not yet copied down
        self.lower: Image | None = None  # while set, guest writes also go here
        self.lock = Lock()
        self.failed: SnapfsError | None = None  # a write to ``lower`` failed: the merge fails
        self.both = 0  # guest writes applied to both images (the log, tests)

    def take(self) -> list[tuple[int, int]]:
        """The ranges recorded so far, sorted and joined, and a fresh record."""
        written, self.written = self.written, []
        return join_ranges(written)

    def record(self, offset: int, length: int) -> None:
        """A guest write that reached only the active image: the merge copies it down."""
        self.written.append((offset, length))

    def recorded(self) -> int:
        return sum(n for _, n in self.written)

    def block(self, lower: Image) -> None:
        """From now on, write guest writes to ``lower`` too."""
        self.lower = lower

    async def write_both(self, top: Image, apply) -> bool:
        """Apply one guest write (``apply(image)``) to the active image ``top`` and to the
        image below, under the lock.  False when it reached only ``top``: the mirror stopped
        blocking meanwhile, or the image below refused it (the merge then fails)."""
        lower = self.lower
        async with self.lock:
            await apply(top)
            if lower is None or self.lower is not lower:
                return False
            try:
                await apply(lower)
            except SnapfsError as exc:
                # The guest's data is in the active image: its write succeeded.  The merge
                # cannot finish without it below, so it fails and the chain stays as it is.
                log.error("merging %s: a guest write could not be copied into %s: %s",
                          top.path, lower.path, exc.message)
                self.lower, self.failed = None, exc
                return False
            self.both += 1
            return True

    async def stop(self) -> None:
        """Stop blocking, once any write to the image below under way has ended (the merge
        is about to close that image)."""
        self.lower = None
        async with self.lock:
            pass


def join_ranges(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """``(offset, length)`` ranges sorted, with overlapping and adjacent ones joined."""
    out: list[tuple[int, int]] = []
    for off, n in sorted(ranges):
        if out and off <= out[-1][0] + out[-1][1]:
            last_off, last_n = out[-1]
            out[-1] = (last_off, max(last_n, off + n - last_off))
        else:
            out.append((off, n))
    return out
