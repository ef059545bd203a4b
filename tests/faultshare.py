"""A share that misbehaves on demand: a pyfuse3 passthrough of a directory that can be told,
while mounted, to fail, delay or block chosen calls (issue: when the share misbehaves).

Run as ``python -m tests.faultshare SOURCE MOUNTPOINT RULES LOG``; ``RULES`` is a JSON file
re-read whenever it changes, holding a list of rules::

    {"op": "read"|"write"|"fsync"|"open"|"any", "path": "volume-v*",   # fnmatch, share-relative
     "error": "EIO"|"ESTALE"|..., "delay_ms": 200, "block": true, "count": 1}

A matching call is delayed, then blocked while the rule stays (``block``), then fails with
``error`` (``count`` limits how many calls a rule fails).  Every fault is logged to ``LOG``.
Calls never wait for each other: a blocked read does not hold up a read of another file, as
on a real NFS share.  ``FaultShare`` starts and always stops it from a test.
"""

from __future__ import annotations

import errno
import fnmatch
import json
import logging
import os
import stat
import subprocess
import sys
import time

log = logging.getLogger("faultshare")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Rules:
    """The fault rules, re-read from their file when it changes (checked every 50 ms)."""

    def __init__(self, path: str):
        self.path = path
        self.rules: list[dict] = []
        self.mtime = None
        self.checked = 0.0

    def current(self) -> list[dict]:
        now = time.monotonic()
        if now - self.checked > 0.05:
            self.checked = now
            try:
                st = os.stat(self.path)
            except FileNotFoundError:
                self.rules, self.mtime = [], None
                return self.rules
            if st.st_mtime_ns != self.mtime:
                with open(self.path) as f:
                    self.rules = json.load(f)
                self.mtime = st.st_mtime_ns
        return self.rules

    def match(self, op: str, path: str) -> dict | None:
        for r in self.current():
            if r.get("op", "any") in (op, "any") and fnmatch.fnmatch(path, r.get("path", "*")):
                if r.get("count", 1) <= 0:
                    continue
                return r
        return None


