"""The operations of CONTRACT.md section 3 on one share, without FUSE.

``VolumeService`` owns the open volumes and their locks.  Each operation validates its
arguments first (bad input changes nothing), takes the volume's operation lock, records its
intent when it has several steps, and is idempotent as Cinder expects.  Long merges run as
background jobs holding the volume's lock, so later operations on that volume wait for them.

Many daemons (one per host) may serve one share.  The volume's lock is then also its lease
(``snapfs.chain.leases``): only the daemon owning a volume changes its chain or writes its
active image.  A request for a volume another daemon owns goes to that daemon through its
inbox on the share (``snapfs.chain.mailbox``) and the reply comes back the same way; a guest
write on a volume owned elsewhere asks the owner to hand it over (it flushes everything and
lets go) and takes the lease.  Taking over a lease whose holder died first finishes what the
dead daemon's intent records, as after a crash.  The others follow: they read the chain
read-only and read it again when the volume's change counter moves.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import time
import uuid

from snapfs.chain import catalog as cat
from snapfs.chain import extent as ex
from snapfs.chain.catalog import Share, base_name, check_id, overlay_name
from snapfs.chain.copy import clone_image
from snapfs.chain.image import create_qcow2, create_raw, open_image
from snapfs.chain.leases import Leases, default_host_id, host_running
from snapfs.chain.mailbox import Inbox
from snapfs.chain.volume import Volume, copy_content
from snapfs.errors import (Busy, Corrupt, Exists, Invalid, Moved, NotFound, NotOwner,
                           ShareIOError, SnapfsError, from_reply)
from snapfs.io import (CancelScope, Semaphore, WouldBlock, checkpoint, current_task,
                       move_on_after, open_nursery, run_blocking, sleep)

log = logging.getLogger(__name__)

STATUS_WAIT = 2.0  # seconds status waits for the share before answering from memory
SPACE_INTERVAL = 30.0  # seconds between free-space checks of the share
REFRESH = 1.0  # seconds between looks at the share's change counter (what others changed)
INBOX_POLL = 0.1  # seconds between looks into this daemon's inbox
CLAIM_WAIT = 10.0  # seconds a request waits for the owning daemon to take it up
OWNER_WAIT = 120.0  # seconds a write waits for a volume's lease (above NFSv4's 90 s lease)
FENCED = "volume lost its lease"  # the start of the reason a fenced volume shows
LEASE_IDLE = 60.0  # seconds a lease is kept for a volume nobody here uses
FOLLOW_TRIES = 5  # a follower's tries at a consistent view of a chain its owner changes
HANDOVER_RECHECK = 0.25  # seconds between looks whether a handover request was answered
REVERT_SUFFIX = ".reverting"  # the new active overlay's name while a revert fills it
REVERT_MAP_SPAN = 1 << 30  # guest bytes of a frozen image mapped between two checkpoints
MOVES = 5  # times a request follows a volume whose ownership keeps moving

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
# Requests daemons send each other, never accepted from a control file.
INTERNAL = {
    "handover": ({"volume"}, set()),
    "set-attrs": ({"volume", "changes"}, set()),
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
                 unrecorded_format: str | None = None, space_warn: float = 10.0,
                 host_id: str | None = None, leases: Leases | None = None,
                 mountpoint: str | None = None, offline: bool = False,
                 owner_timeout: float = CLAIM_WAIT):
        self.host_id = leases.host if leases else (host_id or default_host_id())
        self.share = Share(root, file_mode=file_mode, unrecorded_format=unrecorded_format,
                           host=self.host_id)
        self.leases = leases or Leases(self.share.meta, self.host_id, mountpoint)
        self.inbox = Inbox(self.share.meta, self.host_id)
        self.space_warn = space_warn  # percent of the share free below which snapfs warns
        self.space: dict = {"free_bytes": 0, "total_bytes": 0, "share_state": "ok"}
        self.space_low = False
        self.default_format = check_format(default_format)
        self.volumes: dict[str, Volume] = {}
        self.locks: dict[str, Semaphore] = {}
        self.holders: dict[str, object] = {}  # the task holding each volume's lock
        self.jobs: dict[str, Job] = {}
        self.used: dict[str, float] = {}  # when each volume's lock was last let go
        self.handing_over: set[str] = set()  # volumes another daemon is taking over
        self.resuming: set[str] = set()  # volumes whose unfinished merge is about to go on
        self.failed: dict[str, str] = {}
        self.nursery = None
        self.seen_gen = -1  # the share's change counter when this daemon last looked
        self.on_change = None  # async callback(vids) after others changed volumes (the mount)
        self.offline = offline  # a tool reading the share: follows every volume, owns none
        self.owner_timeout = owner_timeout  # seconds a request waits for its owner to take it

    @contextlib.asynccontextmanager
    async def running(self, refresh: float = REFRESH):
        """Run the service: recover what a crash interrupted, then serve; jobs run inside."""
        if not self.leases.me.held and not await self._blocking("locking",
                                                                 self.leases.hold_host):
            raise Busy(f"share {self.share.root} is already served by a snapfs daemon with "
                       f"host id {self.host_id}")
        n = await self._blocking("reading", self.inbox.abandon_claimed,
                                 f"the snapfs daemon of host {self.host_id} restarted while "
                                 "carrying out the request")
        if n:
            log.warning("answered %d request(s) a previous run of this daemon left unfinished", n)
        async with open_nursery() as nursery:
            self.nursery = nursery
            try:
                await self.recover()
                nursery.start_soon(self.serve_inbox)
                nursery.start_soon(self.watch_share, refresh)
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
                self.leases.close()
                self.inbox.close()

    async def wait_idle(self) -> None:
        while self.jobs or self.resuming:
            await sleep(0.01)

    async def _blocking(self, what: str, fn, *args):
        return await run_blocking(False, what, fn, *args)

    # -- locking and ownership -------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def locked(self, vid: str, take_over: bool = False):
        await self._acquire(vid, take_over)
        try:
            yield
        finally:
            self._release(vid)

    async def _acquire(self, vid: str, take_over: bool = False) -> None:
        """The volume's operation lock, in this daemon and on the share (its lease).

        A volume another live daemon owns raises Moved, or with ``take_over`` (a guest write
        here) asks that daemon to hand it over and waits for the lease."""
        sem = self.locks.setdefault(vid, Semaphore(1))
        await sem.acquire()
        self.holders[vid] = current_task()
        try:
            await self._own(vid, take_over)
        except BaseException:
            self.holders.pop(vid, None)
            sem.release()
            raise

    def _release(self, vid: str) -> None:
        """Let other tasks at the volume; its lease stays until another daemon asks for it
        (``hand_over``), so that this daemon need not take it again for the next request."""
        self.holders.pop(vid, None)
        self.locks[vid].release()
        self.used[vid] = time.monotonic()

    async def _own(self, vid: str, take_over: bool) -> None:
        if self.leases.owns(vid):
            return
        deadline = time.monotonic() + OWNER_WAIT
        asked = None  # (host, its inbox, request id, when we last looked for its answer)
        try:
            while True:
                if await self._blocking("locking", self.leases.try_own, vid):
                    break
                host = await self._blocking("locking", self.leases.owner, vid)
                if host is None:
                    continue  # let go between the two looks: try again
                if not take_over:
                    raise Moved(vid, host)
                asked = await self._ask_handover(vid, host, asked)
                if time.monotonic() > deadline:
                    raise ShareIOError(f"volume {vid} is owned by host {host}, which did not "
                                       f"hand it over within {OWNER_WAIT:g} s")
                await sleep(0.02)
        finally:
            if asked is not None:
                with CancelScope(shield=True), contextlib.suppress(SnapfsError):
                    await self._blocking("sending", asked[1].forget, asked[2])
                asked[1].close()
        log.info("volume %s: this daemon (host %s) owns it now", vid, self.host_id)
        if self.failed.get(vid, "").startswith(FENCED):
            del self.failed[vid]
        try:
            await self._took_over(vid)
        except BaseException:
            with CancelScope(shield=True):
                await self._disown(vid)
            raise

    async def _ask_handover(self, vid: str, host: str, asked):
        """Ask ``host`` to hand ``vid`` over: again when the owner changed, or when it
        answered but took the volume back before we could take the lock."""
        if asked is not None:
            if asked[0] == host:
                if time.monotonic() - asked[3] < HANDOVER_RECHECK:
                    return asked
                asked = (*asked[:3], time.monotonic())
                reply = await self._blocking("reading", asked[1].collect, asked[2])
                if reply is None:
                    return asked  # not answered yet
                if not reply.get("ok"):
                    raise from_reply(reply.get("errno", "EIO"),
                                     f"host {host} could not hand volume {vid} over: "
                                     f"{reply.get('message')}")
            else:
                with contextlib.suppress(SnapfsError):
                    await self._blocking("sending", asked[1].forget, asked[2])
            asked[1].close()
        log.info("volume %s: asking host %s to hand it over", vid, host)
        inbox = Inbox(self.share.meta, host)
        with CancelScope(shield=True):  # a request posted is a request we can withdraw
            rid = await self._blocking("sending", inbox.post, self.host_id,
                                       {"op": "handover", "volume": vid})
        return (host, inbox, rid, time.monotonic())

    async def _disown(self, vid: str) -> None:
        """Drop a volume's lease (closing its file may wait on the share: not on the loop)."""
        lease = self.leases.disown(vid)
        if lease is not None:
            await self._blocking("unlocking", lease.close)

    async def _took_over(self, vid: str) -> None:
        """Just after taking a volume's lease: finish what its last owner left (a crash, or
        a merge paused by a handover), and stop following the volume if it is open here."""
        intent = await self._blocking("reading", self.share.read_intent, vid)
        if intent and intent.get("op") == "merge" and intent.get("into"):
            # The renaming steps of a stream-up first: the chain may name a renamed file.
            if await self._settle_stream_up(vid, intent):
                await self._changed(vid)
                intent = None
        vol = self.volumes.get(vid)
        if vol is not None and not vol.writable and (intent or {}).get("op") != "delete-volume":
            try:
                await self._reload(vol, writable=True)
            except SnapfsError as exc:
                log.warning("volume %s: reopening it to write failed: %s", vid, exc.message)
        if intent:
            await self._recover_intent(vid, intent)

    async def writable(self, vid: str) -> Volume:
        """The open volume, owned by this daemon so that a guest may write it."""
        vol = await self.volume(vid)
        if vol.writable:
            return vol
        await self._acquire(vid, take_over=True)
        try:
            vol = await self.volume(vid)
            if not vol.writable:
                await self._reload(vol, writable=True)
            return vol
        finally:
            self._release(vid)

    async def guest_write(self, vid: str, offset: int, data) -> None:
        """A guest write: taken over from the owning daemon first if that is another one."""
        for _ in range(MOVES):
            vol = await self.writable(vid)
            try:
                return await vol.write(offset, data)
            except NotOwner:
                continue  # handed over again between the two steps
        raise ShareIOError(f"volume {vid} keeps moving between hosts; write not done")

    async def hand_over(self, volume, sender: str = "?") -> dict:
        """Let another daemon own ``volume``: pause its merge (the next owner resumes it),
        flush every acknowledged write, follow the volume from now on, drop the lease."""
        vid = check_id(volume, "volume")
        sem = self.locks.setdefault(vid, Semaphore(1))
        self.handing_over.add(vid)  # no merge starts meanwhile (_start_merge)
        try:
            while True:  # a job may hold the lock, or get it next: pause them as they come
                job = self.jobs.get(vid)
                if job is not None and not job.scope.cancel_called:
                    log.info("volume %s: pausing the %s for host %s", vid, job.what, sender)
                    job.scope.cancel()
                try:
                    sem.acquire_nowait()
                    break
                except WouldBlock:
                    await sleep(0.01)
        finally:
            self.handing_over.discard(vid)
        self.holders[vid] = current_task()
        try:
            if not self.leases.owns(vid):
                return {"volume": vid}
            vol = self.volumes.get(vid)
            if vol is not None:
                if vol.users:
                    await self._reload(vol, writable=False)
                else:
                    del self.volumes[vid]
                    await vol.close()
            await self._disown(vid)
            log.info("volume %s: handed over to host %s", vid, sender)
            return {"volume": vid}
        finally:
            self._release(vid)

    async def _changed(self, vid: str | None) -> None:
        """Tell the other daemons that ``vid`` (or the set of volumes) changed."""
        try:
            # seen_gen stays: another daemon's change may lie between it and ours.
            await self._blocking("recording", self.leases.changed, vid)
        except SnapfsError as exc:
            log.error("share %s: recording a change failed: %s", self.share.root, exc.message)
        vol = self.volumes.get(vid) if vid else None
        if vol is not None:
            vol.gen += 1

    # -- dispatch --------------------------------------------------------------------------

    async def handle(self, request, *, forwarded: bool = False, internal: bool = False,
                     sender: str = "?") -> dict:
        """Run one control request (a decoded JSON object); returns the result or raises.

        A request for a volume another daemon owns is carried out by that daemon.  Internal
        ops come from this daemon's mount (``internal``) or another daemon (``forwarded``)."""
        if not isinstance(request, dict):
            raise Invalid("a request is a JSON object")
        op = request.get("op")
        table = {**ARGS, **INTERNAL} if forwarded or internal else ARGS
        if not isinstance(op, str) or op not in table:
            raise Invalid(f"unknown op {op!r}")
        required, optional = table[op]
        keys = set(request) - {"op"}
        if keys - required - optional:
            raise Invalid(f"unknown argument(s) for {op}: {', '.join(sorted(keys - required - optional))}")
        if required - keys:
            raise Invalid(f"{op} needs {', '.join(sorted(required - keys))}")
        args = {k.replace("-", "_"): v for k, v in request.items() if k != "op"}
        if op == "handover":
            return await self.hand_over(sender=sender, **args)
        fn = getattr(self, op.replace("-", "_"))
        for _ in range(MOVES):
            try:
                return await fn(**args)
            except Moved as moved:
                if forwarded:
                    raise
                try:
                    return await self._forward(moved.host, request)
                except Moved:
                    continue  # it moved on again: look again where it is
        raise ShareIOError(f"the owner of the volume kept changing; {op} not done")

    async def _forward(self, host: str, request: dict) -> dict:
        """Have the daemon of ``host`` carry out ``request``; its result, or its error."""
        inbox = Inbox(self.share.meta, host)
        try:
            with CancelScope(shield=True):  # a request posted is a request we can withdraw
                rid = await self._blocking("sending", inbox.post, self.host_id, request)
            log.info("%s for volume %s: sent to host %s, which owns it", request.get("op"),
                     request.get("volume"), host)
            posted = time.monotonic()
            while True:
                await sleep(INBOX_POLL / 2)
                with CancelScope(shield=True):
                    reply = await self._blocking("reading", inbox.collect, rid)
                if reply is not None:
                    break
                if time.monotonic() - posted < self.owner_timeout:
                    continue
                entry = await self._blocking("reading", inbox.entry, rid)
                if entry is None:
                    raise ShareIOError(f"host {host} lost the request")
                if entry.get("state") == "new":
                    if await self._blocking("sending", inbox.withdraw, rid):
                        raise ShareIOError(
                            f"host {host} owns volume {request.get('volume')} and did not "
                            f"answer within {self.owner_timeout:g} s; nothing was changed")
                elif not await self._blocking("reading", self._host_alive, host):
                    await self._blocking("sending", inbox.forget, rid)
                    raise ShareIOError(
                        f"host {host} stopped while carrying out the request; the next owner "
                        "of the volume finishes or rolls back what it began")
        finally:
            inbox.close()
        if reply.get("ok"):
            return reply.get("result") or {}
        if reply.get("moved"):
            raise Moved(str(request.get("volume")), reply["moved"])
        raise from_reply(reply.get("errno", "EIO"), reply.get("message") or "failed")

    def _host_alive(self, host: str) -> bool:
        return host_running(self.share.meta, host)

    async def serve_inbox(self) -> None:
        """Carry out what other daemons ask of this one."""
        while True:
            with move_on_after(10):
                try:
                    for rid, sender, request in await self._blocking("reading",
                                                                     self.inbox.claim):
                        self.nursery.start_soon(self._serve_request, rid, sender, request)
                except SnapfsError as exc:
                    log.warning("reading the inbox of host %s failed: %s", self.host_id,
                                exc.message)
                except Exception:  # noqa: BLE001 -- a damaged inbox must not stop the daemon
                    log.exception("reading the inbox of host %s failed", self.host_id)
            await sleep(INBOX_POLL)

    async def _serve_request(self, rid: str, sender: str, request) -> None:
        op = request.get("op") if isinstance(request, dict) else None
        try:
            result = await self.handle(request, forwarded=True, sender=sender)
            reply = {"ok": True, "op": op, "result": result}
        except Moved as moved:
            reply = {"ok": False, "op": op, "moved": moved.host, "errno": "EIO",
                     "message": moved.message}
        except SnapfsError as exc:
            reply = {"ok": False, "op": op, "errno": exc.errno_name, "message": exc.message}
        except Exception as exc:  # noqa: BLE001 -- another host's request never stops this one
            log.exception("carrying out %s for host %s failed", op, sender)
            reply = {"ok": False, "op": op, "errno": "EIO",
                     "message": f"{type(exc).__name__}: {exc}"}
        if op != "handover":
            log.info("carried out %s for host %s: %s", op, sender,
                     "ok" if reply["ok"] else reply["message"])
        with CancelScope(shield=True):
            try:
                await self._blocking("answering", self.inbox.answer, rid, reply)
            except SnapfsError as exc:
                log.error("answering host %s failed: %s", sender, exc.message)

    # -- opening volumes -------------------------------------------------------------------

    def _state(self, vid: str) -> tuple[dict | None, bool]:
        info = self.share.read_info(vid)
        exists = info is not None or self.share.exists(base_name(vid))
        return info, exists

    async def volume(self, vid: str, own: bool = True) -> Volume:
        """The open volume (opened now if needed): writable if this daemon owns it, else a
        follower.  A volume nobody owns becomes this daemon's unless ``own`` is False (a
        look at its attributes).  Call with the volume's lock held, or from I/O paths that
        only read ``volumes``."""
        vol = self.volumes.get(vid)
        if vol is not None:
            return vol
        if self.offline:
            return await self._open_volume(vid, False)
        if self.holders.get(vid) is current_task():
            return await self._open_volume(vid, self.leases.owns(vid))
        if not own and not self.leases.owns(vid):
            return await self._open_volume(vid, False)
        # Opened for writing only under the volume's lock, which keeps its lease meanwhile
        # (a handover or an idle lease's release waits for it).
        try:
            await self._acquire(vid)  # nobody owns it: this daemon does from now on
        except Moved:
            return await self._open_volume(vid, False)
        try:
            return await self._open_volume(vid, self.leases.owns(vid))
        finally:
            self._release(vid)

    async def _open_volume(self, vid: str, writable: bool) -> Volume:
        vol = self.volumes.get(vid)
        if vol is not None:
            return vol
        vol = Volume(self.share, vid)
        await self._load(vol, writable)
        other = self.volumes.get(vid)
        if other is not None:  # opened meanwhile by another task
            await vol.close()
            return other
        self.volumes[vid] = vol
        return vol

    async def _load(self, vol: Volume, writable: bool, report: bool = True) -> None:
        """(Re)open a volume's chain as the share has it now (``report``: a failure marks
        the volume failed and is logged)."""
        vid = vol.vid
        gen = await self._blocking("reading", self.leases.volume_gen, vid)
        info, exists = await self._blocking("reading", self._state, vid)
        if not exists:
            raise NotFound(f"no volume {vid}")
        active = info["active"] if info else base_name(vid)
        try:
            if active == base_name(vid):
                fmt = await self._blocking("reading", self.share.base_format, vid, None)
                await vol.open(active, fmt, writable)
            else:
                await vol.open(active, "qcow2", writable)
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
            if report:
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
        vol.attrs = None
        vol.gen = gen
        vol.reload = functools.partial(self._refollow, vol)

    async def _reload(self, vol: Volume, writable: bool) -> None:
        """Open a volume's chain again, as owner or follower, with guest I/O paused."""
        if not writable and not vol.writable and vol.images:
            return await self._reread_follower(vol)
        async with vol.gate.exclusive():
            await vol.close()
            try:
                await self._load(vol, writable)
            except SnapfsError:
                if self.volumes.get(vol.vid) is vol and not vol.users:
                    del self.volumes[vol.vid]
                raise

    async def _reread_follower(self, vol: Volume) -> None:
        """A follower's new view of the chain, opened beside the old one and swapped in: the
        owner may rename or remove files while we read .info and open them (then we try
        again), and until the new view is complete the old one goes on serving reads."""
        fresh = Volume(self.share, vol.vid)
        for attempt in range(FOLLOW_TRIES):
            try:
                await self._load(fresh, False, report=attempt == FOLLOW_TRIES - 1)
                break
            except SnapfsError:
                if attempt == FOLLOW_TRIES - 1:
                    raise
                await sleep(0.05)
        async with vol.gate.exclusive():
            old = vol.images
            vol.adopt(fresh)
        if old:
            await old[-1].close()

    async def opened(self, vid: str) -> Volume:
        """A file of the volume is being opened: a follower looks at the share again
        (close-to-open, as NFS does for plain files)."""
        vol = await self.volume(vid)
        if not vol.writable:
            await self._follow(vol)
        return vol

    async def _follow(self, vol: Volume) -> bool:
        """A follower: read the chain again if its owner changed it, else the active image's
        tables.  True when the chain was read again."""
        gen = await self._blocking("reading", self.leases.volume_gen, vol.vid)
        if gen == vol.gen or vol.writable:
            await vol.refresh()
            return False
        return await self._refollow(vol)

    async def _refollow(self, vol: Volume) -> bool:
        """A follower reads its chain again, unless this daemon is taking it over (which
        reads it anyway).  True when it did."""
        sem = self.locks.setdefault(vol.vid, Semaphore(1))
        try:
            sem.acquire_nowait()
        except WouldBlock:
            return False  # this daemon is taking the volume over: it reads the chain anyway
        try:
            if vol.writable or self.volumes.get(vol.vid) is not vol:
                return False
            log.info("volume %s: changed by its owner, reading its chain again", vol.vid)
            await self._reload(vol, writable=False)
            return True
        finally:
            sem.release()

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
    async def hold(self, vid: str, own: bool = True):
        """The open volume, kept open (not released) while the caller uses it."""
        vol = await self.volume(vid, own)
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
            tmp = os.path.join(self.share.tmp, f"{base_name(vid)}.{uuid.uuid4().hex}")
            if fmt == "raw":
                await create_raw(tmp, size, mode=self.share.file_mode)
            else:
                await create_qcow2(tmp, size, mode=self.share.file_mode)
            await self._blocking("renaming", self._rename_into, tmp, base_name(vid))
            await self._changed(vid)
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
                await self._changed(vid)
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
                await self._changed(vid)
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
            await self._changed(vid)
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
            await self._changed(vid)
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
        """Run the merge as a job that takes over the volume's lock (held by the caller)."""
        if vid in self.handing_over:
            log.info("volume %s: the merge of %s is left to the volume's next owner", vid, name)
            self._release(vid)
            return
        job = Job(vid, f"merging {name}")
        self.jobs[vid] = job
        vol.users += 1
        self.nursery.start_soon(self._merge_job, job, vol, name)

    async def _merge_job(self, job: Job, vol: Volume, name: str) -> None:
        vid = job.vid
        try:
            with job.scope:
                await self._merge(vol, name, job.progress)
            if job.scope.cancelled_caught and vid in self.volumes:
                log.info("volume %s: merge of %s paused; the volume's next owner goes on "
                         "with it", vid, name)
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
            async def record_active() -> None:
                info = await self._blocking("reading", self.share.read_info, vid) or {}
                info["active"] = vol.names()[-1]
                await self._blocking("recording", self.share.write_info, vid, info)

            if up:
                log.info("volume %s: merging %s by streaming %s up", vid, name, names[i - 1])
                await vol.stream_up(name, progress)
                if was_active:
                    await record_active()
            else:
                log.info("volume %s: merging %s down into %s", vid, name, names[i - 1])
                await vol.commit_down(name, progress,
                                      on_switch=record_active if was_active else None)
        await self._blocking("cleaning", self._finish_merge, vid, name)
        await self._changed(vid)
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
        if (await self._blocking("reading", self._state, vid))[1]:
            raise Exists(f"volume {vid} already exists")
        # The source's owner carries out the clone (Moved); the new volume's lease is taken
        # from whoever holds it idle.  Only a new volume is locked second: no lock cycle.
        async with self.locked(src), self.locked(vid, take_over=True):
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
            await self._changed(vid)
            log.info("cloned volume %s from %s%s", vid, src, f" snapshot {sid}" if sid else "")
            return {"volume": vid, "size": size or source.size, "format": fmt}

    async def _clone_into(self, vid: str, source, size: int, fmt: str) -> None:
        rec = {"format": fmt, "snapshots": {}, "created": time.time()}
        await self._blocking("recording", self.share.write_record, vid, rec)
        tmp = os.path.join(self.share.tmp, f"{base_name(vid)}.{uuid.uuid4().hex}")
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
        await self._changed(vol.vid)

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
            await self._changed(vid)
            log.info("reverted volume %s to snapshot %s", vid, sid)
            return {"volume": vid, "snapshot": sid}

    async def _revert(self, vol: Volume, name: str) -> None:
        """Give the volume snapshot ``name``'s content (the revert intent is on record).

        A new active overlay on the same backing file replaces the active one: what the
        active file holds is dropped without being read, and only what the frozen overlays
        above the snapshot changed is copied back from the snapshot, all before guest I/O
        pauses for the rename (reverting to the latest snapshot copies nothing).  The intent
        goes with the rename, so a crash never undoes guest writes made after it; a revert
        that fails before it changes nothing."""
        vid = vol.vid
        target = vol.below(name)
        frozen = vol.images[vol.names().index(name):-1]
        tmp_name = os.path.basename(vol.top.path) + REVERT_SUFFIX

        async def fill(new) -> None:
            ranges: list[tuple[int, int]] = []
            for img in frozen:
                for pos in range(0, img.size, REVERT_MAP_SPAN):
                    for kind, off, n, _ in await img.map(pos, min(REVERT_MAP_SPAN,
                                                                  img.size - pos)):
                        if kind != ex.UNALLOC:
                            ranges.append((off, n))
                    await checkpoint()
            await copy_content(target, new, _union(ranges))

        async def switched() -> None:
            await self._blocking("recording", self.share.clear_intent, vid)

        active = vol.top
        try:
            await self._blocking("cleaning", self.share.remove, tmp_name)  # a crash's leftover
            await vol.replace_top(tmp_name, fill, switched)
        except SnapfsError:
            if vol.images and vol.top is active:  # nothing changed: nothing to finish later
                with contextlib.suppress(SnapfsError):
                    await self._blocking("cleaning", self.share.clear_intent, vid)
            raise

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
            await self._changed(vid)
            log.info("managing %s as volume %s (%s)", source, vid, fmt)
            return {"volume": vid}

    async def info(self, volume) -> dict:
        vid = check_id(volume, "volume")
        host = None if self.offline else await self._blocking("reading", self.leases.owner, vid)
        if host is not None:
            raise Moved(vid, host)  # its owner knows its state
        if vid in self.failed and vid not in self.volumes:
            _, exists = await self._blocking("reading", self._state, vid)
            if not exists:
                raise NotFound(f"no volume {vid}")
            # The volume cannot be opened: the contract's keys all the same, with what is known.
            return {"volume": vid, "size": 0, "base_format": None, "active": None,
                    "files": [], "snapshots": [], "allocated": 0, "state": "failed",
                    "reason": self.failed[vid]}
        async with self.hold(vid, own=False) as vol:
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
        """chmod/chown in the mount: kept in the volume's record, by the volume's owner."""
        await self.handle({"op": "set-attrs", "volume": vid, "changes": changes},
                          internal=True)

    async def set_attrs(self, volume, changes) -> dict:
        vid = check_id(volume, "volume")
        if (not isinstance(changes, dict) or set(changes) - {"mode", "uid", "gid"}
                or not all(isinstance(v, int) and not isinstance(v, bool)
                           for v in changes.values())):
            raise Invalid("changes holds integer mode, uid or gid")
        async with self.locked(vid):
            rec = await self._blocking("reading", self.share.read_record, vid)
            if rec is None:
                raise NotFound(f"no volume {vid}")
            rec.setdefault("attrs", {}).update(changes)
            await self._blocking("recording", self.share.write_record, vid, rec)
            vol = self.volumes.get(vid)
            if vol is not None:
                vol.attrs = rec["attrs"]
            await self._changed(vid)
            return {"volume": vid}

    async def snapshot_created(self, vid: str, sid: str) -> float:
        rec = await self._blocking("reading", self.share.read_record, vid) or {}
        created = rec.get("snapshots", {}).get(sid, {}).get("created")
        return created if created is not None else rec.get("adopted", rec.get("created", 0.0))

    async def volume_status(self, vid: str) -> dict:
        try:
            vol = await self.volume(vid, own=False)
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
        return {"share": self.share.root, "host": self.host_id,
                "owned": self.leases.owned(), **self.space,
                "provisioned_bytes": sum(v["provisioned"] for v in vols),
                "allocated_bytes": sum(v["allocated"] for v in vols),
                "volumes": vols, "jobs": [j.as_dict() for j in self.jobs.values()] + [
                    {"volume": vid, "job": "resuming an interrupted merge", "progress": 0.0,
                     "started": time.time()} for vid in sorted(self.resuming - set(self.jobs))]}

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

    async def watch_share(self, interval: float = REFRESH) -> None:
        """Notice what other daemons changed (the share's change counter), read again the
        chains of volumes followed here, and check that the leases held are still ours."""
        while True:
            with move_on_after(max(interval, STATUS_WAIT)):
                try:
                    await self._look_again()
                except SnapfsError as exc:
                    log.warning("share %s: looking for changes failed: %s", self.share.root,
                                exc.message)
            await sleep(interval)

    async def _look_again(self) -> None:
        now = time.monotonic()
        for vid in self.leases.owned():
            sem = self.locks.get(vid)
            if (vid not in self.volumes and vid not in self.jobs and vid not in self.resuming
                    and (sem is None or sem.value) and now - self.used.get(vid, 0) > LEASE_IDLE):
                await self._disown(vid)  # unused here for a while: one descriptor fewer
        for vid in await self._blocking("locking", self.leases.lost):
            await self._fence(vid)
        gen = await self._blocking("reading", self.leases.share_gen)
        if gen == self.seen_gen:
            return
        self.seen_gen = gen
        changed: set[str] = set()
        for vid, vol in list(self.volumes.items()):
            if vol.writable:
                continue
            try:
                if await self._follow(vol):
                    changed.add(vid)
            except SnapfsError as exc:
                changed.add(vid)
                log.warning("volume %s: following its owner failed: %s", vid, exc.message)
        if self.on_change is not None:
            await self.on_change(changed)

    async def _fence(self, vid: str) -> None:
        """The share dropped a lease we held (this host was cut off longer than the
        server's lease time): another daemon may own the volume now.  Write nothing more."""
        reason = f"{FENCED} on the share (cut off for too long); its new owner serves it"
        log.error("volume %s: %s", vid, reason)
        self.failed[vid] = reason
        vol = self.volumes.get(vid)
        if vol is not None:
            vol.writable = False
            for img in vol.images:
                img.writable = False
        job = self.jobs.get(vid)
        if job is not None:
            job.scope.cancel()  # its next steps would change a chain another daemon owns
        await self._disown(vid)

    async def watch_space(self, interval: float = SPACE_INTERVAL) -> None:
        while True:
            with move_on_after(interval):
                await self.check_space()
            await sleep(interval)

    # -- recovery --------------------------------------------------------------------------

    async def recover(self) -> None:
        """Finish or roll back what a crash interrupted (intents), drop temporary files and
        records of volumes whose creation never completed.  Volumes another live daemon
        owns are left to it."""
        await self._blocking("cleaning", self.share.clean_tmp)
        pending = await self._blocking("listing", self.share.intents)
        for vid in await self._blocking("listing", self.share.record_ids):
            if vid not in pending:
                await self._drop_if_orphan(vid)
        for vid in pending:
            try:
                await self._acquire(vid)  # taking the lease finishes the intent
            except Moved:
                continue
            except SnapfsError as exc:
                self.failed[vid] = f"recovery failed: {exc.message}"
                log.error("volume %s: recovery failed: %s", vid, exc.message)
                continue
            self._release(vid)

    async def _drop_if_orphan(self, vid: str) -> None:
        if await self._blocking("reading", self.share.exists, base_name(vid)):
            return
        try:
            await self._acquire(vid)
        except Moved:
            return  # being created by its owner right now
        try:
            if not await self._blocking("reading", self.share.exists, base_name(vid)):
                log.info("dropping the record of volume %s, whose creation never completed",
                         vid)
                await self._blocking("cleaning", self.share.remove_record, vid)
        finally:
            self._release(vid)

    async def _recover_intent(self, vid: str, intent: dict) -> None:
        """Finish what an intent records; called by the new owner, with the lease held.
        A merge goes on in the background."""
        op = intent.get("op")
        log.info("volume %s: recovering interrupted %s", vid, op)
        try:
            await self._finish_intent(vid, intent)
        except SnapfsError as exc:
            self.failed[vid] = f"recovery failed: {exc.message}"
            log.error("volume %s: recovery failed: %s", vid, exc.message)
            raise

    async def _finish_intent(self, vid: str, intent: dict) -> None:
        op = intent.get("op")
        if op == "delete-volume":
            await self._blocking("deleting", self._delete_files, vid)
            await self._changed(vid)
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
                await self._changed(vid)
            elif op == "clone":
                await self._blocking("cleaning", self.share.clear_intent, vid)
                return
        if op == "merge":
            if intent.get("into") and await self._settle_stream_up(vid, intent):
                await self._changed(vid)
                return
            if vid not in self.resuming:
                self.resuming.add(vid)
                self.nursery.start_soon(self._resume_merge, vid, intent["file"])
            return
        if op == "revert":
            info = await self._blocking("reading", self.share.read_info, vid) or {}
            if intent.get("snapshot") in info:
                async with self.hold(vid) as vol:
                    await self._revert(vol, info[intent["snapshot"]])
                await self._changed(vid)
            await self._blocking("cleaning", self.share.clear_intent, vid)
            return
        raise Corrupt(f"unknown intent {op!r}")

    async def _resume_merge(self, vid: str, name: str) -> None:
        """Go on with a merge an earlier owner began, as a background job."""
        try:
            try:
                await self._acquire(vid)
            except Moved:
                return  # the volume moved on: its new owner resumes the merge
            try:
                intent = await self._blocking("reading", self.share.read_intent, vid) or {}
                if intent.get("op") != "merge" or intent.get("file") != name:
                    self._release(vid)
                    return
                vol = await self.volume(vid)
            except BaseException:
                self._release(vid)
                raise
            self._start_merge(vid, vol, name)
        except SnapfsError as exc:
            self.failed[vid] = f"recovery failed: {exc.message}"
            log.error("volume %s: resuming the merge of %s failed: %s", vid, name, exc.message)
        finally:
            self.resuming.discard(vid)

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

