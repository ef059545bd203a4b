"""``mount.snapfs SHARE MOUNTPOINT [-o OPTS]``: start the snapfs daemon (CONTRACT.md section 2).

Follows mount(8)'s helper conventions so an ``/etc/fstab`` line works: ``-s -n -v -N NS`` are
accepted and ignored, ``-f`` is a fake mount, generic options are ignored.  Without
``--foreground`` the daemon detaches and this command returns once the mount is ready.
"""

from __future__ import annotations

import argparse
import faulthandler
import grp
import logging
import logging.handlers
import os
import resource
import signal
import sys
import time
from dataclasses import dataclass

from snapfs.chain.catalog import ID_RE

log = logging.getLogger("snapfs.mount")

GENERIC = {"defaults", "rw", "_netdev", "nofail", "auto", "noauto", "user", "nouser", "users",
           "exec", "noexec", "suid", "nosuid", "dev", "nodev", "async", "sync", "atime",
           "noatime", "relatime", "diratime", "nodiratime"}
LEASE_WAIT = 30.0
SWITCH_INTERVAL = 0.0001  # seconds


@dataclass
class MountConfig:
    share: str
    mountpoint: str
    qcow2_volumes: bool = False
    allow_other: bool = False
    read_only: bool = False
    debug: bool = False
    log_path: str | None = None
    uid: int = 0
    gid: int = 0
    mode: int = 0o660
    ctl_gid: int = 0
    unrecorded_format: str | None = None
    foreground: bool = False
    fake: bool = False
    io_timeout: float = 60.0
    space_warn: float = 10.0
    host_id: str | None = None  # this daemon's name on the share (default: the host name)
    refresh: float = 1.0  # seconds between looks for what other daemons changed
    owner_timeout: float = 10.0  # seconds a request waits for another host's daemon to take it
    busy_poll: float = 50.0  # microseconds the request loop spins for the next request


class UsageError(Exception):
    pass


def _group(value: str) -> int:
    if value.isdigit():
        return int(value)
    try:
        return grp.getgrnam(value).gr_gid
    except KeyError:
        raise UsageError(f"unknown group {value!r}") from None


class _Parser(argparse.ArgumentParser):
    """Argument errors as one line (mount(8) helpers report one line)."""

    def error(self, message):
        raise UsageError(message)


def parse_args(argv: list[str]) -> MountConfig:
    p = _Parser(prog="mount.snapfs", add_help=True)
    p.add_argument("share")
    p.add_argument("mountpoint")
    p.add_argument("-o", dest="options", action="append", default=[])
    p.add_argument("--foreground", action="store_true")
    p.add_argument("-f", dest="fake", action="store_true")
    p.add_argument("-s", "-n", "-v", dest="ignored", action="store_true")
    p.add_argument("-N", dest="namespace")
    a = p.parse_args(argv)
    cfg = MountConfig(os.path.abspath(a.share), os.path.abspath(a.mountpoint),
                      foreground=a.foreground, fake=a.fake)
    for opt in ",".join(a.options).split(","):
        if not opt or opt in GENERIC or opt.startswith("x-") or opt.startswith("comment="):
            continue
        key, _, value = opt.partition("=")
        try:
            if key == "qcow2_volumes":
                cfg.qcow2_volumes = True
            elif key == "allow_other":
                cfg.allow_other = True
            elif key == "ro":
                cfg.read_only = True
            elif key == "debug":
                cfg.debug = True
            elif key == "log" and value:
                cfg.log_path = value
            elif key == "uid":
                cfg.uid = int(value)
            elif key == "gid":
                cfg.gid = _group(value)
            elif key == "mode":
                cfg.mode = int(value, 8) & 0o7777
            elif key == "ctl_gid":
                cfg.ctl_gid = _group(value)
            elif key == "unrecorded_format" and value in ("raw", "qcow2"):
                cfg.unrecorded_format = value
            elif key == "io_timeout" and float(value) > 0:
                cfg.io_timeout = float(value)
            elif key == "space_warn" and 0 <= float(value) <= 100:
                cfg.space_warn = float(value)
            elif key == "host_id" and ID_RE.fullmatch(value):
                cfg.host_id = value
            elif key == "refresh" and 0.05 <= float(value) <= 60:
                cfg.refresh = float(value)
            elif key == "owner_timeout" and float(value) > 0:
                cfg.owner_timeout = float(value)
            elif key == "busy_poll" and 0 <= float(value) <= 1000:
                cfg.busy_poll = float(value)
            else:
                raise UsageError(f"unknown option {opt!r}")
        except ValueError:
            raise UsageError(f"bad value in option {opt!r}") from None
    if not os.path.isdir(cfg.share):
        raise UsageError(f"share {cfg.share} is not a directory")
    if not os.path.isdir(cfg.mountpoint):
        raise UsageError(f"mount point {cfg.mountpoint} is not a directory")
    return cfg