def make_operations(source: str, rules_path: str):
    import pyfuse3
    import trio

    rules = Rules(rules_path)

    class Passthrough(pyfuse3.Operations):
        def __init__(self):
            super().__init__()
            self.paths: dict[int, str] = {pyfuse3.ROOT_INODE: ""}
            self.fds: dict[int, tuple[int, str]] = {}
            self.dirs: dict[int, str] = {}
            self.next_fh = 1

        # -- faults ----------------------------------------------------------------------

        async def fault(self, op: str, rel: str) -> None:
            r = rules.match(op, rel)
            if r is None:
                return
            log.info("fault on %s %s: %s", op, rel, json.dumps(r, sort_keys=True))
            if r.get("delay_ms"):
                await trio.sleep(r["delay_ms"] / 1000)
            if r.get("block"):
                log.info("blocked %s %s", op, rel)
                while rules.match(op, rel) is r:
                    await trio.sleep(0.02)
                log.info("released %s %s", op, rel)
            if r.get("error") and rules.match(op, rel) is r:
                if "count" in r:
                    r["count"] -= 1
                raise pyfuse3.FUSEError(getattr(errno, r["error"]))

        # -- names -----------------------------------------------------------------------

        def real(self, rel: str) -> str:
            return os.path.join(source, rel) if rel else source

        def rel_of(self, inode: int) -> str:
            try:
                return self.paths[inode]
            except KeyError:
                raise pyfuse3.FUSEError(errno.ENOENT) from None

        def child(self, parent: int, name: bytes) -> str:
            base = self.rel_of(parent)
            n = os.fsdecode(name)
            return f"{base}/{n}" if base else n

        def attr(self, rel: str) -> "pyfuse3.EntryAttributes":
            try:
                st = os.lstat(self.real(rel))
            except OSError as exc:
                raise pyfuse3.FUSEError(exc.errno) from None
            ino = pyfuse3.ROOT_INODE if rel == "" else st.st_ino
            self.paths[ino] = rel
            a = pyfuse3.EntryAttributes()
            for k in ("st_mode", "st_nlink", "st_uid", "st_gid", "st_rdev", "st_size",
                      "st_blksize", "st_blocks", "st_atime_ns", "st_mtime_ns", "st_ctime_ns"):
                setattr(a, k, getattr(st, k))
            a.st_ino = ino
            a.entry_timeout = a.attr_timeout = 0  # like NFS with actimeo=0: always ask
            return a

        async def syscall(self, fn, *args):
            try:
                return fn(*args)
            except OSError as exc:
                raise pyfuse3.FUSEError(exc.errno or errno.EIO) from None

        # -- metadata --------------------------------------------------------------------

        async def lookup(self, parent_inode, name, ctx=None):
            rel = self.child(parent_inode, name)
            await self.fault("lookup", rel)
            return self.attr(rel)

        async def getattr(self, inode, ctx=None):
            return self.attr(self.rel_of(inode))

        async def setattr(self, inode, attr, fields, fh, ctx):
            rel = self.rel_of(inode)
            path = self.real(rel)
            if fields.update_size:
                await self.fault("write", rel)
                if fh is not None and fh in self.fds:
                    await self.syscall(os.ftruncate, self.fds[fh][0], attr.st_size)
                else:
                    await self.syscall(os.truncate, path, attr.st_size)
            if fields.update_mode:
                await self.syscall(os.chmod, path, stat.S_IMODE(attr.st_mode))
            if fields.update_uid or fields.update_gid:
                await self.syscall(os.chown, path, attr.st_uid if fields.update_uid else -1,
                                   attr.st_gid if fields.update_gid else -1)
            if fields.update_atime or fields.update_mtime:
                st = os.lstat(path)
                await self.syscall(os.utime, path, None, (
                    attr.st_atime_ns if fields.update_atime else st.st_atime_ns,
                    attr.st_mtime_ns if fields.update_mtime else st.st_mtime_ns))
            return self.attr(rel)

        async def opendir(self, inode, ctx):
            fh = self.next_fh
            self.next_fh += 1
            self.dirs[fh] = self.rel_of(inode)
            return fh

        async def readdir(self, fh, start_id, token):
            rel = self.dirs[fh]
            await self.fault("readdir", rel)
            names = sorted(os.listdir(self.real(rel)))
            for i, n in enumerate(names[start_id:], start_id):
                try:
                    a = self.attr(f"{rel}/{n}" if rel else n)
                except pyfuse3.FUSEError:
                    continue
                if not pyfuse3.readdir_reply(token, os.fsencode(n), a, i + 1):
                    break

        async def releasedir(self, fh):
            self.dirs.pop(fh, None)

        async def mkdir(self, parent_inode, name, mode, ctx):
            rel = self.child(parent_inode, name)
            await self.syscall(os.mkdir, self.real(rel), mode)
            return self.attr(rel)

        async def rmdir(self, parent_inode, name, ctx):
            await self.syscall(os.rmdir, self.real(self.child(parent_inode, name)))

        async def unlink(self, parent_inode, name, ctx):
            rel = self.child(parent_inode, name)
            await self.fault("unlink", rel)
            await self.syscall(os.unlink, self.real(rel))

        async def rename(self, parent_inode_old, name_old, parent_inode_new, name_new, flags,
                         ctx):
            old = self.child(parent_inode_old, name_old)
            new = self.child(parent_inode_new, name_new)
            await self.fault("rename", new)
            await self.syscall(os.rename, self.real(old), self.real(new))
            self.attr(new)

        async def link(self, inode, new_parent_inode, new_name, ctx):
            new = self.child(new_parent_inode, new_name)
            await self.syscall(os.link, self.real(self.rel_of(inode)), self.real(new))
            return self.attr(new)

        async def statfs(self, ctx):
            await self.fault("statfs", "")
            st = os.statvfs(source)
            s = pyfuse3.StatvfsData()
            for k in ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail", "f_files",
                      "f_ffree", "f_favail"):
                setattr(s, k, getattr(st, k))
            s.f_namemax = 255
            return s

        # -- files -----------------------------------------------------------------------

        def handle(self, fd: int, rel: str) -> "pyfuse3.FileInfo":
            fh = self.next_fh
            self.next_fh += 1
            self.fds[fh] = (fd, rel)
            return pyfuse3.FileInfo(fh=fh, direct_io=True)  # every read reaches us

        async def open(self, inode, flags, ctx):
            rel = self.rel_of(inode)
            await self.fault("open", rel)
            fd = await self.syscall(os.open, self.real(rel),
                                    flags & ~(os.O_CREAT | os.O_EXCL | os.O_DIRECT))
            return self.handle(fd, rel)

        async def create(self, parent_inode, name, mode, flags, ctx):
            rel = self.child(parent_inode, name)
            await self.fault("open", rel)
            fd = await self.syscall(os.open, self.real(rel), (flags & ~os.O_DIRECT) | os.O_CREAT,
                                    mode)
            return self.handle(fd, rel), self.attr(rel)

        async def read(self, fh, off, size):
            fd, rel = self.fds[fh]
            await self.fault("read", rel)
            return await self.syscall(os.pread, fd, size, off)

        async def write(self, fh, off, buf):
            fd, rel = self.fds[fh]
            await self.fault("write", rel)
            return await self.syscall(os.pwrite, fd, buf, off)

        async def fsync(self, fh, datasync):
            fd, rel = self.fds[fh]
            await self.fault("fsync", rel)
            await self.syscall(os.fsync, fd)

        async def flush(self, fh):
            return None

        async def release(self, fh):
            fd, _ = self.fds.pop(fh, (None, None))
            if fd is not None:
                os.close(fd)

    return Passthrough()


