"""Several daemons on one share, driven through the engine in one process: each
``VolumeService`` has its own host id, leases and inbox, as separate daemons would (OFD locks
of different open files conflict also within one process).  The interleavings that matter are
forced by slowing one step down; every outcome is read back from the share."""

from __future__ import annotations

import contextlib
import os
import time

import trio

from snapfs.chain.service import VolumeService

MiB = 1 << 20
BLOCK = 4096


@contextlib.asynccontextmanager
async def two_daemons(tmp_path):
    """Daemons of hosts a and b serving one share, each looking for changes 5 times a second."""
    a = VolumeService(str(tmp_path), host_id="a")
    b = VolumeService(str(tmp_path), host_id="b")
    async with a.running(refresh=0.2), b.running(refresh=0.2):
        yield a, b


async def eventually(check, timeout: float = 10.0):
    with trio.fail_after(timeout):
        while not await check():
            await trio.sleep(0.05)


def test_a_daemons_own_change_does_not_hide_another_daemons(tmp_path):
    """B snapshots and rewrites x; A changes its own volume y before it looks again: A,
    following x, must still notice B's change."""
    async def main():
        async with two_daemons(tmp_path) as (a, b):
            await a.create_volume("y", MiB)
            await b.create_volume("x", MiB)
            async with b.hold("x") as vb:
                await vb.write(0, b"1" * BLOCK)
                await vb.flush()
                async with a.hold("x") as va:
                    assert not va.writable and await va.read(0, 4) == b"1111"
                    await trio.sleep(0.5)
                    await b.create_snapshot("x", "s1")
                    await vb.write(0, b"2" * BLOCK)
                    await vb.flush()
                    await a.set_attrs("y", {"mode": 0o600})

                    async def seen():
                        return list(va.snap_files) == ["s1"] and await va.read(0, 4) == b"2222"
                    await eventually(seen)
    trio.run(main)


def test_taking_over_a_followed_volume_finishes_the_dead_owners_revert(tmp_path):
    async def main():
        b = VolumeService(str(tmp_path), host_id="b")
        async with b.running(refresh=0.2):
            a = VolumeService(str(tmp_path), host_id="a")
            async with a.running(refresh=0.2):
                await a.create_volume("v", MiB, "qcow2")
                async with a.hold("v") as va:
                    await va.write(0, b"1" * BLOCK)
                    await a.create_snapshot("v", "s1")
                    await va.write(0, b"2" * BLOCK)
                    await va.flush()
                assert (await b.volume_status("v"))["state"] == "ok"
                assert not b.volumes["v"].writable  # B follows v
                # A dies in the middle of a revert: its intent is on the share
                a.share.write_intent("v", {"op": "revert", "snapshot": "s1"})
            await b.extend_volume("v", 2 * MiB)  # B takes v over and finishes the revert
            async with b.hold("v") as vol:
                assert vol.writable and vol.size == 2 * MiB
                assert await vol.read(0, BLOCK) == b"1" * BLOCK
            assert b.share.read_intent("v") is None and "v" not in b.failed
    trio.run(main)


def test_a_handover_pauses_a_merge_instead_of_waiting_for_it(tmp_path):
    """A merge that would take a minute: the handover pauses it (the merge is left to the next
    owner, which finishes it), it does not wait for it."""
    async def main():
        async with two_daemons(tmp_path) as (a, b):
            await a.create_volume("v", MiB, "qcow2")
            async with a.hold("v") as va:
                await va.write(0, b"1" * BLOCK)
                await a.create_snapshot("v", "s1")
                await va.write(BLOCK, b"2" * BLOCK)
                await va.flush()
            merge, forget = a._merge, a._forget_snapshot

            async def slow_merge(*args):
                await trio.sleep(60)
                return await merge(*args)

            def slow_forget(*args):
                time.sleep(0.3)  # the handover arrives while delete-snapshot records
                return forget(*args)
            a._merge, a._forget_snapshot = slow_merge, slow_forget
            async with trio.open_nursery() as n:
                n.start_soon(a.delete_snapshot, "v", "s1")
                await trio.sleep(0.1)
                with trio.fail_after(10):
                    await a.hand_over("v", "b")
            assert not a.leases.owns("v") and "v" not in a.jobs
            assert a.share.read_intent("v")["op"] == "merge"
            await b.writable("v")  # B owns v now and goes on with the merge
            await b.wait_idle()
            assert b.share.read_intent("v") is None
            async with b.hold("v") as vb:
                assert vb.writable and vb.names() == ["volume-v"]
                assert await vb.read(0, 2 * BLOCK) == b"1" * BLOCK + b"2" * BLOCK
    trio.run(main)


def test_a_handover_at_a_merges_switch_keeps_what_a_flush_acknowledged(tmp_path):
    """The active overlay is merged down; right after the switch the guest writes Z and
    flushes while a handover arrives.  The merge completes before the volume changes hands:
    the next owner reads Z, never the merged overlay's older data."""
    async def main():
        async with two_daemons(tmp_path) as (a, b):
            await a.create_volume("v", MiB, "qcow2")
            async with a.hold("v") as vol:
                await vol.write(0, b"X" * 65536)
                await a.create_snapshot("v", "s1")
                await vol.write(0, b"Y" * 65536)
                await vol.flush()
                read_info = a.share.read_info
                slow = {"once": False}

                def slow_read_info(vid):
                    if slow["once"]:
                        slow["once"] = False
                        time.sleep(1.0)  # recording the switch takes a while
                    return read_info(vid)
                a.share.read_info = slow_read_info
                await a.delete_snapshot("v", "s1")
                slow["once"] = True
                with trio.fail_after(10):
                    while vol.names() != ["volume-v"]:
                        await trio.sleep(0.001)
                await vol.write(0, b"Z" * 65536)
                flushed = []
                async with trio.open_nursery() as n:
                    async def guest_flush():
                        await vol.flush()
                        flushed.append(True)
                    n.start_soon(guest_flush)
                    await trio.sleep(0.05)
                    await a.hand_over("v", "b")
                assert flushed
            await a.release("v")
            await b.writable("v")
            await b.wait_idle()
            async with b.hold("v") as vb:
                assert await vb.read(0, 65536) == b"Z" * 65536
            assert b.share.read_info("v") == {"active": "volume-v"}
            assert not os.path.exists(tmp_path / "volume-v.s1")
            assert b.share.read_intent("v") is None
    trio.run(main)
