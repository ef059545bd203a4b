"""What a compute host runs so that the path a volume's connection names exists there.

The Cinder driver answers ``initialize_connection`` with ``device_path =
<base>/<md5 of the share>/volume-<id>``: the volume's raw file in a snapfs mount.  Nova's
``gpfs`` volume driver opens that path as it is, so every host that runs guests must have the
same share mounted with snapfs at the same place, each daemon with its own host id (the share
is safe for many daemons: see ``snapfs.chain.leases``).  ``snapfs attach-mounts`` does that for
every share of the driver's shares file: the NFS export at ``<base>/.shares/<md5>`` (where
os-brick's remotefs client mounts it on the Cinder host), snapfs over it at ``<base>/<md5>``.
It is idempotent, so a boot script or a systemd unit before nova-compute may run it at will.
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys

SHARE_RE = re.compile(r".+:/.+")


def share_digest(share: str) -> str:
    return hashlib.md5(share.encode("utf-8"), usedforsecurity=False).hexdigest()


def mount_point(base: str, share: str) -> str:
    """Where snapfs serves ``share`` (the driver's ``snapfs_mount_point_base`` layout)."""
    return os.path.join(base, share_digest(share))


def nfs_mount_point(base: str, share: str) -> str:
    """Where the NFS export under the snapfs mount is mounted (os-brick's layout)."""
    return os.path.join(base, ".shares", share_digest(share))


def read_shares(path: str, on_bad=None) -> dict[str, str | None]:
    """The driver's shares file: ``host:/export [NFS mount flags]`` or a local path a line.
    A line naming neither is passed to ``on_bad`` and skipped, or raises ValueError."""
    shares: dict[str, str | None] = {}
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            address, _sep, flags = line.partition(" ")
            address = address.replace("\\040", " ")
            if not (os.path.isabs(address) or SHARE_RE.match(address)):
                if on_bad is None:
                    raise ValueError(f"share {address!r} is neither host:/export nor a "
                                     "local path")
                on_bad(address)
                continue
            shares[address] = flags.strip() or None
    return shares


def fstype(path: str) -> str | None:
    """The type of the file system mounted at ``path`` (the topmost), or None."""
    found = None
    with open("/proc/self/mounts") as f:
        for line in f:
            fields = line.split()
            if len(fields) > 2 and _unescape(fields[1]) == path:
                found = fields[2]
    return found


def _unescape(field: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def ensure_mounted(share: str, base: str, *, nfs_flags: str | None = None,
                   options: str = "allow_other", helper: str | None = None,
                   run=subprocess.run) -> str:
    """Mount ``share`` with snapfs at its place under ``base`` unless it is; returns the
    mount point.  Raises RuntimeError with the failing command's message."""
    base = os.path.abspath(base)
    mnt = mount_point(base, share)
    kind = fstype(mnt)
    if kind == "fuse.snapfs":
        try:
            os.stat(os.path.join(mnt, ".snapfs", "status"))
            return mnt
        except OSError:  # the daemon is gone: mount it again
            _run(run, ["umount", "-l", mnt])
    elif kind is not None:
        raise RuntimeError(f"{mnt} (for {share}) is mounted, but not by snapfs ({kind})")
    if os.path.isabs(share):
        source = share
    else:
        source = nfs_mount_point(base, share)
        os.makedirs(source, exist_ok=True)
        if fstype(source) is None:
            _run(run, ["mount", "-t", "nfs", *(nfs_flags.split() if nfs_flags else []),
                       share, source])
    os.makedirs(mnt, exist_ok=True)
    helper = helper or _helper()
    _run(run, [*helper, source, mnt, "-o", options])
    return mnt


def _helper() -> list[str]:
    for p in ("/sbin/mount.snapfs", "/usr/sbin/mount.snapfs"):
        if os.access(p, os.X_OK):
            return [p]
    return [sys.executable, "-m", "snapfs.mount"]


def _run(run, argv: list[str]) -> None:
    r = run(argv, capture_output=True, text=True)
    if r.returncode != 0:
        msg = (r.stderr or r.stdout or "").strip().splitlines()
        raise RuntimeError(f"{' '.join(argv)}: {msg[-1] if msg else f'exit {r.returncode}'}")
