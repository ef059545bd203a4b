"""The mirror of an active merge (snapfs/chain/mirror.py): recorded ranges come back sorted
and joined, and a guest write that cannot be copied into the image below still succeeds in
the active image, is recorded, and makes the merge fail instead of finishing without it."""

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
            await m.write(top, lambda img: img.write(0, b"a" * 4096), 0, 4096)
            assert m.take() == [(0, 4096)] and m.both == 0
            m.block(lower)
            await m.write(top, lambda img: img.write(8192, b"b" * 4096), 8192, 4096)
            assert m.failed is not None and m.lower is None
            assert m.take() == [(8192, 4096)]  # left for a copy, were the merge to go on
            assert await top.read(8192, 4096) == b"b" * 4096
            await m.stop()
        finally:
            await top.close()
            await lower.close()

    trio.run(main)
    assert qemu.to_raw(top_path, str(tmp_path / "out"))[8192:12288] == b"b" * 4096
    assert qemu.to_raw(lower_path, str(tmp_path / "out2")) == bytes(MIB)
