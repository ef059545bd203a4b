"""The ``snapfs`` command line (CONTRACT.md section 4): tools that need no mount."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time

import trio

from snapfs.chain.chain import open_chain
from snapfs.chain.check import check_image
from snapfs.chain.extent import zeros
from snapfs.chain.image import probe_format
from snapfs.errors import SnapfsError, from_oserror
from snapfs.io import run_blocking

CHUNK = 8 << 20


class Progress:
    """A one-line progress meter on stderr, shown only when asked for."""

    def __init__(self, enabled: bool, total: int):
        self.enabled = enabled
        self.total = max(total, 1)
        self.last = 0.0

    def update(self, done: int, force: bool = False) -> None:
        now = time.monotonic()
        if self.enabled and (force or now - self.last > 0.2):
            self.last = now
            sys.stderr.write(f"\r    ({100.0 * done / self.total:6.2f}/100%)")
            sys.stderr.flush()

    def finish(self) -> None:
        if self.enabled:
            self.update(self.total, force=True)
            sys.stderr.write("\n")


async def convert(src: str, dst: str, fmt: str | None, progress: bool) -> None:
    """Write the guest content of ``src`` (through its chain) to ``dst`` as sparse raw."""
    img = await open_chain(src, fmt)
    try:
        try:
            fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise from_oserror(exc, f"cannot create {dst}") from None
        try:
            meter = Progress(progress, img.size)
            pos = 0
            while pos < img.size:
                n = min(CHUNK, img.size - pos)
                data = await img.read(pos, n)
                if data != zeros(n):
                    os.pwrite(fd, data, pos)
                pos += n
                meter.update(pos)
            os.ftruncate(fd, img.size)
            os.fsync(fd)
            meter.finish()
        except OSError as exc:
            raise from_oserror(exc, f"writing {dst}") from None
        finally:
            os.close(fd)
    finally:
        await img.close()


async def check(paths: list[str], fmt: str | None, repair: bool) -> int:
    worst = 0
    rank = {0: 0, 3: 1, 2: 2, 1: 3}
    for path in paths:
        try:
            f = fmt or await probe_format(path)
            res = await check_image(path, f, repair="leaks" if repair else None)
        except SnapfsError as exc:
            print(f"snapfs check: {path}: {exc.message}", file=sys.stderr)
            code = 1
        else:
            for m in res.messages:
                print(m)
            if res.leaks_fixed:
                print(f"{res.leaks_fixed} leaked clusters were repaired.")
            if res.corruptions:
                print(f"{path}: {res.corruptions} errors were found on the image.")
            elif res.leaks:
                print(f"{path}: {res.leaks} leaked clusters were found on the image.")
            else:
                print(f"{path}: no errors were found on the image.")
            code = res.exit_code
        if rank[code] > rank[worst]:
            worst = code
    return worst


def ctl(mountpoint: str, op: str, pairs: list[str]) -> int:
    """One control request from the shell, on a private request file."""
    from snapfs.ctl import Client, ControlError, parse_value
    args = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            print(f"snapfs ctl: argument {pair!r} is not key=value", file=sys.stderr)
            return 1
        args[key] = parse_value(value)
    try:
        with Client(mountpoint) as client:
            result = client.request(op, **args)
    except ControlError as exc:
        print(json.dumps(exc.reply or {"ok": False, "message": exc.message}))
        print(f"snapfs ctl: {op}: {exc.message}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"snapfs ctl: {mountpoint}: {exc.strerror}", file=sys.stderr)
        return 1
    print(json.dumps({"ok": True, "op": op, "result": result}, indent=1))
    return 0


async def share_info(share: str, volume: str | None) -> int:
    """Volumes, chains, snapshots and space, read offline from the share, with the daemons
    serving it and which of them owns each volume (leases are read, never taken)."""
    from snapfs.chain.leases import survey
    from snapfs.chain.service import VolumeService
    svc = VolumeService(share, offline=True)
    leases = await run_blocking(False, "reading leases", survey, svc.share.meta)
    vids = [volume] if volume else (await svc.list())["volumes"]
    out = []
    for vid in vids:
        try:
            info = await svc.info(vid)
            status = await svc.volume_status(vid)
            info["allocated"] = status["allocated"]
        except SnapfsError as exc:
            info = {"volume": vid, "state": "failed", "reason": exc.message}
        lease = leases["owners"].get(vid, {})
        info["owner"], info["owner_since"] = lease.get("owner"), lease.get("since")
        out.append(info)
        await svc.release(vid)
    st = os.statvfs(share)
    print(json.dumps({"share": os.path.abspath(share), "free_bytes": st.f_bavail * st.f_frsize,
                      "total_bytes": st.f_blocks * st.f_frsize,
                      "provisioned_bytes": sum(v.get("size", 0) for v in out),
                      "allocated_bytes": sum(v.get("allocated", 0) for v in out),
                      "daemons": leases["hosts"], "volumes": out}, indent=1))
    return 0


def attach_mounts(args) -> int:
    """Mount every share at its place under the driver's base directory (idempotent)."""
    from snapfs import attach
    shares: dict[str, str | None] = {}
    try:
        if args.shares_config:
            shares.update(attach.read_shares(args.shares_config))
    except (OSError, ValueError) as exc:
        print(f"snapfs attach-mounts: {args.shares_config}: {exc}", file=sys.stderr)
        return 1
    shares.update({s: shares.get(s) for s in args.shares})
    if not shares:
        print("snapfs attach-mounts: no share given", file=sys.stderr)
        return 1
    options = args.options + (f",host_id={args.host_id}" if args.host_id else "")
    failed = 0
    for share, flags in shares.items():
        try:
            mnt = attach.ensure_mounted(share, args.base, nfs_flags=flags, options=options)
            print(f"{share} {mnt}")
        except (OSError, RuntimeError) as exc:
            print(f"snapfs attach-mounts: {share}: {exc}", file=sys.stderr)
            failed += 1
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="snapfs", description=__doc__)
    parser.add_argument("--debug", action="store_true", help="log what happens")
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("convert", help="write an image's guest content as a sparse raw file")
    p.add_argument("-f", dest="fmt", choices=("raw", "qcow2"))
    p.add_argument("-p", dest="progress", action="store_true", help="show progress")
    p.add_argument("image")
    p.add_argument("output")
    p = sub.add_parser("check", help="check images for corruption and leaked clusters")
    p.add_argument("-f", dest="fmt", choices=("raw", "qcow2"))
    p.add_argument("--repair", action="store_true", help="free leaked clusters")
    p.add_argument("images", nargs="+")
    p = sub.add_parser("ctl", help="send one control request to a snapfs mount")
    p.add_argument("mountpoint")
    p.add_argument("op")
    p.add_argument("args", nargs="*", metavar="key=value")
    p = sub.add_parser("attach-mounts", help="mount shares where the Cinder driver's "
                       "connections point (run on every compute host)")
    p.add_argument("--base", required=True,
                   help="the driver's snapfs_mount_point_base (the same on every host)")
    p.add_argument("--shares-config", help="the driver's shares file")
    p.add_argument("-o", dest="options", default="allow_other",
                   help="mount.snapfs options (default: allow_other)")
    p.add_argument("--host-id", help="this host's name on the shares (default: host name)")
    p.add_argument("shares", nargs="*", help="host:/export or a local path")
    p = sub.add_parser("info", help="volumes, chains and snapshots of a share, read offline")
    p.add_argument("share")
    p.add_argument("volume", nargs="?")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.cmd == "ctl":
            return ctl(args.mountpoint, args.op, args.args)
        if args.cmd == "attach-mounts":
            return attach_mounts(args)
        if args.cmd == "info":
            return trio.run(share_info, args.share, args.volume)
        if args.cmd == "convert":
            trio.run(convert, args.image, args.output, args.fmt, args.progress)
            return 0
        return trio.run(check, args.images, args.fmt, args.repair)
    except SnapfsError as exc:
        print(f"snapfs {args.cmd}: {exc.message}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
