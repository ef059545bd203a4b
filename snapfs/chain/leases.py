"""Leases on the share: which daemons run on it (one per host id) and which one owns each
volume, that is, is the only daemon that writes its active image or changes its chain.

Leases are OFD byte-range locks, which an NFSv4 server enforces and expires when a client stops
renewing its state: when a daemon or its host dies, its locks go after the server's lease time
(at once on a local file system), and a cut-off host's later I/O through files whose locks the
server dropped fails instead of writing (Linux NFS does not reclaim lost locks by default).
Heartbeats are not used: a lock that is held is the proof that its holder lives.

Each lease file also holds a small JSON record (who holds it, since when, a generation number).
It is read and rewritten only under a lock on byte 1 of the file, because taking a lock is what
makes an NFS client drop its cached copy of a file: no reader trusts a stale record.

Layout under ``.snapfs/`` on the share:

- ``hosts/<host>.lease``  held by the running daemon of that host id (pid, mount point, since);
- ``hosts/<host>.inbox``  requests for that daemon (``snapfs.chain.mailbox``);
- ``owners/<vid>``        held by the daemon owning the volume (host, since, ``gen``, bumped at
  every change of the volume's chain, size or content that others must not miss);
- ``generation``          the share's change counter, bumped with every volume's ``gen`` and
  when volumes come and go: other daemons poll it to know when to look again.

Lease files are never deleted (a deleted lock file lets two daemons lock two different files of
one name).  Every call here blocks on the share; callers run them through ``snapfs.io``.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import threading
import time

from snapfs.chain.locks import byte_held, try_byte, unlock_byte, wait_byte
from snapfs.errors import Corrupt, SnapfsError, from_oserror

HOLD_BYTE = 0  # held exclusively for as long as the lease is held
RECORD_BYTE = 1  # held around every read (shared) and rewrite (exclusive) of the record


def default_host_id() -> str:
    return socket.gethostname().split(".")[0] or "localhost"


class RecordFile:
    """A JSON record in a file of its own, read and replaced under a lock on one byte."""

    def __init__(self, path: str, mode: int = 0o600):
        self.path = path
        self.mode = mode
        self.fd: int | None = None
        # Worker threads may use one RecordFile at once; its OFD locks cannot keep them
        # apart (a lock taken again through the same open file converts, never waits).
        self._mutex = threading.Lock()

    def _open(self) -> int:
        if self.fd is None:
            try:
                self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, self.mode)
            except OSError as exc:
                raise from_oserror(exc, f"opening {os.path.basename(self.path)}") from None
        return self.fd

    def _load(self, fd: int) -> dict:
        raw = b""
        while True:
            chunk = os.pread(fd, 1 << 16, len(raw))
            if not chunk:
                break
            raw += chunk
        if not raw.strip():
            return {}
        try:
            rec = json.loads(raw)
        except ValueError:
            raise Corrupt(f"{os.path.basename(self.path)} is not valid JSON") from None
        if not isinstance(rec, dict):
            raise Corrupt(f"{os.path.basename(self.path)} does not hold a JSON object")
        return rec

    def _store(self, fd: int, rec: dict) -> None:
        # Overwritten in place, padded with blanks to its old length: a full share still
        # takes a record that does not grow (no block to allocate), and a reader that takes
        # the lock never sees a file cut short.
        data = json.dumps(rec, sort_keys=True).encode()
        data = data.ljust(os.fstat(fd).st_size)
        os.pwrite(fd, data, 0)
        # The bytes (and a grown size) only: a record overwritten in place needs no journal
        # commit for its timestamps, and a change request pays for two of these.
        os.fdatasync(fd)

    def read(self) -> dict:
        with self._mutex:
            return self._read()

    def _read(self) -> dict:
        fd = self._open()
        try:
            wait_byte(fd, RECORD_BYTE, exclusive=False)
            try:
                return self._load(fd)
            finally:
                unlock_byte(fd, RECORD_BYTE)
        except OSError as exc:
            raise from_oserror(exc, f"reading {os.path.basename(self.path)}") from None

    def update(self, change, fresh: bool = False) -> dict:
        """Read the record, let ``change(rec)`` edit it in place, write it back; returns it.
        ``fresh``: start from an empty record (one that cannot be read is replaced)."""
        with self._mutex:
            return self._update(change, fresh)

    def _update(self, change, fresh: bool) -> dict:
        fd = self._open()
        try:
            wait_byte(fd, RECORD_BYTE)
            try:
                rec = {} if fresh else self._load(fd)
                result = change(rec)
                self._store(fd, rec)
                return rec if result is None else result
            finally:
                unlock_byte(fd, RECORD_BYTE)
        except OSError as exc:
            raise from_oserror(exc, f"writing {os.path.basename(self.path)}") from None

    def close(self) -> None:
        if self.fd is not None:
            fd, self.fd = self.fd, None
            try:
                os.close(fd)
            except OSError:
                pass


class Lease(RecordFile):
    """A lease: a record file whose byte 0 its holder keeps locked."""

    held = False

    def try_hold(self, **record) -> bool:
        """Take the lease if nobody holds it; the record then names us."""
        fd = self._open()
        try:
            if not self.held:
                if not try_byte(fd, HOLD_BYTE):
                    return False
                self.held = True
            stamp = {"pid": os.getpid(), "since": time.time(), **record}
            try:
                self.update(lambda rec: rec.update(stamp))
            except SnapfsError:
                pass  # the lock is the lease; the record only tells who holds it
            return True
        except OSError as exc:
            raise from_oserror(exc, f"locking {os.path.basename(self.path)}") from None

    def still_held(self) -> bool:
        """Re-assert the lock: False when the server dropped it and another took it."""
        if not self.held:
            return False
        try:
            return try_byte(self._open(), HOLD_BYTE)
        except OSError:
            return False

    def held_elsewhere(self) -> bool:
        """Whether another daemon (or another lease file object) holds the lease now."""
        if self.held:
            return False
        try:
            return byte_held(self._open(), HOLD_BYTE)
        except OSError as exc:
            raise from_oserror(exc, f"testing {os.path.basename(self.path)}") from None

    def close(self) -> None:
        self.held = False
        super().close()


class Leases:
    """This daemon's leases on one share: its host lease and the volumes it owns."""

    def __init__(self, meta: str, host: str, mountpoint: str | None = None):
        self.meta = meta
        self.host = host
        self.mountpoint = mountpoint
        for d in ("hosts", "owners"):
            os.makedirs(os.path.join(meta, d), mode=0o700, exist_ok=True)
        self.me = Lease(host_lease_path(meta, host))
        self.generation = RecordFile(os.path.join(meta, "generation"))
        self.volumes: dict[str, Lease] = {}

    # -- this daemon -----------------------------------------------------------------------

    def hold_host(self) -> bool:
        return self.me.try_hold(host=self.host, mountpoint=self.mountpoint)

    def host_record(self) -> dict:
        return self.me.read()

    # -- volumes ---------------------------------------------------------------------------
    #
    # ``volumes`` holds only the leases this daemon holds, each on one open file that nothing
    # else uses.  Every look at another volume's lease opens the file anew and closes it: a
    # shared file would let one thread's lock calls convert or drop another's (OFD locks
    # belong to the open file, not to the caller), and these calls run in worker threads.

    def _path(self, vid: str) -> str:
        return os.path.join(self.meta, "owners", vid)

    @contextlib.contextmanager
    def _peek(self, vid: str):
        held = self.volumes.get(vid)
        if held is not None:
            yield held
            return
        lease = Lease(self._path(vid))
        try:
            yield lease
        finally:
            lease.close()

    def owns(self, vid: str) -> bool:
        return vid in self.volumes

    def owned(self) -> list[str]:
        return sorted(self.volumes)

    def try_own(self, vid: str) -> bool:
        """Take ``vid``'s lease if nobody holds it (called with the volume's lock held)."""
        if vid in self.volumes:
            return True
        lease = Lease(self._path(vid))
        try:
            if not lease.try_hold(host=self.host):
                lease.close()
                return False
        except BaseException:
            lease.close()
            raise
        self.volumes[vid] = lease
        return True

    def owner(self, vid: str) -> str | None:
        """The host id of the live daemon owning ``vid``, if not this one."""
        if vid in self.volumes:
            return None
        with self._peek(vid) as lease:
            if not lease.held_elsewhere():
                return None
            return str(lease.read().get("host") or "an unnamed host")

    def disown(self, vid: str) -> Lease | None:
        """Stop holding ``vid``'s lease; the caller closes the file returned (which lets go
        of the lock), off the loop since closing may wait on the share."""
        lease = self.volumes.pop(vid, None)
        if lease is not None:
            lease.held = False
        return lease

    def lost(self) -> list[str]:
        """The volumes whose lease this daemon held but the share no longer gives it."""
        return [vid for vid, lease in list(self.volumes.items()) if not lease.still_held()]

    def volume_gen(self, vid: str) -> int:
        with self._peek(vid) as lease:
            return int(lease.read().get("gen", 0))

    def changed(self, vid: str | None) -> int:
        """Record a change others must see: the volume's ``gen`` and the share's counter."""
        if vid is not None:
            with self._peek(vid) as lease:
                lease.update(lambda rec: rec.__setitem__("gen", rec.get("gen", 0) + 1))
        rec = self.generation.update(lambda r: r.__setitem__("gen", r.get("gen", 0) + 1))
        return rec["gen"]

    def share_gen(self) -> int:
        return int(self.generation.read().get("gen", 0))

    def close(self) -> None:
        for lease in self.volumes.values():
            lease.close()
        self.volumes.clear()
        self.generation.close()
        self.me.close()


