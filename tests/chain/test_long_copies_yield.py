"""Long copies let other tasks run between chunks.

On a local share every read and write is inline, so a clone, a merge's copy or a stream
would never give the loop back if nothing in it waited: guest requests to every volume of
the mount would stall until the copy ended.  A ticker task counts the scheduler's passes;
between any two chunks' progress reports it must have run.
"""

import trio

from snapfs.chain import copy as copy_mod
from snapfs.chain import volume as volume_mod
from snapfs.chain.image import create_qcow2
from snapfs.chain.qcow2 import Qcow2Image
from tests import qemu

MIB = 1 << 20
SIZE = 64 * MIB


def _source(tmp_path) -> str:
    path = str(tmp_path / "src.qcow2")
    qemu.img("create", "-f", "qcow2", path, str(SIZE))
    qemu.io(path, *(f"write -P {i + 1} {i * 4 * MIB} {MIB}" for i in range(SIZE // (4 * MIB))))
    return path


async def _ticks_between_chunks(copy) -> list[int]:
    """Run ``copy(on_progress)``; the ticker's count at each chunk's progress report."""
    ticks, seen = 0, []

    async def ticker():
        nonlocal ticks
        while True:
            await trio.lowlevel.checkpoint()
            ticks += 1

    async with trio.open_nursery() as nursery:
        nursery.start_soon(ticker)
        while ticks < 2:  # the ticker is going
            await trio.lowlevel.checkpoint()
        await copy(lambda *_: seen.append(ticks))
        nursery.cancel_scope.cancel()
    return seen


def _other_tasks_ran(seen: list[int], chunks: int) -> None:
    # The scheduler runs its tasks in no fixed order within a pass, so the ticker's run
    # between two chunks may show only at the report after next.
    assert len(seen) == chunks, seen
    stuck = [i for i, (a, b) in enumerate(zip(seen, seen[2:])) if a == b]
    assert not stuck, f"no other task ran around chunks {stuck}: {seen}"


def test_clone_yields_between_chunks(tmp_path):
    src_path = _source(tmp_path)

    async def main():
        src = await Qcow2Image.open(src_path)
        try:
            for fmt in ("raw", "qcow2"):
                seen = await _ticks_between_chunks(lambda progress: copy_mod.clone_image(
                    src, str(tmp_path / f"clone.{fmt}"), SIZE, fmt, 0o600, progress))
                _other_tasks_ran(seen, SIZE // copy_mod.CHUNK)
        finally:
            await src.close()

    trio.run(main)
    assert qemu.to_raw(str(tmp_path / "clone.qcow2"), str(tmp_path / "a.raw")) == \
        qemu.to_raw(src_path, str(tmp_path / "b.raw"))


def test_merge_copies_yield_between_chunks(tmp_path):
    src_path = _source(tmp_path)

    async def main():
        src = await Qcow2Image.open(src_path)
        try:
            for name, run in (("own", volume_mod.copy_own_runs),
                              ("stream", lambda s, d, r, p: volume_mod.stream_runs(s, d, None, p))):
                path = str(tmp_path / f"dst-{name}.qcow2")
                await create_qcow2(path, SIZE)
                dst = await Qcow2Image.open(path, writable=True)
                try:
                    seen = await _ticks_between_chunks(lambda progress: run(src, dst, None,
                                                                            progress))
                    await dst.flush()
                finally:
                    await dst.close()
                chunk = volume_mod.COPY_CHUNK if name == "own" else volume_mod.STREAM_CHUNK
                _other_tasks_ran(seen, SIZE // chunk)
        finally:
            await src.close()

    trio.run(main)
    want = qemu.to_raw(src_path, str(tmp_path / "want.raw"))
    for name in ("own", "stream"):
        assert qemu.to_raw(str(tmp_path / f"dst-{name}.qcow2"),
                           str(tmp_path / f"{name}.raw")) == want
