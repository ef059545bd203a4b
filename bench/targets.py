"""The three things measured side by side, each over its own copy of one chain.

- ``snapfs``: the volume file in a snapfs mount over a share directory;
- ``qsd``: qemu-storage-daemon exporting the identical qcow2 chain over FUSE (the C peer);
- ``direct``: the chain converted to one raw file on the same file system (the limit).

Daemons run in their own session, so a Ctrl-C reaches only the bench, which then unmounts
everything in order; ``close()`` never raises, because a stale FUSE mount breaks the next run.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VID = "v"
MOUNT_WAIT = 30.0

#: Warnings, errors and abnormal exits of every snapfs daemon of this run (for the report).
DAEMON_PROBLEMS: list[str] = []


def run(*argv: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(argv, check=True, capture_output=True, text=True, **kw)


def copy_tree(src: str, dst: str) -> None:
    run("cp", "-a", "--sparse=always", src, dst)


def active_file(share: str) -> str:
    """The file the guest writes to, as upstream Cinder finds it (the ``.info`` file)."""
    info = os.path.join(share, f"volume-{VID}.info")
    if os.path.exists(info):
        with open(info) as f:
            return os.path.join(share, json.load(f)["active"])
    return os.path.join(share, f"volume-{VID}")


def unmount(path: str) -> None:
    if os.path.ismount(path):
        if subprocess.run(["fusermount3", "-u", path], capture_output=True).returncode:
            subprocess.run(["fusermount3", "-u", "-z", path], capture_output=True)


def mounts_under(path: str) -> list[str]:
    """Mount points at or below ``path``, from /proc/mounts."""
    root = os.path.realpath(path).rstrip("/") + "/"
    with open("/proc/mounts") as f:
        points = [line.split()[1].replace("\\040", " ") for line in f]
    return [p for p in points if (p + "/").startswith(root)]


def sweep_mounts(path: str) -> list[str]:
    """Lazily unmount whatever is still mounted under ``path``; the list of what was."""
    left = mounts_under(path)
    for p in sorted(left, key=len, reverse=True):
        subprocess.run(["fusermount3", "-u", "-z", p], capture_output=True)
    return left


def _stop(proc: subprocess.Popen, timeout: float) -> None:
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _wait_mounted(path: str, proc: subprocess.Popen, errfile: str, what: str) -> None:
    deadline = time.monotonic() + MOUNT_WAIT
    while not os.path.ismount(path):
        if proc.poll() is not None or time.monotonic() > deadline:
            with open(errfile, errors="replace") as f:
                raise RuntimeError(f"{what} did not mount {path}: {f.read()[-500:]}")
        time.sleep(0.02)


class SnapfsMount:
    """``mount.snapfs SHARE MNT --foreground`` as a child; ``env`` adds variables (the slow
    share's injected delay).  ``close()`` records what the daemon logged above INFO."""

    def __init__(self, share: str, mnt: str, log: str, env: dict | None = None,
                 options: str = ""):
        self.share, self.mnt, self.log = share, mnt, log
        os.makedirs(mnt, exist_ok=True)
        argv = [sys.executable, "-m", "snapfs.mount", share, mnt, "--foreground",
                "-o", f"log={log}" + (f",{options}" if options else "")]
        with open(log + ".stderr", "w") as err:
            self.proc = subprocess.Popen(argv, env=dict(os.environ, PYTHONPATH=REPO, **(env or {})),
                                         stdout=subprocess.DEVNULL, stderr=err,
                                         start_new_session=True)
        try:
            _wait_mounted(mnt, self.proc, log + ".stderr", "snapfs")
        except BaseException:
            self.close()
            raise

    @property
    def pid(self) -> int:
        return self.proc.pid

    def close(self) -> None:
        unmount(self.mnt)
        _stop(self.proc, 60)
        self._record_problems()

    def _record_problems(self) -> None:
        if self.proc.returncode:
            DAEMON_PROBLEMS.append(f"{self.log}: daemon exited with {self.proc.returncode}")
        for path in (self.log, self.log + ".stderr"):
            try:
                with open(path, errors="replace") as f:
                    lines = f.read().splitlines()
            except OSError:
                continue
            bad = [ln for ln in lines
                   if any(k in ln for k in (" WARNING ", " ERROR ", " CRITICAL ", "Traceback",
                                            "Fatal Python error"))]
            for ln in bad:
                DAEMON_PROBLEMS.append(f"{path}: {ln}")
                print(f"  snapfs logged: {ln}", file=sys.stderr, flush=True)


class Target:
    """One served copy of the chain: ``path`` is the raw volume file fio and dd use.
    ``fuse`` targets get O_DIRECT I/O (a guest with cache=none, and no FUSE page cache
    serving re-reads); the direct file is read through the page cache, as the daemons read
    their share files, so it is the limit of the same storage path."""

    name = ""
    fuse = True
    path = ""

    def close(self) -> None:
        pass


class SnapfsTarget(Target):
    name = "snapfs"

    def __init__(self, share: str, work: str, env: dict | None = None, options: str = ""):
        self.share = os.path.join(work, "share")
        copy_tree(share, self.share)
        self.mount = SnapfsMount(self.share, os.path.join(work, "mnt"),
                                 os.path.join(work, "snapfs.log"), env, options)
        self.path = os.path.join(self.mount.mnt, f"volume-{VID}")

    def close(self) -> None:
        self.mount.close()


class QsdTarget(Target):
    """qemu-storage-daemon's FUSE export of the chain's active file, its share files read
    through the host page cache (``cache.direct=off``) like snapfs's."""

    name = "qsd"

    def __init__(self, share: str, work: str):
        self.share = os.path.join(work, "share")
        copy_tree(share, self.share)
        self.path = os.path.join(work, "export")
        open(self.path, "w").close()  # a FUSE export's mount point is a regular file
        argv = ["qemu-storage-daemon",
                "--blockdev", f"driver=file,node-name=file,filename={active_file(self.share)},"
                              "cache.direct=off",
                "--blockdev", "driver=qcow2,node-name=fmt,file=file",
                "--export", f"type=fuse,id=exp,node-name=fmt,mountpoint={self.path},"
                            "writable=on"]
        errfile = os.path.join(work, "qsd.stderr")
        with open(errfile, "w") as err:
            self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=err,
                                         start_new_session=True)
        try:
            _wait_mounted(self.path, self.proc, errfile, "qemu-storage-daemon")
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        unmount(self.path)
        if self.proc.poll() is None:
            self.proc.terminate()
        _stop(self.proc, 30)


class DirectTarget(Target):
    name = "direct"
    fuse = False

    def __init__(self, share: str, work: str):
        self.path = os.path.join(work, "volume.raw")
        run("qemu-img", "convert", "-O", "raw", active_file(share), self.path)


KINDS = {"snapfs": SnapfsTarget, "qsd": QsdTarget, "direct": DirectTarget}


@contextlib.contextmanager
def serving(share: str, work: str, names: list[str]):
    """Every named target over its own copy of ``share`` (under ``work``); all closed on
    exit, also when one of them fails to start."""
    with contextlib.ExitStack() as stack:
        targets = []
        for name in names:
            d = os.path.join(work, name)
            os.makedirs(d)
            t = KINDS[name](share, d)
            stack.callback(t.close)
            targets.append(t)
        yield targets
