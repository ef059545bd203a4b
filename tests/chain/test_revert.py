"""Revert replaces the active overlay instead of copying over what it holds.

Reverting to the latest snapshot (the only revert Cinder asks for) leaves an empty active
overlay on the snapshot's file: nothing the guest wrote since is read or copied.  Reverting to
an older snapshot copies back only what the frozen overlays above it changed.  qemu-img is the
judge of the content and of the files; a revert that fails before its switch changes nothing.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from snapfs.chain.service import REVERT_SUFFIX, VolumeService
from snapfs.errors import SnapfsError
from tests import qemu

MIB = 1 << 20
SIZE = 8 * MIB


def pattern(seed: int, n: int) -> bytes:
    return random.Random(seed).randbytes(n)


async def write(svc: VolumeService, vid: str, off: int, data: bytes) -> None:
    async with svc.hold(vid) as vol:
        await vol.write(off, data)
        await vol.flush()


async def read_all(svc: VolumeService, vid: str) -> bytes:
    async with svc.hold(vid) as vol:
        return await vol.read(0, vol.size)


def depth0(path: Path) -> list[dict]:
    """What the file itself holds (data or zero clusters), as qemu-img maps it."""
    return [e for e in qemu.map_(str(path)) if e["depth"] == 0]


def leftovers(share: Path) -> list[str]:
    return [n for n in os.listdir(share) if n.endswith(REVERT_SUFFIX)]


async def test_revert_to_latest_snapshot_leaves_an_empty_overlay(tmp_path: Path) -> None:
    share = tmp_path / "share"
    share.mkdir()
    before = pattern(1, 4 * MIB)
    svc = VolumeService(str(share))
    async with svc.running():
        await svc.handle({"op": "create-volume", "volume": "A", "size": SIZE})
        await write(svc, "A", 0, before)
        await svc.handle({"op": "create-snapshot", "volume": "A", "snapshot": "s1"})
        await write(svc, "A", MIB, pattern(2, 6 * MIB))
        active = share / "volume-A.s1"
        old_inode = active.stat().st_ino
        await svc.handle({"op": "revert", "volume": "A", "snapshot": "s1"})
        want = before + bytes(SIZE - len(before))
        assert await read_all(svc, "A") == want
        await write(svc, "A", 7 * MIB, b"after" * 100)  # writes after the revert apply on top
        want = want[:7 * MIB] + b"after" * 100 + want[7 * MIB + 500:]
        assert await read_all(svc, "A") == want
    assert active.stat().st_ino != old_inode  # a new file took the active file's name
    assert qemu.to_raw(str(active), str(tmp_path / "a.raw")) == want
    # the new overlay holds only the write made after the revert
    assert [(e["start"], e["length"]) for e in depth0(active)] == [(7 * MIB, 65536)]
    assert qemu.check(str(active))[0] == 0
    assert not leftovers(share)
    assert not os.listdir(share / ".snapfs" / "intents")


async def test_revert_to_older_snapshot_copies_only_what_frozen_overlays_changed(
        tmp_path: Path) -> None:
    share = tmp_path / "share"
    share.mkdir()
    base = pattern(3, SIZE)
    svc = VolumeService(str(share))
    async with svc.running():
        await svc.handle({"op": "create-volume", "volume": "A", "size": SIZE})
        await write(svc, "A", 0, base)
        await svc.handle({"op": "create-snapshot", "volume": "A", "snapshot": "s1"})
        await write(svc, "A", MIB, pattern(4, MIB))  # in s1's overlay, frozen below
        await write(svc, "A", 3 * MIB, bytes(MIB))  # zeros over data: must come back too
        await svc.handle({"op": "create-snapshot", "volume": "A", "snapshot": "s2"})
        at_s2 = await read_all(svc, "A")
        await write(svc, "A", 5 * MIB + 4096, pattern(5, 8192))  # in s2's overlay
        await svc.handle({"op": "create-snapshot", "volume": "A", "snapshot": "s3"})
        at_s3 = await read_all(svc, "A")
        await write(svc, "A", 6 * MIB, pattern(6, 2 * MIB))  # only in the active file
        await svc.handle({"op": "revert", "volume": "A", "snapshot": "s1"})
        assert await read_all(svc, "A") == base
        async with svc.hold("A") as vol:  # later snapshots keep their content
            assert await vol.read_snapshot("s2", 0, SIZE) == at_s2
            assert await vol.read_snapshot("s3", 0, SIZE) == at_s3
    active = share / "volume-A.s3"
    assert qemu.to_raw(str(active), str(tmp_path / "a.raw")) == base
    changed = [(MIB, MIB), (3 * MIB, MIB), (5 * MIB, 65536)]
    for e in depth0(active):  # nothing of what only the active file held was copied
        assert any(s <= e["start"] and e["start"] + e["length"] <= s + n for s, n in changed), e
    assert sum(e["length"] for e in depth0(active)) == 2 * MIB + 65536
    for name in ("volume-A.s1", "volume-A.s2", "volume-A.s3"):
        assert qemu.check(str(share / name))[0] == 0, name
    assert not leftovers(share)


async def test_revert_failing_before_its_switch_changes_nothing(tmp_path: Path) -> None:
    share = tmp_path / "share"
    share.mkdir()
    svc = VolumeService(str(share))
    async with svc.running():
        await svc.handle({"op": "create-volume", "volume": "A", "size": SIZE})
        await svc.handle({"op": "create-snapshot", "volume": "A", "snapshot": "s1"})
        await write(svc, "A", 0, pattern(7, 2 * MIB))
        now = await read_all(svc, "A")
        blocker = share / ("volume-A.s1" + REVERT_SUFFIX)  # where the new overlay would go
        blocker.mkdir()
        (blocker / "f").write_bytes(b"x")
        inode = (share / "volume-A.s1").stat().st_ino
        with pytest.raises(SnapfsError):
            await svc.handle({"op": "revert", "volume": "A", "snapshot": "s1"})
        assert await read_all(svc, "A") == now
        assert (share / "volume-A.s1").stat().st_ino == inode
        assert not os.listdir(share / ".snapfs" / "intents")  # nothing left to finish later
        (blocker / "f").unlink()
        blocker.rmdir()
        await svc.handle({"op": "revert", "volume": "A", "snapshot": "s1"})
        assert await read_all(svc, "A") == bytes(SIZE)


async def test_revert_on_a_full_share_changes_nothing(tmp_path: Path) -> None:
    """The copy back into the new overlay needs space: on a full share the revert fails with
    ENOSPC, the new overlay and the intent are gone, the volume reads as before."""
    import errno
    import subprocess
    share = tmp_path / "share"
    share.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=20m", "tmpfs", str(share)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"cannot mount a tmpfs as a small share (run as root): {r.stderr}")
    try:
        svc = VolumeService(str(share))
        async with svc.running():
            await svc.handle({"op": "create-volume", "volume": "A", "size": SIZE})
            await write(svc, "A", 0, pattern(8, 4 * MIB))
            await svc.handle({"op": "create-snapshot", "volume": "A", "snapshot": "s1"})
            await write(svc, "A", 0, pattern(9, 4 * MIB))  # frozen below once s2 is taken
            await svc.handle({"op": "create-snapshot", "volume": "A", "snapshot": "s2"})
            now = await read_all(svc, "A")
            free = os.statvfs(share).f_bavail * os.statvfs(share).f_frsize
            (share / "filler").write_bytes(bytes(free - MIB))  # 1 MiB left; the copy needs 4
            with pytest.raises(SnapfsError) as err:
                await svc.handle({"op": "revert", "volume": "A", "snapshot": "s1"})
            assert err.value.errno == errno.ENOSPC
            assert await read_all(svc, "A") == now
            assert not leftovers(share)
            assert not os.listdir(share / ".snapfs" / "intents")
            (share / "filler").unlink()
            await svc.handle({"op": "revert", "volume": "A", "snapshot": "s1"})
            assert (await read_all(svc, "A"))[:4 * MIB] == pattern(8, 4 * MIB)
        for name in ("volume-A.s1", "volume-A.s2"):
            assert qemu.check(str(share / name))[0] == 0, name
    finally:
        subprocess.run(["umount", "-l", str(share)], capture_output=True)
