"""The I/O workloads: fio jobs (JSON output) and a whole-file ``dd`` read.

Every fio job uses O_DIRECT, as a guest with ``cache=none`` does, so that no target is helped
by the page cache of the file it exports; the ``dd`` read is buffered and shows readahead.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time

#: name -> (fio arguments, what the figure is)
WORKLOADS = {
    "seq-read-1M": (["--rw=read", "--bs=1M", "--iodepth=4", "--ioengine=libaio"], "MB/s"),
    "seq-write-1M": (["--rw=write", "--bs=1M", "--iodepth=4", "--ioengine=libaio"], "MB/s"),
    "rand-read-4K-qd1": (["--rw=randread", "--bs=4k", "--iodepth=1", "--ioengine=libaio"],
                         "IOPS"),
    "rand-read-4K-qd16": (["--rw=randread", "--bs=4k", "--iodepth=16", "--ioengine=libaio"],
                          "IOPS"),
    "rand-write-4K-fsync32": (["--rw=randwrite", "--bs=4k", "--iodepth=1", "--ioengine=psync",
                               "--fsync=32"], "IOPS"),
}


def fio(path: str, name: str, seconds: float, size: int) -> float:
    """Run workload ``name`` on ``path``; MB/s or IOPS."""
    args, unit = WORKLOADS[name]
    argv = ["fio", "--name=bench", f"--filename={path}", "--direct=1", "--time_based",
            f"--runtime={seconds:g}", f"--size={size}", "--output-format=json",
            "--randrepeat=0", *args]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=seconds * 4 + 60)
    if r.returncode != 0:
        raise RuntimeError(f"fio {name} on {path}: {r.stderr.strip()[-400:]}")
    job = json.loads(r.stdout[r.stdout.index("{"):])["jobs"][0]
    side = job["write"] if "write" in args[0] else job["read"]
    if unit == "IOPS":
        return side["iops"]
    return side["bw_bytes"] / 1e6


def dd_read(path: str) -> float:
    """A buffered whole-file read with 1 MiB blocks, cold; MB/s."""
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