def lock_problem(path: str, mounts: str | None = None) -> str | None:
    """Why leases cannot work on the file system holding ``path``, or None.

    An NFS client mounted with ``nolock`` or ``local_lock=posix|all`` keeps fcntl locks on
    the client: every host would get every lease, and two daemons could write one volume.
    ``mounts`` is the text of /proc/self/mounts (read when not given)."""
    if mounts is None:
        with open("/proc/self/mounts") as f:
            mounts = f.read()
    path = os.path.realpath(path)
    best: tuple[str, str, str] | None = None
    for line in mounts.splitlines():
        fields = line.split()
        if len(fields) < 4:
            continue
        mnt = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[1])
        inside = path == mnt or path.startswith(mnt.rstrip("/") + "/")
        if inside and (best is None or len(mnt) >= len(best[0])):
            best = (mnt, fields[2], fields[3])
    if best is None or not best[1].startswith("nfs"):
        return None
    opts = best[2].split(",")
    if "nolock" in opts:
        return f"{best[0]} is an NFS mount with 'nolock': file locks stay on this host"
    for o in opts:
        if o in ("local_lock=all", "local_lock=posix"):
            return f"{best[0]} is an NFS mount with '{o}': file locks stay on this host"
    return None


def host_lease_path(meta: str, host: str) -> str:
    return os.path.join(meta, "hosts", f"{host}.lease")


