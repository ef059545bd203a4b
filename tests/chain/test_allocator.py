"""The cluster allocator: first fit, and each scan starts at the lowest free cluster.

A qemu-img image with data, holes punched by discards, then random allocations and frees of
1-3 clusters.  Every allocation must return the first run of free clusters a scan of the
refcounts from 0 finds, and the next scan must start at the lowest free cluster, or right
past the run just allocated: a hint left on allocated clusters made every later allocation
rescan them (a sequential writer paid a scan of the image's refcounts per cluster).  Afterwards everything is
given back and qemu-img check must find the image clean.
"""

import random

import trio

from snapfs.chain.qcow2 import Qcow2Image
from tests import qemu

MIB = 1 << 20
CS = 65536


async def _counts(refs, upto: int) -> list[int]:
    return [await refs.get(ci) for ci in range(upto)]


def _first_fit(counts: list[int], n: int) -> int:
    run = 0
    for ci, c in enumerate(counts + [0] * n):
        run = run + 1 if c == 0 else 0
        if run == n:
            return ci - n + 1
    raise AssertionError("unreachable")


def test_first_fit_and_a_tight_hint(tmp_path):
    path = str(tmp_path / "img.qcow2")
    qemu.img("create", "-f", "qcow2", path, "64M")
    qemu.io(path, "write -P 0x11 0 24M")

    async def main():
        img = await Qcow2Image.open(path, writable=True)
        try:
            for off in (2 * MIB, 5 * MIB + 3 * CS, 9 * MIB, 20 * MIB):
                await img.discard(off, 3 * CS)
            refs, rnd, mine = img.refs, random.Random(3), []
            for _ in range(300):
                if mine and rnd.random() < 0.3:
                    ci = mine.pop(rnd.randrange(len(mine)))
                    await refs.add(ci, -1)
                    continue
                n = rnd.choice((1, 1, 2, 3))
                counts = await _counts(refs, refs.end_cluster)
                want, lowest = _first_fit(counts, n), _first_fit(counts, 1)
                got = await refs.alloc(n) // CS
                assert got == want, (n, got, want)
                mine.extend(range(got, got + n))
                # the next scan starts at the lowest free cluster, or past this run if that
                # was where it began; never back on clusters it already found allocated
                assert refs.free_hint == (got + n if got == lowest else lowest), \
                    (n, got, lowest, refs.free_hint)
                counts = await _counts(refs, refs.end_cluster)
                assert all(counts[:refs.free_hint]), "a free cluster below the hint"
            for ci in mine:
                await refs.add(ci, -1)
        finally:
            await img.close()

    trio.run(main)
    rc, report = qemu.check(path)
    assert rc == 0, report
