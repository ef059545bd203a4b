"""The chains every target serves, built once per run through snapfs itself (so they are in
Cinder's layout) and then copied for each target.

A chain of depth ``d`` is a sparse raw base and ``d`` qcow2 overlays, one per snapshot; the
``written`` bytes are split over the overlays, each holding distinct data (1 MiB pieces spread
over the whole volume, so every overlay covers a different part of it).
"""

from __future__ import annotations

import os
import random

from snapfs.ctl import Client

from bench.targets import VID, SnapfsMount

MIB = 1 << 20


def build_chain(share: str, work: str, size: int, written: int, depth: int) -> None:
    os.makedirs(share)
    mount = SnapfsMount(share, os.path.join(work, "build-mnt"), os.path.join(work, "build.log"))
    try:
        with Client(mount.mnt) as c:
            c.request("create-volume", volume=VID, size=size)
            fill(mount.mnt, c, size, written, depth)
    finally:
        mount.close()


def fill(mnt: str, c: Client, size: int, written: int, depth: int, vid: str = VID) -> None:
    """Take ``depth`` snapshots, writing a distinct share of ``written`` after each."""
    slots = list(range(size // MIB))
    random.Random(depth).shuffle(slots)
    per = written // MIB // depth
    rng = random.Random(7)
    fd = os.open(os.path.join(mnt, f"volume-{vid}"), os.O_RDWR)
    try:
        for d in range(depth):
            c.request("create-snapshot", volume=vid, snapshot=f"s{d}")
            for slot in slots[d * per:(d + 1) * per]:
                os.pwrite(fd, rng.randbytes(MIB), slot * MIB)
            os.fsync(fd)
    finally:
        os.close(fd)
