"""Control operations on volumes that are being written through the mount (CONTRACT.md sections
2 and 3): snapshots, deletes with their merges, clones, extends and reverts while a writer
thread fsyncs numbered blocks, checked against the writer's own record of what it was told and
against qemu-img reading the share."""

import errno
import json
import mmap
import os
import random
import threading
import time

import pytest

from snapfs.ctl import Client
from tests import qemu
from tests.mount.workload import (BLOCK, MiB, Writer, assert_same, backing_of, check_share,
                                  compare_with_share, expected_volume, point_in_time,
                                  read_file, scattered, slot_of, status, tick, timed_request,
                                  wait_jobs)
from tests.sharefiles import tmp_files


def snap_path(m, vid, sid):
    return m.path(".snapshots", f"volume-{vid}", sid)


def snapshot_ids(m, vid):
    return sorted(os.listdir(m.path(".snapshots", f"volume-{vid}")))


def info_file(m, vid):
    p = m.share_path(f"volume-{vid}.info")
    if not os.path.exists(p):
        return None
    with open(p) as f:
        return json.load(f)


def check_chain_files(m, vid):
    """After the merges: the share holds the base, the overlays of the remaining snapshots and
    nothing else of the volume (every merged overlay is gone)."""
    info = info_file(m, vid) or {"active": f"volume-{vid}"}
    files = {n for n in os.listdir(m.share)
             if n.startswith(f"volume-{vid}.") and n != f"volume-{vid}.info"}
    want = {name for sid, name in info.items() if sid != "active"}
    assert files == want, f"volume {vid}: files {sorted(files)}, snapshots need {sorted(want)}"
    assert info["active"] in want | {f"volume-{vid}"}


def check_snapshots_against_share(m, vid, tmp_path):
    """Every snapshot file in the mount is what qemu-img reads from the file its overlay backs
    onto."""
    info = info_file(m, vid) or {"active": f"volume-{vid}"}
    assert sorted(k for k in info if k != "active") == snapshot_ids(m, vid)
    for sid in snapshot_ids(m, vid):
        backing, fmt = backing_of(m.share, info[sid])
        want = qemu.to_raw(backing, str(tmp_path / f"{vid}-{sid}.raw"), fmt)
        assert_same(read_file(snap_path(m, vid, sid)), want,
                    f"snapshot {sid} vs qemu-img convert of {os.path.basename(backing)}")


# -- snapshots and deletes -------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_snapshots_and_deletes_under_a_writer(mounted, tmp_path, fmt):
    size = 32 * MiB
    nslots = size // BLOCK
    with Client(mounted.mnt) as c:
        c.request("create-volume", volume="v", size=size, format=fmt)
        w = Writer(mounted.path("volume-v"), scattered(0, nslots), nslots)
        w.start()
        try:
            w.wait_acks(20)
            snaps = {}
            for k in range(5):
                sid = f"s{k}"
                sent, replied, _ = timed_request(c, "create-snapshot", volume="v", snapshot=sid)
                snaps[sid] = (sent, replied)
                w.wait_acks(w.acks + 15)
            contents = {}
            for sid, (sent, replied) in snaps.items():
                contents[sid] = read_file(snap_path(mounted, "v", sid))
                assert len(contents[sid]) == size
                point_in_time(contents[sid], list(w.recs), sent, replied,
                              what=f"snapshot {sid}")
            # successive snapshots are successive points
            counts = [point_in_time(contents[s], list(w.recs), *snaps[s]) for s in snaps]
            assert counts == sorted(counts) and len(set(counts)) == len(counts)

            # a middle snapshot (merge of a frozen overlay), the newest one (merge of the
            # active overlay while it is written) and the oldest (merge into the base)
            for sid in ("s2", "s4", "s0"):
                timed_request(c, "delete-snapshot", volume="v", snapshot=sid)
                assert sid not in snapshot_ids(mounted, "v")
                assert sid not in info_file(mounted, "v")
                assert sid not in [s["id"] for s in c.request("info", volume="v")["snapshots"]]
                w.wait_acks(w.acks + 15)
            wait_jobs(mounted.mnt)
            w.wait_acks(w.acks + 10)
        finally:
            w.stop()
        assert not w.errors, [errno.errorcode.get(e.error) for e in w.errors]
        assert snapshot_ids(mounted, "v") == ["s1", "s3"]
        for sid in ("s1", "s3"):
            assert_same(read_file(snap_path(mounted, "v", sid)), contents[sid],
                        f"snapshot {sid} after the merges of its neighbours")
        assert_same(read_file(mounted.path("volume-v")), expected_volume(size, w.recs),
                    "the volume")
        info = c.request("info", volume="v")
        assert [s["id"] for s in info["snapshots"]] == ["s1", "s3"]
        assert info["state"] == "ok", info["reason"]
        check_chain_files(mounted, "v")
    compare_with_share(mounted.path("volume-v"), mounted.share, "v", fmt)
    check_snapshots_against_share(mounted, "v", tmp_path)
    check_share(mounted.share)