def setup_logging(cfg: MountConfig) -> None:
    root = logging.getLogger()
    root.setLevel(logging.DEBUG if cfg.debug else logging.INFO)
    fmt = logging.Formatter("%(asctime)s snapfs[%(process)d] %(levelname)s %(name)s: %(message)s")
    if cfg.log_path:
        handler: logging.Handler = logging.FileHandler(cfg.log_path)
    elif cfg.foreground:
        handler = logging.StreamHandler(sys.stderr)
    elif os.path.exists("/dev/log"):
        handler = logging.handlers.SysLogHandler("/dev/log")
        fmt = logging.Formatter("snapfs[%(process)d]: %(levelname)s %(name)s: %(message)s")
    else:
        handler = logging.NullHandler()
    handler.setFormatter(fmt)
    root.handlers[:] = [handler]
    # Tracebacks of every thread on a crash, and on SIGUSR1 (a daemon that seems stuck).
    trace = open(cfg.log_path, "a") if cfg.log_path else sys.stderr  # noqa: SIM115 (lives on)
    if cfg.log_path or cfg.foreground:
        faulthandler.enable(trace)
        faulthandler.register(signal.SIGUSR1, all_threads=True, file=trace)


# -- the host lease -----------------------------------------------------------------------

def acquire_lease(cfg: MountConfig):
    """One daemon per host id on a share (daemons of other hosts share it; see leases).

    A holder whose mount is already gone is shutting down: wait for it, bounded."""
    from snapfs.chain.leases import Leases, default_host_id, lock_problem
    problem = lock_problem(cfg.share)
    if problem:
        raise UsageError(f"{problem}; remount it without (snapfs leases need server locks)")
    meta = os.path.join(cfg.share, ".snapfs")
    os.makedirs(meta, mode=0o700, exist_ok=True)
    leases = Leases(meta, cfg.host_id or default_host_id(), cfg.mountpoint)
    deadline = time.monotonic() + LEASE_WAIT
    while not leases.hold_host():
        holder = leases.host_record()
        mounted = holder and os.path.ismount(holder.get("mountpoint") or "") and \
            holder.get("host") == leases.host
        if mounted or time.monotonic() > deadline:
            where = f" at {holder.get('mountpoint')} (pid {holder.get('pid')})" if holder else ""
            leases.close()
            raise UsageError(f"share {cfg.share} is already served by another snapfs daemon "
                             f"with host id {leases.host}{where}")
        time.sleep(0.1)
    return leases


# -- running ------------------------------------------------------------------------------