def main(argv: list[str]) -> int:
    import pyfuse3
    import trio

    source, mnt, rules_path, log_path = argv
    logging.basicConfig(filename=log_path, level=logging.INFO,
                        format="%(asctime)s %(message)s")
    ops = make_operations(os.path.abspath(source), rules_path)
    opts = set(pyfuse3.default_options) | {"fsname=faultshare"}
    opts.discard("default_permissions")
    pyfuse3.init(ops, mnt, opts)
    try:
        trio.run(pyfuse3.main)
    finally:
        pyfuse3.close(unmount=True)
    return 0


class FaultShare:
    """The misbehaving share mounted for a test; ``set(rules)`` changes the faults at once,
    ``stop()`` (also on ``with`` exit) always unmounts."""

    def __init__(self, source: str, mnt: str, work: str):
        self.source, self.mnt = source, mnt
        self.rules_path = os.path.join(work, "faults.json")
        self.log = os.path.join(work, "faultshare.log")
        self.set([])
        os.makedirs(mnt, exist_ok=True)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.faultshare", source, mnt, self.rules_path, self.log],
            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 20
        while not os.path.ismount(mnt):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"faultshare did not mount: {self.proc.stderr.read()!r}")
            time.sleep(0.02)

    def set(self, rules: list[dict]) -> None:
        tmp = self.rules_path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(rules, f)
        os.replace(tmp, self.rules_path)
        time.sleep(0.1)  # past the share's 50 ms re-read interval

    def log_text(self) -> str:
        try:
            with open(self.log) as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def stop(self) -> None:
        self.set([])  # release blocked calls first, so that unmounting is not held up
        if os.path.ismount(self.mnt):
            r = subprocess.run(["fusermount3", "-u", self.mnt], capture_output=True)
            if r.returncode:
                subprocess.run(["fusermount3", "-u", "-z", self.mnt], capture_output=True)
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def __enter__(self) -> "FaultShare":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
