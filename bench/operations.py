"""Control operations timed against their qemu-img peers, the writer's longest stall while
snapshots come and go, the daemon's memory with many volumes, and the slow share.

Each function builds what it needs under ``work`` through its own snapfs mount and returns
figures in plain units (milliseconds, MB/s, MiB, IOPS).
"""

from __future__ import annotations

import bisect
import json
import mmap
import os
import random
import shutil
import statistics
import threading
import time

from snapfs.ctl import STATUS, Client

from bench.chains import MIB, fill
from bench.io_rounds import settle
from bench.targets import VID, SnapfsMount, SnapfsTarget, active_file, copy_tree, run
from bench.workloads import WORKLOADS, fio


def _mount(work: str, name: str) -> SnapfsMount:
    share = os.path.join(work, f"{name}-share")
    os.makedirs(share)
    return SnapfsMount(share, os.path.join(work, f"{name}-mnt"), os.path.join(work, f"{name}.log"))


def _wait_idle(mnt: str) -> None:
    """Until no background merge runs (``.snapfs/status`` lists them)."""
    while True:
        with open(os.path.join(mnt, STATUS)) as f:
            if not json.load(f)["jobs"]:
                return
        time.sleep(0.005)


def snapshot_latency(work: str, sizes: dict[str, int], count: int) -> dict[str, float]:
    """Median milliseconds of create-snapshot on empty sparse volumes of each size."""
    m = _mount(work, "snap")
    out = {}
    try:
        with Client(m.mnt) as c:
            for label, size in sizes.items():
                vid = "lat-" + label.replace(" ", "")
                c.request("create-volume", volume=vid, size=size)
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
    """O_DIRECT 4 KiB pwrites in a loop (each to a new place, so each allocates in the active
    overlay), remembering when each returned."""

    def __init__(self, path: str, span: int):
        super().__init__(daemon=True)
        self.path, self.blocks = path, span // 4096
        self.done: list[float] = []
        self.stop = threading.Event()

    def run(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_DIRECT)
        buf = mmap.mmap(-1, 4096)  # page-aligned, as O_DIRECT needs
        buf.write(os.urandom(4096))
        try:
            i = 0
            while not self.stop.is_set():
                os.pwritev(fd, [buf], (i * 7919 % self.blocks) * 4096)
                self.done.append(time.perf_counter())
                i += 1
        finally:
            os.close(fd)

    def longest_gap(self, start: float, end: float) -> float:
        """Milliseconds of the longest time without a completed write that overlaps
        ``[start, end]`` (a write still blocked at ``end`` counts up to its completion)."""
        lo = max(bisect.bisect_left(self.done, start) - 1, 0)
        hi = bisect.bisect_right(self.done, end) + 1
        ts = self.done[lo:hi]
        return max((b - a for a, b in zip(ts, ts[1:])), default=end - start) * 1000


def writer_stall(work: str, size: int, written: int) -> dict[str, float]:
    """Longest writer pause (ms) while a snapshot is created, and while it is deleted again
    (its overlay, the active file, merged away in the background meanwhile)."""
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
            if not w.done:
                raise RuntimeError("the stall writer completed no write")
            return {"create": w.longest_gap(t0, t1), "delete": w.longest_gap(t2, t3)}
    finally:
        m.close()


def _alternate(rounds: int, ours, theirs) -> dict[str, float]:
    """Seconds of ``ours()`` and ``theirs()`` (each returns its own timing), medians of
    ``rounds`` runs in alternating order: whichever goes second would otherwise always find
    the first one's writeback done or still going."""
    times: dict[str, list[float]] = {"snapfs": [], "qemu-img": []}
    for r in range(rounds):
        order = (("snapfs", ours), ("qemu-img", theirs))
        for name, fn in (order if r % 2 == 0 else order[::-1]):
            times[name].append(fn(r))
    return {name: statistics.median(t) for name, t in times.items()}


