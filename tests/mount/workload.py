"""Helpers for the real-mount tests that run I/O against the daemon while control operations,
crashes and remounts happen: a writer thread with a global event clock, and the checks that
compare what the mount (or the share) holds with what the writer was told.

The clock is a global counter (``tick()``), not wall time: every event (a write starting, a
``pwrite`` returning, an ``fsync`` returning, a control request being sent or its reply arriving)
takes the next number, so "acknowledged before the request was sent" is a plain comparison.
"""

from __future__ import annotations

import errno
import itertools
import json
import os
import struct
import subprocess
import threading
import time
from dataclasses import dataclass

from snapfs.ctl import Client
from tests import qemu

BLOCK = 4096
MiB = 1 << 20
QCOW2_MAGIC = b"QFI\xfb"

_clock = itertools.count(1)


def tick() -> int:
    """The next event number (atomic under the GIL)."""
    return next(_clock)


def block_data(i: int, gen: int = 1) -> bytes:
    """The content of numbered block ``i``: its number (and a generation) in every 16 bytes."""
    return struct.pack("<QQ", gen, i + 1) * (BLOCK // 16)


def scattered(start: int, nslots: int, stride: int = 4099):
    """Slot numbers spread over the volume (stride coprime to the slot count): slot(i)."""
    return lambda i: ((start + i) * stride) % nslots


@dataclass
class Rec:
    i: int
    slot: int
    data: bytes
    start: int
    written: int | None = None   # pwrite returned
    acked: int | None = None     # fsync returned
    error: int | None = None     # errno of a failed attempt
    failed: int | None = None


class Writer(threading.Thread):
    """Writes numbered 4 KiB blocks, each at its own slot, ``pwrite`` then ``fsync``, recording
    the event numbers of each step.  A write refused with ENOSPC is retried (``retry_enospc``)
    after a short pause; any other error stops the writer (kept in ``errors``)."""

    def __init__(self, path: str, slot, count: int, *, gen: int = 1, fsync: bool = True,
                 retry_enospc: bool = False, pace: float = 0.0):
        super().__init__(daemon=True)
        self.path, self.slot, self.count, self.gen = path, slot, count, gen
        self.fsync, self.retry_enospc, self.pace = fsync, retry_enospc, pace
        self.recs: list[Rec] = []       # successful writes, in order
        self.attempts: list[Rec] = []   # every attempt, failed ones included
        self.errors: list[Rec] = []
        self.stop_event = threading.Event()
        self._progress = threading.Condition()
        self.acks = 0

    def stop(self) -> None:
        self.stop_event.set()
        self.join(60)
        assert not self.is_alive(), "writer thread hung"

    def wait_acks(self, n: int, timeout: float = 60) -> None:
        """Wait until ``n`` blocks in all were acknowledged (the writer's own progress)."""
        deadline = time.monotonic() + timeout
        with self._progress:
            while self.acks < n:
                if not self.is_alive() or self.errors and not self.retry_enospc:
                    raise AssertionError(f"writer stopped after {self.acks} blocks: "
                                         f"{[errno.errorcode.get(e.error) for e in self.errors]}")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"writer made no progress ({self.acks}/{n} blocks)")
                self._progress.wait(min(left, 0.2))

    def run(self) -> None:
        try:
            fd = os.open(self.path, os.O_RDWR)
        except OSError as exc:
            self.errors.append(Rec(-1, -1, b"", tick(), error=exc.errno, failed=tick()))
            return
        try:
            i = 0
            while i < self.count and not self.stop_event.is_set():
                slot = self.slot(i)
                rec = Rec(i, slot, block_data(i, self.gen), tick())
                self.attempts.append(rec)
                try:
                    n = os.pwrite(fd, rec.data, slot * BLOCK)
                    assert n == BLOCK, f"short write {n}"
                    rec.written = tick()
                    if self.fsync:
                        os.fsync(fd)
                        rec.acked = tick()
                except OSError as exc:
                    rec.error, rec.failed = exc.errno, tick()
                    self.errors.append(rec)
                    if rec.written is not None:
                        self.recs.append(rec)  # written, but its fsync failed
                    if exc.errno == errno.ENOSPC and self.retry_enospc:
                        time.sleep(0.002)
                        continue
                    return
                self.recs.append(rec)
                with self._progress:
                    self.acks += 1
                    self._progress.notify_all()
                i += 1
                if self.pace:
                    time.sleep(self.pace)
        finally:
            try:
                os.close(fd)
            except OSError:
                pass


def slot_of(content: bytes, slot: int) -> bytes:
    return content[slot * BLOCK:(slot + 1) * BLOCK]


