"""A volume over a sparse raw base, read through its snapshot's overlay: the base's holes
read as zeros from the volume's map of its frozen chain (snapfs/chain/volume.py, _remap),
never from the share, so the share's page cache gains no pages of zeros for them; the data
beside them reads as written.  What the share file has in the page cache comes from
``fincore`` (util-linux)."""

import os
import random
import subprocess

from snapfs.ctl import Client

MiB = 1 << 20
SIZE = 64 * MiB


def _resident(path: str) -> int:
    out = subprocess.run(["fincore", "--bytes", "--raw", "--noheadings", "--output", "RES",
                          path], check=True, capture_output=True, text=True).stdout
    return int(out.split()[0])


def test_holes_of_a_raw_base_are_not_read_from_the_share(mounted):
    data = random.Random(5).randbytes(MiB)
    with Client(mounted.mnt) as c:
        c.request("create-volume", volume="v", size=SIZE)
        with open(mounted.path("volume-v"), "r+b") as f:
            f.write(data)
            os.fsync(f.fileno())
        c.request("create-snapshot", volume="v", snapshot="s1")
    base = mounted.share_path("volume-v")
    fd = os.open(base, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # from here on: what was read
    finally:
        os.close(fd)
    assert _resident(base) == 0
    with open(mounted.path("volume-v"), "rb") as f:
        content = f.read()
    assert content[:MiB] == data
    assert content[MiB:] == bytes(SIZE - MiB)
    # the data megabyte and at most a readahead window past it, not the 63 MiB of holes
    assert MiB <= _resident(base) <= 4 * MiB, _resident(base)
