"""allow_other: a hypervisor user opens volumes; only root and ctl_gid use the control files."""

import json
import os
import shutil
import subprocess
import sys
import tempfile

import pytest

from tests.mount.conftest import start

HYPERVISOR_GID = 64000
CTL_GID = 64001
OTHER_UID = 64010

PROBE = r"""
import json, os, sys
mnt = sys.argv[1]
out = {}
def attempt(name, fn):
    try:
        fn()
        out[name] = "ok"
    except OSError as e:
        out[name] = os.strerror(e.errno)
def read_volume():
    with open(os.path.join(mnt, "volume-v"), "rb") as f:
        f.read(4096)
def write_volume():
    fd = os.open(os.path.join(mnt, "volume-v"), os.O_WRONLY)
    try:
        os.pwrite(fd, b"x" * 512, 0)
    finally:
        os.close(fd)
def control():
    fd = os.open(os.path.join(mnt, ".snapfs", "control"), os.O_RDWR)
    try:
        os.write(fd, b'{"op": "list"}')
    finally:
        os.close(fd)
def request_file():
    p = os.path.join(mnt, ".snapfs", "requests", "probe-%d" % os.getpid())
    fd = os.open(p, os.O_CREAT | os.O_EXCL | os.O_RDWR)
    try:
        os.write(fd, b'{"op": "list"}')
        assert json.loads(os.pread(fd, 65536, 0))["ok"]
    finally:
        os.close(fd)
attempt("read_volume", read_volume)
attempt("write_volume", write_volume)
attempt("control", control)
attempt("request_file", request_file)
print(json.dumps(out))
"""


@pytest.fixture
def shared_mount():
    # Other users must reach the mount point: pytest's tmp_path lives under a 0700 directory.
    base = tempfile.mkdtemp(prefix="snapfs-perm-")
    os.chmod(base, 0o755)
    share = os.path.join(base, "share")
    os.mkdir(share)
    m = start(share, os.path.join(base, "mnt"), "allow_other", f"gid={HYPERVISOR_GID}",
              f"ctl_gid={CTL_GID}", "mode=0660", log=os.path.join(base, "log"))
    try:
        os.chmod(m.mnt, 0o755)
        with open(m.path(".snapfs", "control"), "r+b", buffering=0) as f:
            f.write(json.dumps({"op": "create-volume", "volume": "v", "size": 1 << 20}).encode())
        yield m
    finally:
        m.unmount()
        shutil.rmtree(base, ignore_errors=True)


# The system interpreter: a virtualenv's may live where other users cannot reach (/root).
PYTHON = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable


def probe(mnt: str, uid: int, groups: list[int]) -> dict:
    r = subprocess.run([PYTHON, "-c", PROBE, mnt], capture_output=True, text=True,
                       user=uid, group=groups[0], extra_groups=groups[1:], cwd="/")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_hypervisor_group_uses_volumes_not_control(shared_mount):
    st = os.stat(shared_mount.path("volume-v"))
    assert (st.st_gid, st.st_mode & 0o777) == (HYPERVISOR_GID, 0o660)
    got = probe(shared_mount.mnt, OTHER_UID, [HYPERVISOR_GID])
    assert got["read_volume"] == "ok" and got["write_volume"] == "ok"
    assert got["control"] == os.strerror(13) and got["request_file"] == os.strerror(13)


def test_ctl_group_uses_control_files(shared_mount):
    got = probe(shared_mount.mnt, OTHER_UID, [CTL_GID])
    assert got["control"] == "ok" and got["request_file"] == "ok"
    assert got["read_volume"] == os.strerror(13)


def test_strangers_get_nothing(shared_mount):
    got = probe(shared_mount.mnt, OTHER_UID, [OTHER_UID])
    assert set(got.values()) == {os.strerror(13)}
