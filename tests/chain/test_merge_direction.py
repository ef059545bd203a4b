"""delete-snapshot merges the smaller side (issue: volumes and snapshots).

When the deleted snapshot's overlay holds more than the qcow2 file below it, snapfs streams the
lower file up into the overlay and renames the overlay over the lower file's name, instead of
committing the big delta down.  Which way it went is visible on the share: after a stream up
the lower file's NAME holds the overlay's INODE.  Either way the share must end up as upstream
Cinder leaves it (same names, same ``.info``), every snapshot and the volume keep their content
-- also with a guest writing to the volume during the merge -- and ``qemu-img`` agrees.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import pytest
import trio

from snapfs.chain.catalog import Share
from snapfs.chain.service import VolumeService
from tests import qemu

MIB = 1 << 20
SIZE = 16 * MIB


def blob(seed: int, n: int) -> bytes:
    return random.Random(seed).randbytes(n)


class Model:
    """What the volume and each snapshot must read."""

    def __init__(self, size: int):
        self.volume = bytearray(size)
        self.snapshots: dict[str, bytes] = {}

    def write(self, off: int, data: bytes) -> None:
        self.volume[off:off + len(data)] = data


async def write(svc: VolumeService, model: Model, vid: str, off: int, data: bytes) -> None:
    async with svc.hold(vid) as vol:
        await vol.write(off, data)
        await vol.flush()
    model.write(off, data)


async def spread(svc, model, vid, seed: int, total: int, piece: int = 256 << 10) -> None:
    rng = random.Random(seed)
    for k in range(total // piece):
        off = rng.randrange(0, SIZE - piece) & ~4095
        await write(svc, model, vid, off, blob(seed * 1000 + k, piece))


async def snapshot(svc, model, vid: str, sid: str) -> None:
    await svc.handle({"op": "create-snapshot", "volume": vid, "snapshot": sid})
    model.snapshots[sid] = bytes(model.volume)


async def build(svc, model: Model, vid: str, fmt: str, seed: int, mib: list[int]) -> None:
    """A volume with ``mib[0]`` MiB written, then snapshot s1 and ``mib[1]`` MiB, s2 ..."""
    await svc.handle({"op": "create-volume", "volume": vid, "size": SIZE, "format": fmt})
    for k, n in enumerate(mib):
        if k:
            await snapshot(svc, model, vid, f"s{k}")
        await spread(svc, model, vid, seed + k, n * MIB)


def ino(root: Path, name: str) -> int:
    return os.stat(root / name).st_ino


async def verify(svc: VolumeService, root: Path, vid: str, model: Model, tmp: Path) -> None:
    async with svc.hold(vid) as vol:
        assert await vol.read(0, SIZE) == bytes(model.volume), "volume content"
        for sid, want in model.snapshots.items():
            assert await vol.read_snapshot(sid, 0, SIZE) == want, f"snapshot {sid} content"
    info = json.loads((root / f"volume-{vid}.info").read_text())
    expected = {sid: f"volume-{vid}.{sid}" for sid in model.snapshots}
    assert {k: v for k, v in info.items() if k != "active"} == expected
    files = sorted(p.name for p in root.iterdir() if p.name.startswith(f"volume-{vid}"))
    assert files == sorted([f"volume-{vid}", f"volume-{vid}.info", *expected.values()])
    for name in files:
        if not name.endswith(".info") and qemu.info(str(root / name))["format"] == "qcow2":
            rc, out = qemu.check(str(root / name))
            assert rc == 0, f"qemu-img check {name}: {out}"
    assert qemu.to_raw(str(root / info["active"]), str(tmp / "out.raw")) == bytes(model.volume)


async def verify_reopened(root: Path, vid: str, model: Model, tmp: Path) -> None:
    """The same again from a fresh start, as another daemon would open the share."""
    svc = VolumeService(str(root))
    async with svc.running():
        await verify(svc, root, vid, model, tmp)


def run(fn, *args):
    trio.run(fn, *args)


def test_stream_up_into_the_overlay_below_while_the_guest_writes(tmp_path: Path) -> None:
    """Raw base, small s1 overlay, big active s2 overlay: deleting s2 streams s1's overlay up."""
    root = tmp_path / "share"
    root.mkdir()

    async def main():
        model = Model(SIZE)
        svc = VolumeService(str(root))
        async with svc.running():
            await build(svc, model, "v", "raw", 1, [2, 1, 8])
            upper = ino(root, "volume-v.s2")
            async with svc.hold("v"):
                await svc.handle({"op": "delete-snapshot", "volume": "v", "snapshot": "s2"})
                del model.snapshots["s2"]
                # the guest keeps writing while the merge streams (small blocks, many switches)
                k = 0
                while svc.jobs:
                    await write(svc, model, "v", (k * 12288 + 4096) % (SIZE - 8192),
                                blob(5000 + k, 8192))
                    k += 1
            assert ino(root, "volume-v.s1") == upper, "the s1 file must now be the old s2 overlay"
            assert not (root / "volume-v.s2").exists()
            info = json.loads((root / "volume-v.info").read_text())
            assert info["active"] == "volume-v.s1"
            assert qemu.info(str(root / "volume-v.s1"))["backing-filename"] == "volume-v"
            await verify(svc, root, "v", model, tmp_path)
        await verify_reopened(root, "v", model, tmp_path)

    run(main)


