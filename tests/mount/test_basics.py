"""The mount as an admin uses it: ls, dd, cp, truncate, rm, the control file."""

import errno
import json
import os
import subprocess
import sys

import pytest

from snapfs.ctl import Client, ControlError
from tests import qemu

MiB = 1 << 20


def test_volume_lifecycle_through_the_mount(mounted, tmp_path):
    with Client(mounted.mnt) as c:
        c.request("create-volume", volume="v1", size=8 * MiB)
        data = os.urandom(3 * MiB)
        with open(mounted.path("volume-v1"), "r+b") as f:
            f.seek(MiB)
            f.write(data)
        c.request("create-snapshot", volume="v1", snapshot="s1")
        with open(mounted.path("volume-v1"), "r+b") as f:
            f.write(b"\xff" * MiB)
        assert sorted(os.listdir(mounted.path(".snapshots", "volume-v1"))) == ["s1"]
        snap = open(mounted.path(".snapshots", "volume-v1", "s1"), "rb").read()
        assert snap == bytes(MiB) + data + bytes(4 * MiB)
        vol = open(mounted.path("volume-v1"), "rb").read()
        assert vol == b"\xff" * MiB + data + bytes(4 * MiB)
        # qemu-img reads the share exactly as the mount serves it
        info = json.loads(open(mounted.share_path("volume-v1.info")).read())
        assert info == {"active": "volume-v1.s1", "s1": "volume-v1.s1"}
        assert qemu.to_raw(mounted.share_path("volume-v1.s1"), str(tmp_path / "o.raw")) == vol
        assert qemu.check(mounted.share_path("volume-v1.s1"))[0] == 0
        with pytest.raises(ControlError) as e:
            c.request("delete-volume", volume="v1")
        assert e.value.errno == errno.EBUSY
        c.request("delete-snapshot", volume="v1", snapshot="s1")
        assert os.listdir(mounted.path(".snapshots", "volume-v1")) == []
        assert open(mounted.path("volume-v1"), "rb").read() == vol
    os.unlink(mounted.path("volume-v1"))
    assert "volume-v1" not in os.listdir(mounted.mnt)


def test_block_device_semantics(mounted):
    path = mounted.path("volume-b")
    with open(path, "wb"):  # creating the file creates an empty volume
        pass
    assert os.path.getsize(path) == 0
    os.truncate(path, 4 * MiB)
    assert os.path.getsize(path) == 4 * MiB
    with open(path, "r+b") as f:
        f.write(b"x" * 4096)
    with open(path, "wb"):  # O_TRUNC is ignored
        pass
    assert os.path.getsize(path) == 4 * MiB
    assert open(path, "rb").read(4096) == b"x" * 4096
    for size in (0, MiB):
        with pytest.raises(OSError) as e:
            os.truncate(path, size)
        assert e.value.errno == errno.EINVAL
    fd = os.open(path, os.O_WRONLY)
    try:
        with pytest.raises(OSError) as e:
            os.pwrite(fd, b"y", 4 * MiB)
        assert e.value.errno == errno.ENOSPC
    finally:
        os.close(fd)
    r = subprocess.run(["dd", "if=/dev/zero", f"of={path}", "bs=64k", "count=4", "conv=notrunc"],
                       capture_output=True)
    assert r.returncode == 0
    assert os.path.getsize(path) == 4 * MiB


def test_control_errors_and_private_replies(mounted):
    fd1 = os.open(mounted.path(".snapfs", "control"), os.O_RDWR)
    fd2 = os.open(mounted.path(".snapfs", "control"), os.O_RDWR)
    try:
        for bad, err in ((b"{not json", "EINVAL"), (b'{"op": "nope"}', "EINVAL"),
                         (b'{"op": "info", "volume": "missing"}', "ENOENT"),
                         (b'{"op": "create-volume", "volume": "volume-x", "size": 512}', "EINVAL"),
                         (b'{"op": "create-volume", "volume": "x", "size": 100}', "EINVAL"),
                         (b"x" * (65 * 1024), "EINVAL")):
            with pytest.raises(OSError) as e:
                os.write(fd1, bad)
            assert errno.errorcode[e.value.errno] == err
            reply = json.loads(os.pread(fd1, 65536, 0))
            assert reply["ok"] is False and reply["errno"] == err and reply["message"]
        os.write(fd2, b'{"op": "list"}\n')
        assert json.loads(os.pread(fd2, 65536, 0)) == {"ok": True, "op": "list",
                                                        "result": {"volumes": []}}
        assert json.loads(os.pread(fd1, 65536, 0))["ok"] is False
    finally:
        os.close(fd1)
        os.close(fd2)
    assert os.listdir(mounted.share) == [".snapfs"]


def test_share_files_hidden_and_status(mounted):
    with Client(mounted.mnt) as c:
        c.request("create-volume", volume="v", size=MiB, format="qcow2")
        c.request("create-snapshot", volume="v", snapshot="s")
        assert os.listdir(mounted.path(".snapfs", "requests")) == [os.path.basename(c.path)]
    assert os.listdir(mounted.path(".snapfs", "requests")) == []
    assert sorted(os.listdir(mounted.mnt)) == [".snapfs", ".snapshots", "volume-v"]
    status = json.loads(open(mounted.path(".snapfs", "status")).read())
    assert [v["volume"] for v in status["volumes"]] == ["v"]
    assert status["volumes"][0]["provisioned"] == MiB and status["free_bytes"] > 0


def test_snapshot_files_are_read_only(mounted):
    with Client(mounted.mnt) as c:
        c.request("create-volume", volume="r", size=MiB)
        c.request("create-snapshot", volume="r", snapshot="s")
    with pytest.raises(OSError) as e:
        open(mounted.path(".snapshots", "volume-r", "s"), "r+b")
    assert e.value.errno in (errno.EROFS, errno.EACCES)


def test_check_repair_refuses_a_live_volume(mounted):
    with Client(mounted.mnt) as c:
        c.request("create-volume", volume="live", size=MiB, format="qcow2")
    fd = os.open(mounted.path("volume-live"), os.O_RDWR)
    try:
        os.pwrite(fd, b"x" * 4096, 0)
        r = subprocess.run([sys.executable, "-m", "snapfs.cli", "check", "--repair",
                            mounted.share_path("volume-live")], capture_output=True, text=True)
        assert r.returncode == 1 and "in use" in r.stderr, (r.returncode, r.stdout, r.stderr)
        r = subprocess.run([sys.executable, "-m", "snapfs.cli", "check",
                            mounted.share_path("volume-live")], capture_output=True, text=True)
        assert r.returncode == 0, r.stdout + r.stderr
    finally:
        os.close(fd)
