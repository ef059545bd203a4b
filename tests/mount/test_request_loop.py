"""The request loop under a guest that keeps the queue full (snapfs/fs/session.py).

The daemon says it took over pyfuse3's wait (its quick path is then in use); with sixteen
O_DIRECT readers keeping the queue full, control requests, status reads, listings and
unmounting still get their turn, and every read returns the volume's bytes.  That the quick
path is faster is the bench's business, not a test's."""

import mmap
import os
import random
import signal
import threading

from snapfs.ctl import Client
from tests.mount.workload import is_mounted

MiB = 1 << 20
SIZE = 16 * MiB
BLOCK = 4096
READERS = 16


class Hammer:
    """``READERS`` threads reading random 4 KiB blocks with O_DIRECT (every read reaches the
    daemon), each checked against ``expected``; the queue stays about ``READERS`` deep."""

    def __init__(self, path: str, expected: bytes):
        self.path, self.expected = path, expected
        self.stop = threading.Event()
        self.reads = [0] * READERS
        self.wrong: list[str] = []
        self.errors: list[OSError] = []
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True)
                        for i in range(READERS)]

    def __enter__(self):
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for t in self.threads:
            t.join(30)

    def _run(self, i: int) -> None:
        rnd = random.Random(i)
        buf = mmap.mmap(-1, BLOCK)
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_DIRECT)
        except OSError as exc:
            self.errors.append(exc)
            return
        try:
            while not self.stop.is_set():
                off = rnd.randrange(SIZE // BLOCK) * BLOCK
                n = os.preadv(fd, [buf], off)
                if n != BLOCK or buf[:] != self.expected[off:off + BLOCK]:
                    self.wrong.append(f"block at {off}: {n} bytes, not the volume's")
                    return
                self.reads[i] += 1
        except OSError as exc:
            self.errors.append(exc)
        finally:
            try:
                os.close(fd)
            except OSError:  # the mount went away (unmounted under the readers)
                pass

    def total(self) -> int:
        return sum(self.reads)


def _volume(m) -> bytes:
    data = random.Random(7).randbytes(SIZE)
    with Client(m.mnt) as c:
        c.request("create-volume", volume="v", size=SIZE, format="qcow2")
    with open(m.path("volume-v"), "r+b") as f:
        f.write(data)
        os.fsync(f.fileno())
    return data


def _wait_reads(h: Hammer, more: int) -> None:
    target = h.total() + more
    while h.total() < target and not h.wrong and not h.errors:
        h.stop.wait(0.01)


def test_control_requests_get_their_turn_under_a_full_queue(mounted):
    data = _volume(mounted)
    assert "queued FUSE requests are taken without waiting" in mounted.log_text()
    with Hammer(mounted.path("volume-v"), data) as h:
        _wait_reads(h, 2000)
        with Client(mounted.mnt) as c:
            for i in range(5):
                c.request("create-snapshot", volume="v", snapshot=f"s{i}")
                with open(mounted.path(".snapfs", "status")) as f:
                    assert '"volumes"' in f.read()
            assert sorted(os.listdir(mounted.path(".snapshots", "volume-v"))) == \
                [f"s{i}" for i in range(5)]
            c.request("delete-snapshot", volume="v", snapshot="s2")
        _wait_reads(h, 2000)
    assert not h.wrong, h.wrong[0]
    assert not h.errors, h.errors[0]
    assert all(h.reads), h.reads  # no reader was starved either
    with open(mounted.path(".snapshots", "volume-v", "s4"), "rb") as f:
        assert f.read() == data


def test_sigterm_under_a_full_queue_unmounts_cleanly(mounted):
    data = _volume(mounted)
    with Hammer(mounted.path("volume-v"), data) as h:
        _wait_reads(h, 2000)
        mounted.proc.send_signal(signal.SIGTERM)
        assert mounted.proc.wait(30) == 0, mounted.log_text()[-3000:]
    assert not is_mounted(mounted.mnt)
    assert not h.wrong, h.wrong[0]
