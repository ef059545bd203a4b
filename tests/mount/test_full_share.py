"""A full share (ENOSPC), for real: the share is a small tmpfs that the guest fills.

A guest write that needs a new cluster fails with ENOSPC (never EIO, never a hang); rewriting
clusters already allocated keeps working; control operations that need space fail with ENOSPC
and change nothing; once space is freed, writes work again without a remount; nothing
acknowledged is lost and ``qemu-img check`` finds no corruption (leaks are repaired by the
clean unmount).  Status and ``snapfs info`` show provisioned vs allocated bytes and free space,
and the daemon warns once when free space drops below ``space_warn``.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys

import pytest

from snapfs.ctl import Client, ControlError
from tests import qemu
from tests.mount.conftest import REPO, start
from tests.mount.workload import BLOCK, MiB, active_file, block_data, check_share, status

SHARE_SIZE = 24 * MiB
VOLUME = 64 * MiB


@pytest.fixture
def small_share(tmp_path):
    share = tmp_path / "share"
    share.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={SHARE_SIZE}", "tmpfs", str(share)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"cannot mount a tmpfs as the full share (run as root): {r.stderr}")
    try:
        yield share
    finally:
        subprocess.run(["umount", "-l", str(share)], capture_output=True)


def share_files(share) -> dict[str, int]:
    return {n: os.stat(os.path.join(share, n)).st_size for n in sorted(os.listdir(share))
            if n.startswith("volume-")}


def test_full_share(small_share, tmp_path):
    share = small_share
    m = start(share, tmp_path / "mnt", "space_warn=50")
    try:
        c = Client(m.mnt)
        c.request("create-volume", volume="v", size=VOLUME)
        c.request("create-snapshot", volume="v", snapshot="s1")  # writes go to a qcow2 overlay
        path = m.path("volume-v")
        reserve = os.path.join(share, "reserve")  # freed at the end: space coming back
        with open(reserve, "wb") as f:
            f.write(bytes(6 * MiB))
        acked: dict[int, bytes] = {}
        fd = os.open(path, os.O_RDWR)
        try:
            # fill the share: every block at a new cluster, until the share says ENOSPC
            full = None
            for i in range(VOLUME // (64 << 10)):
                data = block_data(i)
                try:
                    os.pwrite(fd, data, i * (64 << 10))
                    os.fsync(fd)
                except OSError as exc:
                    full = exc.errno
                    break
                acked[i] = data
            assert full == errno.ENOSPC, f"a full share must give ENOSPC, got " \
                                         f"{errno.errorcode.get(full)}"
            assert len(acked) > 64
            # writes into clusters already allocated keep working
            for i in list(acked)[:32]:
                acked[i] = block_data(i, gen=2)
                os.pwrite(fd, acked[i], i * (64 << 10))
            os.fsync(fd)

            st = status(m.mnt)
            assert st["free_bytes"] < 2 * MiB
            assert st["provisioned_bytes"] == VOLUME
            assert SHARE_SIZE // 2 < st["allocated_bytes"] <= SHARE_SIZE
            (vol,) = st["volumes"]
            assert vol["state"] == "ok" and vol["provisioned"] == VOLUME

            # operations needing space fail with ENOSPC and change nothing
            filler = os.path.join(share, "filler")
            subprocess.run(["dd", "if=/dev/zero", f"of={filler}", "bs=64k"],
                           capture_output=True)
            before = share_files(share)
            for op, args in (("create-snapshot", {"volume": "v", "snapshot": "s2"}),
                             ("clone", {"volume": "w", "source_volume": "v",
                                        "source_snapshot": "s1"}),
                             ("create-volume", {"volume": "x", "size": 8 * MiB,
                                                "format": "qcow2"})):
                with pytest.raises(ControlError) as e:
                    c.request(op, **args)
                assert e.value.errno == errno.ENOSPC, (op, e.value)
                assert share_files(share) == before, op
            assert sorted(c.request("list")["volumes"]) == ["v"]
            assert [s["id"] for s in c.request("info", volume="v")["snapshots"]] == ["s1"]

            # space comes back: new clusters can be written, no remount
            os.unlink(filler)
            os.unlink(reserve)
            c.request("create-snapshot", volume="v", snapshot="s2")
            i = max(acked) + 1
            acked[i] = block_data(i, gen=3)
            os.pwrite(fd, acked[i], i * (64 << 10))
            os.fsync(fd)
        finally:
            os.close(fd)
            c.close()
        log = m.log_text()
        assert "below the 50% warning threshold" in log
        assert log.count("guest write failed") == 1, "each kind of fault is logged once"

        # snapfs info (offline tool) shows the same accounting
        m.unmount()
        out = subprocess.run([sys.executable, "-m", "snapfs.cli", "info", str(share)],
                             capture_output=True, text=True, cwd=REPO, check=True).stdout
        info = json.loads(out)
        assert info["provisioned_bytes"] == VOLUME and info["allocated_bytes"] > SHARE_SIZE // 2
        assert 0 < info["free_bytes"] <= info["total_bytes"] == SHARE_SIZE
    finally:
        m.unmount()
    check_share(share)
    active, fmt = active_file(str(share), "v", "raw")
    raw = qemu.to_raw(active, str(tmp_path / "out.raw"), fmt)
    for i, data in acked.items():
        off = i * (64 << 10)
        assert raw[off:off + BLOCK] == data, f"acknowledged block {i} lost"