def test_stream_up_into_a_qcow2_base_rebases_the_child(tmp_path: Path) -> None:
    """qcow2 base holding little, big s1 overlay under the active one: deleting s1 streams the
    base up into s1's overlay, which becomes the base (no backing) and the active file is
    pointed at it."""
    root = tmp_path / "share"
    root.mkdir()

    async def main():
        model = Model(SIZE)
        svc = VolumeService(str(root))
        async with svc.running():
            await build(svc, model, "q", "qcow2", 11, [1, 8, 1])
            upper = ino(root, "volume-q.s1")
            await svc.handle({"op": "delete-snapshot", "volume": "q", "snapshot": "s1"})
            del model.snapshots["s1"]
            await svc.wait_idle()
            assert ino(root, "volume-q") == upper, "the base must now be the old s1 overlay"
            base = qemu.info(str(root / "volume-q"))
            assert base["format"] == "qcow2" and "backing-filename" not in base
            assert qemu.info(str(root / "volume-q.s2"))["backing-filename"] == "volume-q"
            await verify(svc, root, "q", model, tmp_path)
        await verify_reopened(root, "q", model, tmp_path)

    run(main)


def test_small_overlay_is_committed_down(tmp_path: Path) -> None:
    """The usual case (a small delta over a big file) keeps committing down: the lower file
    keeps its inode."""
    root = tmp_path / "share"
    root.mkdir()

    async def main():
        model = Model(SIZE)
        svc = VolumeService(str(root))
        async with svc.running():
            await build(svc, model, "d", "qcow2", 21, [8, 1])
            lower = ino(root, "volume-d")
            await svc.handle({"op": "delete-snapshot", "volume": "d", "snapshot": "s1"})
            del model.snapshots["s1"]
            await svc.wait_idle()
            assert ino(root, "volume-d") == lower
            assert not (root / "volume-d.s1").exists()
            await verify(svc, root, "d", model, tmp_path)

    run(main)


# --------------------------------------------------------------------------------------------
# recovery of each on-disk step of a stream up
# --------------------------------------------------------------------------------------------

#: (volume, base format, MiB written before s1, between s1 and s2, after s2, snapshot deleted)
SHAPES = {"active": ("a", "raw", 2, 1, 8, "s2"), "child": ("c", "qcow2", 1, 8, 1, "s1")}