def point_in_time(content: bytes, recs: list[Rec], sent: int, replied: int,
                  prior: bytes | None = None, what: str = "image", acked_only: bool = False
                  ) -> int:
    """Check that ``content`` holds a consistent point of a sequential writer's history that
    lies between ``sent`` and ``replied``: every write that returned (``acked_only``: whose
    fsync returned) before ``sent`` is there, none started after ``replied`` is, and the writes
    present are a prefix of the writer's sequence (one write at a time: a point in time cuts
    the sequence once).  Slots the writer did not write hold ``prior`` (default zeros) there.
    Returns how many writes are present."""
    present = []
    for r in recs:
        have = slot_of(content, r.slot)
        before = slot_of(prior, r.slot) if prior is not None else bytes(BLOCK)
        if have == r.data:
            present.append(True)
        elif have == before:
            present.append(False)
        else:
            raise AssertionError(f"{what}: block {r.i} (slot {r.slot}) holds neither its data "
                                 f"nor what was there before: {have[:16].hex()}")
    k = present.index(False) if False in present else len(present)
    assert not any(present[k:]), (
        f"{what}: not a point in time: block {k} missing but later blocks "
        f"{[recs[j].i for j in range(k, len(recs)) if present[j]][:5]} present")
    for r, p in zip(recs, present):
        done = r.acked if acked_only else r.written
        if done is not None and done < sent:
            assert p, f"{what}: block {r.i} returned (event {done}) before the request " \
                      f"(event {sent}) but is missing"
        if r.start > replied:
            assert not p, f"{what}: block {r.i} started (event {r.start}) after the reply " \
                          f"(event {replied}) but is present"
    return k


def expected_volume(size: int, recs: list[Rec], base: bytes | None = None) -> bytearray:
    out = bytearray(base[:size]) if base is not None else bytearray(size)
    if len(out) < size:
        out += bytes(size - len(out))
    for r in recs:
        out[r.slot * BLOCK:(r.slot + 1) * BLOCK] = r.data
    return out


def read_file(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def first_difference(a: bytes, b: bytes) -> str:
    if len(a) != len(b):
        return f"sizes differ: {len(a)} != {len(b)}"
    for off in range(0, len(a), BLOCK):
        if a[off:off + BLOCK] != b[off:off + BLOCK]:
            return f"first difference in the 4 KiB block at {off:#x} (slot {off // BLOCK}): " \
                   f"{a[off:off + 16].hex()} vs {b[off:off + 16].hex()}"
    return "identical"


def assert_same(actual: bytes, expected: bytes, what: str) -> None:
    if actual != expected:
        raise AssertionError(f"{what}: {first_difference(actual, expected)}")


# -- the share ----------------------------------------------------------------------------

def active_file(share: str, vid: str, base_format: str) -> tuple[str, str]:
    """The file the guest writes to, from the share's ``.info`` (or the base), and its format."""
    p = os.path.join(share, f"volume-{vid}.info")
    if os.path.exists(p):
        with open(p) as f:
            active = json.load(f)["active"]
        if active != f"volume-{vid}":
            return os.path.join(share, active), "qcow2"
    return os.path.join(share, f"volume-{vid}"), base_format


def compare_with_share(mnt_file: str, share: str, vid: str, base_format: str) -> None:
    """``qemu-img compare`` of the mount's raw view with the active chain on the share."""
    path, fmt = active_file(share, vid, base_format)
    r = qemu.img("compare", "-U", "-f", "raw", mnt_file, "-F", fmt, path, check=False)
    assert r.returncode == 0, f"qemu-img compare {mnt_file} {path}: rc {r.returncode} " \
                              f"{r.stdout.strip()} {r.stderr.strip()}"


def backing_of(share: str, name: str) -> tuple[str, str]:
    info = qemu.info(os.path.join(share, name))
    backing = info.get("backing-filename")
    assert backing, f"{name} has no backing file"
    assert "/" not in backing, f"{name} backs onto {backing!r}, not a bare file name"
    return os.path.join(share, backing), info.get("backing-filename-format") or "raw"


def qcow2_files(share: str) -> list[str]:
    out = []
    for n in sorted(os.listdir(share)):
        p = os.path.join(share, n)
        if os.path.isfile(p):
            with open(p, "rb") as f:
                if f.read(4) == QCOW2_MAGIC:
                    out.append(p)
    return out


def check_share(share: str) -> None:
    """``qemu-img check`` exits 0 on every qcow2 file on the share."""
    bad = []
    for p in qcow2_files(share):
        rc, data = qemu.check(p)
        if rc != 0:
            bad.append(f"{os.path.basename(p)}: rc {rc} {json.dumps(data)[:400]}")
    assert not bad, "qemu-img check failed:\n" + "\n".join(bad)


# -- the mount ----------------------------------------------------------------------------

def status(mnt: str) -> dict:
    with open(os.path.join(mnt, ".snapfs", "status")) as f:
        return json.load(f)


def wait_jobs(mnt: str, timeout: float = 60) -> None:
    """Wait until no background job (merge) runs."""
    deadline = time.monotonic() + timeout
    while status(mnt)["jobs"]:
        assert time.monotonic() < deadline, f"jobs still running: {status(mnt)['jobs']}"
        time.sleep(0.02)


def timed_request(c: Client, op: str, **args) -> tuple[int, int, dict]:
    """A control request with the events of its sending and its reply."""
    sent = tick()
    result = c.request(op, **args)
    return sent, tick(), result


def is_mounted(mnt: str) -> bool:
    """True also for a dead FUSE mount (whose stat fails, so os.path.ismount says False)."""
    mnt = os.path.realpath(mnt)
    with open("/proc/self/mountinfo") as f:
        for line in f:
            if line.split()[4].replace("\\040", " ") == mnt:
                return True
    return False


def lazy_unmount(mnt: str) -> None:
    while is_mounted(mnt):
        r = subprocess.run(["fusermount3", "-u", "-z", mnt], capture_output=True)
        if r.returncode != 0:
            subprocess.run(["umount", "-l", mnt], capture_output=True)
            if is_mounted(mnt):
                raise RuntimeError(f"cannot unmount {mnt}: {r.stderr.decode().strip()}")
