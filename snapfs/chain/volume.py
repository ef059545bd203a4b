"""An open volume: its chain of images, guest I/O on the active image, and the chain switches
that snapshots, merges and reverts make while guest I/O goes on.

Guest reads and writes pass the volume's ``gate`` shared; a switch of the active image takes it
exclusively for milliseconds.  Operations that change the chain hold ``lock`` (one at a time).

A volume is open either as its owner (``writable``: this daemon writes the active image) or as
a follower of the daemon that owns it on another host: then every image is read-only, and the
active image's tables, which the owner keeps changing, are read again from the share at each
open of the volume and at most ``FOLLOW_REFRESH`` seconds after the last time.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import time

from snapfs.chain import extent as ex
from snapfs.chain.catalog import PREFIX, Share, base_name, is_chain_name
from snapfs.chain.chain import open_chain
from snapfs.chain.copy import Writeback
from snapfs.chain.image import Image, open_image
from snapfs.chain.locks import unlock
from snapfs.chain.mirror import Mirror
from snapfs.chain.qcow2 import Qcow2Image
from snapfs.chain.raw import RawImage
from snapfs.chain.resolve import FlatMap
from snapfs.errors import (Corrupt, Invalid, NotFound, NotOwner, PastEnd, ShareIOError,
                           SnapfsError)
from snapfs.io import CancelScope, Event, Gate, Lock, Replaced, checkpoint, run_blocking

log = logging.getLogger(__name__)

COPY_CHUNK = 4 << 20
FOLLOW_REFRESH = 1.0  # seconds a follower trusts the active image's tables it has read
FAULT_HOLD = 60.0  # seconds a volume shows "failed" after its last share fault
STREAM_CHUNK = 1 << 20  # written under the gate when streaming into the active image
CATCH_UP_LEFT = 256 << 10  # an active merge's catch-up passes stop with less than this left


class Volume:
    def __init__(self, share: Share, vid: str):
        self.share = share
        self.vid = vid
        self.gate = Gate()
        self.lock = Lock()
        self.images: list[Image] = []  # bottom (base) .. top (active)
        self.users = 0
        self.mirror: Mirror | None = None  # guest writes during an active merge
        # the last active merge: guest writes it applied to both images, and the bytes of
        # guest writes it copied at the switch, with guest I/O paused
        self.merge_stats = {"mirrored": 0, "paused_copy": 0}
        self.failed: str | None = None
        self.snap_files: dict[str, str] = {}  # snapshot id -> overlay created with it
        self.attrs: dict | None = None
        self.fault: tuple[str, float] | None = None  # last share fault: (reason, monotonic)
        self.allocated = 0  # bytes on the share, as last measured (status)
        self._faults = FaultLog(vid)
        self.writable = True  # False: a follower of the daemon that owns the volume
        self.gen = 0  # the volume's change counter (leases) when its chain was read
        self.fresh_at = 0.0  # when a follower last read the active image's tables
        self.reload = None  # async callable: a follower reads its chain again (the service)
        self.settling = None  # an Event while a snapshot's or merge's switch is made durable
        self.switch_failed: str | None = None  # ... and why that failed: flushes fail
        self.unflushed: Image | None = None  # frozen by a snapshot, not yet durable

    # -- opening ---------------------------------------------------------------------------

    def allow_backing(self, image_name: str, backing_name: str) -> None:
        """A volume's chain holds only that volume's files (CONTRACT.md section 1)."""
        if not is_chain_name(self.vid, backing_name):
            raise Corrupt(f"{image_name} backs onto {backing_name!r}, a file of another volume")

    async def open(self, active: str, active_format: str, writable: bool = True) -> None:
        top = await open_chain(self.share.path(active), active_format, writable=writable,
                               allow_backing=self.allow_backing)
        chain = []
        img = top
        while img is not None:
            chain.append(img)
            img = img.backing
        chain.reverse()
        if os.path.basename(chain[0].path) != base_name(self.vid):
            await top.close()
            raise Corrupt(f"the chain of volume {self.vid} does not end at its base file")
        self.images = chain
        self.writable = writable
        self.fresh_at = time.monotonic()
        self.mirror = None
        self.unflushed = None
        self._remap()

    def adopt(self, fresh: "Volume") -> None:
        """A follower takes over the chain another Volume object just opened (its own old
        images are the caller's to close)."""
        self.images, fresh.images = fresh.images, []
        self.snap_files, self.gen = fresh.snap_files, fresh.gen
        self.writable, self.fresh_at, self.attrs, self.mirror = False, fresh.fresh_at, None, None

    def _remap(self) -> None:
        """After the chain changed: a FlatMap of the frozen images for the active one when
        they are several, or a raw file: its holes then read as zeros without a call on the
        share (nor a page of zeros in the share's page cache).  One frozen qcow2 image is
        read as fast without a map."""
        for img in self.images:
            if isinstance(img, Qcow2Image):
                img.below_map = None
        top, frozen = self.top, self.images[:-1]
        if isinstance(top, Qcow2Image) and (
                len(frozen) >= 2 or (frozen and isinstance(frozen[0], RawImage))):
            sizes = [i.cs for i in frozen if isinstance(i, Qcow2Image)] or [top.cs]
            top.below_map = FlatMap(top.backing, min(sizes))

    async def close(self) -> None:
        if self.images:
            top = self.images[-1]
            self.images = []
            await top.close()

    @property
    def top(self) -> Image:
        if not self.images:
            raise ShareIOError(f"volume {self.vid} could not be opened again; see the log")
        return self.images[-1]

    @property
    def size(self) -> int:
        return self.top.size

    def names(self) -> list[str]:
        return [os.path.basename(i.path) for i in self.images]

    def image(self, name: str) -> Image:
        for img in self.images:
            if os.path.basename(img.path) == name:
                return img
        raise Corrupt(f"{name} is not in the chain of volume {self.vid}")

    def below(self, name: str) -> Image:
        """The image a file backs onto: a snapshot's point-in-time content."""
        names = self.names()
        i = names.index(name) if name in names else -1
        if i <= 0:
            raise Corrupt(f"{name} has nothing below it in volume {self.vid}")
        return self.images[i - 1]

    # -- guest I/O -------------------------------------------------------------------------

    async def refresh(self) -> None:
        """A follower: read the active image's header and tables again (what the owner has
        made durable since), as an NFS client revalidates a file at open."""
        if self.writable or not self.images:
            return
        self.fresh_at = time.monotonic()
        async with self.gate.shared():  # not while the chain is opened again
            if self.images and not self.writable:
                await self.top.revalidate()

    async def read(self, offset: int, length: int) -> bytes:
        if self.writable:
            return await self._read(offset, length)
        try:
            if time.monotonic() - self.fresh_at > FOLLOW_REFRESH:
                await self.refresh()
            return await self._read(offset, length)
        except Replaced:
            await self._reread_chain()
            return await self._read(offset, length)

    async def _reread_chain(self) -> None:
        """A follower whose files another host replaced (a merge): open the chain again."""
        if self.reload is None:
            raise ShareIOError(f"volume {self.vid}: the chain changed under a reader")
        log.info("volume %s: its chain changed on another host; reading it again", self.vid)
        await self.reload()

    async def _read(self, offset: int, length: int) -> bytes:
        return await self._read_from(self._active, offset, length)

    def _active(self) -> Image:
        return self.top

    async def read_snapshot(self, sid: str, offset: int, length: int) -> bytes:
        """Read a snapshot's point-in-time content (what its overlay backs onto)."""
        def content() -> Image:
            name = self.snap_files.get(sid)
            if name is None:
                raise NotFound(f"volume {self.vid} has no snapshot {sid}")
            return self.below(name)
        try:
            return await self._read_from(content, offset, length)
        except Replaced:
            if self.writable:
                raise
            await self._reread_chain()
            return await self._read_from(content, offset, length)

    async def _read_from(self, pick, offset: int, length: int) -> bytes:
        """Read the image ``pick()`` names, with guest I/O's share of the gate."""
        try:
            async with self.gate.shared():
                img = pick()
                end = min(offset + length, img.size)
                if offset >= end:
                    return b""
                return await img.read(offset, end - offset)
        except SnapfsError as exc:
            self._io_failed("read", exc)
            raise

    def _owner_only(self) -> None:
        if not self.writable:
            raise NotOwner(f"volume {self.vid} is owned by another daemon")

    async def write(self, offset: int, data) -> None:
        try:
            async with self.gate.shared():
                self._owner_only()
                top = self.top
                if offset + len(data) > top.size:
                    raise PastEnd("write past the end of the volume")
                await self._apply(top, lambda img: img.write(offset, data), offset, len(data))
        except SnapfsError as exc:
            self._io_failed("write", exc)
            raise

    async def write_zeroes(self, offset: int, length: int, unmap: bool = False) -> None:
        try:
            async with self.gate.shared():
                self._owner_only()
                top = self.top
                if offset + length > top.size:
                    raise PastEnd("write past the end of the volume")
                await self._apply(top, lambda img: img.write_zeroes(offset, length, unmap),
                                  offset, length)
        except SnapfsError as exc:
            self._io_failed("write", exc)
            raise

    async def _apply(self, top: Image, apply, offset: int, length: int) -> None:
        """Apply a guest write to the active image; during an active merge, record it for
        copying down unless it went to both images.  It is recorded in the merge's mirror of
        the moment it ends (a merge that began while it was under way may have copied past
        it), also when it failed or was cancelled halfway."""
        mirror = self.mirror
        both = False
        try:
            if mirror is not None and mirror.lower is not None:
                both = await mirror.write_both(top, apply)
            else:
                await apply(top)
        finally:
            if not both and self.mirror is not None:
                self.mirror.record(offset, length)

    async def flush(self) -> None:
        try:
            while True:
                if self.settling is not None:
                    await self.settling.wait()  # a snapshot's or merge's switch made durable
                if self.switch_failed:
                    raise ShareIOError(self.switch_failed)
                async with self.gate.shared():
                    if self.settling is not None:
                        continue  # a switch came while this waited for the gate: wait for it
                    if not self.writable:
                        return  # a follower holds nothing unwritten
                    if self.unflushed is not None:
                        await self._flush_unflushed()
                    await self.top.flush()
                    return
        except SnapfsError as exc:
            self._io_failed("flush", exc)
            raise

    async def _flush_unflushed(self) -> None:
        """Try again to make durable the image a snapshot froze, which holds writes that
        guest flushes cover; it is frozen once that works."""
        img = self.unflushed
        await img.finish_writing()
        if self.unflushed is img:
            self.unflushed = None
            freeze(img)

    async def settle_unflushed(self) -> None:
        """Before the chain changes again: the image an earlier snapshot could not flush
        must be durable first (a merge reopens it from the share)."""
        if self.unflushed is not None:
            async with self.gate.shared():
                if self.unflushed is not None:
                    await self._flush_unflushed()

    async def resize(self, size: int) -> None:
        async with self.gate.shared():
            self._owner_only()
            await self.top.resize(size)

    def _io_failed(self, what: str, exc: SnapfsError) -> None:
        """Guest I/O failures caused by the share: remembered for status, logged once."""
        if isinstance(exc, NotOwner):
            return
        if exc.errno == errno.EIO:
            self.fault = (f"{what} failed: {exc.message}", time.monotonic())
        if exc.errno in (errno.EIO, errno.ENOSPC) and not isinstance(exc, PastEnd):
            self._faults.note(what, exc)

    def fault_reason(self) -> str | None:
        """The recent share fault that makes this volume show as failed, if any."""
        if self.fault and time.monotonic() - self.fault[1] < FAULT_HOLD:
            return self.fault[0]
        return None

    # -- chain switches --------------------------------------------------------------------

    async def push_overlay(self, name: str) -> None:
        """Freeze the active image and put a new empty overlay on top (a snapshot).

        Guest I/O pauses only for the switch.  The old image is flushed after it, while
        guest writes already go to the new overlay: flushing it before, under its lock, held
        every guest write back for its syncs (tens of milliseconds).  Guest flushes wait
        until the old image is durable (``settling``), since it holds writes they cover;
        if it cannot be made durable, they keep trying it and fail while it fails."""
        await self.settle_unflushed()
        top = self.top
        path = await self._new_overlay(name, top)
        new = None
        try:
            new = await open_image(path, "qcow2", writable=True)
            async with self.gate.exclusive():
                new.backing = top
                self.images.append(new)
                self._remap()
                self.settling = Event()
        except BaseException:
            if new is None or new not in self.images:
                await _discard(new, path)
            raise
        # No guest write reaches the old image any more: make it durable with I/O going on.
        try:
            await self._settle_frozen(top)
        except SnapfsError as exc:
            # The snapshot stands (guest writes already go above it); the image keeps its
            # caches and stays open for writing: guest flushes and its close try again.
            log.error("volume %s: flushing %s after the snapshot failed: %s", self.vid,
                      os.path.basename(top.path), exc.message)
            self.unflushed = top

    async def replace_top(self, tmp_name: str, fill, on_switch) -> None:
        """Put a new overlay, on the same backing file, in the active image's place; what the
        active image holds is dropped (a revert).

        The overlay is created as ``tmp_name`` and filled by ``fill(new)`` while guest I/O
        goes on (it reads only frozen images), made durable, then renamed over the active
        file under the gate, where ``on_switch`` runs too: guest I/O pauses for the rename,
        not for copying what the active image held."""
        await self.settle_unflushed()
        top = self.top
        below = top.backing
        if below is None:
            raise Invalid(f"volume {self.vid} has no snapshot below its active file")
        path = await self._new_overlay(tmp_name, below)
        new = None
        try:
            new = await open_image(path, "qcow2", writable=True)
            new.backing = below
            await fill(new)
            await new.flush()
            with CancelScope(shield=True):  # a rename done must be recorded and used
                async with self.gate.exclusive():
                    await run_blocking(new.f.inline, "renaming", self.share.replace, tmp_name,
                                       os.path.basename(top.path))
                    new.path = new.f.path = top.path
                    self.images[-1] = new
                    self._remap()
                    await on_switch()
        except BaseException:
            if new is None or new not in self.images:
                await _discard(new, path)
                raise
            await _drop(top)
            raise
        await _drop(top)

    async def _new_overlay(self, name: str, below: Image) -> str:
        """Create the empty overlay file ``name`` on ``below``, as large as the volume and
        with the active image's cluster size; its path."""
        from snapfs.chain.image import create_qcow2
        top = self.top
        path = self.share.path(name)
        await create_qcow2(path, top.size, backing_file=os.path.basename(below.path),
                           backing_format=below.format, mode=self.share.file_mode,
                           cluster_size=_cluster_size(top))
        return path

    async def _settle_frozen(self, img: Image) -> None:
        """Make an image that guest writes no longer reach durable and freeze it; guest
        flushes wait for this."""
        settling = self.settling
        try:
            await img.finish_writing()
            freeze(img)
        finally:
            self.settling = None
            if settling is not None:
                settling.set()

    async def commit_down(self, name: str, on_progress=None, on_switch=None) -> None:
        """Merge file ``name`` into the image below it and drop it from the chain.

        The data ``name`` holds is copied down while guest I/O continues; the image above it
        (or the guest, if ``name`` is active) is then pointed at the image below.  When
        ``name`` is active, guest I/O pauses only for the last writes' copy and the switch;
        ``on_switch`` (recording the new active file) runs after the lower image is durable,
        and guest flushes wait for both: until then a crash would merge ``name`` down again
        over writes made since, which is allowed only for writes no flush acknowledged."""
        await self.settle_unflushed()
        i = self.names().index(name)
        if i == 0:
            raise Invalid("the base file cannot be merged down")
        upper, lower_ro = self.images[i], self.images[i - 1]
        active = upper is self.top
        lower = await open_image(lower_ro.path, lower_ro.format, writable=True)
        lower.backing = lower_ro.backing
        try:
            if lower.size < upper.size:
                await lower.resize(upper.size)
            if active:
                self.mirror = Mirror()
            await copy_own_runs(upper, lower, None, on_progress)
            await self._catch_up(upper, lower)
            # Durable before the switch, so that guest flushes after it wait only for the
            # last few writes (``_settle_switch``).  Synced before the last pass: while it
            # runs, guest writes wait for the image below too, and a qcow2 image holds its
            # lock while it syncs its tables.
            await lower.flush()
            await self._catch_up(upper, lower)  # what the guest wrote during that flush
            await self._copy_last(upper, lower)
            await self._presync_child(i)
            # From the switch on the merge completes (see stream_up): a pause between the
            # switch and recording it would let the next owner merge down again over writes
            # a flush acknowledged.
            with CancelScope(shield=True):
                await self._commit_switch(i, name, upper, lower, lower_ro, active, on_switch)
        except BaseException:
            mirror, self.mirror = self.mirror, None
            if mirror is not None:
                with CancelScope(shield=True):
                    await mirror.stop()
            if lower not in self.images:
                lower.backing = None
                await lower.close()
            raise

    async def _commit_switch(self, i: int, name: str, upper: Image, lower: Image,
                             lower_ro: Image, active: bool, on_switch) -> None:
        """The end of ``commit_down``: the image above (or the guest) moves to ``lower``."""
        async with self.gate.exclusive():
            if active:
                mirror, self.mirror = self.mirror, None
                if mirror.failed is not None:
                    self.mirror = mirror  # nothing changed yet: the caller ends the merge
                    raise mirror.failed
                pending = mirror.take()
                await copy_own_runs(upper, lower, pending, None)
                self.settling = Event()
                self.merge_stats = {"mirrored": mirror.both,
                                    "paused_copy": sum(n for _, n in pending)}
                log.debug("volume %s: switching the active image; %s", self.vid,
                          self.merge_stats)
            else:
                await lower.finish_writing()
            if i + 1 < len(self.images):
                child = self.images[i + 1]
                await set_backing(child, lower)
                child.backing = lower
            await lower_ro.f.close()  # replaced by ``lower``; its backing stays in use
            self.images[i - 1] = lower
            del self.images[i]
            if not active:
                freeze(lower)
            self._remap()
        if active:
            await self._settle_switch(lower, on_switch, name)
        upper.backing = None
        await upper.close()

    async def _presync_child(self, i: int) -> None:
        """Sync the data of the image above image ``i`` before a switch rewrites its header:
        that header's sync inside the pause would otherwise write out everything the guest
        wrote to it since its last flush (170 ms for a writer's 0.7 s of 4 KiB writes)."""
        if i + 1 < len(self.images) and self.images[i + 1].writable:
            await self.images[i + 1].f.fdatasync()

    async def _catch_up(self, upper: Image, lower: Image) -> None:
        """During an active merge: copy what the guest wrote meanwhile, until little is left
        or a pass no longer leaves less than the one before (the guest writes as fast as
        this copies)."""
        if self.mirror is None:
            return
        left = None
        for _ in range(8):
            recorded = self.mirror.recorded()
            if recorded < CATCH_UP_LEFT or left is not None and recorded >= left:
                return
            left = recorded
            await copy_own_runs(upper, lower, self.mirror.take(), None)

    async def _copy_last(self, upper: Image, lower: Image) -> None:
        """An active merge's last pass (``snapfs.chain.mirror``): guest writes go to both
        images from now on, and what they wrote before is copied range by range, each under
        the mirror's lock, until nothing recorded is left.  Writes that were already under
        way when the mirror began to block record their ranges when they end; the switch
        copies any that end after this."""
        mirror = self.mirror
        if mirror is None:
            return
        mirror.block(lower)
        while mirror.written:
            for start, length in mirror.take():
                # in pieces: guest writes wait for the lock while a piece is copied
                for pos in range(start, start + length, STREAM_CHUNK):
                    if mirror.failed is not None:
                        raise mirror.failed
                    n = min(STREAM_CHUNK, start + length - pos)
                    async with mirror.lock:
                        await copy_own_runs(upper, lower, [(pos, n)], None)

    async def _settle_switch(self, lower: Image, on_switch, name: str) -> None:
        """After an active commit's switch: make the new active image durable and record it;
        guest flushes wait for this (``settling``) and fail if it fails."""
        settling = self.settling
        try:
            await lower.flush()
            if on_switch is not None:
                await on_switch()
        except SnapfsError as exc:
            self.switch_failed = f"merging {name} could not be made durable: {exc.message}"
            raise
        finally:
            self.settling = None
            if settling is not None:
                settling.set()

    async def merge_direction(self, name: str) -> str:
        """``"down"`` (commit ``name`` into the file below) or ``"up"`` (stream the file below
        into ``name``): whichever copies less.  Streaming up needs a qcow2 file below, since
        ``name`` takes its place and its name."""
        i = self.names().index(name)
        if i == 0:
            raise Invalid("the base file cannot be merged")
        upper, lower = self.images[i], self.images[i - 1]
        if not isinstance(lower, Qcow2Image):
            return "down"
        return "up" if await own_bytes(lower) < await own_bytes(upper) else "down"

    async def stream_up(self, name: str, on_progress=None) -> None:
        """Merge the file below ``name`` into ``name``, which then takes its place and name.

        ``name`` receives the lower file's own data wherever it holds none of its own (guest
        I/O continues), is pointed at the lower file's backing, and is renamed over the lower
        file; the image above it is pointed at the new name.  The result on the share is the
        one a commit down leaves (CONTRACT.md section 1), reached by copying the smaller side."""
        await self.settle_unflushed()
        i = self.names().index(name)
        upper_ro, lower = self.images[i], self.images[i - 1]
        if i == 0 or not isinstance(lower, Qcow2Image):
            raise Invalid(f"{name} cannot be streamed up into a non-qcow2 file")
        active = upper_ro is self.top
        if active:
            upper = upper_ro
        else:
            upper = await open_image(upper_ro.path, "qcow2", writable=True)
            upper.backing = lower
        try:
            await stream_runs(lower, upper, self.gate if active else None, on_progress)
            # Durable before the pause: the syncs inside it then find next to nothing left.
            await (upper.flush() if active else upper.finish_writing())
            await self._presync_child(i)
            # From here on the merge completes: pausing it (a handover cancels it) between the
            # rename and the re-pointing would leave a chain that names a file gone.
            with CancelScope(shield=True):
                await self._stream_switch(i, name, upper, upper_ro, lower, active)
        except BaseException:
            if upper not in self.images:
                upper.backing = None
                await upper.close()
            raise

    async def _stream_switch(self, i: int, name: str, upper: Image, upper_ro: Image,
                             lower: Image, active: bool) -> None:
        """The end of ``stream_up``: ``name`` takes the lower file's place and name."""
        async with self.gate.exclusive():
            await (upper.flush() if active else upper.finish_writing())
            below = lower.backing
            if below is None:
                await upper.set_backing_file(None, None)
            else:
                await upper.set_backing_file(os.path.basename(below.path), below.format)
            lower_name = os.path.basename(lower.path)
            await run_blocking(upper.f.inline, "renaming", self.share.replace, name, lower_name)
            upper.path = upper.f.path = lower.path
            upper.backing = below
            lower.backing = None
            if not active:
                upper_ro.backing = None
                await upper_ro.close()
                freeze(upper)
            self.images[i - 1:i + 1] = [upper]
            if i < len(self.images):
                self.images[i].backing = upper
            self._remap()
            if i < len(self.images):
                await set_backing(self.images[i], upper)
        # Frozen and renamed over: only its descriptor goes, and its last close frees the
        # file's pages, which takes long for a large file: after the pause, in a worker.
        await lower.f.close(unlinked=True)


class FaultLog:
    """One log line per kind of fault and volume, then a count at most once a minute: a
    failing share must not flood the log with one line per guest request."""

    INTERVAL = 60.0

    def __init__(self, vid: str):
        self.vid = vid
        self.last: dict[tuple[str, int], float] = {}
        self.suppressed: dict[tuple[str, int], int] = {}

    def note(self, what: str, exc: SnapfsError) -> None:
        key = (what, exc.errno)
        now = time.monotonic()
        exc.logged = True
        if now - self.last.get(key, -self.INTERVAL) < self.INTERVAL:
            self.suppressed[key] = self.suppressed.get(key, 0) + 1
            return
        self.last[key] = now
        more = self.suppressed.pop(key, 0)
        log.error("volume %s: guest %s failed: %s%s", self.vid, what, exc.message,
                  f" ({more} more such failures in the last minute)" if more else "")


def freeze(img: Image) -> None:
    """An image that will not be written again: refuse writes, let qemu-img open it."""
    if isinstance(img, Qcow2Image):
        img.freeze()
    img.writable = False
    img.f.relock = None
    unlock(img.f.fd)


async def _discard(new: Image | None, path: str) -> None:
    """Undo a new overlay that never joined the chain: close it (if opened, without flushing
    what is removed next) and remove it."""
    try:
        if new is not None:
            new.backing = None
            new.writable = False
            await new.close()
    finally:
        with contextlib.suppress(OSError):  # a failing share: never hide the error that got here
            os.unlink(path)


async def _drop(img: Image) -> None:
    """Close an active image whose file was renamed over: only its descriptor goes, without
    flushing what nothing will read again."""
    img.backing = None
    img.writable = False
    await img.f.close(unlinked=True)


def _cluster_size(img: Image) -> int:
    return img.cs if isinstance(img, Qcow2Image) else 65536


async def copy_content(src: Image, dst: Image, ranges) -> None:
    """Make ``dst`` read as ``src`` over ``ranges`` (clipped to ``dst``): ``src``'s content,
    with zeros where it reads as zeros or ends (kept as zero clusters, not written out)."""
    writeback = Writeback(dst)
    for start, length in ranges:
        pos, end = start, min(start + length, dst.size)
        while pos < end:
            n = min(COPY_CHUNK, end - pos)
            k = max(0, min(n, src.size - pos))
            data = await src.read(pos, k) if k else b""
            if data.count(0) == k:  # C speed; a Python scan of 4 MiB takes 40 ms
                await dst.write_zeroes(pos, n)
            else:
                await dst.write(pos, data)
                if k < n:
                    await dst.write_zeroes(pos + k, n - k)
                await writeback.wrote(k)
            pos += n
            await checkpoint()


async def copy_own_runs(src: Image, dst: Image, ranges, on_progress) -> None:
    """Copy what ``src`` itself holds (not its backing) into ``dst`` at the same offsets."""
    if ranges is None:
        ranges = [(0, src.size)]
    total = sum(n for _, n in ranges) or 1
    done = 0
    # Into a raw file, the data clusters of a frozen image (none of them freed meanwhile)
    # are copied by the kernel, not read into the daemon and written back.
    direct = isinstance(dst, RawImage) and not src.writable
    writeback = Writeback(dst)
    for start, length in ranges:
        end = min(start + length, src.size)
        pos = start
        while pos < end:
            n = min(COPY_CHUNK, end - pos)
            for kind, off, ln, host in await own_map(src, pos, n):
                if kind == ex.UNALLOC:
                    continue
                if kind == ex.ZERO:
                    await dst.write_zeroes(off, ln)
                    continue
                if kind == ex.DATA and direct:
                    await dst.copy_in(src.f, host, off, ln)
                else:
                    await dst.write(off, await src.read(off, ln))
                await writeback.wrote(ln)
            pos += n
            done += n
            if on_progress:
                on_progress(done, total)
            await checkpoint()  # guest requests between chunks (the I/O may all be inline)


async def stream_runs(src: Image, dst: Image, gate: Gate | None, on_progress) -> None:
    """Copy ``src``'s own runs into ``dst`` wherever ``dst`` holds nothing of its own.

    With ``gate`` (``dst`` is live), each chunk is checked and written under the gate held
    exclusively, so a guest write can never land between the check and the copy."""
    size = min(src.size, dst.size)
    for pos in range(0, size, STREAM_CHUNK):
        n = min(STREAM_CHUNK, size - pos)
        runs = [r for r in await own_map(src, pos, n) if r.kind != ex.UNALLOC]
        if runs:
            data = {r.offset: await src.read(r.offset, r.length)
                    for r in runs if r.kind != ex.ZERO}
            async with gate.exclusive() if gate is not None else contextlib.nullcontext():
                holes = [(r.offset, r.length) for r in await own_map(dst, pos, n)
                         if r.kind == ex.UNALLOC]
                for r in runs:
                    for off, ln in _overlaps(r.offset, r.length, holes):
                        if r.kind == ex.ZERO:
                            await dst.write_zeroes(off, ln)
                        else:
                            skip = off - r.offset
                            await dst.write(off, memoryview(data[r.offset])[skip:skip + ln])
        if on_progress:
            on_progress(pos + n, size)
        await checkpoint()


def _overlaps(offset: int, length: int, ranges) -> list[tuple[int, int]]:
    """The parts of ``ranges`` inside ``[offset, offset + length)``."""
    out = []
    for o, n in ranges:
        start, end = max(o, offset), min(o + n, offset + length)
        if start < end:
            out.append((start, end - start))
    return out


async def own_bytes(img: Image) -> int:
    """Bytes ``img`` itself stores: what merging it in either direction must copy."""
    if isinstance(img, Qcow2Image):
        return await img.stored_bytes()
    return sum(r.length for r in await own_map(img, 0, img.size)
               if r.kind in (ex.DATA, ex.COMPRESSED))


async def own_map(img: Image, offset: int, length: int) -> list[ex.Extent]:
    """Runs of ``img`` itself; a raw image holds everything."""
    return await img.map(offset, length)


async def set_backing(img: Image, backing: Image) -> None:
    """Point ``img``'s header at another backing file (``qemu-img rebase -u``)."""
    if not isinstance(img, Qcow2Image):
        raise Corrupt(f"{img.path} is not a qcow2 overlay")
    await img.set_backing_file(os.path.basename(backing.path), backing.format)


def is_volume_file(name: str) -> bool:
    return name.startswith(PREFIX)