@pytest.mark.parametrize("shape", sorted(SHAPES))
@pytest.mark.parametrize("step", ["rebased", "renamed"])
def test_recovery_finishes_an_interrupted_stream_up(tmp_path: Path, shape: str, step: str):
    """The share as a crash leaves it after each renaming step of a stream up -- ``rebased``:
    the overlay already points at the lower file's backing but still has its own name;
    ``renamed``: it has the lower file's name but the child (or ``.info``'s active) still names
    it -- with the merge's intent on the share: opening the share finishes the merge."""
    root = tmp_path / "share"
    root.mkdir()
    vid, fmt, before, between, after, sid = SHAPES[shape]
    model = Model(SIZE)
    upper = f"volume-{vid}.{sid}"
    lower = f"volume-{vid}" if sid == "s1" else f"volume-{vid}.s1"
    child = f"volume-{vid}.s2" if sid == "s1" else None

    async def prepare():
        svc = VolumeService(str(root))
        async with svc.running():
            await build(svc, model, vid, fmt, 31, [before, between, after])
        shutil.copyfile(root / lower, tmp_path / "lower.saved")
        svc = VolumeService(str(root))
        async with svc.running():
            await svc.handle({"op": "delete-snapshot", "volume": vid, "snapshot": sid})
            del model.snapshots[sid]
            await svc.wait_idle()

    trio.run(prepare)
    merged = ino(root, lower)
    # wind the share back to the crash point
    if child:
        qemu.img("rebase", "-u", "-b", upper, "-F", "qcow2", str(root / child))
    else:
        info = json.loads((root / f"volume-{vid}.info").read_text())
        info["active"] = upper
        Share(str(root)).write_info(vid, info)
    if step == "rebased":
        os.rename(root / lower, root / upper)
        shutil.copyfile(tmp_path / "lower.saved", root / lower)
    Share(str(root)).write_intent(vid, {"op": "merge", "snapshot": sid, "file": upper,
                                        "into": lower, "child": child})

    async def recover():
        svc = VolumeService(str(root))
        async with svc.running():
            assert not svc.failed
            await verify(svc, root, vid, model, tmp_path)
        assert Share(str(root)).intents() == []
        assert ino(root, lower) == merged

    trio.run(recover)


@pytest.mark.parametrize("cs,extl2", [(65536, False), (65536, True), (4096, False),
                                      (512, False)])
def test_stored_bytes_match_qemu_img_map(tmp_path, cs, extl2):
    """What the direction is chosen from: the bytes an overlay itself stores, as
    ``qemu-img map`` counts them (data at depth 0), for writes of every shape: partial
    clusters (subclusters with extended L2), zero writes on allocated and unallocated
    clusters, compressed clusters, overwrites."""
    from snapfs.chain.qcow2 import Qcow2Image

    size = 8 * MIB
    base = str(tmp_path / "base.qcow2")
    top = str(tmp_path / "top.qcow2")
    qemu.create(base, size, f"cluster_size={cs}")
    qemu.io(base, f"write -P 1 0 {size}")
    qemu.create(top, size, f"cluster_size={cs}", f"extended_l2={'on' if extl2 else 'off'}",
                backing=base, backing_fmt="qcow2")
    rng = random.Random(cs + extl2)
    # compressed first: qemu writes them only into clusters the image does not hold yet
    qemu.io(top, *(f"write -c -P 7 {c * cs} {cs}"
                   for c in rng.sample(range(size // cs), 12)))
    cmds = []
    for _ in range(50):
        off = rng.randrange(0, size - 65536) & ~511
        n = rng.randrange(1, 129) * 512
        cmds.append(f"write -P 9 {off} {n}" if rng.randrange(3) else f"write -z {off} {n}")
    qemu.io(top, *cmds)
    expected = sum(e["length"] for e in qemu.map_(top) if e["depth"] == 0 and e["data"])

    async def count() -> int:
        img = await Qcow2Image.open(top)
        try:
            return await img.stored_bytes()
        finally:
            await img.close()

    assert trio.run(count) == expected
