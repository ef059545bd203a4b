"""The pyfuse3 Operations: a thin adapter from FUSE requests to ``VolumeService`` calls.

Each handler resolves an inode or handle, makes one service call and builds attributes.  The
``fuse_errors`` boundary turns every engine error into ``FUSEError(errno)``: nothing else may
escape a handler, or pyfuse3's main loop dies (pyfuse3 docs).
"""

from __future__ import annotations

import errno
import functools
import json
import logging
import os
import stat
import time
from dataclasses import dataclass, field

import pyfuse3
import trio

from snapfs import __version__, heap
from snapfs.chain.catalog import PREFIX, check_id
from snapfs.chain.service import VolumeService
from snapfs.ctl import MAX_REQUEST
from snapfs.errors import Invalid, NotFound, SnapfsError
from snapfs.fs import inodes as ino
from snapfs.fs.inodes import InodeTable
from snapfs.io import run_blocking

log = logging.getLogger(__name__)

#: How long the kernel may trust a file's attributes.  Whenever they expire, concurrent O_DIRECT
#: reads (auto_inval_data) send a storm of GETATTRs lasting a second or two -- measured: one
#: GETATTR per 2.5 reads, at a 1 s timeout, all the time.  Changes made here (extend, revert,
#: snapshot deletion) invalidate them at once instead; st_blocks and mtime may lag this long.
ATTR_TIMEOUT = 60.0


@dataclass
class Options:
    uid: int = 0
    gid: int = 0
    mode: int = 0o660
    ctl_gid: int = 0
    read_only: bool = False
    mountpoint: str = ""


@dataclass
class Handle:
    kind: str  # "vol", "snap", "ctl", "status"
    key: tuple
    writable: bool = False
    reply: bytes = b""
    inode: int = 0
    extra: dict = field(default_factory=dict)


def fuse_errors(fn):
    """The boundary every handler goes through: engine errors become errnos."""

    @functools.wraps(fn)
    async def wrapper(self, *args, **kwargs):
        try:
            return await fn(self, *args, **kwargs)
        except pyfuse3.FUSEError:
            raise
        except SnapfsError as exc:
            if exc.errno not in (errno.ENOENT, errno.EEXIST) and not getattr(exc, "logged", False):
                log.info("%s: %s", fn.__name__, exc.message)
            raise pyfuse3.FUSEError(exc.errno) from None
        except trio.Cancelled:
            raise
        except Exception:
            log.exception("unexpected error in %s", fn.__name__)
            raise pyfuse3.FUSEError(errno.EIO) from None

    return wrapper


def _vid_from_name(name: bytes) -> str | None:
    try:
        text = name.decode()
    except UnicodeDecodeError:
        return None
    if not text.startswith(PREFIX) or "." in text:
        return None
    try:
        return check_id(text[len(PREFIX):], "id")
    except Invalid:
        return None


