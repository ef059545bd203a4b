"""What the daemon asks of the kernel for its mount (snapfs/fs/kernel.py): 1 MiB readahead
and room for 64 asynchronous requests in flight instead of FUSE's 12, read back from sysfs."""

import os
import time

from snapfs.fs.kernel import FUSECTL, MAX_BACKGROUND, READ_AHEAD_KB


def _wait_for(m, text: str, timeout: float = 20) -> None:
    end = time.monotonic() + timeout
    while text not in m.log_text():
        assert time.monotonic() < end, m.log_text()[-2000:]
        time.sleep(0.05)


def test_mount_gets_readahead_and_requests_in_flight(mounted):
    _wait_for(mounted, f"up to {MAX_BACKGROUND} requests in flight")
    dev = os.stat(mounted.mnt).st_dev
    with open(f"/sys/class/bdi/{os.major(dev)}:{os.minor(dev)}/read_ahead_kb") as f:
        assert int(f.read()) == READ_AHEAD_KB
    conn = os.path.join(FUSECTL, str((os.major(dev) << 20) | os.minor(dev)))
    with open(os.path.join(conn, "max_background")) as f:
        assert int(f.read()) == MAX_BACKGROUND
    with open(os.path.join(conn, "congestion_threshold")) as f:
        assert int(f.read()) == MAX_BACKGROUND * 3 // 4
