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

import json
import os
import re
import socket
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
        os.fsync(fd)

    def read(self) -> dict:
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

    def drop(self) -> None:
        if self.held:
            self.held = False
            try:
                unlock_byte(self._open(), HOLD_BYTE)
            except (OSError, SnapfsError):
                pass  # closing the file drops it as well

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

    def _lease(self, vid: str) -> Lease:
        lease = self.volumes.get(vid)
        if lease is None:
            lease = self.volumes[vid] = Lease(os.path.join(self.meta, "owners", vid))
        return lease

    def owns(self, vid: str) -> bool:
        lease = self.volumes.get(vid)
        return lease is not None and lease.held

    def owned(self) -> list[str]:
        return sorted(v for v, lease in self.volumes.items() if lease.held)

    def try_own(self, vid: str) -> bool:
        return self._lease(vid).try_hold(host=self.host)

    def owner(self, vid: str) -> str | None:
        """The host id of the live daemon owning ``vid``, if not this one."""
        lease = self._lease(vid)
        if lease.held or not lease.held_elsewhere():
            return None
        return str(lease.read().get("host") or "an unnamed host")

    def disown(self, vid: str) -> None:
        lease = self.volumes.pop(vid, None)
        if lease is not None:
            lease.close()

    def lost(self) -> list[str]:
        """The volumes whose lease this daemon held but the share no longer gives it."""
        return [vid for vid, lease in list(self.volumes.items())
                if lease.held and not lease.still_held()]

    def volume_gen(self, vid: str) -> int:
        return int(self._lease(vid).read().get("gen", 0))

    def changed(self, vid: str | None) -> int:
        """Record a change others must see: the volume's ``gen`` and the share's counter."""
        if vid is not None:
            self._lease(vid).update(lambda rec: rec.__setitem__("gen", rec.get("gen", 0) + 1))
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
