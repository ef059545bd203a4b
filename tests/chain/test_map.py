"""Where the engine says a chain's content lives, against ``qemu-img map``.

Two-image chains made by qemu-img and filled by qemu-io with scattered data, zero writes and
discards, with small clusters so that a guest range crosses many L2 tables, with and without
extended L2 entries.  ``resolve`` (built on ``Image.map``, which skips stretches of empty L2
entries in one step) must name the same file depth, host offset and zero/data state for every
byte as qemu-img map does.
"""

import random

import pytest
import trio

from snapfs.chain import extent as ex
from snapfs.chain.chain import open_chain
from snapfs.chain.resolve import resolve
from tests import qemu

MIB = 1 << 20
SIZE = 24 * MIB


def _fill(path: str, rnd: random.Random, cs: int, ops: int) -> None:
    cmds = []
    for _ in range(ops):
        off = rnd.randrange(SIZE // 512) * 512
        n = min(rnd.choice((512, cs, 3 * cs, 40 * cs)), SIZE - off)
        kind = rnd.random()
        if kind < 0.7:
            cmds.append(f"write -P {rnd.randrange(1, 255)} {off} {n}")
        elif kind < 0.85:
            cmds.append(f"write -z {off} {n}")
        else:
            cmds.append(f"discard {off} {n}")
    qemu.io(path, *cmds)


def _ours(path: str) -> list[tuple[int, int, object, int]]:
    """(start, end, depth or None for zeros, host offset of start)."""
    async def main():
        top = await open_chain(path, "qcow2")
        try:
            chain, img = [], top
            while img is not None:
                chain.append(img)
                img = img.backing
            out = []
            for img, run in await resolve(top, 0, top.size):
                if img is None or run.kind == ex.ZERO:
                    out.append((run.offset, run.offset + run.length, None, 0))
                else:
                    assert run.kind == ex.DATA, run
                    out.append((run.offset, run.offset + run.length, chain.index(img), run.host))
            return out
        finally:
            await top.close()
    return trio.run(main)


@pytest.mark.parametrize("cs,extended", [(4096, False), (65536, False), (16384, True)])
def test_resolve_agrees_with_qemu_img_map(tmp_path, cs, extended):
    rnd = random.Random(cs + extended)
    base, top = str(tmp_path / "base.qcow2"), str(tmp_path / "top.qcow2")
    opts = f"cluster_size={cs}" + (",extended_l2=on" if extended else "")
    qemu.img("create", "-f", "qcow2", "-o", opts, base, str(SIZE))
    _fill(base, rnd, cs, 60)
    qemu.img("create", "-f", "qcow2", "-o", opts, "-b", "base.qcow2", "-F", "qcow2", top)
    _fill(top, rnd, cs, 60)
    ours = _ours(top)
    assert ours[0][0] == 0 and ours[-1][1] == SIZE
    assert all(a[1] == b[0] for a, b in zip(ours, ours[1:])), "runs with gaps or overlaps"
    checked = 0
    for m in qemu.map_(top):
        start, end = m["start"], m["start"] + m["length"]
        for s, e, depth, host in ours:
            lo, hi = max(s, start), min(e, end)
            if lo >= hi:
                continue
            where = f"guest {lo:#x}-{hi:#x}: qemu {m}, snapfs depth {depth} host {host:#x}"
            if m["data"]:
                assert depth == m["depth"], where
                assert host + (lo - s) == m["offset"] + (lo - start), where
            else:
                assert depth is None, where
            checked += hi - lo
    assert checked == SIZE
