"""Many hosts, one share: daemons with their own host ids mount one share directory at
different mount points, as the Cinder host and the compute hosts mount one NFS export.

The share is a local directory here: this machine has no NFS client to mount a real export
with, so the locks are the local file system's OFD locks (which a daemon's death frees at once,
where an NFSv4 server frees them after its lease time).  What crosses between the daemons is
what crosses between hosts: files and locks on the share, nothing else.
"""

from __future__ import annotations

import errno
import json
import mmap
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from snapfs.ctl import Client, ControlError
from tests.mount.conftest import REPO, start
from tests.mount.workload import (BLOCK, MiB, Writer, assert_same, check_share,
                                  expected_volume, first_difference, lazy_unmount,
                                  point_in_time, read_file,
                                  scattered, status, tick, wait_jobs)

SIZE = 8 * MiB
SLOTS = SIZE // BLOCK
SEEN_WITHIN = 10.0  # seconds: the refresh bound (0.2 s here) with room for a slow machine


class Hosts:
    """Daemons of several hosts over one share; unmounts all of them at the end."""

    def __init__(self, tmp_path):
        self.tmp = tmp_path
        self.share = tmp_path / "share"
        self.share.mkdir()
        self.mounts: dict[str, object] = {}

    def mount(self, host: str, *opts: str):
        m = start(self.share, self.tmp / f"mnt-{host}", f"host_id={host}", "refresh=0.2",
                  *opts, log=self.tmp / f"{host}.log")
        self.mounts[host] = m
        return m

    def kill9(self, host: str) -> None:
        m = self.mounts.pop(host)
        m.proc.kill()
        m.proc.wait()
        lazy_unmount(m.mnt)

    def unmount_all_and_check(self) -> None:
        """Unmount every daemon, then ``qemu-img check`` every qcow2 file of the share."""
        for m in self.mounts.values():
            m.unmount()
        self.mounts.clear()
        check_share(str(self.share))

    def close(self) -> None:
        for m in self.mounts.values():
            with_cont(m)
            m.unmount()


def with_cont(m) -> None:
    if m.proc.poll() is None:
        os.kill(m.proc.pid, signal.SIGCONT)


@pytest.fixture
def hosts(tmp_path):
    h = Hosts(tmp_path)
    try:
        yield h
    finally:
        h.close()


def ctl(m, op, **args):
    with Client(m.mnt) as c:
        return c.request(op, **args)


def eventually(check, what: str, timeout: float = SEEN_WITHIN):
    deadline = time.monotonic() + timeout
    while True:
        try:
            result = check()
            if result:
                return result
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout:g} s")
        time.sleep(0.05)


def snapshot_dir(m, vid) -> list[str]:
    return sorted(os.listdir(m.path(".snapshots", f"volume-{vid}")))


def test_one_daemon_per_host_id_and_many_hosts(hosts):
    a = hosts.mount("hostA")
    b = hosts.mount("hostB")
    with pytest.raises(RuntimeError, match="host id hostA"):
        start(hosts.share, hosts.tmp / "mnt-again", "host_id=hostA",
              log=hosts.tmp / "again.log")
    assert status(a.mnt)["host"] == "hostA" and status(b.mnt)["host"] == "hostB"


def test_changes_on_one_host_are_seen_on_the_other(hosts):
    a = hosts.mount("hostA")
    b = hosts.mount("hostB")
    ctl(a, "create-volume", volume="v", size=SIZE)
    eventually(lambda: "volume-v" in os.listdir(b.mnt), "a volume created on A on B")
    assert os.path.getsize(b.path("volume-v")) == SIZE
    with open(b.path("volume-v"), "r+b") as f:  # B writes: ownership moves to B
        f.write(b"x" * BLOCK)
        os.fsync(f.fileno())
    assert ctl(b, "list")["volumes"] == ["v"]
    ctl(a, "create-snapshot", volume="v", snapshot="s1")  # carried out by B, the owner
    eventually(lambda: snapshot_dir(b, "v") == ["s1"], "the snapshot on B")
    eventually(lambda: snapshot_dir(a, "v") == ["s1"], "the snapshot on A")
    ctl(a, "extend-volume", volume="v", size=2 * SIZE)
    eventually(lambda: os.path.getsize(b.path("volume-v")) == 2 * SIZE, "the new size on B")
    eventually(lambda: os.path.getsize(a.path("volume-v")) == 2 * SIZE, "the new size on A")
    ctl(a, "delete-snapshot", volume="v", snapshot="s1")
    eventually(lambda: snapshot_dir(b, "v") == [], "the deleted snapshot gone on B")
    wait_jobs(b.mnt)
    info = ctl(a, "info", volume="v")
    assert info["snapshots"] == [] and info["state"] == "ok", info
    with open(a.path("volume-v"), "rb") as f:
        assert f.read(BLOCK) == b"x" * BLOCK
    ctl(a, "delete-volume", volume="v")
    eventually(lambda: "volume-v" not in os.listdir(b.mnt), "the deleted volume gone on B")
    assert ctl(b, "list")["volumes"] == []