# -- clones ----------------------------------------------------------------------------------

def test_clone_of_a_snapshot_under_a_writer(mounted, tmp_path):
    size = 16 * MiB
    nslots = size // BLOCK
    with Client(mounted.mnt) as c:
        c.request("create-volume", volume="v", size=size, format="qcow2")
        w = Writer(mounted.path("volume-v"), scattered(0, nslots), nslots)
        w.start()
        try:
            w.wait_acks(20)
            snap = timed_request(c, "create-snapshot", volume="v", snapshot="s")
            w.wait_acks(w.acks + 15)
            # larger than the source: the snapshot's point, zeros beyond
            timed_request(c, "clone", volume="c2", source_volume="v", source_snapshot="s",
                          size=size + 4 * MiB, format="qcow2")
            w.wait_acks(w.acks + 15)
            timed_request(c, "clone", volume="c3", source_volume="v", source_snapshot="s",
                          format="raw")
            w.wait_acks(w.acks + 15)
        finally:
            w.stop()
        assert not w.errors, [errno.errorcode.get(e.error) for e in w.errors]
        recs = list(w.recs)
        snapshot = read_file(snap_path(mounted, "v", "s"))
        point_in_time(snapshot, recs, *snap[:2], what="snapshot s")
        c2 = read_file(mounted.path("volume-c2"))
        assert len(c2) == size + 4 * MiB
        assert_same(c2[:size], snapshot, "clone c2 of snapshot s")
        assert c2[size:] == bytes(4 * MiB)
        assert_same(read_file(mounted.path("volume-c3")), snapshot, "clone c3 of snapshot s")
        assert_same(read_file(mounted.path("volume-v")), expected_volume(size, recs), "v")
        assert snapshot_ids(mounted, "v") == ["s"]
        assert sorted(c.request("list")["volumes"]) == ["c2", "c3", "v"]
    compare_with_share(mounted.path("volume-v"), mounted.share, "v", "qcow2")
    compare_with_share(mounted.path("volume-c2"), mounted.share, "c2", "qcow2")
    compare_with_share(mounted.path("volume-c3"), mounted.share, "c3", "raw")
    check_snapshots_against_share(mounted, "v", tmp_path)
    check_share(mounted.share)


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_clone_of_the_live_volume_under_a_writer(mounted, tmp_path, fmt):
    """The source is open and written: each clone is a consistent point between its request
    and its reply, and leaves no temporary snapshot behind."""
    size = 16 * MiB
    nslots = size // BLOCK
    with Client(mounted.mnt) as c:
        c.request("create-volume", volume="v", size=size, format=fmt)
        w = Writer(mounted.path("volume-v"), scattered(0, nslots), nslots)
        w.start()
        clones = {}
        try:
            w.wait_acks(20)
            for k, cfmt in enumerate(("raw", "qcow2", "raw")):
                if k == 2:
                    timed_request(c, "create-snapshot", volume="v", snapshot="s")
                clones[f"c{k}"] = (cfmt,) + timed_request(c, "clone", volume=f"c{k}",
                                                          source_volume="v", format=cfmt)[:2]
                w.wait_acks(w.acks + 15)
            wait_jobs(mounted.mnt)
            w.wait_acks(w.acks + 10)
        finally:
            w.stop()
        assert not w.errors, [errno.errorcode.get(e.error) for e in w.errors]
        recs = list(w.recs)
        counts = []
        for cid, (cfmt, sent, replied) in clones.items():
            content = read_file(mounted.path(f"volume-{cid}"))
            assert len(content) == size
            counts.append(point_in_time(content, recs, sent, replied,
                                        what=f"clone {cid} of the live volume"))
        assert counts == sorted(counts)
        # independent of the source and of each other
        with open(mounted.path("volume-c0"), "r+b") as f:
            f.write(b"\x5a" * BLOCK)
        assert read_file(mounted.path("volume-v"))[:BLOCK] != b"\x5a" * BLOCK
        assert_same(read_file(mounted.path("volume-v")), expected_volume(size, recs), "v")
        # the temporary snapshots are gone, merged
        assert snapshot_ids(mounted, "v") == ["s"]
        assert sorted(info_file(mounted, "v")) == ["active", "s"]
        info = c.request("info", volume="v")
        assert [s["id"] for s in info["snapshots"]] == ["s"]
        assert info["state"] == "ok", info["reason"]
        check_chain_files(mounted, "v")
        assert sorted(c.request("list")["volumes"]) == ["c0", "c1", "c2", "v"]
    compare_with_share(mounted.path("volume-v"), mounted.share, "v", fmt)
    for cid, (cfmt, _, _) in clones.items():
        compare_with_share(mounted.path(f"volume-{cid}"), mounted.share, cid, cfmt)
    check_share(mounted.share)


