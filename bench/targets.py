"""The three things measured side by side, each over its own copy of one chain.

- ``snapfs``: the volume file in a snapfs mount over a share directory;
- ``qsd``: qemu-storage-daemon exporting the identical qcow2 chain over FUSE (the C peer);
- ``direct``: the chain converted to one raw file on the same file system (the limit).

Every target is torn down in ``close()``, which never raises: a stale FUSE mount would break
the next run.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VID = "v"


def run(*argv: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(argv, check=True, capture_output=True, text=True, **kw)


def copy_tree(src: str, dst: str) -> None:
    run("cp", "-a", "--sparse=always", src, dst)


def unmount(path: str) -> None:
    if os.path.ismount(path):
        r = subprocess.run(["fusermount3", "-u", path], capture_output=True)
        if r.returncode:
            subprocess.run(["fusermount3", "-u", "-z", path], capture_output=True)


class SnapfsMount:
    """``mount.snapfs SHARE MNT`` in the foreground as a child; ``env`` adds variables (the
    slow share's injected delay)."""

    def __init__(self, share: str, mnt: str, log: str, env: dict | None = None):
        self.share, self.mnt = share, mnt
        os.makedirs(mnt, exist_ok=True)
        argv = [sys.executable, "-m", "snapfs.mount", share, mnt, "--foreground",
                "-o", f"log={log}"]
        self.proc = subprocess.Popen(argv, env=dict(os.environ, PYTHONPATH=REPO, **(env or {})),
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 30
        while not os.path.ismount(mnt):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.close()
                raise RuntimeError(f"snapfs did not mount {mnt}: "
                                   f"{self.proc.stderr.read().decode()[-500:]}")
            time.sleep(0.02)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def close(self) -> None:
        unmount(self.mnt)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class Target:
    name = ""
    path = ""

    def close(self) -> None:
        pass


class SnapfsTarget(Target):
    name = "snapfs"

    def __init__(self, share: str, work: str, env: dict | None = None):
        self.share = os.path.join(work, "share")
        copy_tree(share, self.share)
        self.mount = SnapfsMount(self.share, os.path.join(work, "mnt"),
                                 os.path.join(work, "snapfs.log"), env)
        self.path = os.path.join(self.mount.mnt, f"volume-{VID}")

    def close(self) -> None:
        self.mount.close()


class QsdTarget(Target):
    """qemu-storage-daemon's FUSE export of the chain's active file (cache as a guest with
    cache=none would not use: the host page cache, like snapfs's share files)."""

    name = "qsd"

    def __init__(self, share: str, work: str):
        self.share = os.path.join(work, "share")
        copy_tree(share, self.share)
        active = active_file(self.share)
        self.path = os.path.join(work, "export")
        open(self.path, "w").close()
        argv = ["qemu-storage-daemon",
                "--blockdev", f"driver=file,node-name=file,filename={active},cache.direct=off",
                "--blockdev", "driver=qcow2,node-name=fmt,file=file",
                "--export", f"type=fuse,id=exp,node-name=fmt,mountpoint={self.path},"
                            "writable=on"]
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 30
        while not os.path.ismount(self.path):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.close()
                raise RuntimeError("qemu-storage-daemon did not export the chain: "
                                   f"{self.proc.stderr.read().decode()[-500:]}")
            time.sleep(0.02)

    def close(self) -> None:
        unmount(self.path)
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class DirectTarget(Target):
    name = "direct"

    def __init__(self, share: str, work: str):
        self.path = os.path.join(work, "volume.raw")
        run("qemu-img", "convert", "-O", "raw", active_file(share), self.path)


def active_file(share: str) -> str:
    info = os.path.join(share, f"volume-{VID}.info")
    if os.path.exists(info):
        with open(info) as f:
            return os.path.join(share, json.load(f)["active"])
    return os.path.join(share, f"volume-{VID}")


def open_targets(share: str, work: str, names: list[str]) -> list[Target]:
    """Every target over its own copy of ``share``; all closed again if one fails."""
    out: list[Target] = []
    kinds = {"snapfs": SnapfsTarget, "qsd": QsdTarget, "direct": DirectTarget}
    try:
        for name in names:
            d = os.path.join(work, name)
            os.makedirs(d)
            out.append(kinds[name](share, d))
    except BaseException:
        close_all(out)
        raise
    return out


def close_all(targets: list[Target]) -> None:
    for t in targets:
        try:
            t.close()
        except Exception as exc:  # noqa: BLE001 -- keep closing the others
            print(f"closing {t.name}: {exc}", file=sys.stderr)


def remove(path: str) -> None:
    shutil.rmtree(path, ignore_errors=True)
