"""The operations of CONTRACT.md section 3 on one share, without FUSE.

``VolumeService`` owns the open volumes and their locks.  Each operation validates its
arguments first (bad input changes nothing), takes the volume's operation lock (in process, and
a lock file on the share across processes), records its intent when it has several steps, and
is idempotent as Cinder expects.  Long merges run as background jobs holding the volume's lock,
so later operations on that volume wait for them.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
import uuid

import filelock

from snapfs.chain import catalog as cat
from snapfs.chain.catalog import Share, base_name, check_id, overlay_name
from snapfs.chain.copy import clone_image
from snapfs.chain.image import create_qcow2, create_raw, open_image
from snapfs.chain.volume import Volume
from snapfs.errors import Busy, Corrupt, Exists, Invalid, NotFound, SnapfsError
from snapfs.io import (CancelScope, Semaphore, move_on_after, open_nursery, run_blocking,
                       sleep)

log = logging.getLogger(__name__)

STATUS_WAIT = 2.0  # seconds status waits for the share before answering from memory
SPACE_INTERVAL = 30.0  # seconds between free-space checks of the share

ARGS = {
    "create-volume": ({"volume", "size"}, {"format"}),
    "delete-volume": ({"volume"}, set()),
    "extend-volume": ({"volume", "size"}, set()),
    "create-snapshot": ({"volume", "snapshot"}, set()),
    "delete-snapshot": ({"volume", "snapshot"}, set()),
    "clone": ({"volume", "source_volume"}, {"source_snapshot", "size", "format"}),
    "revert": ({"volume", "snapshot"}, set()),
    "manage": ({"volume", "source", "format"}, set()),
    "info": ({"volume"}, set()),
    "list": (set(), {"unmanaged"}),
}


def check_size(value) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise Invalid("size must be an integer number of bytes")
    if value <= 0 or value % 512:
        raise Invalid("size must be a positive multiple of 512")
    return value


def check_format(value) -> str:
    if value not in ("raw", "qcow2"):
        raise Invalid("format must be 'raw' or 'qcow2'")
    return value


class Job:
    """A background merge, shown in status with its progress."""

    def __init__(self, vid: str, what: str):
        self.vid = vid
        self.what = what
        self.done = 0
        self.total = 0
        self.started = time.time()
        self.scope = CancelScope()

    def progress(self, done: int, total: int) -> None:
        self.done, self.total = done, total

    def as_dict(self) -> dict:
        pct = 100.0 * self.done / self.total if self.total else 0.0
        return {"volume": self.vid, "job": self.what, "progress": round(pct, 1),
                "started": self.started}


class VolumeService:
    def __init__(self, root: str, *, default_format: str = "raw", file_mode: int = 0o660,
                 unrecorded_format: str | None = None, space_warn: float = 10.0):
        self.share = Share(root, file_mode=file_mode, unrecorded_format=unrecorded_format)
        self.space_warn = space_warn  # percent of the share free below which snapfs warns
        self.space: dict = {"free_bytes": 0, "total_bytes": 0, "share_state": "ok"}
        self.space_low = False
        self.default_format = check_format(default_format)
        self.volumes: dict[str, Volume] = {}
        self.locks: dict[str, Semaphore] = {}
        self.file_locks: dict[str, filelock.FileLock] = {}
        self.jobs: dict[str, Job] = {}
        self.failed: dict[str, str] = {}
        self.nursery = None

    @contextlib.asynccontextmanager
    async def running(self):
        """Run the service: recover what a crash interrupted, then serve; jobs run inside."""
        async with open_nursery() as nursery:
            self.nursery = nursery
            try:
                await self.recover()
                yield self
                await self.wait_idle()
            finally:
                nursery.cancel_scope.cancel()
                # Flushing what guests wrote must finish even though we are shutting down.
                with CancelScope(shield=True):
                    for vol in list(self.volumes.values()):
                        try:
                            await vol.close()
                        except SnapfsError as exc:
                            log.error("volume %s: closing failed: %s", vol.vid, exc.message)
                self.volumes.clear()
                for fl in self.file_locks.values():
                    fl.release(force=True)

    async def wait_idle(self) -> None:
        while self.jobs:
            await sleep(0.01)

    async def _blocking(self, what: str, fn, *args):
        return await run_blocking(False, what, fn, *args)

    # -- locking ---------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def locked(self, vid: str):
        await self._acquire(vid)
        try:
            yield
        finally:
            self._release(vid)

    async def _acquire(self, vid: str) -> None:
        sem = self.locks.setdefault(vid, Semaphore(1))
        await sem.acquire()
        try:
            fl = self.file_locks.get(vid)
            if fl is None:
                path = os.path.join(self.share.meta, "locks", f"{vid}.lock")
                fl = self.file_locks[vid] = filelock.FileLock(path, mode=0o600, thread_local=False)
            while True:
                try:
                    await self._blocking("locking", lambda: fl.acquire(timeout=0))
                    return
                except filelock.Timeout:
                    await sleep(0.05)
        except BaseException:
            sem.release()
            raise

    def _release(self, vid: str) -> None:
        self.file_locks[vid].release()
        self.locks[vid].release()

    # -- dispatch --------------------------------------------------------------------------

    async def handle(self, request) -> dict:
        """Run one control request (a decoded JSON object); returns the result or raises."""
        if not isinstance(request, dict):
            raise Invalid("a request is a JSON object")
        op = request.get("op")
        if not isinstance(op, str) or op not in ARGS:
            raise Invalid(f"unknown op {op!r}")
        required, optional = ARGS[op]
        keys = set(request) - {"op"}
        if keys - required - optional:
            raise Invalid(f"unknown argument(s) for {op}: {', '.join(sorted(keys - required - optional))}")
        if required - keys:
            raise Invalid(f"{op} needs {', '.join(sorted(required - keys))}")
        args = {k.replace("-", "_"): v for k, v in request.items() if k != "op"}
        return await getattr(self, op.replace("-", "_"))(**args)

    # -- opening volumes -------------------------------------------------------------------

    def _state(self, vid: str) -> tuple[dict | None, bool]:
        info = self.share.read_info(vid)
        exists = info is not None or self.share.exists(base_name(vid))
        return info, exists

    async def volume(self, vid: str) -> Volume:
        """The open volume (opened now if needed).  Call with the volume's lock held, or
        from I/O paths that only read ``volumes``."""
        vol = self.volumes.get(vid)
        if vol is not None:
            return vol
        info, exists = await self._blocking("reading", self._state, vid)
        if not exists:
            raise NotFound(f"no volume {vid}")
        active = info["active"] if info else base_name(vid)
        vol = Volume(self.share, vid)
        try:
            if active == base_name(vid):
                fmt = await self._blocking("reading", self.share.base_format, vid, None)
                await vol.open(active, fmt)
            else:
                await vol.open(active, "qcow2")
                base = vol.images[0]
                rec = await self._blocking("reading", self.share.read_record, vid)
                if rec is None:
                    await self._blocking("recording", self.share.base_format, vid, base.format)
                elif rec["format"] != base.format:
                    await vol.close()
                    raise Corrupt(f"volume {vid}: its overlay says the base is {base.format}, "
                                  f"snapfs recorded {rec['format']}")
            self._check_info(vid, info, vol)
        except SnapfsError as exc:
            with contextlib.suppress(SnapfsError):
                await vol.close()
            self.failed[vid] = f"cannot open: {exc.message}"
            log.error("volume %s cannot be served: %s", vid, exc.message)
            raise
        if self.failed.get(vid, "").startswith("cannot open"):
            self.failed.pop(vid)
        rec = await self._blocking("reading", self.share.read_record, vid) or {}
        created = rec.get("snapshots", {})
        vol.snap_files = {sid: name for sid, name in sorted(
            ((k, v) for k, v in (info or {}).items() if k != "active"),
            key=lambda kv: (created.get(kv[0], {}).get("created", 0), kv[0]))}
        self.volumes[vid] = vol
        return vol

    def _check_info(self, vid: str, info: dict | None, vol: Volume) -> None:
        """Every snapshot the .info names must be an overlay within the chain."""
        names = vol.names()
        for sid, name in (info or {}).items():
            if sid != "active" and (name not in names or names.index(name) < 1):
                raise Corrupt(f"volume {vid}: snapshot {sid} ({name}) is not in the chain")

    async def release(self, vid: str) -> None:
        """Close a volume nobody uses any more (no open files, no job)."""
        vol = self.volumes.get(vid)
        if vol is not None and vol.users == 0 and vid not in self.jobs:
            del self.volumes[vid]
            await vol.close()

    @contextlib.asynccontextmanager
    async def hold(self, vid: str):
        """The open volume, kept open (not released) while the caller uses it."""
        vol = await self.volume(vid)
        vol.users += 1
        try:
            yield vol
        finally:
            vol.users -= 1
            if vol.users == 0:
                await self.release(vid)

    # -- operations ------------------------------------------------------------------------

    async def create_volume(self, volume, size, format=None, *, allow_empty=False) -> dict:
        """Create an empty volume; ``allow_empty`` (size 0, sized later by truncate) is for
        files created in the mount, never for control requests."""
        vid = check_id(volume, "volume")
        size = 0 if allow_empty and size == 0 else check_size(size)
        fmt = check_format(format) if format is not None else self.default_format
        async with self.locked(vid):
            info, exists = await self._blocking("reading", self._state, vid)
            if exists:
                async with self.hold(vid) as vol:
                    if vol.size == size and vol.images[0].format == fmt:
                        return {"volume": vid, "size": size, "format": fmt}
                raise Exists(f"volume {vid} exists with a different size or format")
            rec = {"format": fmt, "snapshots": {}, "created": time.time()}
            await self._blocking("recording", self.share.write_record, vid, rec)
            tmp = os.path.join(self.share.meta, "tmp", f"{base_name(vid)}.{uuid.uuid4().hex}")
            if fmt == "raw":
                await create_raw(tmp, size, mode=self.share.file_mode)
            else:
                await create_qcow2(tmp, size, mode=self.share.file_mode)
            await self._blocking("renaming", self._rename_into, tmp, base_name(vid))
            log.info("created volume %s (%d bytes, %s)", vid, size, fmt)
            return {"volume": vid, "size": size, "format": fmt}

    def _rename_into(self, tmp: str, name: str) -> None:
        os.rename(tmp, self.share.path(name))
        self.share.sync_dir()

    async def delete_volume(self, volume) -> dict:
        vid = check_id(volume, "volume")
        info, _ = await self._blocking("reading", self._state, vid)
        if info and len(info) > 1:
            raise Busy(f"volume {vid} has snapshots")
        vol = self.volumes.get(vid)
        if vol is not None and vol.users - (vid in self.jobs) > 0:
            raise Busy(f"volume {vid} is in use")
        job = self.jobs.get(vid)
        if job is not None:
            job.scope.cancel()  # a merge of a deleted snapshot: the volume goes anyway
        async with self.locked(vid):
            info, exists = await self._blocking("reading", self._state, vid)
            if info and len(info) > 1:
                raise Busy(f"volume {vid} has snapshots")
            vol = self.volumes.get(vid)
            if vol is not None and vol.users:
                raise Busy(f"volume {vid} is in use")
            if vol is not None:
                del self.volumes[vid]
                await vol.close()
            await self._blocking("deleting", self._delete_files, vid)
            if exists:
                log.info("deleted volume %s", vid)
            return {"volume": vid}

    def _delete_files(self, vid: str) -> None:
        self.share.write_intent(vid, {"op": "delete-volume"})
        names = self.share.volume_files(vid)
        for n in sorted(names, key=lambda n: n == base_name(vid)):  # the base last
            self.share.remove(n)
        self.share.sync_dir()
        self.share.remove_record(vid)
        self.share.clear_intent(vid)
        self.failed.pop(vid, None)

    async def extend_volume(self, volume, size) -> dict:
        vid, size = check_id(volume, "volume"), check_size(size)
        async with self.locked(vid), self.hold(vid) as vol:
            if size < vol.size:
                raise Invalid(f"volume {vid} is larger ({vol.size} bytes) than {size}")
            if size > vol.size:
                await vol.resize(size)
                log.info("extended volume %s to %d bytes", vid, size)
            return {"volume": vid, "size": size}

    async def create_snapshot(self, volume, snapshot) -> dict:
        vid, sid = check_id(volume, "volume"), check_id(snapshot, "snapshot")
        async with self.locked(vid), self.hold(vid) as vol:
            info = await self._blocking("reading", self.share.read_info, vid) or {
                "active": base_name(vid)}
            if sid in info:
                return {"volume": vid, "snapshot": sid}
            name = overlay_name(vid, sid)
            if name in vol.names():
                raise Exists(f"file {name} is already in the chain of volume {vid}")
            await self._blocking("recording", self.share.write_intent, vid,
                                 {"op": "create-snapshot", "snapshot": sid, "file": name})
            await self._blocking("cleaning", self.share.remove, name)
            await vol.push_overlay(name)
            info[sid] = name
            info["active"] = name
            await self._blocking("recording", self._commit_snapshot, vid, sid, info)
            vol.snap_files[sid] = name
            log.info("created snapshot %s of volume %s", sid, vid)
            return {"volume": vid, "snapshot": sid}

    def _commit_snapshot(self, vid: str, sid: str, info: dict) -> None:
        self.share.write_info(vid, info)
        rec = self.share.read_record(vid) or {"format": "raw", "snapshots": {}}
        rec["snapshots"][sid] = {"created": time.time()}
        self.share.write_record(vid, rec)
        self.share.clear_intent(vid)

    async def delete_snapshot(self, volume, snapshot) -> dict:
        vid, sid = check_id(volume, "volume"), check_id(snapshot, "snapshot")
        await self._acquire(vid)
        handed_over = False
        try:
            info, exists = await self._blocking("reading", self._state, vid)
            if not info or sid not in info:
                return {"volume": vid, "snapshot": sid}
            vol = await self.volume(vid)
            name = info[sid]
            intent = {"op": "merge", "snapshot": sid, "file": name}
            del info[sid]
            await self._blocking("recording", self._forget_snapshot, vid, sid, info, intent)
            vol.snap_files.pop(sid, None)
            log.info("deleted snapshot %s of volume %s; merging %s", sid, vid, name)
            self._start_merge(vid, vol, name)
            handed_over = True
            return {"volume": vid, "snapshot": sid}
        finally:
            if not handed_over:
                self._release(vid)

    def _forget_snapshot(self, vid: str, sid: str, info: dict, intent: dict) -> None:
        self.share.write_intent(vid, intent)
        self.share.write_info(vid, info)
        rec = self.share.read_record(vid)
        if rec is not None and sid in rec["snapshots"]:
            del rec["snapshots"][sid]
            self.share.write_record(vid, rec)

    def _start_merge(self, vid: str, vol: Volume, name: str) -> None:
        job = Job(vid, f"merging {name}")
        self.jobs[vid] = job
        vol.users += 1
        self.nursery.start_soon(self._merge_job, job, vol, name)

    async def _merge_job(self, job: Job, vol: Volume, name: str) -> None:
        vid = job.vid
        try:
            with job.scope:
                await self._merge(vol, name, job.progress)
        except SnapfsError as exc:
            self.failed[vid] = f"merge of {name} failed: {exc.message}"
            log.error("volume %s: merge of %s failed: %s", vid, name, exc.message)
        finally:
            del self.jobs[vid]
            vol.users -= 1
            self._release(vid)
            if vol.users == 0 and self.volumes.get(vid) is vol:
                with contextlib.suppress(SnapfsError):
                    await self.release(vid)

    async def _merge(self, vol: Volume, name: str, progress) -> None:
        vid = vol.vid
        if name in vol.names():
            names = vol.names()
            was_active = names[-1] == name
            i = names.index(name)
            up = await vol.merge_direction(name) == "up"
            intent = await self._blocking("reading", self.share.read_intent, vid) or {}
            intent = {"op": "merge", "snapshot": intent.get("snapshot"), "file": name}
            if up:
                # Renaming steps follow: recovery needs to know which files they touch.
                intent["into"] = names[i - 1]
                intent["child"] = names[i + 1] if i + 1 < len(names) else None
            await self._blocking("recording", self.share.write_intent, vid, intent)
            if up:
                log.info("volume %s: merging %s by streaming %s up", vid, name, names[i - 1])
                await vol.stream_up(name, progress)
            else:
                log.info("volume %s: merging %s down into %s", vid, name, names[i - 1])
                await vol.commit_down(name, progress)
            if was_active:
                info = await self._blocking("reading", self.share.read_info, vid) or {}
                info["active"] = vol.names()[-1]
                await self._blocking("recording", self.share.write_info, vid, info)
        await self._blocking("cleaning", self._finish_merge, vid, name)
        if self.failed.get(vid, "").startswith(("merge of", "recovery failed")):
            del self.failed[vid]
        log.info("volume %s: merge of %s finished", vid, name)

    def _finish_merge(self, vid: str, name: str) -> None:
        self.share.remove(name)
        self.share.sync_dir()
        self.share.clear_intent(vid)

    async def clone(self, volume, source_volume, source_snapshot=None, size=None,
                    format=None) -> dict:
        vid = check_id(volume, "volume")
        src = check_id(source_volume, "source_volume")
        sid = check_id(source_snapshot, "source_snapshot") if source_snapshot is not None else None
        size = check_size(size) if size is not None else None
        fmt = check_format(format) if format is not None else self.default_format
        if vid == src:
            raise Invalid("a volume cannot be cloned onto itself")
        first, second = sorted((vid, src))
        async with self.locked(first), self.locked(second):
            _, exists = await self._blocking("reading", self._state, vid)
            if exists:
                raise Exists(f"volume {vid} already exists")
            async with self.hold(src) as vol:
                tmp_sid = None
                if sid is None and vol.users > 1:
                    # Live source: copy from a temporary snapshot, as Cinder's tmp-snap does.
                    tmp_sid = f"tmp-snap-{uuid.uuid4()}"
                    await self._snapshot_locked(vol, tmp_sid)
                    await self._blocking("recording", self.share.write_intent, src,
                                         {"op": "clone", "volume": vid, "tmp_snapshot": tmp_sid})
                try:
                    use = sid or tmp_sid
                    if use is not None:
                        info = await self._blocking("reading", self.share.read_info, src) or {}
                        if use not in info:
                            raise NotFound(f"volume {src} has no snapshot {use}")
                        source = vol.below(info[use])
                    else:
                        source = vol.top
                    if size is not None and size < source.size:
                        raise Invalid(f"size {size} is smaller than the source ({source.size})")
                    await self._clone_into(vid, source, size or source.size, fmt)
                finally:
                    if tmp_sid is not None:
                        await self._drop_snapshot_locked(vol, tmp_sid)
            log.info("cloned volume %s from %s%s", vid, src, f" snapshot {sid}" if sid else "")
            return {"volume": vid, "size": size or source.size, "format": fmt}

    async def _clone_into(self, vid: str, source, size: int, fmt: str) -> None:
        rec = {"format": fmt, "snapshots": {}, "created": time.time()}
        await self._blocking("recording", self.share.write_record, vid, rec)
        tmp = os.path.join(self.share.meta, "tmp", f"{base_name(vid)}.{uuid.uuid4().hex}")
        try:
            await clone_image(source, tmp, size, fmt, self.share.file_mode)
            await self._blocking("renaming", self._rename_into, tmp, base_name(vid))
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            self.share.remove_record(vid)
            raise

    async def _snapshot_locked(self, vol: Volume, sid: str) -> None:
        info = await self._blocking("reading", self.share.read_info, vol.vid) or {
            "active": base_name(vol.vid)}
        name = overlay_name(vol.vid, sid)
        await self._blocking("recording", self.share.write_intent, vol.vid,
                             {"op": "create-snapshot", "snapshot": sid, "file": name})
        await vol.push_overlay(name)
        info[sid] = name
        info["active"] = name
        await self._blocking("recording", self._commit_snapshot, vol.vid, sid, info)
        vol.snap_files[sid] = name

    async def _drop_snapshot_locked(self, vol: Volume, sid: str) -> None:
        info = await self._blocking("reading", self.share.read_info, vol.vid) or {}
        if sid not in info:
            return
        name = info.pop(sid)
        await self._blocking("recording", self._forget_snapshot, vol.vid, sid, info,
                             {"op": "merge", "snapshot": sid, "file": name})
        vol.snap_files.pop(sid, None)
        await self._merge(vol, name, None)

    async def revert(self, volume, snapshot) -> dict:
        vid, sid = check_id(volume, "volume"), check_id(snapshot, "snapshot")
        async with self.locked(vid), self.hold(vid) as vol:
            info = await self._blocking("reading", self.share.read_info, vid) or {}
            if sid not in info:
                raise NotFound(f"volume {vid} has no snapshot {sid}")
            await self._blocking("recording", self.share.write_intent, vid,
                                 {"op": "revert", "snapshot": sid})
            await self._revert(vol, info[sid])
            await self._blocking("recording", self.share.clear_intent, vid)
            log.info("reverted volume %s to snapshot %s", vid, sid)
            return {"volume": vid, "snapshot": sid}

    async def _revert(self, vol: Volume, name: str) -> None:
        target = vol.below(name)
        names = vol.names()
        changed = vol.images[names.index(name):]
        async with vol.gate.exclusive():
            top = vol.top
            ranges: list[tuple[int, int]] = []
            for img in changed:
                for kind, off, n, _ in await img.map(0, img.size):
                    if kind != 2:
                        ranges.append((off, n))
            for off, n in _union(ranges):
                end = min(off + n, top.size)
                pos = off
                while pos < end:
                    ln = min(4 << 20, end - pos)
                    if pos >= target.size:
                        await top.write_zeroes(pos, ln)
                    else:
                        k = min(ln, target.size - pos)
                        data = await target.read(pos, k)
                        if not any(data):
                            await top.write_zeroes(pos, k)
                        else:
                            await top.write(pos, data)
                        if k < ln:
                            await top.write_zeroes(pos + k, ln - k)
                    pos += ln
            await top.flush()

    async def manage(self, volume, source, format) -> dict:
        vid, fmt = check_id(volume, "volume"), check_format(format)
        if (not isinstance(source, str) or not source or "/" in source or "\0" in source
                or source.startswith(".") or source.startswith(cat.PREFIX)):
            raise Invalid(f"{source!r} is not the name of an unmanaged file on the share")
        async with self.locked(vid):
            _, exists = await self._blocking("reading", self._state, vid)
            if exists:
                raise Exists(f"volume {vid} already exists")
            path = self.share.path(source)
            if not os.path.isfile(path) or os.path.islink(path):
                raise NotFound(f"no file {source} on the share")
            if fmt == "qcow2":
                img = await open_image(path, "qcow2")
                try:
                    if img.backing_name:
                        raise Invalid(f"{source} has a backing file ({img.backing_name})")
                finally:
                    await img.close()
            rec = {"format": fmt, "snapshots": {}, "managed": time.time()}
            await self._blocking("recording", self.share.write_record, vid, rec)
            await self._blocking("renaming", self._rename_into, path, base_name(vid))
            log.info("managing %s as volume %s (%s)", source, vid, fmt)
            return {"volume": vid}

    async def info(self, volume) -> dict:
        vid = check_id(volume, "volume")
        if vid in self.failed and vid not in self.volumes:
            _, exists = await self._blocking("reading", self._state, vid)
            if not exists:
                raise NotFound(f"no volume {vid}")
            # The volume cannot be opened: the contract's keys all the same, with what is known.
            return {"volume": vid, "size": 0, "base_format": None, "active": None,
                    "files": [], "snapshots": [], "allocated": 0, "state": "failed",
                    "reason": self.failed[vid]}
        async with self.hold(vid) as vol:
            info = await self._blocking("reading", self.share.read_info, vid) or {
                "active": base_name(vid)}
            rec = await self._blocking("reading", self.share.read_record, vid) or {}
            files, total = [], 0
            for img in vol.images:
                alloc = await img.allocated()
                total += alloc
                files.append({"name": os.path.basename(img.path), "format": img.format,
                              "virtual_size": img.size, "allocated": alloc})
            snaps = []
            for sid, name in info.items():
                if sid == "active":
                    continue
                created = rec.get("snapshots", {}).get(sid, {}).get("created")
                snaps.append({"id": sid, "size": vol.below(name).size,
                              "created": created if created is not None else rec.get("adopted")})
            failed = self.failed.get(vid)
            return {"volume": vid, "size": vol.size, "base_format": vol.images[0].format,
                    "active": vol.names()[-1], "files": files, "snapshots": snaps,
                    "allocated": total, "state": "failed" if failed else "ok",
                    "reason": failed or ""}

    async def list(self, unmanaged=False) -> dict:
        if not isinstance(unmanaged, bool):
            raise Invalid("unmanaged must be true or false")
        if not unmanaged:
            return {"volumes": await self._blocking("listing", self.share.volume_ids)}
        return {"unmanaged": await self._blocking("listing", self._unmanaged)}

    def _unmanaged(self) -> list[dict]:
        out = []
        for n in self.share.listdir():
            if n.startswith(".") or n.startswith(cat.PREFIX):
                continue
            p = self.share.path(n)
            if os.path.isfile(p) and not os.path.islink(p):
                out.append({"name": n, "size": os.path.getsize(p)})
        return out

    # -- what the mount shows --------------------------------------------------------------

    async def exists(self, vid: str) -> bool:
        if vid in self.volumes:
            return True
        _, exists = await self._blocking("reading", self._state, vid)
        return exists

    async def volume_attrs(self, vid: str) -> dict:
        """Owner and mode the mount shows for a volume (kept in snapfs's record)."""
        vol = self.volumes.get(vid)
        if vol is not None and vol.attrs is not None:
            return vol.attrs
        rec = await self._blocking("reading", self.share.read_record, vid) or {}
        attrs = rec.get("attrs", {})
        if vol is not None:
            vol.attrs = attrs
        return attrs

    async def set_volume_attrs(self, vid: str, changes: dict) -> None:
        async with self.locked(vid):
            rec = await self._blocking("reading", self.share.read_record, vid)
            if rec is None:
                raise NotFound(f"no volume {vid}")
            rec.setdefault("attrs", {}).update(changes)
            await self._blocking("recording", self.share.write_record, vid, rec)
            vol = self.volumes.get(vid)
            if vol is not None:
                vol.attrs = rec["attrs"]

    async def snapshot_created(self, vid: str, sid: str) -> float:
        rec = await self._blocking("reading", self.share.read_record, vid) or {}
        created = rec.get("snapshots", {}).get(sid, {}).get("created")
        return created if created is not None else rec.get("adopted", rec.get("created", 0.0))

    async def volume_status(self, vid: str) -> dict:
        try:
            vol = await self.volume(vid)
            allocated = 0
            for img in vol.images:
                allocated += await img.allocated()
            vol.allocated = allocated
            failed = self.failed.get(vid) or vol.fault_reason()
            return {"volume": vid, "provisioned": vol.size, "allocated": allocated,
                    "state": "failed" if failed else "ok", "reason": failed or ""}
        except SnapfsError as exc:
            return {"volume": vid, "provisioned": 0, "allocated": 0, "state": "failed",
                    "reason": exc.message}

    def _known_status(self, vid: str) -> dict:
        """A volume's status from memory, for when the share does not answer."""
        vol = self.volumes.get(vid)
        reason = self.failed.get(vid) or (vol.fault_reason() if vol else None)
        return {"volume": vid, "provisioned": vol.size if vol and vol.images else 0,
                "allocated": vol.allocated if vol else 0, "state": "failed" if reason else "ok",
                "reason": reason or "the share did not answer in time"}

    async def status(self) -> dict:
        """What ``.snapfs/status`` shows.  Answers within seconds even when the share hangs:
        what the share does not tell in time comes from memory."""
        vids = sorted(self.volumes)
        vols: list[dict] = []
        with move_on_after(STATUS_WAIT) as waited:  # one deadline for everything
            await self.check_space()
            vids = (await self.list())["volumes"]
            for vid in vids:
                vols.append(await self.volume_status(vid))
        if waited.cancelled_caught:
            self.space["share_state"] = f"not answering within {STATUS_WAIT:g} s"
        vols += [self._known_status(vid) for vid in vids[len(vols):]]
        return {"share": self.share.root, **self.space,
                "provisioned_bytes": sum(v["provisioned"] for v in vols),
                "allocated_bytes": sum(v["allocated"] for v in vols),
                "volumes": vols, "jobs": [j.as_dict() for j in self.jobs.values()]}

    async def check_space(self) -> None:
        """Read the share's free space; warn once when it drops below ``space_warn`` percent."""
        try:
            st = await self._blocking("statvfs", os.statvfs, self.share.root)
        except SnapfsError as exc:
            if self.space.get("share_state") == "ok":
                log.error("share %s: %s", self.share.root, exc.message)
            self.space["share_state"] = f"not answering: {exc.message}"
            return
        if self.space.get("share_state", "ok") != "ok":
            log.info("share %s answers again", self.share.root)
        free, total = st.f_bavail * st.f_frsize, st.f_blocks * st.f_frsize
        self.space = {"free_bytes": free, "total_bytes": total, "share_state": "ok"}
        low = total > 0 and free * 100 < total * self.space_warn
        if low and not self.space_low:
            log.warning("share %s: only %d MiB free (%.1f%%), below the %g%% warning threshold",
                        self.share.root, free >> 20, free * 100 / total, self.space_warn)
        elif self.space_low and not low:
            log.info("share %s: free space is above %g%% again", self.share.root,
                     self.space_warn)
        self.space_low = low

    async def watch_space(self, interval: float = SPACE_INTERVAL) -> None:
        while True:
            with move_on_after(interval):
                await self.check_space()
            await sleep(interval)

    # -- recovery --------------------------------------------------------------------------

    async def recover(self) -> None:
        """Finish or roll back what a crash interrupted (intents), drop temporary files and
        records of volumes whose creation never completed."""
        await self._blocking("cleaning", self.share.clean_tmp)
        await self._blocking("cleaning", self._drop_orphan_records)
        for vid in await self._blocking("listing", self.share.intents):
            try:
                await self._recover_volume(vid)
            except SnapfsError as exc:
                self.failed[vid] = f"recovery failed: {exc.message}"
                log.error("volume %s: recovery failed: %s", vid, exc.message)

    def _drop_orphan_records(self) -> None:
        pending = set(self.share.intents())
        for vid in self.share.record_ids():
            if vid not in pending and not self.share.exists(base_name(vid)):
                log.info("dropping the record of volume %s, whose creation never completed", vid)
                self.share.remove_record(vid)

    async def _recover_volume(self, vid: str) -> None:
        intent = await self._blocking("reading", self.share.read_intent, vid)
        if not intent:
            return
        op = intent.get("op")
        log.info("volume %s: recovering interrupted %s", vid, op)
        if op == "delete-volume":
            await self._blocking("deleting", self._delete_files, vid)
            return
        if op == "create-snapshot":
            info = await self._blocking("reading", self.share.read_info, vid) or {}
            if intent.get("snapshot") not in info:
                await self._blocking("cleaning", self.share.remove, intent["file"])
            await self._blocking("cleaning", self.share.clear_intent, vid)
            return
        if op in ("merge", "clone"):
            # The request may have died before the snapshot left the .info: finish that first.
            sid = intent.get("snapshot") or intent.get("tmp_snapshot")
            info = await self._blocking("reading", self.share.read_info, vid) or {}
            if sid in info:
                name = info.pop(sid)
                await self._blocking("recording", self._forget_snapshot, vid, sid, info,
                                     {"op": "merge", "snapshot": sid, "file": name})
                intent = {"op": "merge", "snapshot": sid, "file": name}
                op = "merge"
            elif op == "clone":
                await self._blocking("cleaning", self.share.clear_intent, vid)
                return
        if op == "merge" and intent.get("into") and await self._settle_stream_up(vid, intent):
            return
        await self._acquire(vid)
        try:
            vol = await self.volume(vid)
            if op == "merge":
                await self._merge(vol, intent["file"], None)
            elif op == "revert":
                info = await self._blocking("reading", self.share.read_info, vid) or {}
                if intent.get("snapshot") in info:
                    await self._revert(vol, info[intent["snapshot"]])
                await self._blocking("cleaning", self.share.clear_intent, vid)
            else:
                raise Corrupt(f"unknown intent {op!r}")
        finally:
            self._release(vid)
            await self.release(vid)

    async def _settle_stream_up(self, vid: str, intent: dict) -> bool:
        """Finish the renaming steps of an interrupted stream-up merge, before the chain is
        opened (it may name a file that is already renamed).  True when the merge is done;
        False when it had not switched yet and must run again."""
        upper, lower, child = intent["file"], intent["into"], intent.get("child")
        if await self._blocking("reading", self.share.exists, upper):
            if await _backing_of(self.share.path(upper)) == lower:
                return False
            await self._blocking("renaming", self.share.replace, upper, lower)
        if child and await self._blocking("reading", self.share.exists, child):
            img = await open_image(self.share.path(child), "qcow2")
            try:
                if img.h.backing_file == upper:  # renamed, but the child not yet re-pointed
                    await img.set_backing_file(lower, "qcow2")
            finally:
                await img.close()
        info = await self._blocking("reading", self.share.read_info, vid)
        if info and info.get("active") == upper:
            info["active"] = lower
            await self._blocking("recording", self.share.write_info, vid, info)
        await self._blocking("cleaning", self.share.clear_intent, vid)
        log.info("volume %s: finished the interrupted merge of %s into %s", vid, upper, lower)
        return True


async def _backing_of(path: str) -> str | None:
    img = await open_image(path, "qcow2")
    try:
        return img.h.backing_file
    finally:
        await img.close()


def _union(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for off, n in sorted(ranges):
        if out and off <= out[-1][0] + out[-1][1]:
            o, m = out[-1]
            out[-1] = (o, max(o + m, off + n) - o)
        else:
            out.append((off, n))
    return out

