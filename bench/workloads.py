"""The I/O workloads: fio jobs (JSON output) and a whole-file ``dd`` read.

FUSE targets get O_DIRECT fio jobs: every request then reaches the daemon (a guest with
cache=none), nothing is served from the mount's page cache, and 1 MiB requests arrive whole
(PERF-FACTS 6).  qemu-storage-daemon's export is direct I/O anyway.  The ``dd`` read is
buffered and cold (the mount's cache dropped first): it shows the kernel's readahead
(PERF-FACTS 5), which O_DIRECT bypasses.  The share files stay in the host page cache for
every target, so the direct raw file is read and written through it too.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from dataclasses import dataclass


@dataclass(frozen=True)
class Workload:
    fio_args: tuple[str, ...]  # empty: the dd read
    unit: str
    writes: bool = False


WORKLOADS = {
    # iodepth 4 x 1 MiB: what the kernel's 1 MiB readahead keeps in flight (PERF-FACTS 5)
    "seq-read-1M": Workload(("--rw=read", "--bs=1M", "--iodepth=4", "--ioengine=libaio"),
                            "MB/s"),
    "rand-read-4K-qd1": Workload(("--rw=randread", "--bs=4k", "--iodepth=1",
                                  "--ioengine=libaio"), "IOPS"),
    "rand-read-4K-qd16": Workload(("--rw=randread", "--bs=4k", "--iodepth=16",
                                   "--ioengine=libaio"), "IOPS"),
    "dd-read-1M": Workload((), "MB/s"),
    "seq-write-1M": Workload(("--rw=write", "--bs=1M", "--iodepth=4", "--ioengine=libaio"),
                             "MB/s", writes=True),
    "rand-write-4K-fsync32": Workload(("--rw=randwrite", "--bs=4k", "--iodepth=1",
                                       "--ioengine=psync", "--fsync=32"), "IOPS", writes=True),
}


def measure(name: str, path: str, fuse: bool, seconds: float, size: int) -> float:
    """Workload ``name`` on ``path`` once: MB/s or IOPS."""
    w = WORKLOADS[name]
    if not w.fio_args:
        return dd_read(path, drop_cache=fuse)
    return fio(path, w, direct=fuse, seconds=seconds, size=size)


def fio(path: str, w: Workload, direct: bool, seconds: float, size: int) -> float:
    # --thread: a forked fio job runs in a session of its own, which outlives a killed fio
    argv = ["fio", "--name=bench", "--thread", f"--filename={path}", f"--direct={int(direct)}",
            "--invalidate=0", "--time_based", f"--runtime={seconds:g}", f"--size={size}",
            "--randrepeat=0", "--output-format=json", *w.fio_args]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=seconds * 4 + 60)
    if r.returncode != 0:
        raise RuntimeError(f"fio {' '.join(w.fio_args)} on {path}: {r.stderr.strip()[-400:]}")
    job = json.loads(r.stdout[r.stdout.index("{"):])["jobs"][0]
    side = job["write" if w.writes else "read"]
    return side["iops"] if w.unit == "IOPS" else side["bw_bytes"] / 1e6


def dd_read(path: str, drop_cache: bool) -> float:
    """``dd bs=1M`` of the whole file to /dev/null; MB/s."""
    if drop_cache:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    t = time.monotonic()
    r = subprocess.run(["dd", f"if={path}", "of=/dev/null", "bs=1M"], capture_output=True,
                       text=True)
    elapsed = time.monotonic() - t
    if r.returncode != 0:
        raise RuntimeError(f"dd {path}: {r.stderr.strip()}")
    copied = re.search(r"^(\d+) bytes", r.stderr, re.M)
    return int(copied.group(1)) / elapsed / 1e6
