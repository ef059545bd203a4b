"""The remembered map of a frozen chain (``FlatMap``) reads what qemu-img reads.

A deep chain made by qemu-img and qemu-io mixes everything a lookup must get right: a raw base
shorter than the volume, cluster sizes from 4 KiB to 2 MiB, extended L2 subclusters, zero and
compressed clusters, discards, and data in every image.  The active image reads through the
chain with a FlatMap and without one, at cluster-straddling offsets, twice (remembered
answers), and must equal ``qemu-img convert`` of the chain; writes to the active image (which
the map never covers) must show through at once.
"""

from __future__ import annotations

import random
from pathlib import Path

import trio

from snapfs.chain.chain import open_chain
from snapfs.chain.resolve import FlatMap
from tests import qemu

MIB = 1 << 20
SIZE = 12 * MIB


def build(d: Path) -> Path:
    base = d / "base.raw"
    with open(base, "wb") as f:
        f.truncate(8 * MIB)  # shorter than the volume: the rest reads as zeros
        f.write(random.Random(1).randbytes(3 * MIB))
    layers = [("64k", []), ("4k", []), ("2M", []), ("64k", ["extended_l2=on"]),
              ("32k", []), ("64k", []), ("128k", ["extended_l2=on"]), ("64k", [])]
    below, below_fmt = base.name, "raw"
    rng = random.Random(2)
    for k, (cs, opts) in enumerate(layers):
        path = d / f"o{k}.qcow2"
        qemu.create(str(path), SIZE, f"cluster_size={cs}", *opts, backing=below,
                    backing_fmt=below_fmt)
        cmds = []
        for _ in range(6):
            off = rng.randrange(0, SIZE - 300_000) & ~511
            n = rng.randrange(1, 300_000) & ~511 or 512
            cmds.append(f"write -P {k + 1} {off} {n}")
        cmds.append(f"write -z {rng.randrange(0, SIZE // 65536) * 65536} 131072")
        cmds.append(f"discard {rng.randrange(0, SIZE // 65536) * 65536} 65536")
        if not opts:  # a compressed write covers one whole cluster
            c = int(cs[:-1]) << (10 if cs.endswith("k") else 20)
            cmds.append(f"write -c -P {k + 101} {rng.randrange(0, SIZE // c) * c} {c}")
        qemu.io(str(path), *cmds)
        below, below_fmt = path.name, "qcow2"
    top = d / "top.qcow2"
    qemu.create(str(top), SIZE, backing=below, backing_fmt="qcow2")
    qemu.io(str(top), "write -P 200 1000000 70000")
    return top


def test_flatmap_reads_what_qemu_reads(tmp_path: Path) -> None:
    top_path = build(tmp_path)
    want = qemu.to_raw(str(top_path), str(tmp_path / "want.raw"))
    rng = random.Random(3)
    ranges = [(0, SIZE)] + [(o, rng.randrange(1, 300_000))
                            for o in (rng.randrange(0, SIZE - 300_000) for _ in range(300))]

    async def main():
        top = await open_chain(str(top_path), "qcow2", writable=True)
        try:
            sizes = []
            img = top.backing
            while img is not None:
                sizes.append(getattr(img, "cs", 65536))
                img = img.backing
            top.below_map = FlatMap(top.backing, min(sizes))
            for _ in range(2):
                for off, n in ranges:
                    assert await top.read(off, n) == want[off:off + n], (off, n)
            assert len(top.below_map.entries) > 100
            # the active image's own writes are never answered from the map
            await top.write(3 * MIB + 123, b"fresh" * 1000)
            got = await top.read(3 * MIB, 10_000)
            assert got[123:5123] == b"fresh" * 1000
            assert got[:123] == want[3 * MIB:3 * MIB + 123]
        finally:
            await top.close()

    trio.run(main)


def test_flatmap_reads_a_piece_in_one_go(tmp_path: Path) -> None:
    """Granules that follow each other in one file are read as one run: a 1 MiB read of a
    piece one snapshot wrote whole is one read of that file, zeros cost no read at all."""
    base = tmp_path / "base.raw"
    base.write_bytes(b"")
    with open(base, "r+b") as f:
        f.truncate(8 * MIB)
    qemu.create(str(tmp_path / "o1.qcow2"), 8 * MIB, backing="base.raw", backing_fmt="raw")
    qemu.io(str(tmp_path / "o1.qcow2"), f"write -P 1 {MIB} {MIB}", f"write -P 3 {5 * MIB} 65536")
    qemu.create(str(tmp_path / "o2.qcow2"), 8 * MIB, backing="o1.qcow2", backing_fmt="qcow2")
    qemu.io(str(tmp_path / "o2.qcow2"), f"write -P 2 {3 * MIB} {MIB}",
            f"write -P 4 {5 * MIB + 65536} 65536")
    top_path = tmp_path / "top.qcow2"
    qemu.create(str(top_path), 8 * MIB, backing="o2.qcow2", backing_fmt="qcow2")
    want = qemu.to_raw(str(top_path), str(tmp_path / "want.raw"))

    async def main():
        top = await open_chain(str(top_path), "qcow2", writable=True)
        calls: list[tuple[str, int]] = []
        try:
            top.below_map = FlatMap(top.backing, 65536)
            img = top.backing
            while img is not None:
                def spy(host, length, _img=img, _orig=img.read_host):
                    calls.append((_img.path.rsplit("/", 1)[-1], length))
                    return _orig(host, length)
                img.read_host = spy
                img = img.backing
            await top.read(0, 65536)  # fill the map
            calls.clear()
            assert await top.read(MIB, MIB) == want[MIB:2 * MIB]
            assert calls == [("o1.qcow2", MIB)]
            calls.clear()
            assert await top.read(0, 8 * MIB) == want
            assert calls == [("o1.qcow2", MIB), ("o2.qcow2", MIB), ("o1.qcow2", 65536),
                             ("o2.qcow2", 65536)]
            calls.clear()
            assert await top.read(MIB + 4096, 8192) == want[MIB + 4096:MIB + 12288]
            assert calls == [("o1.qcow2", 8192)]
        finally:
            await top.close()

    trio.run(main)
