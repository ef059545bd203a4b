"""Writes that skip per-cluster planning, measured against qemu-img.

Two quick paths sit in front of the general write: an overwrite of clusters the image owns
in a row on the host (one write), and a write of whole clusters the image holds nothing of
(allocated together).  Everything else (partial clusters over the backing file, clusters
not in a row, a write across an L2 table's end, compressed or zero-flagged clusters with a
host) takes the general path.  Each case here is written through the engine into an overlay
that qemu-io prepared (data, zero clusters, a compressed cluster), and the result must read
as the model says through ``qemu-img convert`` and pass ``qemu-img check``; the test also
makes sure both quick paths were taken, so that it keeps testing them.
"""

from __future__ import annotations

import random

import pytest
import trio

from snapfs.chain.chain import open_chain
from snapfs.chain.qcow2 import Qcow2Image
from tests import qemu

MIB = 1 << 20
SIZE = 8 * MIB


@pytest.mark.parametrize("cs", [65536, 4096])
def test_quick_write_paths_match_qemu(tmp_path, monkeypatch, cs):
    base = str(tmp_path / "base.qcow2")
    top = str(tmp_path / "top.qcow2")
    qemu.create(base, SIZE, f"cluster_size={cs}")
    qemu.io(base, f"write -P 3 0 {SIZE}")
    qemu.create(top, SIZE, f"cluster_size={cs}", backing="base.qcow2", backing_fmt="qcow2")
    model = bytearray(b"\3" * SIZE)
    prep = [(5 * cs, 2 * cs, 9, ""), (20 * cs, 4 * cs, 0, "-z "), (40 * cs, cs, 0, "-z -u "),
            (60 * cs, cs, 7, "-c ")]
    for off, n, byte, flags in prep:
        if flags.startswith("-z"):
            qemu.io(top, f"write {flags}{off} {n}")
        else:
            qemu.io(top, f"write {flags}-P {byte} {off} {n}")
        model[off:off + n] = bytes([byte]) * n

    taken = {"owned": 0, "fresh": 0}
    for name, key in (("_overwrite_owned", "owned"), ("_write_fresh", "fresh")):
        real = getattr(Qcow2Image, name)

        async def spy(self, offset, data, _real=real, _key=key):
            done = await _real(self, offset, data)
            taken[_key] += done
            return done
        monkeypatch.setattr(Qcow2Image, name, spy)

    rng = random.Random(cs)
    l2_span = cs * (cs // 8)  # guest bytes one L2 table maps
    writes = [
        (100 * cs, 4 * cs),            # whole unallocated clusters: allocated together
        (20 * cs, 4 * cs),             # over zero-flagged clusters
        (40 * cs, 2 * cs),             # a zero cluster without a host and its neighbour
        (100 * cs + 100, 3 * cs),      # inside what the first write allocated
        (99 * cs + 512, 2 * cs),       # partly over the backing file
        (5 * cs + 7, cs),              # qemu's own clusters, in a row
        (59 * cs, 3 * cs),             # around the compressed cluster
        (SIZE - 2 * cs, 2 * cs),       # the last clusters
    ]
    if l2_span < SIZE:
        writes.append((l2_span - cs, 2 * cs))  # across the end of an L2 table
    for _ in range(40):
        if rng.random() < 0.5:
            off = rng.randrange(SIZE // cs - 8) * cs
            n = rng.randrange(1, 9) * cs
        else:
            off = rng.randrange(SIZE - 64 * 1024)
            n = rng.randrange(1, 64 * 1024)
        writes.append((off, n))

    async def run() -> None:
        img = await open_chain(top, "qcow2", writable=True)
        try:
            for k, (off, n) in enumerate(writes):
                data = random.Random(k).randbytes(n)
                await img.write(off, data)
                model[off:off + n] = data
                if k % 7 == 6:
                    await img.flush()
                    assert await img.read(off, n) == data
        finally:
            await img.close()

    trio.run(run)
    assert taken["owned"] > 0 and taken["fresh"] > 0, taken
    assert qemu.to_raw(top, str(tmp_path / "out.raw")) == bytes(model)
    rc, report = qemu.check(top)
    assert rc == 0, report