def serve(cfg: MountConfig, ready) -> int:
    """Mount and serve until unmounted; ``ready(msg)`` is called once, with None on success."""
    import pyfuse3
    import trio

    from snapfs.chain.service import VolumeService
    from snapfs.fs.operations import Operations, Options
    from snapfs.io import set_timeout

    # A worker thread whose share call returned waits for the GIL while the loop computes;
    # Python's default 5 ms switch interval made every threaded call cost milliseconds.
    sys.setswitchinterval(SWITCH_INTERVAL)
    # Every open image and every volume lease is a descriptor: allow as many as the host does.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))

    try:
        leases = acquire_lease(cfg)
        set_timeout(cfg.io_timeout)
        svc = VolumeService(cfg.share, default_format="qcow2" if cfg.qcow2_volumes else "raw",
                            file_mode=0o660, unrecorded_format=cfg.unrecorded_format,
                            space_warn=cfg.space_warn, leases=leases,
                            owner_timeout=cfg.owner_timeout)
        ops = Operations(svc, Options(uid=cfg.uid, gid=cfg.gid, mode=cfg.mode,
                                      ctl_gid=cfg.ctl_gid, read_only=cfg.read_only,
                                      mountpoint=cfg.mountpoint))
        opts = set(pyfuse3.default_options)
        opts |= {f"fsname={cfg.share}", "subtype=snapfs"}
        if cfg.allow_other:
            opts.add("allow_other")
        if cfg.read_only:
            opts.add("ro")
        pyfuse3.init(ops, cfg.mountpoint, opts)
    except (UsageError, OSError, RuntimeError) as exc:
        ready(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        return 1
    except Exception as exc:  # noqa: BLE001 -- one line to the caller, details to the log
        log.exception("mount failed")
        ready(f"{type(exc).__name__}: {exc}")
        return 1
    log.info("serving %s at %s", cfg.share, cfg.mountpoint)
    clean = False
    try:
        trio.run(_main, svc, ops, ready, cfg)
        clean = True
    except BaseException:
        log.exception("daemon stopped on an error")
        raise
    finally:
        pyfuse3.close(unmount=clean)
        leases.close()
        log.info("unmounted %s", cfg.mountpoint)
    return 0


async def _main(svc, ops, ready, cfg: MountConfig) -> None:
    import pyfuse3
    import trio

    from snapfs.fs import kernel, session

    ops.request_loop = session.install(cfg.busy_poll)
    async with svc.running(refresh=cfg.refresh):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_signals)
            nursery.start_soon(svc.watch_space)
            nursery.start_soon(trio.to_thread.run_sync, kernel.tune, cfg.mountpoint)
            ready(None)
            await pyfuse3.main()
            nursery.cancel_scope.cancel()


async def _signals() -> None:
    import pyfuse3
    import trio

    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            log.info("signal %d: unmounting", signum)
            pyfuse3.terminate()


def main(argv: list[str] | None = None) -> int:
    own_process = argv is None  # the command itself, not a call from another program
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        cfg = parse_args(argv)
    except UsageError as exc:
        print(f"mount.snapfs: {exc}", file=sys.stderr)
        return 1
    if cfg.fake:
        return 0
    if own_process:
        _use_huge_pages(argv)
    if cfg.foreground:
        setup_logging(cfg)

        def ready(msg):
            if msg:
                print(f"mount.snapfs: {msg}", file=sys.stderr)
        return serve(cfg, ready)
    return _daemonize(cfg)


#: glibc's tunable for transparent huge pages on the malloc heap (glibc 2.35+, ignored before)
HUGE_PAGES = "glibc.malloc.hugetlb"


def _use_huge_pages(argv: list[str]) -> None:
    """Start again, once, with the heap on transparent huge pages: every 1 MiB request is
    copied into libfuse's buffer, into a ``bytes`` and out again, with fewer TLB misses on
    huge pages (same-day A/B: 1 MiB writes +4-17 %, 1 MiB reads +10 %, 4 KiB requests and the
    RSS of 100 volumes unchanged).  glibc reads its tunables only when a process starts.  A
    setting of the user's own for it is kept; other C libraries are left alone."""
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    try:
        libc = os.confstr("CS_GNU_LIBC_VERSION") or ""  # the C library this process runs on
    except (ValueError, OSError):
        libc = ""
    if HUGE_PAGES + "=" in tunables or not libc.startswith("glibc"):
        return
    env = dict(os.environ, GLIBC_TUNABLES=":".join(filter(None, (tunables,
                                                                 HUGE_PAGES + "=1"))))
    os.execve(sys.executable, [sys.executable, "-m", "snapfs.mount", *argv], env)


def _daemonize(cfg: MountConfig) -> int:
    r, w = os.pipe()
    pid = os.fork()
    if pid:
        os.close(w)
        with os.fdopen(r) as pipe:
            msg = pipe.readline().strip()
        if msg == "ok":
            return 0
        print(f"mount.snapfs: {msg or 'the daemon exited before the mount was ready'}",
              file=sys.stderr)
        os.waitpid(pid, 0)
        return 1
    os.close(r)
    os.setsid()
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    setup_logging(cfg)
    told = False

    def ready(msg):
        nonlocal told
        if not told:
            told = True
            os.write(w, (msg or "ok").encode() + b"\n")
            os.close(w)
    code = 1
    try:
        code = serve(cfg, ready)
    finally:
        ready("the daemon stopped before the mount was ready")
        os._exit(code)


if __name__ == "__main__":
    sys.exit(main())
