"""Copy-on-write over zeros writes the guest's bytes, not a cluster of zeros around them.

A 4 KiB write into a cluster the overlay does not have yet, over a hole of the base (or no
base at all), gets a new cluster past the end of the overlay file: only the 4 KiB and the
cluster's last byte are written, so the file still covers whole clusters and the rest reads
as zeros from the file system's hole.  Content below that is not zero is copied whole, and a
cluster reused after a discard (it may still hold old bytes) is written whole.  qemu-img is
the judge of every result."""

import os

import trio

from snapfs.chain import extent as ex
from snapfs.chain.chain import open_chain
from snapfs.chain.image import create_qcow2
from tests import qemu

KIB = 1024
CS = 64 * KIB
SIZE = 64 * CS


def _base(path: str) -> bytes:
    """A sparse raw base: holes, except cluster 3 (a pattern) and cluster 4 (written zeros)."""
    data = bytearray(SIZE)
    data[3 * CS:4 * CS] = bytes(range(256)) * (CS // 256)
    with open(path, "wb") as f:
        f.truncate(SIZE)
        f.seek(3 * CS)
        f.write(data[3 * CS:5 * CS])
    return bytes(data)


async def _host(img, guest: int) -> int:
    (e,) = await img.map(guest, 4 * KIB)
    assert e.kind == ex.DATA, e
    return e.host - (guest % CS)


def test_a_small_write_over_a_hole_writes_only_its_bytes(tmp_path):
    qemu.require()
    base, top = str(tmp_path / "base"), str(tmp_path / "top")
    want = bytearray(_base(base))
    payload = os.urandom(4 * KIB)
    # the middle of twenty clusters over holes, one over the pattern, one over written zeros
    targets = [c * CS + 20 * KIB for c in list(range(10, 30)) + [3, 4]]

    async def run():
        await create_qcow2(top, SIZE, backing_file="base", backing_format="raw")
        img = await open_chain(top, "qcow2", writable=True)
        try:
            for off in targets:
                await img.write(off, payload)
            await img.flush()
        finally:
            await img.close()

    trio.run(run)
    for off in targets:
        want[off:off + len(payload)] = payload
    assert qemu.check(top)[0] == 0, qemu.check(top)
    assert qemu.to_raw(top, str(tmp_path / "out.raw")) == bytes(want)
    st = os.stat(top)
    assert st.st_size % CS == 0, st.st_size
    # 21 new clusters over zeros hold 8 KiB each (the write, the last page); the one over
    # the pattern is whole; the tables take a few clusters.  Whole clusters everywhere:
    # at least 22 * 64 KiB = 1.4 MiB.
    assert st.st_blocks * 512 < 22 * 8 * KIB + CS + 8 * CS, st.st_blocks * 512


def test_a_reused_cluster_is_written_whole(tmp_path):
    qemu.require()
    top = str(tmp_path / "top")
    old = b"\xaa" * CS
    payload = os.urandom(4 * KIB)

    async def run():
        await create_qcow2(top, SIZE)
        img = await open_chain(top, "qcow2", writable=True)
        try:
            await img.write(0, old)
            await img.write(CS, old)  # so that the freed cluster is not the file's last
            await img.flush()
            freed = await _host(img, 0)
            await img.discard(0, CS)
            await img.flush()
            await img.write(9 * CS + 8 * KIB, payload)
            reused = await _host(img, 9 * CS)
            await img.flush()
            return freed, reused
        finally:
            await img.close()

    freed, reused = trio.run(run)
    assert reused == freed, "the allocator did not reuse the discarded cluster"
    want = bytearray(SIZE)
    want[CS:2 * CS] = old
    want[9 * CS + 8 * KIB:9 * CS + 12 * KIB] = payload
    assert qemu.check(top)[0] == 0, qemu.check(top)
    assert qemu.to_raw(top, str(tmp_path / "out.raw")) == bytes(want)