def test_snapshots_taken_on_a_hold_what_b_acknowledged(hosts):
    a = hosts.mount("hostA")
    b = hosts.mount("hostB")
    ctl(a, "create-volume", volume="v", size=SIZE, format="qcow2")
    w = Writer(b.path("volume-v"), scattered(0, SLOTS), 100000)
    w.start()
    taken = []
    try:
        for k in range(4):
            w.wait_acks(40 * (k + 1))
            sent = tick()
            ctl(a, "create-snapshot", volume="v", snapshot=f"s{k}")
            taken.append((f"s{k}", sent, tick()))
        w.wait_acks(w.acks + 20)
        sent = tick()
        ctl(a, "clone", volume="c", source_volume="v", source_snapshot="s1")
        ctl(a, "delete-snapshot", volume="v", snapshot="s0")  # merged by B, while B writes
        ctl(a, "clone", volume="live", source_volume="v")  # through a temporary snapshot
        live_sent, live_replied = sent, tick()
        w.wait_acks(w.acks + 20)
    finally:
        w.stop()
    assert not w.errors, w.errors
    recs = w.recs
    for sid, sent, replied in taken[1:]:
        content = eventually(lambda: read_file(a.path(".snapshots", "volume-v", sid)),
                             f"snapshot {sid} readable on A")
        point_in_time(content, recs, sent, replied, what=f"snapshot {sid}", acked_only=True)
    assert_same(read_file(a.path("volume-c")),
                read_file(a.path(".snapshots", "volume-v", "s1")), "clone of s1")
    point_in_time(read_file(a.path("volume-live")), recs, live_sent, live_replied,
                  what="clone of the live volume", acked_only=True)
    wait_jobs(b.mnt)
    expected = expected_volume(SIZE, recs)
    assert_same(read_file(b.path("volume-v")), expected, "the volume on B")
    assert_same(read_file(a.path("volume-v")), expected, "the volume read on A")
    hosts.unmount_all_and_check()


def test_writers_alternating_between_hosts_lose_nothing(hosts):
    """A live migration back and forth: the destination opens the volume while the source
    still writes, then takes over the writing."""
    a = hosts.mount("hostA")
    b = hosts.mount("hostB")
    ctl(a, "create-volume", volume="v", size=SIZE, format="qcow2")
    ctl(a, "create-snapshot", volume="v", snapshot="s0")
    recs = []
    for rnd in range(6):
        src, dst = (a, b) if rnd % 2 == 0 else (b, a)
        w = Writer(src.path("volume-v"), scattered(rnd * 300, SLOTS), 100000, gen=rnd + 1)
        w.start()
        try:
            w.wait_acks(60)
            with open(dst.path("volume-v"), "r+b"):  # opened on the destination
                w.wait_acks(w.acks + 30)
        finally:
            w.stop()
        assert not w.errors, w.errors
        recs += w.recs
    # and both at once: each write moves the volume, nothing may be lost
    wa = Writer(a.path("volume-v"), scattered(5000, SLOTS), 150, gen=10)
    wb = Writer(b.path("volume-v"), scattered(6000, SLOTS), 150, gen=11)
    wa.start()
    wb.start()
    wa.join(120)
    wb.join(120)
    assert not wa.errors and not wb.errors, (wa.errors, wb.errors)
    recs += sorted(wa.recs + wb.recs, key=lambda r: r.acked)
    expected = expected_volume(SIZE, recs)
    assert_same(read_file(a.path("volume-v")), expected, "the volume read on A")
    assert_same(read_file(b.path("volume-v")), expected, "the volume read on B")
    hosts.unmount_all_and_check()


