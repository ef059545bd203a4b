"""Real mounts: the daemon runs in a subprocess (never in the test process: pyfuse3 has one
global session, and a blocking syscall here would stall the loop serving it), and every mount
is unmounted in teardown, also on failure."""

import os
import shutil
import subprocess
import sys
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def require_fuse() -> None:
    if not os.path.exists("/dev/fuse") or not shutil.which("fusermount3"):
        raise RuntimeError("FUSE is not usable here (/dev/fuse, fusermount3): run `make test`, "
                           "which installs fuse3")


class Mount:
    def __init__(self, share, mnt, log, proc):
        self.share, self.mnt, self.log, self.proc = str(share), str(mnt), str(log), proc

    def path(self, *parts) -> str:
        return os.path.join(self.mnt, *parts)

    def share_path(self, *parts) -> str:
        return os.path.join(self.share, *parts)

    def log_text(self) -> str:
        try:
            with open(self.log) as f:
                return f.read()
        except OSError:
            return ""

    def unmount(self) -> None:
        unmount(self.mnt, self.proc)


def start(share, mnt, *opts: str, log=None, wait=True):
    """Start ``mount.snapfs --foreground`` and wait for the mount (failing if the daemon dies)."""
    require_fuse()
    os.makedirs(mnt, exist_ok=True)
    log = log or os.path.join(os.path.dirname(str(mnt)), f"{os.path.basename(str(mnt))}.log")
    argv = [sys.executable, "-m", "snapfs.mount", str(share), str(mnt), "--foreground",
            "-o", ",".join(("log=" + str(log),) + opts)]
    env = dict(os.environ, PYTHONPATH=REPO)
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    m = Mount(share, mnt, log, proc)
    if not wait:
        return m
    deadline = time.monotonic() + 20
    while not os.path.ismount(str(mnt)):
        if proc.poll() is not None:
            out, err = proc.communicate()
            raise RuntimeError(f"mount.snapfs exited with {proc.returncode}: {err.strip()}\n"
                               f"{m.log_text()}")
        if time.monotonic() > deadline:
            unmount(str(mnt), proc)
            raise RuntimeError(f"mount did not appear within 20 s\n{m.log_text()}")
        time.sleep(0.02)
    return m


def unmount(mnt: str, proc=None, timeout: float = 30) -> None:
    """Unmount and wait for the daemon; lazy unmount and kill when it will not go."""
    if os.path.ismount(mnt):
        r = subprocess.run(["fusermount3", "-u", mnt], capture_output=True)
        if r.returncode != 0:
            subprocess.run(["fusermount3", "-u", "-z", mnt], capture_output=True)
    if proc is not None:
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stdout:
            proc.stdout.close()
        if proc.stderr:
            proc.stderr.close()


@pytest.fixture
def mounted(tmp_path):
    """A fresh share directory mounted with snapfs; yields a ``Mount``."""
    share = tmp_path / "share"
    share.mkdir()
    m = start(share, tmp_path / "mnt")
    try:
        yield m
    finally:
        m.unmount()
        if m.proc.returncode not in (0, None):
            print(m.log_text())