# -- extend ----------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt,with_snapshot", [("raw", False), ("qcow2", True)])
def test_extend_under_a_writer(mounted, tmp_path, fmt, with_snapshot):
    """The writer runs off the end (ENOSPC, retried) while the volume is extended, once by a
    control request and once by truncate in the mount."""
    sizes = [2 * MiB, 3 * MiB, 4 * MiB]
    start_slot = sizes[0] // BLOCK - 32
    count = sizes[2] // BLOCK - start_slot
    with Client(mounted.mnt) as c:
        c.request("create-volume", volume="v", size=sizes[0], format=fmt)
        if with_snapshot:
            with open(mounted.path("volume-v"), "r+b") as f:
                f.write(b"\x11" * BLOCK)
            c.request("create-snapshot", volume="v", snapshot="s")
        w = Writer(mounted.path("volume-v"), lambda i: start_slot + i, count, retry_enospc=True)
        w.start()
        grown = []
        try:
            last = 0
            for new_size in sizes[1:]:
                # wait for the writer to run off the current end
                while not any(e.error == errno.ENOSPC and e.start > last for e in list(w.errors)):
                    assert w.is_alive(), "the writer stopped"
                    time.sleep(0.002)
                sent = tick()
                if not grown:
                    c.request("extend-volume", volume="v", size=new_size)
                else:
                    os.truncate(mounted.path("volume-v"), new_size)
                last = tick()
                grown.append((sent, last, new_size))
                assert os.path.getsize(mounted.path("volume-v")) == new_size
            w.join(60)
        finally:
            w.stop()
        # only ENOSPC past the end, and none for a write that started after the volume grew
        assert w.recs and len(w.recs) == count
        for e in w.errors:
            assert e.error == errno.ENOSPC, errno.errorcode.get(e.error)
            assert e.written is None
            size_then = sizes[0]
            for sent, replied, new_size in grown:
                if e.start > replied:
                    size_then = new_size
            assert (e.slot + 1) * BLOCK > size_then, \
                f"ENOSPC for slot {e.slot} started after the volume had {size_then} bytes"
        content = read_file(mounted.path("volume-v"))
        base = (b"\x11" * BLOCK) if with_snapshot else b""
        assert_same(content, expected_volume(sizes[2], w.recs, base), "the extended volume")
        assert c.request("info", volume="v")["size"] == sizes[2]
        if with_snapshot:
            assert os.path.getsize(snap_path(mounted, "v", "s")) == sizes[0]
            assert read_file(snap_path(mounted, "v", "s")) == base + bytes(sizes[0] - BLOCK)
    compare_with_share(mounted.path("volume-v"), mounted.share, "v", fmt)
    if with_snapshot:
        check_snapshots_against_share(mounted, "v", tmp_path)
    check_share(mounted.share)