def host_running(meta: str, host: str) -> bool:
    """Whether a daemon of host id ``host`` runs on the share (holds its host lease)."""
    lease = Lease(host_lease_path(meta, host))
    try:
        return lease.held_elsewhere()
    finally:
        lease.close()


def survey(meta: str) -> dict:
    """What ``snapfs info`` shows: running daemons and volume owners, read without taking
    any lease (a lease nobody holds is shown as free)."""
    out: dict = {"hosts": [], "owners": {}}
    hosts = os.path.join(meta, "hosts")
    for n in sorted(os.listdir(hosts)) if os.path.isdir(hosts) else []:
        if n.endswith(".lease"):
            lease = Lease(os.path.join(hosts, n))
            try:
                if lease.held_elsewhere():
                    out["hosts"].append({"host": n[:-6], **lease.read()})
            finally:
                lease.close()
    owners = os.path.join(meta, "owners")
    for vid in sorted(os.listdir(owners)) if os.path.isdir(owners) else []:
        lease = Lease(os.path.join(owners, vid))
        try:
            rec = lease.read()
            held = lease.held_elsewhere()
        finally:
            lease.close()
        out["owners"][vid] = {"owner": rec.get("host") if held else None,
                              "since": rec.get("since") if held else None,
                              "gen": rec.get("gen", 0)}
    return out
