"""Deleting the newest snapshot merges the active overlay down while the guest writes to it
flat out (issue: benchmarks; seen there as a 14 s writer stall and a 90 s merge).

A guest that writes small blocks as fast as the daemon copies them used to keep the merge's
catch-up passes growing and leave the rest to the switch, which copies it with guest I/O
paused.  The merge must finish while the writers keep writing, copy next to nothing inside the
pause, and leave every image as qemu-img reads it with the content the guest wrote.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import trio

from snapfs.chain.service import VolumeService
from tests.chain.test_merge_direction import SIZE, Model, blob, build, verify, verify_reopened

BLOCK = 4096
WRITERS = 4

#: base format, MiB written before each snapshot and after the last, the snapshot deleted
SHAPES = {"into-raw-base": ("raw", [8, 1], "s1"),
          "into-qcow2-overlay": ("raw", [4, 8, 1], "s2")}


async def writer(vol, model: Model, t: int, seed: int, counts: list[int]) -> None:
    """Writer ``t`` of ``WRITERS``: 4 KiB blocks (now and then zeroes) at its own scattered
    slots, no flushes, a pass through the scheduler between writes as FUSE requests give."""
    rng = random.Random(seed)
    slots = SIZE // BLOCK // WRITERS
    k = 0
    while True:
        off = (rng.randrange(slots) * WRITERS + t) * BLOCK
        if k % 37 == 36:
            await vol.write_zeroes(off, BLOCK)
            model.write(off, bytes(BLOCK))
        else:
            data = blob(seed * 100_000 + k, BLOCK)
            await vol.write(off, data)
            model.write(off, data)
        counts[t] += 1
        k += 1
        await trio.sleep(0)


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_active_merge_converges_under_flat_out_writers(tmp_path: Path, shape: str) -> None:
    fmt, mib, sid = SHAPES[shape]
    root = tmp_path / "share"
    root.mkdir()

    async def main():
        model = Model(SIZE)
        svc = VolumeService(str(root))
        async with svc.running():
            await build(svc, model, "v", fmt, 31, mib)
            async with svc.hold("v") as vol:
                counts = [0] * WRITERS
                async with trio.open_nursery() as nursery:
                    for t in range(WRITERS):
                        nursery.start_soon(writer, vol, model, t, 700 + t, counts)
                    await svc.handle({"op": "delete-snapshot", "volume": "v", "snapshot": sid})
                    del model.snapshots[sid]
                    await svc.wait_idle()
                    nursery.cancel_scope.cancel()
                assert vol.mirror is None
                stats = vol.merge_stats
            assert not svc.failed, svc.failed
            assert sum(counts) > 100, counts  # the writers did write during the merge
            # The last pass let guest writes through to both images, and the switch found at
            # most one write per writer that began before that (the pause copies nothing else).
            assert stats["paused_copy"] <= WRITERS * BLOCK, stats
            assert stats["mirrored"] > 0, stats
            await verify(svc, root, "v", model, tmp_path)
        await verify_reopened(root, "v", model, tmp_path)

    trio.run(main)
