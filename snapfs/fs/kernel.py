"""What snapfs asks of the kernel for its mount once it is up: 1 MiB readahead and room for
more requests in flight than FUSE's default of 12.

Neither can be asked for in pyfuse3's INIT reply, so both go through sysfs: the mount's
backing device info (``/sys/class/bdi``) and the FUSE control file system
(``/sys/fs/fuse/connections``, which systemd mounts at boot).  Each is a speed-up, never a
condition: a host that refuses one serves the same bytes, more slowly, and says why in the log.
"""

from __future__ import annotations

import logging
import os
import subprocess

log = logging.getLogger(__name__)

READ_AHEAD_KB = 1024
#: Asynchronous requests (O_DIRECT reads and writes through libaio or io_uring, readahead) the
#: kernel keeps in flight to the daemon.  FUSE's default of 12 caps a guest at iodepth 16 below
#: its depth, which a share answering in a millisecond turns into lost throughput.
MAX_BACKGROUND = 64
CONGESTION_THRESHOLD = MAX_BACKGROUND * 3 // 4
FUSECTL = "/sys/fs/fuse/connections"


def tune(mountpoint: str) -> None:
    """Apply both settings to the FUSE mount at ``mountpoint`` (blocking: the stat goes through
    the mount, so call it from a thread while the daemon serves)."""
    try:
        dev = os.stat(mountpoint).st_dev
    except OSError as exc:
        log.info("could not tune the FUSE connection: %s", exc)
        return
    raise_readahead(dev)
    raise_background(dev)


def raise_readahead(dev: int) -> None:
    """1 MiB readahead: buffered reads then arrive as 1 MiB requests instead of 256 KiB
    (PERF-FACTS.md, 5)."""
    path = f"/sys/class/bdi/{os.major(dev)}:{os.minor(dev)}/read_ahead_kb"
    try:
        with open(path, "w") as f:
            f.write(str(READ_AHEAD_KB))
    except OSError as exc:
        log.info("could not raise readahead: %s", exc)


def raise_background(dev: int) -> None:
    """Let the kernel send up to MAX_BACKGROUND asynchronous requests at once."""
    # the control directory is named after the kernel's own encoding of the device number
    conn = os.path.join(FUSECTL, str((os.major(dev) << 20) | os.minor(dev)))
    if not os.path.isdir(conn) and not (_mount_fusectl() and os.path.isdir(conn)):
        return
    try:
        for name, value in (("max_background", MAX_BACKGROUND),
                            ("congestion_threshold", CONGESTION_THRESHOLD)):
            with open(os.path.join(conn, name), "w") as f:
                f.write(str(value))
    except OSError as exc:
        log.info("could not raise FUSE's limit of requests in flight (%s): %s", conn, exc)
        return
    log.info("FUSE connection %s: up to %d requests in flight", os.path.basename(conn),
             MAX_BACKGROUND)


def _mount_fusectl() -> bool:
    """Mount the FUSE control file system where systemd would have; True if it is there."""
    if os.path.ismount(FUSECTL):
        return True
    if os.geteuid() != 0 or not os.path.isdir(FUSECTL):
        log.info("FUSE's limit of 12 requests in flight stays: %s is not mounted", FUSECTL)
        return False
    r = subprocess.run(["mount", "-t", "fusectl", "fusectl", FUSECTL], capture_output=True,
                       text=True)
    if r.returncode != 0 and not os.path.ismount(FUSECTL):
        log.info("FUSE's limit of 12 requests in flight stays: mounting %s: %s", FUSECTL,
                 r.stderr.strip())
        return False
    log.info("mounted the FUSE control file system at %s", FUSECTL)
    return True
