"""A guest that writes a qcow2 header into a raw volume changes nothing but its own bytes
(CONTRACT.md sections 1 and 5): formats are recorded, never probed from guest data."""

import os
import subprocess


from snapfs.chain.service import VolumeService

MiB = 1 << 20


async def read_all(svc: VolumeService, vid: str) -> bytes:
    async with svc.hold(vid) as vol:
        return await vol.read(0, vol.size)


async def test_qcow2_header_written_by_a_guest_stays_data(tmp_path):
    share = tmp_path / "share"
    share.mkdir()
    # A real qcow2 header (pointing at a backing file outside the share), as a guest might
    # write it into its disk to trick the host.
    evil = tmp_path / "evil.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", "/etc/passwd", "-F", "raw",
                    str(evil), "4M"], check=True)
    header = evil.read_bytes()[:65536]
    svc = VolumeService(str(share))
    async with svc.running():
        await svc.handle({"op": "create-volume", "volume": "g", "size": 4 * MiB})
        async with svc.hold("g") as vol:
            await vol.write(0, header)
            await vol.flush()
        await svc.handle({"op": "create-snapshot", "volume": "g", "snapshot": "s"})
        async with svc.hold("g") as vol:
            await vol.write(MiB, b"later" * 100)
            await vol.flush()
        await svc.handle({"op": "clone", "volume": "c", "source_volume": "g",
                          "source_snapshot": "s"})
        await svc.handle({"op": "revert", "volume": "g", "snapshot": "s"})
        expected = header + bytes(4 * MiB - len(header))
        assert await read_all(svc, "g") == expected
        assert await read_all(svc, "c") == expected
        info = await svc.handle({"op": "info", "volume": "g"})
        assert info["base_format"] == "raw"
    # A fresh service (a remount) still serves raw bytes: the recorded format wins.
    svc = VolumeService(str(share))
    async with svc.running():
        assert await read_all(svc, "g") == expected
        assert await read_all(svc, "c") == expected
        assert (await svc.handle({"op": "info", "volume": "c"}))["base_format"] == "raw"
    # Even with snapfs's records gone, an overlay's backing-format header names the base's
    # format: the guest's bytes are never classified.
    os.unlink(share / ".snapfs" / "volumes" / "g.json")
    svc = VolumeService(str(share))
    async with svc.running():
        assert await read_all(svc, "g") == expected
        assert (await svc.handle({"op": "info", "volume": "g"}))["base_format"] == "raw"
