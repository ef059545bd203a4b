"""The mirror of an active merge (snapfs/chain/mirror.py): recorded ranges come back sorted
and joined, and a guest write that the image below refuses still succeeds in the active
image and makes the merge fail (it is not counted as written to both; the volume records
it for copying, tests/chain/test_active_merge.py)."""

from __future__ import annotations

import trio

from snapfs.chain.image import open_image
from snapfs.chain.mirror import Mirror, join_ranges
from tests import qemu

MIB = 1 << 20


def test_join_ranges():
    assert join_ranges([]) == []
    assert join_ranges([(8192, 4096), (0, 4096), (4096, 4096)]) == [(0, 12288)]
    assert join_ranges([(0, 4096), (1024, 1024), (65536, 4096), (0, 512)]) == \
        [(0, 4096), (65536, 4096)]
    assert join_ranges([(100, 50), (120, 100), (300, 1)]) == [(100, 120), (300, 1)]


def test_a_write_the_image_below_refuses_fails_the_merge_not_the_guest(tmp_path):
    lower_path, top_path = str(tmp_path / "lower"), str(tmp_path / "top")
    qemu.create(lower_path, MIB)
    qemu.create(top_path, MIB)

    async def main():
        top = await open_image(top_path, "qcow2", writable=True)
        lower = await open_image(lower_path, "qcow2", writable=False)
        try:
            m = Mirror()
            assert not await m.write_both(top, lambda img: img.write(0, b"a" * 4096))
            m.block(lower)
            assert not await m.write_both(top, lambda img: img.write(8192, b"b" * 4096))
            assert m.failed is not None and m.lower is None and m.both == 0
            assert await top.read(0, 4096) == b"a" * 4096
            assert await top.read(8192, 4096) == b"b" * 4096
            await m.stop()
        finally:
            await top.close()
            await lower.close()

    trio.run(main)
    assert qemu.to_raw(top_path, str(tmp_path / "out"))[8192:12288] == b"b" * 4096
    assert qemu.to_raw(lower_path, str(tmp_path / "out2")) == bytes(MIB)
