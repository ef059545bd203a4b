"""Control operations timed against their qemu-img peers, the writer's longest stall while
they run, and the daemon's memory with many volumes.

Each function builds what it needs in ``work`` through a snapfs mount and returns figures in
plain units (milliseconds, MB/s, MiB).
"""

from __future__ import annotations

import json
import mmap
import os
import shutil
import statistics
import threading
import time

from snapfs.ctl import Client

from bench.chains import MIB, fill
from bench.targets import SnapfsMount, run


def _mount(work: str, name: str, env: dict | None = None) -> SnapfsMount:
    share = os.path.join(work, f"{name}-share")
    os.makedirs(share)
    return SnapfsMount(share, os.path.join(work, f"{name}-mnt"),
                       os.path.join(work, f"{name}.log"), env)


def _wait_idle(mnt: str) -> None:
    """Until no background merge runs (``.snapfs/status`` lists them)."""
    while True:
        with open(os.path.join(mnt, ".snapfs", "status")) as f:
            if not json.load(f)["jobs"]:
                return
        time.sleep(0.005)


def snapshot_latency(work: str, sizes: dict[str, int], count: int) -> dict[str, float]:
    """Median milliseconds of create-snapshot on volumes of each size (empty, sparse)."""
    m = _mount(work, "snap")
    out = {}
    try:
        with Client(m.mnt) as c:
            for label, size in sizes.items():
                vid = "lat-" + label.replace(" ", "")
                c.request("create-volume", volume=vid, size=size, format="qcow2")
                times = []
                for k in range(count):
                    t = time.perf_counter()
                    c.request("create-snapshot", volume=vid, snapshot=f"s{k}")
                    times.append((time.perf_counter() - t) * 1000)
                out[label] = statistics.median(times)
    finally:
        m.close()
    return out