def test_owner_killed_the_other_host_takes_over(hosts):
    a = hosts.mount("hostA")
    b = hosts.mount("hostB")
    ctl(a, "create-volume", volume="v", size=SIZE, format="qcow2")
    ctl(a, "create-snapshot", volume="v", snapshot="s0")
    w = Writer(b.path("volume-v"), scattered(0, SLOTS), 100000)
    w.start()
    try:
        w.wait_acks(100)
        ctl(a, "create-snapshot", volume="v", snapshot="s1")  # carried out by B
        w.wait_acks(w.acks + 50)
        hosts.kill9("hostB")  # while it holds the lease and writes
    finally:
        w.join(30)
    acked = [r for r in w.recs if r.acked is not None]
    assert len(acked) >= 150
    # A takes the volume over (B's lease went with its process) and finds every acked write
    with open(a.path("volume-v"), "r+b") as f:
        f.seek(SIZE - BLOCK)
        f.write(b"A" * BLOCK)
        os.fsync(f.fileno())
    content = read_file(a.path("volume-v"))
    for r in acked:
        assert content[r.slot * BLOCK:(r.slot + 1) * BLOCK] == r.data, f"block {r.i} lost"
    assert ctl(a, "info", volume="v")["state"] == "ok"
    assert snapshot_dir(a, "v") == ["s0", "s1"]
    ctl(a, "delete-snapshot", volume="v", snapshot="s0")
    wait_jobs(a.mnt)
    assert read_file(a.path("volume-v")) == content
    # B comes back as a follower of A
    b = hosts.mount("hostB")
    assert read_file(b.path("volume-v")) == content
    hosts.unmount_all_and_check()


