"""Taking FUSE requests off the device without a trip through trio's scheduler each time.

pyfuse3's request loop (3.x) waits for the device to be readable before every request,
through a trio lock and ``wait_readable``: two passes through the scheduler and an epoll
re-arm per request, about a third of the daemon's CPU on 4 KiB reads at queue depth 16.
When requests are already queued nothing needs to wait.  ``install()`` puts a reader in
that place which first polls the device without blocking and takes a queued request at
once; every ``FAST_STREAK`` requests it passes through the scheduler (a checkpoint, no
sleep), so timers, worker threads' results and other tasks are never starved by a busy
guest.

A request is read from the device right after the wait returns, with no await in between,
so a queued request seen by the poll is still there when it is read; pyfuse3's own wait,
used when nothing is queued, is checked the same way (a task on the quick path may have
taken the request it woke for).  pyfuse3 counts the tasks in its own wait to decide when to
start another worker task, so that count still means what it did.  If pyfuse3 has no such
hook (another version), the stock loop stays: slower, not wrong.

When nothing is queued the reader spins for a few tens of microseconds before it sleeps
(``busy_poll``), as QEMU's event loop polls before it blocks: a guest at queue depth 1
sends its next request that soon after the reply, and going to sleep and being woken
costs more CPU than the spin in this daemon (through trio's scheduler and epoll) and
delays the request.  The spin adapts like QEMU's: it doubles while requests come soon
after it gave up and halves while they come later, down to none for an idle or slow
volume; it stops as soon as a worker thread's result or a timer is waiting.
"""

from __future__ import annotations

import logging
import os
import select
import time

import trio

log = logging.getLogger(__name__)

#: Requests taken straight off the device before one pass through the scheduler.
FAST_STREAK = 8
#: Default longest spin for the next request (mount option ``busy_poll``, microseconds).
BUSY_POLL_US = 50
#: The most requests between two looks at an empty device for which the reader spins.
LONE_RUN = 2
#: The shortest spin worth starting; below it the reader just sleeps.
SPIN_MIN = 4e-6
#: How many times the longest spin a sleep may last and still count as short.
SLEEP_COST = 4
#: Polls between looks at the scheduler while spinning (a look costs about 6 us).
POLLS_PER_LOOK = 32


class Reader:
    """The wait pyfuse3's worker tasks call before reading a request off the device."""

    def __init__(self, fd: int, stock, busy_poll_us: float = BUSY_POLL_US):
        self.fd = fd
        self._stock = stock  # pyfuse3's own wait: its task accounting and shutdown stay
        self._poll = select.poll()
        self._poll.register(fd, select.POLLIN)
        self._streak = 0
        self._run = 0  # requests taken since the device was last found empty
        self.spin_max = busy_poll_us / 1e6
        self.spin = self.spin_max  # the current spin, adapted to how soon requests come
        self.spins_won = self.spins_lost = 0

    async def wait(self) -> bool:
        """True when a request can be read without blocking; False: the loop should end."""
        if self._streak >= FAST_STREAK:
            self._streak = 0
            await trio.lowlevel.checkpoint()  # timers, threads' results, other tasks
        if self._poll.poll(0):
            self._streak += 1
            self._run += 1
            return True
        # Nothing queued.  Spin only for a guest that sends one request at a time: with
        # more in flight, requests come in bursts, and the time spun between them is
        # taken from serving them.
        lone, self._run = self._run <= LONE_RUN, 0
        if lone and self.spin and self._spin():
            self._streak += 1
            self._run = 1
            return True
        self._streak = 0
        slept = time.perf_counter()
        while True:
            if not await self._stock():
                return False
            if self._poll.poll(0):  # not taken meanwhile by a task on the quick path
                self._adapt(time.perf_counter() - slept)
                return True

    def stats(self) -> dict:
        """For ``.snapfs/status``: how the spin is set and how often it caught a request."""
        return {"busy_poll_us": round(self.spin_max * 1e6, 1),
                "spin_us": round(self.spin * 1e6, 1),
                "caught_by_spinning": self.spins_won, "missed_by_spinning": self.spins_lost}

    def _spin(self) -> bool:
        """Poll the device for up to ``self.spin`` seconds while the scheduler is idle."""
        if not _scheduler_idle():
            return False
        now = time.perf_counter()
        end = now + self.spin
        polls = 0
        while now < end:
            if self._poll.poll(0):
                self.spins_won += 1
                return True
            polls += 1
            if polls % POLLS_PER_LOOK == 0 and not _scheduler_idle():
                return False
            now = time.perf_counter()
        self.spins_lost += 1
        return False

    def _adapt(self, slept: float) -> None:
        """After a sleep of ``slept`` seconds: spin longer if a longer spin would likely
        have caught the request, shorter if not.  A sleep itself takes tens of
        microseconds here (into trio's scheduler, epoll, woken again), so a request that
        came within a few spins' time still counts as one a spin would have caught."""
        if slept <= SLEEP_COST * self.spin_max:
            self.spin = min(self.spin_max, max(2 * self.spin, SPIN_MIN))
        else:
            self.spin = self.spin / 2 if self.spin / 2 >= SPIN_MIN else 0.0


def _scheduler_idle() -> bool:
    """No worker thread's result and no timer waiting for trio.  Ready tasks do not count:
    another request task that the device woke is nearly always one of them, and it only
    goes back to waiting for the device; other ready tasks wait at most a spin per
    request and get their pass every FAST_STREAK requests."""
    s = trio.lowlevel.current_statistics()
    return not (s.run_sync_soon_queue_size or s.seconds_to_next_deadline <= 0)


def _device_fd() -> int | None:
    """The descriptor of our FUSE connection (pyfuse3 serves one session per process)."""
    found = []
    for name in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{name}") == "/dev/fuse":
                found.append(int(name))
        except OSError:
            continue
    return found[0] if len(found) == 1 else None


def install(busy_poll_us: float = BUSY_POLL_US) -> Reader | None:
    """Replace pyfuse3's wait for the device (after ``pyfuse3.init``); None: not possible
    with this pyfuse3, its own loop stays."""
    import pyfuse3

    fd = _device_fd()
    if fd is None or not hasattr(pyfuse3, "_wait_fuse_readable"):
        log.info("pyfuse3 %s: using its own request loop",
                 getattr(pyfuse3, "__version__", "?"))
        return None
    reader = Reader(fd, pyfuse3._wait_fuse_readable, busy_poll_us)
    pyfuse3._wait_fuse_readable = reader.wait
    log.info("request loop: queued FUSE requests are taken without waiting (up to %d in a "
             "row); %s", FAST_STREAK,
             f"spinning up to {busy_poll_us:g} us for the next one" if busy_poll_us
             else "no busy polling")
    return reader
