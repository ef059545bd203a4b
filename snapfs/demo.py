"""The demo behind `make demo`: a demo share mounted with snapfs, a volume written through the
mount, two snapshots browsed with ls and copied out with cp, a clone, and the unmount, with
qemu-img looking at the share as upstream Cinder would."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

from snapfs.chain.leases import default_host_id, host_running
from snapfs.ctl import Client

MiB = 1 << 20
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def say(msg: str = "") -> None:
    print(msg, flush=True)


def sh(*argv: str) -> None:
    say("$ " + " ".join(argv))
    out = subprocess.run(argv, capture_output=True, text=True)
    text = (out.stdout + out.stderr).rstrip()
    if text:
        say(text)
    if out.returncode:
        raise SystemExit(f"{argv[0]} failed with exit code {out.returncode}")


def digest(path: str, size: int | None = None) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        left = size
        while left is None or left > 0:
            chunk = f.read(MiB if left is None else min(MiB, left))
            if not chunk:
                break
            h.update(chunk)
            if left is not None:
                left -= len(chunk)
    return h.hexdigest()[:16]


def mount(share: str, mnt: str, log: str) -> None:
    env = dict(os.environ, SNAPFS_PYTHON=sys.executable, PYTHONPATH=REPO)
    argv = [os.path.join(REPO, "scripts", "mount.snapfs"), share, mnt, "-o", f"log={log}"]
    say("$ mount.snapfs " + " ".join(argv[1:]))
    subprocess.run(argv, check=True, env=env)


def main(work: str) -> None:
    share, mnt, out = (os.path.join(work, d) for d in ("share", "mnt", "out"))
    for d in (share, mnt, out):
        os.makedirs(d)
    mount(share, mnt, os.path.join(work, "snapfs.log"))
    try:
        with Client(mnt) as ctl:
            say("\n# a 64 MiB volume, 'day 1' data written through the mount")
            ctl.request("create-volume", volume="demo", size=64 * MiB)
            vol = os.path.join(mnt, "volume-demo")
            with open(vol, "r+b") as f:
                f.write(b"day 1 " * (4 * MiB // 6))
            say("\n# snapshot 'monday', more writes, snapshot 'tuesday', more writes")
            ctl.request("create-snapshot", volume="demo", snapshot="monday")
            monday = digest(vol)
            with open(vol, "r+b") as f:
                f.seek(2 * MiB)
                f.write(b"day 2 " * (8 * MiB // 6))
            ctl.request("create-snapshot", volume="demo", snapshot="tuesday")
            with open(vol, "r+b") as f:
                f.seek(20 * MiB)
                f.write(b"day 3 " * MiB)
            sh("ls", "-l", mnt)
            sh("ls", "-l", os.path.join(mnt, ".snapshots", "volume-demo"))
            say("\n# copy a snapshot out with cp and verify it")
            copy = os.path.join(out, "monday.raw")
            sh("cp", "--sparse=always", os.path.join(mnt, ".snapshots", "volume-demo", "monday"),
               copy)
            ok = digest(copy) == monday
            say(f"monday.raw sha256 {digest(copy)} == volume at the snapshot {monday}: {ok}")
            say("\n# a clone of 'tuesday', 128 MiB, independent of the source")
            ctl.request("clone", volume="demo-clone", source_volume="demo",
                        source_snapshot="tuesday", size=128 * MiB)
            tuesday_view = digest(os.path.join(mnt, ".snapshots", "volume-demo", "tuesday"))
            clone_view = digest(os.path.join(mnt, "volume-demo-clone"), 64 * MiB)
            say(f"clone == tuesday: {clone_view == tuesday_view}")
            say("\n# the share, as upstream Cinder and qemu-img see it")
            sh("ls", "-l", share)
            say("$ cat " + os.path.join(share, "volume-demo.info"))
            say(open(os.path.join(share, "volume-demo.info")).read())
            sh("qemu-img", "info", "-U", "--backing-chain",
               os.path.join(share, "volume-demo.tuesday"))
            say("\n# deleting 'monday' merges its overlay away, in the background")
            ctl.request("delete-snapshot", volume="demo", snapshot="monday")
            for _ in range(100):
                status = json.loads(open(os.path.join(mnt, ".snapfs", "status")).read())
                if not status["jobs"]:
                    break
                time.sleep(0.1)
            sh("ls", "-l", os.path.join(mnt, ".snapshots", "volume-demo"))
            sh("cat", os.path.join(mnt, ".snapfs", "status"))
            if not ok or clone_view != tuesday_view:
                raise SystemExit("demo: content mismatch")
    finally:
        say("\n# unmount")
        sh("fusermount3", "-u", mnt)
        for _ in range(100):  # the daemon lets go of the share just after the unmount
            if not host_running(os.path.join(share, ".snapfs"), default_host_id()):
                break
            time.sleep(0.1)
    for name in sorted(os.listdir(share)):
        if name.startswith("volume-") and not name.endswith(".info"):
            path = os.path.join(share, name)
            r = subprocess.run(["qemu-img", "check", "-U", path], capture_output=True, text=True)
            verdict = "raw" if r.returncode == 63 else (
                "clean" if r.returncode == 0 else f"exit {r.returncode}")
            say(f"qemu-img check {name}: {verdict}")
    say("\ndemo done")


def run() -> None:
    work = tempfile.mkdtemp(prefix="snapfs-demo-")
    try:
        main(work)
    finally:
        mnt = os.path.join(work, "mnt")
        if os.path.ismount(mnt):
            subprocess.run(["fusermount3", "-u", "-z", mnt])
        time.sleep(0.5)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    run()