def merge_vs_commit(work: str, size: int, delta: int, rounds: int) -> dict[str, float]:
    """MB/s of merging a ``delta`` overlay into the raw base below it: snapfs delete-snapshot
    of s0 (whose overlay holds the delta, under an empty active overlay) against what
    Cinder's RemoteFS driver runs for the same request (``_img_commit`` and
    ``_rebase_img``): ``qemu-img commit -d`` of that overlay, removing it, and
    ``qemu-img rebase -u`` of the overlay above onto the base.  Both end with the delta in
    the base and the overlay gone; each round runs on fresh copies of the same share."""
    m = _mount(work, "merge")
    try:
        with Client(m.mnt) as c:
            c.request("create-volume", volume="m", size=size)
            fill(m.mnt, c, size, delta, 1, vid="m")
            c.request("create-snapshot", volume="m", snapshot="top")
    finally:
        m.close()

    def ours(r: int) -> float:
        share = os.path.join(work, f"merge-ours-{r}")
        copy_tree(m.share, share)
        mount = SnapfsMount(share, os.path.join(work, f"merge-mnt-{r}"),
                            os.path.join(work, f"merge-{r}.log"))
        try:
            settle(work)
            with Client(mount.mnt) as c:
                t = time.perf_counter()
                c.request("delete-snapshot", volume="m", snapshot="s0")
                _wait_idle(mount.mnt)
                return time.perf_counter() - t
        finally:
            mount.close()
            shutil.rmtree(share)

    def theirs(r: int) -> float:
        share = os.path.join(work, f"merge-theirs-{r}")
        copy_tree(m.share, share)
        try:
            settle(work)
            overlay, base = os.path.join(share, "volume-m.s0"), os.path.join(share, "volume-m")
            t = time.perf_counter()
            run("qemu-img", "commit", "-q", "-d", overlay)
            os.unlink(overlay)
            with open(os.path.join(share, "volume-m.info")) as f:
                above = os.path.join(share, json.load(f)["active"])
            run("qemu-img", "rebase", "-u", "-F", "raw", "-b", base, above)
            return time.perf_counter() - t
        finally:
            shutil.rmtree(share)

    secs = _alternate(rounds, ours, theirs)
    return {name: delta / s / 1e6 for name, s in secs.items()}


def clone_vs_convert(work: str, share: str, size: int, rounds: int) -> dict[str, float]:
    """MB/s (of volume size) of a raw clone of the chain in ``share`` against
    ``qemu-img convert -O raw`` of the same chain, made durable.  qemu-img convert never
    syncs its output (it leaves it in the page cache); a clone request returns only once the
    clone is on disk, so the convert's time includes an fsync of what it wrote."""
    os.makedirs(work)
    copy = os.path.join(work, "clone-share")
    copy_tree(share, copy)
    m = SnapfsMount(copy, os.path.join(work, "clone-mnt"), os.path.join(work, "clone.log"))
    try:
        with Client(m.mnt) as c:
            def ours(r: int) -> float:
                settle(work)
                t = time.perf_counter()
                c.request("clone", volume=f"c{r}", source_volume="v", format="raw")
                took = time.perf_counter() - t
                c.request("delete-volume", volume=f"c{r}")
                return took

            def theirs(r: int) -> float:
                out = os.path.join(work, f"convert-{r}.raw")
                settle(work)
                t = time.perf_counter()
                run("qemu-img", "convert", "-O", "raw", active_file(share), out)
                fd = os.open(out, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
                took = time.perf_counter() - t
                os.unlink(out)
                return took

            secs = _alternate(rounds, ours, theirs)
    finally:
        m.close()
    return {name: size / s / 1e6 for name, s in secs.items()}


def daemon_rss(work: str, volumes: int, snapshots: int, size: int) -> float:
    """VmRSS (MiB) of a daemon serving ``volumes`` x ``snapshots`` after every volume was
    read once whole and every snapshot file was opened and read from."""
    m = _mount(work, "rss")
    try:
        with Client(m.mnt) as c:
            for v in range(volumes):
                c.request("create-volume", volume=f"r{v}", size=size)
                fill(m.mnt, c, size, snapshots * MIB, snapshots, vid=f"r{v}")
        for v in range(volumes):
            with open(os.path.join(m.mnt, f"volume-r{v}"), "rb") as f:
                while f.read(4 * MIB):
                    pass
            snapdir = os.path.join(m.mnt, ".snapshots", f"volume-r{v}")
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


def slow_share(work: str, seconds: float, size: int, delay_ms: float
               ) -> dict[str, float] | None:
    """Random 4 KiB read IOPS at iodepth 1 and 16 with ``delay_ms`` added to every share I/O
    (snapfs's ``SNAPFS_IO_DELAY_MS`` seam) on a volume written in full under one snapshot,
    so that every read reaches the share (holes of a raw base read as zeros without it);
    None when the daemon ignores the variable, seen as an iodepth 1 rate no delayed read
    could reach."""
    m = _mount(work, "slow-build")
    try:
        with Client(m.mnt) as c:
            c.request("create-volume", volume=VID, size=size)
            rng = random.Random(11)
            with open(os.path.join(m.mnt, f"volume-{VID}"), "r+b") as f:
                for _ in range(size // MIB):
                    f.write(rng.randbytes(MIB))
                os.fsync(f.fileno())
            c.request("create-snapshot", volume=VID, snapshot="s0")
    finally:
        m.close()
    os.makedirs(os.path.join(work, "slow"))
    t = SnapfsTarget(m.share, os.path.join(work, "slow"),
                     env={"SNAPFS_IO_DELAY_MS": f"{delay_ms:g}"})
    try:
        qd1 = fio(t.path, WORKLOADS["rand-read-4K-qd1"], True, seconds, size)
        if qd1 > 1000 / delay_ms:
            return None
        return {"qd1": qd1, "qd16": fio(t.path, WORKLOADS["rand-read-4K-qd16"], True, seconds,
                                        size)}
    finally:
        t.close()