def test_owner_killed_during_a_merge_the_new_owner_finishes_it(hosts, monkeypatch):
    a = hosts.mount("hostA")
    monkeypatch.setenv("SNAPFS_IO_DELAY_MS", "3")  # B's merge takes a while
    b = hosts.mount("hostB")
    monkeypatch.delenv("SNAPFS_IO_DELAY_MS")
    ctl(b, "create-volume", volume="v", size=64 * MiB, format="qcow2")
    with open(b.path("volume-v"), "r+b") as f:
        for i in range(0, 64 * MiB, MiB):
            f.seek(i)
            f.write(bytes([i // MiB + 1]) * MiB)
    ctl(b, "create-snapshot", volume="v", snapshot="s0")
    with open(b.path("volume-v"), "r+b") as f:
        f.write(b"z" * 48 * MiB)
        os.fsync(f.fileno())
    before = read_file(b.path("volume-v"))
    ctl(a, "delete-snapshot", volume="v", snapshot="s0")  # B owns v: B merges
    assert status(b.mnt)["jobs"], "the merge finished before B could be killed"
    hosts.kill9("hostB")
    assert read_file(a.path("volume-v")) == before  # A owns it now and goes on merging
    wait_jobs(a.mnt)
    assert "volume v: recovering interrupted merge" in a.log_text()
    assert not os.listdir(hosts.share / ".snapfs" / "intents")
    assert sorted(n for n in os.listdir(hosts.share) if n.startswith("volume-v")) == \
        ["volume-v", "volume-v.info"]
    assert json.loads((hosts.share / "volume-v.info").read_text()) == {"active": "volume-v"}
    assert read_file(a.path("volume-v")) == before
    a.unmount()
    hosts.mounts.clear()
    check_share(str(hosts.share))


def test_revert_on_a_is_what_b_reads(hosts):
    a = hosts.mount("hostA")
    b = hosts.mount("hostB")
    ctl(a, "create-volume", volume="v", size=SIZE, format="qcow2")
    with open(b.path("volume-v"), "r+b") as f:
        f.write(b"1" * SIZE)
        os.fsync(f.fileno())
    ctl(a, "create-snapshot", volume="v", snapshot="s1")
    with open(b.path("volume-v"), "r+b") as f:
        f.write(b"2" * (SIZE // 2))
        os.fsync(f.fileno())
    assert read_file(a.path("volume-v")) == b"2" * (SIZE // 2) + b"1" * (SIZE // 2)
    ctl(a, "revert", volume="v", snapshot="s1")
    assert read_file(b.path("volume-v")) == b"1" * SIZE
    assert read_file(a.path("volume-v")) == b"1" * SIZE


def test_request_for_an_owner_that_does_not_answer_fails_and_changes_nothing(hosts):
    a = hosts.mount("hostA", "owner_timeout=2")
    b = hosts.mount("hostB")
    ctl(b, "create-volume", volume="v", size=SIZE)
    with open(b.path("volume-v"), "r+b") as f:
        f.write(b"b" * BLOCK)
    os.kill(b.proc.pid, signal.SIGSTOP)  # alive, holding its leases, answering nothing
    try:
        started = time.monotonic()
        with pytest.raises(ControlError) as err:
            ctl(a, "create-snapshot", volume="v", snapshot="s1")
        assert time.monotonic() - started < 30
        assert err.value.errno == errno.EIO
        assert "hostB" in err.value.message and "did not answer" in err.value.message
    finally:
        os.kill(b.proc.pid, signal.SIGCONT)
    assert not os.path.exists(hosts.share / "volume-v.s1")
    assert not os.path.exists(hosts.share / "volume-v.info")
    time.sleep(1)  # B would carry out a request it saw late: it must not see one
    assert not os.path.exists(hosts.share / "volume-v.s1")
    assert ctl(b, "info", volume="v")["snapshots"] == []


def test_info_shows_hosts_and_owners(hosts):
    a = hosts.mount("hostA")
    b = hosts.mount("hostB")
    ctl(a, "create-volume", volume="v", size=SIZE)
    with open(b.path("volume-v"), "r+b") as f:
        f.write(b"b" * BLOCK)
    assert status(b.mnt)["owned"] == ["v"]
    assert "v" not in status(a.mnt)["owned"]
    r = subprocess.run([sys.executable, "-m", "snapfs.cli", "info", str(hosts.share)],
                       capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=REPO))
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert sorted(d["host"] for d in out["daemons"]) == ["hostA", "hostB"]
    assert {d["host"]: d["mountpoint"] for d in out["daemons"]} == {"hostA": a.mnt,
                                                                     "hostB": b.mnt}
    [v] = out["volumes"]
    assert v["volume"] == "v" and v["owner"] == "hostB" and v["state"] == "ok", v


def test_a_follower_reads_right_through_merges_on_the_owner(hosts):
    """B reads the volume without pause (O_DIRECT: every read reaches B's daemon) while A,
    the owner, deletes snapshots: one merge streams a lower file up and renames it, one
    commits down.  Every read on B returns the volume's content."""
    a = hosts.mount("hostA")
    b = hosts.mount("hostB")
    ctl(a, "create-volume", volume="v", size=SIZE, format="qcow2")
    expected = bytearray(SIZE)
    for sid, (off, n, byte) in (("s1", (0, 4 * MiB, 1)), ("s2", (MiB, 64 * 1024, 2)),
                                (None, (2 * MiB, 6 * MiB, 3))):
        with open(a.path("volume-v"), "r+b") as f:
            f.seek(off)
            f.write(bytes([byte]) * n)
            os.fsync(f.fileno())
        expected[off:off + n] = bytes([byte]) * n
        if sid:
            ctl(a, "create-snapshot", volume="v", snapshot=sid)
    expected = bytes(expected)
    bad, reads, stop = [], [0], []

    def reader():
        fd = os.open(b.path("volume-v"), os.O_RDONLY | os.O_DIRECT)
        buf = mmap.mmap(-1, SIZE)
        try:
            while not stop:
                n = os.preadv(fd, [buf], 0)
                if n != SIZE or buf[:] != expected:
                    bad.append(first_difference(buf[:n], expected))
                    return
                reads[0] += 1
        except OSError as exc:
            bad.append(f"read failed: {exc}\n{b.log_text()[-3000:]}")
        finally:
            os.close(fd)

    t = threading.Thread(target=reader, daemon=True)
    t.start()
    try:
        eventually(lambda: reads[0] >= 3, "reads on B")
        ctl(a, "delete-snapshot", volume="v", snapshot="s2")
        wait_jobs(a.mnt)
        assert "by streaming" in a.log_text()
        n = reads[0]
        eventually(lambda: reads[0] >= n + 3 or bad, "reads on B after the first merge")
        ctl(a, "delete-snapshot", volume="v", snapshot="s1")
        wait_jobs(a.mnt)
        eventually(lambda: "changed by its owner, reading its chain again" in b.log_text(),
                   "B reading the chain again")
        n = reads[0]
        eventually(lambda: reads[0] >= n + 3 or bad, "reads on B after the second merge")
    finally:
        stop.append(True)
        t.join(30)
    assert not bad, bad[0]