class StallWriter(threading.Thread):
    """4 KiB writes in a loop; remembers when each returned, to find the longest gap."""

    def __init__(self, path: str, span: int):
        super().__init__(daemon=True)
        self.path, self.span = path, span
        self.done: list[float] = []
        self.stop = threading.Event()

    def run(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_DIRECT)
        aligned = mmap.mmap(-1, 4096)  # O_DIRECT needs an aligned buffer
        aligned.write(os.urandom(4096))
        try:
            i = 0
            while not self.stop.is_set():
                os.pwritev(fd, [aligned], (i * 7919 % (self.span // 4096)) * 4096)
                self.done.append(time.perf_counter())
                i += 1
        finally:
            os.close(fd)

    def longest_gap(self, start: float, end: float) -> float:
        """Milliseconds of the longest pause between writes in ``[start, end]``."""
        ts = [t for t in self.done if start <= t <= end]
        if len(ts) < 2:
            return (end - start) * 1000
        return max(b - a for a, b in zip(ts, ts[1:])) * 1000


def writer_stall(work: str, size: int, written: int) -> dict[str, float]:
    """Longest writer pause (ms) while a snapshot is created and while one is deleted (its
    merge included)."""
    m = _mount(work, "stall")
    try:
        with Client(m.mnt) as c:
            c.request("create-volume", volume="w", size=size)
            fill(m.mnt, c, size, written, 1, vid="w")
            w = StallWriter(os.path.join(m.mnt, "volume-w"), size)
            w.start()
            try:
                time.sleep(0.5)
                t0 = time.perf_counter()
                c.request("create-snapshot", volume="w", snapshot="x")
                t1 = time.perf_counter()
                time.sleep(0.5)
                t2 = time.perf_counter()
                c.request("delete-snapshot", volume="w", snapshot="x")
                _wait_idle(m.mnt)
                t3 = time.perf_counter()
                time.sleep(0.2)
            finally:
                w.stop.set()
                w.join(30)
            return {"create": w.longest_gap(t0 - 0.05, t1 + 0.05),
                    "delete": w.longest_gap(t2 - 0.05, t3 + 0.05)}
    finally:
        m.close()


def merge_vs_commit(work: str, size: int, delta: int) -> dict[str, float]:
    """MB/s of merging a ``delta`` overlay away: snapfs delete-snapshot (the overlay of s1
    under the active one, committed down) against ``qemu-img commit`` of a copy of it."""
    m = _mount(work, "merge")
    share = m.share
    try:
        with Client(m.mnt) as c:
            c.request("create-volume", volume="m", size=size)
            fill(m.mnt, c, size, delta, 1, vid="m")  # s0's overlay holds the delta
            c.request("create-snapshot", volume="m", snapshot="top")
        m.close()
        copy = os.path.join(work, "merge-copy")
        shutil.copytree(share, copy)
        m = SnapfsMount(share, m.mnt, os.path.join(work, "merge.log"))
        with Client(m.mnt) as c:
            t = time.perf_counter()
            c.request("delete-snapshot", volume="m", snapshot="s0")
            _wait_idle(m.mnt)
            ours = time.perf_counter() - t
        t = time.perf_counter()
        run("qemu-img", "commit", "-q", os.path.join(copy, "volume-m.s0"))
        theirs = time.perf_counter() - t
        return {"snapfs": delta / ours / 1e6, "qemu-img": delta / theirs / 1e6}
    finally:
        m.close()


def clone_vs_convert(work: str, share: str, size: int) -> dict[str, float]:
    """MB/s (of volume size) of a raw clone of the chain against ``qemu-img convert``."""
    from bench.targets import active_file
    os.makedirs(work)
    copy = os.path.join(work, "clone-share")
    run("cp", "-a", "--sparse=always", share, copy)
    m = SnapfsMount(copy, os.path.join(work, "clone-mnt"), os.path.join(work, "clone.log"))
    try:
        with Client(m.mnt) as c:
            t = time.perf_counter()
            c.request("clone", volume="c", source_volume="v", format="raw")
            ours = time.perf_counter() - t
    finally:
        m.close()
    out = os.path.join(work, "convert.raw")
    t = time.perf_counter()
    run("qemu-img", "convert", "-O", "raw", active_file(share), out)
    theirs = time.perf_counter() - t
    return {"snapfs": size / ours / 1e6, "qemu-img": size / theirs / 1e6}


def daemon_rss(work: str, volumes: int, snapshots: int, size: int) -> float:
    """VmRSS (MiB) of a daemon serving ``volumes`` x ``snapshots`` after each volume and each
    snapshot file was read."""
    m = _mount(work, "rss")
    try:
        with Client(m.mnt) as c:
            for v in range(volumes):
                vid = f"r{v}"
                c.request("create-volume", volume=vid, size=size)
                fill(m.mnt, c, size, snapshots * MIB, snapshots, vid=vid)
        for v in range(volumes):
            vid = f"r{v}"
            with open(os.path.join(m.mnt, f"volume-{vid}"), "rb") as f:
                while f.read(4 * MIB):
                    pass
            snapdir = os.path.join(m.mnt, ".snapshots", f"volume-{vid}")
            for sid in os.listdir(snapdir):
                with open(os.path.join(snapdir, sid), "rb") as f:
                    f.read(MIB)
        with open(f"/proc/{m.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        raise RuntimeError("no VmRSS for the daemon")
    finally:
        m.close()


def slow_share(work: str, share: str, seconds: float, size: int, delay_ms: float
               ) -> dict[str, float]:
    """Random 4 KiB read IOPS at iodepth 1 and 16 with ``delay_ms`` added to every share I/O."""
    from bench.fio import fio
    from bench.targets import SnapfsTarget
    d = os.path.join(work, "slow")
    os.makedirs(d)
    t = SnapfsTarget(share, d, env={"SNAPFS_IO_DELAY_MS": str(delay_ms)})
    try:
        return {"qd1": fio(t.path, "rand-read-4K-qd1", seconds, size),
                "qd16": fio(t.path, "rand-read-4K-qd16", seconds, size)}
    finally:
        t.close()