class Operations(pyfuse3.Operations):
    enable_writeback_cache = False

    def __init__(self, svc: VolumeService, opts: Options):
        super().__init__()
        self.svc = svc
        self.opts = opts
        self.inodes = InodeTable()
        self.handles: dict[int, Handle] = {}
        self.next_fh = 1
        self.requests: dict[str, int] = {}  # request file name -> open descriptors
        self.request_owner: dict[str, tuple[int, int]] = {}
        self.started = time.time()
        self.request_loop = None  # the device reader (snapfs.fs.session), when installed
        svc.on_change = self.others_changed

    # -- attributes ------------------------------------------------------------------------

    def _attr(self, inode: int, mode: int, size: int = 0, *, uid: int = 0, gid: int = 0,
              mtime: float | None = None, blocks: int = 0, nlink: int = 1) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = inode
        a.st_mode = mode
        a.st_nlink = nlink
        a.st_uid, a.st_gid = uid, gid
        a.st_size = size
        a.st_blocks = blocks
        a.st_blksize = 65536
        t = int((mtime if mtime is not None else self.started) * 1e9)
        a.st_atime_ns = a.st_mtime_ns = a.st_ctime_ns = t
        a.attr_timeout = a.entry_timeout = ATTR_TIMEOUT if stat.S_ISREG(mode) else 0
        a.generation = 0
        return a

    def _dir_attr(self, inode: int, mode: int = 0o755, gid: int = 0) -> pyfuse3.EntryAttributes:
        return self._attr(inode, stat.S_IFDIR | mode, nlink=2, gid=gid)

    async def _volume_attr(self, vid: str) -> pyfuse3.EntryAttributes:
        async with self.svc.hold(vid, own=False) as vol:
            owner = await self.svc.volume_attrs(vid)
            st = await vol.top.f.stat()
            blocks = await _chain_blocks(vol.top)
            size = vol.size
        mode = owner.get("mode", self.opts.mode)
        if self.opts.read_only:
            mode &= ~0o222
        return self._attr(self.inodes.ino(("vol", vid)), stat.S_IFREG | mode, size,
                          uid=owner.get("uid", self.opts.uid), gid=owner.get("gid", self.opts.gid),
                          mtime=st.st_mtime, blocks=blocks)

    async def _snapshot_attr(self, vid: str, sid: str) -> pyfuse3.EntryAttributes:
        async with self.svc.hold(vid, own=False) as vol:
            name = vol.snap_files.get(sid)
            if name is None:
                raise NotFound(f"volume {vid} has no snapshot {sid}")
            img = vol.below(name)
            size, blocks = img.size, await _chain_blocks(img)
            created = await self.svc.snapshot_created(vid, sid)
            owner = await self.svc.volume_attrs(vid)
        mode = owner.get("mode", self.opts.mode) & ~0o222
        return self._attr(self.inodes.ino(("snap", vid, sid)), stat.S_IFREG | mode, size,
                          uid=owner.get("uid", self.opts.uid), gid=owner.get("gid", self.opts.gid),
                          mtime=created, blocks=blocks)

    async def _attr_of(self, inode: int) -> pyfuse3.EntryAttributes:
        if inode in (ino.ROOT, ino.SNAPSHOTS):
            return self._dir_attr(inode)
        if inode == ino.META:
            return self._dir_attr(inode, 0o755)
        if inode == ino.REQUESTS:
            return self._dir_attr(inode, 0o770, gid=self.opts.ctl_gid)
        if inode == ino.CONTROL:
            return self._attr(inode, stat.S_IFREG | 0o660, gid=self.opts.ctl_gid)
        if inode == ino.STATUS:
            return self._attr(inode, stat.S_IFREG | 0o444)
        key = self.inodes.key(inode)
        if key is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        if key[0] == "vol":
            return await self._volume_attr(key[1])
        if key[0] == "sdir":
            if not await self.svc.exists(key[1]):
                raise pyfuse3.FUSEError(errno.ENOENT)
            return self._dir_attr(inode)
        if key[0] == "snap":
            return await self._snapshot_attr(key[1], key[2])
        if key[0] == "req":
            if key[1] not in self.requests:
                raise pyfuse3.FUSEError(errno.ENOENT)
            uid, gid = self.request_owner.get(key[1], (0, self.opts.ctl_gid))
            return self._attr(inode, stat.S_IFREG | 0o600, uid=uid, gid=gid)
        raise pyfuse3.FUSEError(errno.ENOENT)

    @fuse_errors
    async def getattr(self, inode, ctx=None):
        return await self._attr_of(inode)

    @fuse_errors
    async def lookup(self, parent_inode, name, ctx=None):
        if name == b".":
            return await self._attr_of(parent_inode)
        if name == b"..":
            parent = {ino.SNAPSHOTS: ino.ROOT, ino.META: ino.ROOT, ino.REQUESTS: ino.META}
            key = self.inodes.key(parent_inode)
            up = ino.SNAPSHOTS if key and key[0] == "sdir" else parent.get(parent_inode, ino.ROOT)
            return await self._attr_of(up)
        child = await self._child(parent_inode, name)
        if child is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return await self._attr_of(child)

    async def _child(self, parent: int, name: bytes) -> int | None:
        if parent == ino.ROOT:
            fixed = {b".snapshots": ino.SNAPSHOTS, b".snapfs": ino.META}
            if name in fixed:
                return fixed[name]
            vid = _vid_from_name(name)
            if vid and await self.svc.exists(vid):
                return self.inodes.ino(("vol", vid))
            return None
        if parent == ino.META:
            return {b"control": ino.CONTROL, b"requests": ino.REQUESTS,
                    b"status": ino.STATUS}.get(name)
        if parent == ino.SNAPSHOTS:
            vid = _vid_from_name(name)
            if vid and await self.svc.exists(vid):
                return self.inodes.ino(("sdir", vid))
            return None
        if parent == ino.REQUESTS:
            n = name.decode(errors="replace")
            return self.inodes.ino(("req", n)) if n in self.requests else None
        key = self.inodes.key(parent)
        if key and key[0] == "sdir":
            sid = name.decode(errors="replace")
            async with self.svc.hold(key[1], own=False) as vol:
                if sid in vol.snap_files:
                    return self.inodes.ino(("snap", key[1], sid))
        return None

    # -- directories -----------------------------------------------------------------------

    @fuse_errors
    async def opendir(self, inode, ctx):
        await self._attr_of(inode)
        return inode

    async def _entries(self, inode: int) -> list[tuple[bytes, int]]:
        if inode == ino.ROOT:
            out = [(b".snapfs", ino.META), (b".snapshots", ino.SNAPSHOTS)]
            for vid in (await self.svc.list())["volumes"]:
                out.append(((PREFIX + vid).encode(), self.inodes.ino(("vol", vid))))
            return out
        if inode == ino.META:
            return [(b"control", ino.CONTROL), (b"requests", ino.REQUESTS),
                    (b"status", ino.STATUS)]
        if inode == ino.SNAPSHOTS:
            return [((PREFIX + vid).encode(), self.inodes.ino(("sdir", vid)))
                    for vid in (await self.svc.list())["volumes"]]
        if inode == ino.REQUESTS:
            return [(n.encode(), self.inodes.ino(("req", n))) for n in sorted(self.requests)]
        key = self.inodes.key(inode)
        if key and key[0] == "sdir":
            async with self.svc.hold(key[1], own=False) as vol:
                return [(sid.encode(), self.inodes.ino(("snap", key[1], sid)))
                        for sid in vol.snap_files]
        raise pyfuse3.FUSEError(errno.ENOTDIR)

    @fuse_errors
    async def readdir(self, fh, start_id, token):
        entries = await self._entries(fh)
        for i, (name, child) in enumerate(entries[start_id:], start_id):
            try:
                attr = await self._attr_of(child)
            except (pyfuse3.FUSEError, SnapfsError):
                continue  # vanished or broken meanwhile: not listed
            if not pyfuse3.readdir_reply(token, name, attr, i + 1):
                break

    async def releasedir(self, fh):
        return None

    # -- opening ---------------------------------------------------------------------------

    def _new_handle(self, h: Handle, direct_io: bool = False) -> pyfuse3.FileInfo:
        fh = self.next_fh
        self.next_fh += 1
        self.handles[fh] = h
        return pyfuse3.FileInfo(fh=fh, direct_io=direct_io, keep_cache=False)

    @fuse_errors
    async def open(self, inode, flags, ctx):
        writable = (flags & os.O_ACCMODE) != os.O_RDONLY
        if inode == ino.CONTROL:
            return self._new_handle(Handle("ctl", ("ctl",), True, inode=inode), direct_io=True)
        if inode == ino.STATUS:
            if writable:
                raise pyfuse3.FUSEError(errno.EACCES)
            body = json.dumps(await self.status(), indent=1).encode() + b"\n"
            return self._new_handle(Handle("status", ("status",), reply=body, inode=inode),
                                    direct_io=True)
        key = self.inodes.key(inode)
        if key is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        if key[0] == "req":
            self.requests[key[1]] = self.requests.get(key[1], 0) + 1
            return self._new_handle(Handle("ctl", key, True, inode=inode), direct_io=True)
        if key[0] == "snap":
            if writable:
                raise pyfuse3.FUSEError(errno.EROFS)
            await self._snapshot_attr(key[1], key[2])
            vol = await self.svc.opened(key[1])
            vol.users += 1
            return self._new_handle(Handle("snap", key, inode=inode))
        if key[0] == "vol":
            if writable and self.opts.read_only:
                raise pyfuse3.FUSEError(errno.EROFS)
            vol = await self.svc.opened(key[1])
            vol.users += 1
            return self._new_handle(Handle("vol", key, writable, inode=inode))
        raise pyfuse3.FUSEError(errno.EISDIR)

    @fuse_errors
    async def create(self, parent_inode, name, mode, flags, ctx):
        if parent_inode == ino.REQUESTS:
            n = name.decode(errors="replace")
            if "/" in n or n in self.requests or not n or n.startswith("."):
                raise pyfuse3.FUSEError(errno.EEXIST if n in self.requests else errno.EINVAL)
            self.requests[n] = 0
            self.request_owner[n] = (ctx.uid, ctx.gid)  # a client's private file
            inode = self.inodes.ino(("req", n))
            fi = await self.open(inode, os.O_RDWR, ctx)
            return fi, await self._attr_of(inode)
        if parent_inode == ino.ROOT and not self.opts.read_only:
            vid = _vid_from_name(name)
            if vid is None:
                raise pyfuse3.FUSEError(errno.EPERM)
            await self.svc.create_volume(vid, 0, None, allow_empty=True)
            inode = self.inodes.ino(("vol", vid))
            fi = await self.open(inode, os.O_RDWR, ctx)
            return fi, await self._attr_of(inode)
        raise pyfuse3.FUSEError(errno.EROFS if self.opts.read_only else errno.EPERM)

    @fuse_errors
    async def release(self, fh):
        h = self.handles.pop(fh, None)
        if h is None:
            return
        if h.kind in ("vol", "snap"):
            vol = self.svc.volumes.get(h.key[1])
            if vol is not None:
                vol.users -= 1
                if vol.users == 0:
                    await vol.flush()
                    heap.trim()  # the end of a burst of I/O on this volume
        elif h.kind == "ctl" and h.key[0] == "req":
            left = self.requests.get(h.key[1], 0) - 1
            if left <= 0:
                self.requests.pop(h.key[1], None)
                self.request_owner.pop(h.key[1], None)
            else:
                self.requests[h.key[1]] = left

    # -- data ------------------------------------------------------------------------------

    @fuse_errors
    async def read(self, fh, off, size):
        h = self._handle(fh)
        if h.kind == "vol":
            vol = await self.svc.volume(h.key[1])
            return await vol.read(off, size)
        if h.kind == "snap":
            vol = await self.svc.volume(h.key[1])
            return await vol.read_snapshot(h.key[2], off, size)
        return h.reply[off:off + size]

    @fuse_errors
    async def write(self, fh, off, buf):
        h = self._handle(fh)
        if h.kind == "vol":
            await self.svc.guest_write(h.key[1], off, buf)
            return len(buf)
        if h.kind == "ctl":
            return await self._control(h, buf)
        raise pyfuse3.FUSEError(errno.EBADF)

    @fuse_errors
    async def flush(self, fh):
        h = self._handle(fh)
        if h.kind == "vol" and h.writable:
            vol = await self.svc.volume(h.key[1])
            await vol.flush()

    @fuse_errors
    async def fsync(self, fh, datasync):
        h = self._handle(fh)
        if h.kind == "vol":
            vol = await self.svc.volume(h.key[1])
            await vol.flush()

    def _handle(self, fh: int) -> Handle:
        h = self.handles.get(fh)
        if h is None:
            raise pyfuse3.FUSEError(errno.EBADF)
        return h

    # -- changing files --------------------------------------------------------------------

    @fuse_errors
    async def setattr(self, inode, attr, fields, fh, ctx):
        key = self.inodes.key(inode)
        if key is None or key[0] != "vol":
            if fields.update_size:
                raise pyfuse3.FUSEError(errno.EACCES)
            return await self._attr_of(inode)
        vid = key[1]
        if self.opts.read_only and (fields.update_size or fields.update_mode
                                    or fields.update_uid or fields.update_gid):
            raise pyfuse3.FUSEError(errno.EROFS)
        if fields.update_size:
            async with self.svc.hold(vid, own=False) as vol:
                current = vol.size
            if attr.st_size < current:
                raise pyfuse3.FUSEError(errno.EINVAL)
            if attr.st_size > current:
                size = -(-attr.st_size // 512) * 512
                await self.svc.handle({"op": "extend-volume", "volume": vid, "size": size},
                                      internal=True)
        changes = {}
        if fields.update_mode:
            changes["mode"] = stat.S_IMODE(attr.st_mode)
        if fields.update_uid:
            changes["uid"] = attr.st_uid
        if fields.update_gid:
            changes["gid"] = attr.st_gid
        if changes:
            await self.svc.set_volume_attrs(vid, changes)
        return await self._attr_of(inode)

    @fuse_errors
    async def unlink(self, parent_inode, name, ctx):
        if parent_inode == ino.ROOT:
            vid = _vid_from_name(name)
            if vid is None or not await self.svc.exists(vid):
                raise pyfuse3.FUSEError(errno.ENOENT)
            if self.opts.read_only:
                raise pyfuse3.FUSEError(errno.EROFS)
            await self.svc.handle({"op": "delete-volume", "volume": vid}, internal=True)
            self.inodes.drop(("vol", vid))
            return
        raise pyfuse3.FUSEError(errno.EPERM)

    async def mkdir(self, parent_inode, name, mode, ctx):
        raise pyfuse3.FUSEError(errno.EPERM)

    async def rename(self, parent_inode_old, name_old, parent_inode_new, name_new, flags, ctx):
        raise pyfuse3.FUSEError(errno.EPERM)

    async def link(self, inode, new_parent_inode, new_name, ctx):
        raise pyfuse3.FUSEError(errno.EPERM)

    async def symlink(self, parent_inode, name, target, ctx):
        raise pyfuse3.FUSEError(errno.EPERM)

    async def mknod(self, parent_inode, name, mode, rdev, ctx):
        raise pyfuse3.FUSEError(errno.EPERM)

    async def rmdir(self, parent_inode, name, ctx):
        raise pyfuse3.FUSEError(errno.EPERM)

    @fuse_errors
    async def statfs(self, ctx):
        st = await run_blocking(False, "statvfs", os.statvfs, self.svc.share.root)
        s = pyfuse3.StatvfsData()
        s.f_bsize, s.f_frsize = st.f_bsize, st.f_frsize
        s.f_blocks, s.f_bfree, s.f_bavail = st.f_blocks, st.f_bfree, st.f_bavail
        s.f_files, s.f_ffree, s.f_favail = st.f_files, st.f_ffree, st.f_favail
        s.f_namemax = 255
        return s

    # -- control ---------------------------------------------------------------------------

    async def _control(self, h: Handle, buf: bytes) -> int:
        op = None
        try:
            if len(buf) > MAX_REQUEST:
                raise Invalid("request larger than 64 KiB")
            try:
                request = json.loads(bytes(buf).decode("utf-8"))
            except (UnicodeDecodeError, ValueError):
                raise Invalid("request is not a UTF-8 JSON object") from None
            if isinstance(request, dict):
                op = request.get("op")
            result = await self.svc.handle(request)
        except SnapfsError as exc:
            h.reply = json.dumps({"ok": False, "op": op if isinstance(op, str) else None,
                                  "errno": exc.errno_name, "message": exc.message}).encode()
            log.info("control %s refused: %s %s", op, exc.errno_name, exc.message)
            raise pyfuse3.FUSEError(exc.errno) from None
        h.reply = json.dumps({"ok": True, "op": op, "result": result}).encode()
        await self._after_control(request)
        return len(buf)

    async def _after_control(self, request: dict) -> None:
        """Drop what the kernel caches about what a control operation changed."""
        vid = request.get("volume")
        if not isinstance(vid, str):
            return
        op = request["op"]
        inode = self.inodes.known(("vol", vid))
        if inode is not None:
            await _invalidate(pyfuse3.invalidate_inode, inode, op != "revert")
        if op == "delete-snapshot":
            sdir = self.inodes.known(("sdir", vid))
            if sdir is not None:
                await _invalidate(pyfuse3.invalidate_entry, sdir,
                                  str(request.get("snapshot")).encode())
        elif op == "delete-volume":
            await _invalidate(pyfuse3.invalidate_entry, ino.ROOT, f"{PREFIX}{vid}".encode())

    async def others_changed(self, vids: set[str]) -> None:
        """Another daemon changed the share: drop what the kernel caches of what it changed
        (attributes of every volume and snapshot it knows, the data of ``vids``, and the
        names of what is gone)."""
        for key, inode in self.inodes.items():
            if key[0] == "vol":
                if await self.svc.exists(key[1]):
                    await _invalidate(pyfuse3.invalidate_inode, inode, key[1] not in vids)
                else:
                    await _invalidate(pyfuse3.invalidate_entry, ino.ROOT,
                                      f"{PREFIX}{key[1]}".encode())
            elif key[0] == "sdir" and not await self.svc.exists(key[1]):
                await _invalidate(pyfuse3.invalidate_entry, ino.SNAPSHOTS,
                                  f"{PREFIX}{key[1]}".encode())
            elif key[0] == "snap":
                vol = self.svc.volumes.get(key[1])
                sdir = self.inodes.known(("sdir", key[1]))
                if vol is not None and key[2] in vol.snap_files:
                    await _invalidate(pyfuse3.invalidate_inode, inode, True)
                elif sdir is not None:
                    await _invalidate(pyfuse3.invalidate_entry, sdir, key[2].encode())

    # -- status ----------------------------------------------------------------------------

    async def status(self) -> dict:
        loop = {"request_loop": self.request_loop.stats()} if self.request_loop else {}
        return {"version": __version__, "mountpoint": self.opts.mountpoint,
                **await self.svc.status(), **loop}


async def _invalidate(fn, *args) -> None:
    """Tell the kernel to forget something; in a thread, as it may block (pyfuse3 docs)."""
    try:
        await trio.to_thread.run_sync(fn, *args)
    except OSError:
        pass  # the kernel does not know it: nothing cached


async def _chain_blocks(img) -> int:
    """512-byte blocks the files of a chain (from ``img`` down) occupy on the share."""
    blocks = 0
    while img is not None:
        blocks += (await img.f.stat()).st_blocks
        img = img.backing
    return blocks
