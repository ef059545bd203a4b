"""A failing, slow, vanishing and forgetful share, for real: snapfs mounted over
``tests.faultshare``, a passthrough that fails, delays or blocks chosen calls on demand.

- EIO on the share: the guest request that hit it fails with EIO, the volume shows failed in
  status with the reason, the fault is logged once, other volumes keep working, and once the
  share heals every acknowledged block is there and ``qemu-img check`` is clean.
- A share that blocks: other volumes, ``ls`` and status still answer, and many requests to the
  blocked volume are in flight at once.
- A share that stops answering: requests fail with EIO after ``io_timeout`` instead of hanging,
  status and unmount still work, and I/O resumes by itself when the share is back.
- ESTALE: snapfs reopens the file by name and the guest never sees it.
"""

from __future__ import annotations

import errno
import mmap
import os
import threading

import pytest

from snapfs.ctl import Client
from tests import qemu
from tests.faultshare import FaultShare
from tests.mount.conftest import start
from tests.mount.workload import (BLOCK, MiB, active_file, block_data, check_share, status)

SIZE = 16 * MiB


@pytest.fixture
def faulty(tmp_path):
    """(fault share, snapfs mount over it, the real share directory); both always unmounted."""
    real = tmp_path / "real"
    real.mkdir()
    fs = FaultShare(str(real), str(tmp_path / "share"), str(tmp_path))
    m = None
    try:
        m = start(fs.mnt, tmp_path / "mnt", "io_timeout=2")
        with Client(m.mnt) as c:
            for vid in ("v", "w"):
                c.request("create-volume", volume=vid, size=SIZE)
                c.request("create-snapshot", volume=vid, snapshot="s1")
        yield fs, m, real
    finally:
        fs.set([])
        if m is not None:
            m.unmount()
        fs.stop()


def write_blocks(path: str, first: int, count: int, gen: int = 1) -> dict[int, bytes]:
    """Write and fsync numbered blocks; returns those acknowledged (stops at the first error)."""
    acked = {}
    fd = os.open(path, os.O_RDWR)
    try:
        for i in range(first, first + count):
            data = block_data(i, gen)
            os.pwrite(fd, data, i * 16 * BLOCK)
            os.fsync(fd)
            acked[i] = data
    finally:
        os.close(fd)
    return acked


def assert_on_share(real, tmp_path, vid: str, acked: dict[int, bytes]) -> None:
    active, fmt = active_file(str(real), vid, "raw")
    raw = qemu.to_raw(active, str(tmp_path / f"{vid}.raw"), fmt)
    for i, data in acked.items():
        off = i * 16 * BLOCK
        assert raw[off:off + BLOCK] == data, f"acknowledged block {i} of {vid} lost"


def unmount_and_check(fs, m, real, tmp_path, acked: dict[str, dict[int, bytes]]) -> None:
    """Both mounts gone: every acknowledged block of each volume is on the share, and
    ``qemu-img check`` finds every file clean."""
    m.unmount()
    fs.stop()
    for vid, blocks in acked.items():
        assert_on_share(real, tmp_path, vid, blocks)
    check_share(str(real))


def answers(fn, *args, timeout: float = 30):
    """``fn(*args)`` run aside: a request stuck behind the blocked share fails the test
    instead of hanging it."""
    out = []
    t = threading.Thread(target=lambda: out.append(fn(*args)), daemon=True)
    t.start()
    t.join(timeout)
    assert out, f"{fn.__name__}{args} did not answer while the share was blocked"
    return out[0]