# -- revert ----------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_revert_under_a_writer(mounted, tmp_path, fmt):
    size = 16 * MiB
    nslots = size // BLOCK
    with Client(mounted.mnt) as c:
        c.request("create-volume", volume="v", size=size, format=fmt)
        w = Writer(mounted.path("volume-v"), scattered(0, nslots), nslots)
        w.start()
        try:
            w.wait_acks(30)
            snap = timed_request(c, "create-snapshot", volume="v", snapshot="s")
            w.wait_acks(w.acks + 40)
            rev = timed_request(c, "revert", volume="v", snapshot="s")
            w.wait_acks(w.acks + 40)
        finally:
            w.stop()
        assert not w.errors, [errno.errorcode.get(e.error) for e in w.errors]
        recs = list(w.recs)
        snapshot = read_file(snap_path(mounted, "v", "s"))
        point_in_time(snapshot, recs, *snap[:2], what="snapshot s")
        content = read_file(mounted.path("volume-v"))
        kept_in_flight = []
        for r in recs:
            have, in_snap = slot_of(content, r.slot), slot_of(snapshot, r.slot)
            if r.start > rev[1]:
                assert have == r.data, f"block {r.i}, written after the revert, is missing"
            elif r.written < rev[0]:
                assert have == in_snap, \
                    f"block {r.i}, written before the revert, was not reverted"
            else:  # during the request: before or after the revert's point in time
                assert have in (r.data, in_snap), f"block {r.i}: {have[:16].hex()}"
                kept_in_flight.append(have == r.data)
        # the revert happened at one point: the writes it undid precede those it kept
        assert kept_in_flight == sorted(kept_in_flight), kept_in_flight
        written = {r.slot for r in recs}
        for slot in range(nslots):
            if slot not in written:
                assert slot_of(content, slot) == bytes(BLOCK), f"slot {slot} not zero"
        assert snapshot_ids(mounted, "v") == ["s"]
        # reverting again with nobody writing: exactly the snapshot
        c.request("revert", volume="v", snapshot="s")
        assert_same(read_file(mounted.path("volume-v")), snapshot, "the volume after revert")
    compare_with_share(mounted.path("volume-v"), mounted.share, "v", fmt)
    check_snapshots_against_share(mounted, "v", tmp_path)
    check_share(mounted.share)


def test_revert_drops_cached_pages(mounted):
    """A reader that read the volume before a revert (its pages are cached) reads the reverted
    content afterwards, through the same descriptor, a mapping and a new descriptor."""
    size = 4 * MiB
    old = random.Random(1).randbytes(size)
    new = random.Random(2).randbytes(size)
    path = mounted.path("volume-v")
    with Client(mounted.mnt) as c:
        c.request("create-volume", volume="v", size=size)
        with open(path, "r+b") as f:
            f.write(old)
        c.request("create-snapshot", volume="v", snapshot="s")
        with open(path, "r+b") as f:
            f.write(new)
            f.flush()
            os.fsync(f.fileno())
        fd = os.open(path, os.O_RDONLY)
        try:
            mm = mmap.mmap(fd, size, prot=mmap.PROT_READ)
            try:
                assert os.pread(fd, size, 0) == new
                assert mm[:] == new
                c.request("revert", volume="v", snapshot="s")
                assert_same(os.pread(fd, size, 0), old, "re-read through the same descriptor")
                assert_same(mm[:], old, "re-read through a mapping")
                assert_same(read_file(path), old, "read through a new descriptor")
                # and the other way: writes after the reply are seen by the same reader
                with open(path, "r+b") as f:
                    f.seek(MiB)
                    f.write(new[:BLOCK])
                assert os.pread(fd, BLOCK, MiB) == new[:BLOCK]
                assert mm[MiB:MiB + BLOCK] == new[:BLOCK]
            finally:
                mm.close()
        finally:
            os.close(fd)
    compare_with_share(path, mounted.share, "v", "raw")


