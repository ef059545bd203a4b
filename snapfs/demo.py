"""The engine demo behind `make demo`: build a small volume chain the way snapshots do,
then show what each layer holds and what qemu-img makes of it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile

import trio

from snapfs.chain.chain import open_chain
from snapfs.chain.check import check_image
from snapfs.chain.extent import KIND_NAMES
from snapfs.chain.image import create_qcow2, create_raw

MiB = 1 << 20


def say(msg: str = "") -> None:
    print(msg, flush=True)


async def describe(path: str) -> None:
    img = await open_chain(path, "qcow2")
    try:
        layer = img
        while layer is not None:
            runs = await layer.map(0, layer.size) if layer.format == "qcow2" else []
            held = [r for r in runs if r.kind != 2]
            summary = ", ".join(f"{KIND_NAMES[r.kind]} {r.offset // MiB}-{(r.offset + r.length) / MiB:g} MiB"
                                for r in held[:6]) or ("all of it" if layer.format == "raw" else "nothing")
            say(f"  {os.path.basename(layer.path):<28} {layer.format:<5} holds: {summary}")
            layer = layer.backing
    finally:
        await img.close()


async def main(share: str) -> None:
    vol = "volume-demo"
    base = os.path.join(share, vol)
    say(f"share: {share}")
    say("1. a 16 MiB volume (raw, sparse), 8 MiB of 'A' written")
    await create_raw(base, 16 * MiB)
    with open(base, "r+b") as f:
        f.write(b"A" * 8 * MiB)
    say("2. snapshot snap1: the base freezes, a qcow2 overlay takes the writes")
    top1 = f"{base}.snap1"
    await create_qcow2(top1, 16 * MiB, backing_file=vol, backing_format="raw")
    img = await open_chain(top1, "qcow2", writable=True)
    await img.write(4 * MiB, b"B" * 2 * MiB)
    await img.write_zeroes(12 * MiB, MiB)
    await img.close()
    say("3. snapshot snap2, then more writes; the chain is three files deep")
    top2 = f"{base}.snap2"
    await create_qcow2(top2, 16 * MiB, backing_file=f"{vol}.snap1", backing_format="qcow2")
    img = await open_chain(top2, "qcow2", writable=True)
    await img.write(5 * MiB + 12345, b"C" * 100000)
    await img.close()
    say("4. what each layer holds:")
    await describe(top2)
    say("5. qemu-img agrees:")
    for p in (top1, top2):
        res = await check_image(p)
        say(f"  snapfs check {os.path.basename(p)}: exit {res.exit_code}")
        out = subprocess.run(["qemu-img", "check", p], capture_output=True, text=True)
        verdict = next((ln for ln in out.stdout.splitlines() if "found" in ln), out.stdout.strip())
        say(f"  qemu-img check {os.path.basename(p)}: {verdict}")
    ours, theirs = os.path.join(share, "ours.raw"), os.path.join(share, "theirs.raw")
    from snapfs.cli import convert
    await convert(top2, ours, "qcow2", False)
    subprocess.run(["qemu-img", "convert", "-O", "raw", top2, theirs], check=True)
    same = open(ours, "rb").read() == open(theirs, "rb").read()
    say(f"  snapfs convert == qemu-img convert of the whole chain: {same}")
    subprocess.run(["ls", "-ls", share])
    if not same:
        raise SystemExit(1)


def run() -> None:
    share = tempfile.mkdtemp(prefix="snapfs-demo-")
    try:
        trio.run(main, share)
    finally:
        shutil.rmtree(share, ignore_errors=True)


if __name__ == "__main__":
    run()
    sys.exit(0)
