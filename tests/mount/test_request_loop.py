"""The request loop under a guest that keeps the queue full (snapfs/fs/session.py).

The daemon says it took over pyfuse3's wait (its quick path is then in use); with sixteen
O_DIRECT readers keeping the queue full, control requests, status reads, listings and
unmounting still get their turn, and every read returns the volume's bytes.  A reader that
sends one request at a time has its requests caught by the loop's spin (counted in
``.snapfs/status``), and ``busy_poll=0`` turns the spin off.  That either is faster is the
bench's business, not a test's."""

import contextlib
import json
import mmap
import os
import random
import signal
import threading

from snapfs.ctl import Client
from snapfs.fs import session
from tests.mount.conftest import start
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


def _one_at_a_time(path: str, data: bytes, count: int) -> None:
    """``count`` O_DIRECT 4 KiB reads, each sent when the one before returned."""
    buf = mmap.mmap(-1, BLOCK)
    rnd = random.Random(3)
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        for _ in range(count):
            off = rnd.randrange(SIZE // BLOCK) * BLOCK
            assert os.preadv(fd, [buf], off) == BLOCK
            assert buf[:] == data[off:off + BLOCK]
    finally:
        os.close(fd)


def _loop_status(m) -> dict:
    with open(m.path(".snapfs", "status")) as f:
        return json.load(f)["request_loop"]


@contextlib.contextmanager
def _mounted_with(tmp_path, options: str):
    """A mount with ``options`` over a fresh share, always unmounted."""
    share = tmp_path / "share"
    share.mkdir()
    m = start(share, tmp_path / "mnt", options)
    try:
        yield m
    finally:
        m.unmount()


def test_requests_one_at_a_time_are_caught_by_spinning(tmp_path):
    # The longest spin the option allows: the test process's next read then comes within
    # it even on a loaded machine, so the outcome does not hang on how fast this one is.
    with _mounted_with(tmp_path, "busy_poll=1000") as m:
        data = _volume(m)
        before = _loop_status(m)
        assert before["busy_poll_us"] == 1000
        _one_at_a_time(m.path("volume-v"), data, 3000)
        after = _loop_status(m)
        assert after["caught_by_spinning"] > before["caught_by_spinning"], after
        assert "spinning up to 1000 us for the next one" in m.log_text()


def test_the_default_spin_is_on(mounted):
    assert _loop_status(mounted)["busy_poll_us"] == session.BUSY_POLL_US
    assert f"spinning up to {session.BUSY_POLL_US} us for the next one" in mounted.log_text()


def test_busy_poll_0_never_spins(tmp_path):
    with _mounted_with(tmp_path, "busy_poll=0") as m:
        data = _volume(m)
        _one_at_a_time(m.path("volume-v"), data, 2000)
        loop = _loop_status(m)
        assert loop == {"busy_poll_us": 0, "spin_us": 0, "caught_by_spinning": 0,
                        "missed_by_spinning": 0}, loop
        assert "no busy polling" in m.log_text()


class _Device:
    """A pipe standing in for /dev/fuse: a byte in it is a queued request."""

    def __enter__(self):
        self.r, self.w = os.pipe()
        return self

    def __exit__(self, *exc):
        os.close(self.r)
        os.close(self.w)


async def _no_stock_wait():
    raise AssertionError("the reader slept although a request was queued")


def test_spin_shrinks_for_requests_far_apart_and_grows_back():
    with _Device() as dev:
        r = session.Reader(dev.r, _no_stock_wait, busy_poll_us=40)
        assert r.spin == 40e-6
        steps = []
        for _ in range(6):  # a slow share or an idle guest: sleeps of a millisecond
            r._adapt(1e-3)
            steps.append(r.spin)
        assert steps[:3] == [20e-6, 10e-6, 5e-6] and steps[3:] == [0.0] * 3, steps
        for _ in range(5):  # requests one at a time again
            r._adapt(20e-6)
        assert r.spin == 40e-6
        r._adapt(session.SLEEP_COST * 40e-6 + 1e-6)
        assert r.spin == 20e-6


def test_a_queued_request_is_taken_without_sleeping():
    import trio

    async def main():
        with _Device() as dev:
            r = session.Reader(dev.r, _no_stock_wait, busy_poll_us=0)
            os.write(dev.w, b"x")
            for _ in range(3 * session.FAST_STREAK):  # checkpoints between streaks too
                assert await r.wait()
    trio.run(main)