# -- a random workload, checked against a model and against qemu-img -----------------------

@pytest.mark.parametrize("fmt,seed,hold_open", [("raw", 1, True), ("qcow2", 2, True),
                                                ("qcow2", 3, False)])
def test_random_workload_matches_share(mounted, tmp_path, fmt, seed, hold_open):
    """Random writes, snapshots, deletes, reverts, extends and clones against an in-memory
    model; the volume stays open all along (as a guest keeps it) or is opened per write."""
    rng = random.Random(seed)
    vid = "w"
    size = 4 * MiB
    model = bytearray(size)
    snaps: dict[str, bytes] = {}
    path = mounted.path(f"volume-{vid}")
    n_snap = 0

    class PerWrite:
        def __enter__(self):
            self.fd = held if hold_open else os.open(path, os.O_RDWR)
            return self.fd

        def __exit__(self, *exc):
            if not hold_open:
                os.close(self.fd)

    with Client(mounted.mnt) as c:
        c.request("create-volume", volume=vid, size=size, format=fmt)
        held = os.open(path, os.O_RDWR) if hold_open else -1
        try:
            for step in range(120):
                r = rng.random()
                if r >= 0.55 and r < 0.7 and len(snaps) >= 6:
                    r = 0.75  # keep the chain short: delete one instead
                if r < 0.55:
                    n = rng.choice([1, 511, 512, 4096, 65536, 70000, 200000])
                    off = rng.randrange(0, len(model) - n)
                    data = rng.randbytes(n) if rng.random() < 0.8 else bytes(n)
                    with PerWrite() as fd:
                        assert os.pwrite(fd, data, off) == n
                        if rng.random() < 0.2:
                            os.fsync(fd)
                    model[off:off + n] = data
                elif r < 0.7:
                    sid = f"s{n_snap}"
                    n_snap += 1
                    c.request("create-snapshot", volume=vid, snapshot=sid)
                    snaps[sid] = bytes(model)
                elif r < 0.78 and snaps:
                    sid = rng.choice(sorted(snaps))
                    c.request("delete-snapshot", volume=vid, snapshot=sid)
                    del snaps[sid]
                elif r < 0.86 and snaps:
                    sid = rng.choice(sorted(snaps))
                    c.request("revert", volume=vid, snapshot=sid)
                    keep = len(model)
                    model[:] = snaps[sid][:keep] + bytes(max(0, keep - len(snaps[sid])))
                elif r < 0.91:
                    grow = rng.choice([512, 4096, 65536, MiB])
                    c.request("extend-volume", volume=vid, size=len(model) + grow)
                    model += bytes(grow)
                elif r < 0.96:
                    src = rng.choice([None] + sorted(snaps))
                    args = {"source_snapshot": src} if src else {}
                    c.request("clone", volume="tmpclone", source_volume=vid,
                              format=rng.choice(["raw", "qcow2"]), **args)
                    want = snaps[src] if src else bytes(model)
                    assert_same(read_file(mounted.path("volume-tmpclone")), want,
                                f"step {step}: clone of {src or 'the live volume'}")
                    c.request("delete-volume", volume="tmpclone")
                else:
                    with PerWrite() as fd:
                        assert_same(os.pread(fd, len(model), 0), bytes(model), f"step {step}")
                    for sid, want in snaps.items():
                        assert_same(read_file(snap_path(mounted, vid, sid)), want,
                                    f"step {step}: snapshot {sid}")
        finally:
            if hold_open:
                os.close(held)
        wait_jobs(mounted.mnt)
        info = c.request("info", volume=vid)
        assert info["state"] == "ok", info["reason"]
    check_chain_files(mounted, vid)
    assert os.path.getsize(path) == len(model)
    assert_same(read_file(path), bytes(model), "the volume")
    assert snapshot_ids(mounted, vid) == sorted(snaps)
    for sid, want in snaps.items():
        assert_same(read_file(snap_path(mounted, vid, sid)), want, f"snapshot {sid}")
    compare_with_share(path, mounted.share, vid, fmt)
    check_snapshots_against_share(mounted, vid, tmp_path)
    check_share(mounted.share)
    assert sorted(os.listdir(mounted.mnt)) == [".snapfs", ".snapshots", f"volume-{vid}"]