def read_first_block(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read(BLOCK)


def volume_state(m, vid: str) -> dict:
    return next(v for v in status(m.mnt)["volumes"] if v["volume"] == vid)


def test_eio_fails_the_request_and_marks_the_volume(faulty, tmp_path):
    fs, m, real = faulty
    v, w = m.path("volume-v"), m.path("volume-w")
    acked = write_blocks(v, 0, 8)
    fs.set([{"op": "write", "path": "volume-v*", "error": "EIO"}])
    fd = os.open(v, os.O_RDWR)
    try:
        for k in range(5):  # every attempt fails; one log line for all of them
            with pytest.raises(OSError) as e:
                os.pwrite(fd, block_data(100 + k), (100 + k) * 16 * BLOCK)
                os.fsync(fd)
            assert e.value.errno == errno.EIO
    finally:
        try:
            os.close(fd)  # close flushes: it may report the failure too
        except OSError as exc:
            assert exc.errno == errno.EIO
    state = volume_state(m, "v")
    assert state["state"] == "failed" and "Input/output error" in state["reason"], state
    assert volume_state(m, "w")["state"] == "ok"
    acked_w = write_blocks(w, 0, 8)  # the other volume keeps working
    with open(v, "rb") as f:  # and reads of the failing one still work
        assert f.read(BLOCK) == acked[0]
    assert m.log_text().count("volume v: guest write failed") == 1

    fs.set([])
    acked.update(write_blocks(v, 8, 8, gen=2))  # healed: no remount needed
    unmount_and_check(fs, m, real, tmp_path, {"v": acked, "w": acked_w})


def test_a_snapshot_whose_old_image_cannot_be_synced_fails_guest_flushes_until_it_can(
        faulty, tmp_path):
    """The file a snapshot freezes is synced after the switch, with guest writes already
    going above it.  If that sync fails, the snapshot stands, but a guest flush must not
    report writes durable that are not: it fails while the frozen file cannot be synced,
    succeeds once it can, and then every acknowledged block is on the share."""
    fs, m, real = faulty
    v = m.path("volume-v")
    acked = write_blocks(v, 0, 4)
    fd = os.open(v, os.O_RDWR)
    try:
        os.pwrite(fd, block_data(10), 10 * 16 * BLOCK)  # acknowledged, not yet synced
        fs.set([{"op": "fsync", "path": "volume-v.s1", "error": "EIO"}])
        with Client(m.mnt) as c:
            c.request("create-snapshot", volume="v", snapshot="s2")
        os.pwrite(fd, block_data(11), 11 * 16 * BLOCK)  # lands above the snapshot
        for _ in range(2):
            with pytest.raises(OSError) as e:
                os.fsync(fd)
            assert e.value.errno == errno.EIO
        fs.set([])
        os.fsync(fd)
        acked.update({10: block_data(10), 11: block_data(11)})
    finally:
        os.close(fd)
    assert "flushing volume-v.s1 after the snapshot failed" in m.log_text()
    unmount_and_check(fs, m, real, tmp_path, {"v": acked})


def test_a_blocked_volume_does_not_hold_up_the_others(faulty):
    fs, m, real = faulty
    write_blocks(m.path("volume-v"), 0, 4)
    acked_w = write_blocks(m.path("volume-w"), 0, 4)
    fs.set([{"op": "read", "path": "volume-v*", "block": True}])
    done = []

    def reader(k):
        fd = os.open(m.path("volume-v"), os.O_RDONLY | os.O_DIRECT)
        try:
            buf = mmap.mmap(-1, BLOCK)  # O_DIRECT: an aligned buffer, every read reaches us
            os.preadv(fd, [buf], (k * 97 % (SIZE // BLOCK)) * BLOCK)
            done.append(k)
        finally:
            os.close(fd)

    threads = [threading.Thread(target=reader, args=(k,), daemon=True) for k in range(6)]
    for t in threads:
        t.start()
    try:
        # the others answer while volume v's reads hang on the share
        assert {"volume-v", "volume-w"} <= set(answers(os.listdir, m.mnt))
        assert {v["volume"] for v in answers(status, m.mnt)["volumes"]} == {"v", "w"}
        assert answers(read_first_block, m.path("volume-w")) == acked_w[0]
        assert not done, "reads of the blocked volume returned while the share held them"
        blocked = fs.log_text().count("blocked read volume-v")
        assert blocked >= 4, f"only {blocked} reads in flight at once on the blocked volume"
    finally:
        fs.set([])
        for t in threads:
            t.join(30)
    assert sorted(done) == list(range(6))


def test_a_share_that_stops_answering_times_out_and_comes_back(faulty, tmp_path):
    fs, m, real = faulty
    acked = write_blocks(m.path("volume-v"), 0, 4)
    fs.set([{"op": "any", "path": "volume-v*", "block": True}])
    fd = os.open(m.path("volume-v"), os.O_RDWR)
    try:
        with pytest.raises(OSError) as e:  # io_timeout=2: EIO, not a hang
            os.pwrite(fd, block_data(50), 50 * 16 * BLOCK)
            os.fsync(fd)
        assert e.value.errno == errno.EIO
        assert "did not answer" in volume_state(m, "v")["reason"]
        fs.set([])  # the share is back: I/O resumes by itself
        os.pwrite(fd, block_data(51), 51 * 16 * BLOCK)
        os.fsync(fd)
        acked[51] = block_data(51)
    finally:
        os.close(fd)
    assert "did not answer within 2 s" in m.log_text()
    unmount_and_check(fs, m, real, tmp_path, {"v": acked})


def test_a_stale_handle_is_reopened(faulty, tmp_path):
    fs, m, real = faulty
    acked = write_blocks(m.path("volume-v"), 0, 4)
    fs.set([{"op": "read", "path": "volume-v.s1", "error": "ESTALE", "count": 1},
            {"op": "write", "path": "volume-v.s1", "error": "ESTALE", "count": 1}])
    fd = os.open(m.path("volume-v"), os.O_RDWR | os.O_DIRECT)
    try:
        buf = mmap.mmap(-1, BLOCK)
        os.preadv(fd, [buf], 0)
        assert bytes(buf) == acked[0]
        buf[:] = block_data(9)
        os.pwritev(fd, [buf], 9 * 16 * BLOCK)
        os.fsync(fd)
        acked[9] = block_data(9)
    finally:
        os.close(fd)
    assert fs.log_text().count('"error": "ESTALE"') == 2, "both faults must have fired"
    assert m.log_text().count("stale file handle; reopening it by name") == 2
    unmount_and_check(fs, m, real, tmp_path, {"v": acked})
