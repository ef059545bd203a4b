"""A guest flush covers every write acknowledged before it, also around chain switches.

- A raw image's flush syncs from a "dirty" flag.  A write that lands after the sync returned
  in its worker thread but before the flush went on is not covered by that sync: the next
  flush must sync again (the flag used to be cleared after the sync, which lost it).
- A flush that waited for the volume's gate while a switch (snapshot or merge) held it must
  then wait until the switch is durable, like a flush that came after it: it used to look at
  the switch only before taking the gate.
"""

from __future__ import annotations

from pathlib import Path

import trio
import trio.testing

from snapfs.chain.image import open_image
from snapfs.chain.service import VolumeService

MIB = 1 << 20


def test_a_write_after_the_sync_keeps_a_raw_image_dirty(tmp_path: Path) -> None:
    path = tmp_path / "volume-r"
    path.write_bytes(bytes(MIB))

    async def main():
        img = await open_image(str(path), "raw", writable=True)
        syncs = []
        real = img.f.fdatasync

        async def sync_then_write():
            await real()
            syncs.append(1)
            if len(syncs) == 1:
                # lands after the sync, before the flush that ran it returns
                await img.write(8192, b"w" * 4096)

        img.f.fdatasync = sync_then_write
        try:
            await img.write(0, b"a" * 4096)
            await img.flush()
            assert len(syncs) == 1
            await img.flush()  # must sync the write made after the first sync
            assert len(syncs) == 2
            await img.flush()  # nothing written since
            assert len(syncs) == 2
        finally:
            img.f.fdatasync = real
            await img.close()

    trio.run(main)
    data = path.read_bytes()
    assert data[:4096] == b"a" * 4096 and data[8192:12288] == b"w" * 4096


def test_a_flush_queued_behind_a_switch_waits_until_it_is_durable(tmp_path: Path) -> None:
    root = tmp_path / "share"
    root.mkdir()

    async def main():
        svc = VolumeService(str(root))
        async with svc.running():
            await svc.handle({"op": "create-volume", "volume": "v", "size": MIB})
            async with svc.hold("v") as vol:
                # nothing written: the flush itself does not wait, so nothing else can
                # hold it back while the test looks
                done = trio.Event()

                async def guest_flush():
                    await vol.flush()
                    done.set()

                async with trio.open_nursery() as nursery:
                    async with vol.gate.exclusive():  # a switch, as push_overlay makes it
                        nursery.start_soon(guest_flush)
                        await trio.testing.wait_all_tasks_blocked()
                        settling = vol.settling = trio.Event()
                    # the gate is open again; the switch is still being made durable
                    await trio.testing.wait_all_tasks_blocked()
                    assert not done.is_set(), "the flush returned before the switch was durable"
                    vol.settling = None
                    settling.set()
                    with trio.fail_after(10):
                        await done.wait()

    trio.run(main)