# -- private request files do not wait behind a long operation -----------------------------

def test_short_requests_do_not_wait_behind_a_long_clone(mounted):
    """A clone of a big volume runs on one request file; `list`, `info` and status on another
    complete while the clone is still copying (its temporary file on the share exists and its
    volume does not yet): proven by the order of events, not by timing."""
    size = 256 * MiB
    with Client(mounted.mnt) as c:
        c.request("create-volume", volume="big", size=size, format="qcow2")
        c.request("create-volume", volume="other", size=MiB)
        chunk = random.Random(3).randbytes(MiB)
        fd = os.open(mounted.path("volume-big"), os.O_RDWR)
        try:
            for off in range(0, size, 2 * MiB):  # sparse but populated: 128 MiB of data
                os.pwrite(fd, chunk, off)
            os.fsync(fd)
        finally:
            os.close(fd)

    target = mounted.share_path("volume-copy")
    events = []
    result = {}

    def clone():
        try:
            with Client(mounted.mnt) as c1:
                events.append(("clone sent", tick()))
                c1.request("clone", volume="copy", source_volume="big", format="qcow2")
                events.append(("clone replied", tick()))
        except BaseException as exc:  # reported by the main thread
            result["error"] = exc

    t = threading.Thread(target=clone)
    with Client(mounted.mnt) as c2:
        t.start()
        try:
            # the clone is copying once its temporary file is on the share
            while not any(n.startswith("volume-copy.") for n in tmp_files(mounted.share)):
                assert t.is_alive() and not os.path.exists(target), \
                    "the clone finished before its copy was seen: make it bigger"
                time.sleep(0.001)
            events.append(("copy seen", tick()))
            short = []
            for op, args in (("list", {}), ("info", {"volume": "other"}),
                             ("info", {"volume": "big"}), ("list", {"unmanaged": True})):
                sent, replied, res = timed_request(c2, op, **args)
                still_copying = not os.path.exists(target) and any(
                    n.startswith("volume-copy.") for n in tmp_files(mounted.share))
                short.append((op, args, sent, replied, still_copying))
                if op == "list" and not args:
                    assert "big" in res["volumes"] and "copy" not in res["volumes"]
            st = status(mounted.mnt)
            assert "copy" not in [v["volume"] for v in st["volumes"]]
            short.append(("status", {}, 0, tick(), not os.path.exists(target)))
        finally:
            t.join(120)
    assert not t.is_alive()
    assert "error" not in result, result.get("error")
    replied = dict(events)["clone replied"]
    for op, args, _sent, at, still_copying in short:
        assert at < replied and still_copying, \
            f"{op} {args} waited for the clone (reply event {at}, clone reply {replied})"
    assert os.path.exists(target)
    with open(mounted.path("volume-copy"), "rb") as f:
        f.seek(2 * MiB * 37)
        assert f.read(MiB) == chunk
        assert f.read(MiB) == bytes(MiB)
