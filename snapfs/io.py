"""The engine's I/O seam: every byte snapfs reads or writes on the share passes through here.

One policy, in one place (DESIGN.md, Concurrency): a call that cannot block on the network runs
inline in the calling trio task (a local-disk share); anything else goes through a worker thread
under a bounded limiter, so a stalled share never freezes the loop.  The engine itself never
imports trio; it takes its lock type from here too.
"""

from __future__ import annotations

import collections
import ctypes
import errno
import logging
import os
import queue
import stat
import sys
import threading
import time

import outcome
import trio

from snapfs.errors import Invalid, ShareIOError, SnapfsError, from_oserror

log = logging.getLogger(__name__)

Lock = trio.Lock
Event = trio.Event
Semaphore = trio.Semaphore
Cancelled = trio.Cancelled
open_nursery = trio.open_nursery
CancelScope = trio.CancelScope
move_on_after = trio.move_on_after
current_task = trio.lowlevel.current_task
WouldBlock = trio.WouldBlock

#: File systems whose calls can wait on a network or another process.
_REMOTE_FS = {"nfs", "nfs4", "cifs", "smb3", "9p", "ceph", "glusterfs", "lustre", "afs", "sshfs"}

THREADS = 16  # share calls in flight at once
IOV_MAX = 1024  # buffers one pwritev may take (Linux)

#: Seconds a thread that wants the GIL waits before it asks the holder to hand it over
#: (Python's default is 5 ms).  A worker whose share call returned waits for the GIL to hand
#: its result back, and the loop, busy serving requests between short system calls, can keep
#: it that long: with a share answering in a millisecond, 16 reads in flight reached 5.3-6.3k
#: IOPS at 5 ms and 6.4-7.3k at 0.5 ms (side by side; 0.1 ms was no better).
SWITCH_INTERVAL = 0.0005

#: Seconds a call on a share that can block may take before the request fails with EIO (the
#: call itself goes on in its thread and is forgotten).  ``io_timeout=`` sets it per mount.
TIMEOUT = 60.0

#: Milliseconds added to every call on the share: a slow share, for benchmarks and tests.
DELAY = float(os.environ.get("SNAPFS_IO_DELAY_MS", "0") or 0) / 1000


def set_timeout(seconds: float) -> None:
    global TIMEOUT
    if seconds <= 0:
        raise ValueError("the I/O timeout must be positive")
    TIMEOUT = seconds


class ShareTimeout(ShareIOError):
    """A call on the share did not return in time (a share that went away)."""


class _Workers:
    """Long-lived threads that run share calls handed over through a queue.

    A call costs one queue hand-over and, at most, one wake-up of the trio loop: calls that
    finish while the loop is busy are handed back together (``_Home``).  ``trio.to_thread``
    also named, limited and recycled a thread for every call, which made up most of the
    daemon's CPU on a share answering in a millisecond.  A call abandoned (timed out or
    cancelled) before a worker took it never runs; one already running finishes unseen."""

    def __init__(self, n: int):
        self.n = n
        self.jobs: queue.SimpleQueue = queue.SimpleQueue()
        self.started = 0
        self.mutex = threading.Lock()

    def _start(self) -> None:
        if sys.getswitchinterval() > SWITCH_INTERVAL:
            sys.setswitchinterval(SWITCH_INTERVAL)
        with self.mutex:
            while self.started < self.n:
                threading.Thread(target=self._work, name=f"snapfs-io-{self.started}",
                                 daemon=True).start()
                self.started += 1

    def _work(self) -> None:
        while True:
            job = self.jobs.get()
            if job.abandoned:
                continue
            job.home.finished(job, outcome.capture(job.fn, *job.args))

    # KeyboardInterrupt between handing the job over and waiting for it would leave a job
    # that reschedules a task no longer waiting for it.
    @trio.lowlevel.enable_ki_protection
    async def run(self, what: str, fn, *args):
        """``fn(*args)`` in a worker; ShareTimeout if it has not returned within TIMEOUT."""
        if self.started < self.n:
            self._start()
        await trio.lowlevel.checkpoint_if_cancelled()
        home = _Home.current()
        job = _Job(what, fn, args, trio.lowlevel.current_task(), home,
                   trio.current_time() + TIMEOUT)
        if home.watching:
            return await self._wait(job)
        # The run is ending and its watchdog is gone: a cancel scope times this call out.
        with trio.move_on_after(TIMEOUT):
            return await self._wait(job)
        raise job.timed_out()

    async def _wait(self, job: "_Job"):
        home = job.home
        home.pending.add(job)
        self.jobs.put(job)

        def abort(_raise_cancel):
            job.abandoned = True
            home.pending.discard(job)
            return trio.lowlevel.Abort.SUCCEEDED

        return await trio.lowlevel.wait_task_rescheduled(abort)


class _Job:
    __slots__ = ("what", "fn", "args", "task", "home", "deadline", "abandoned")

    def __init__(self, what, fn, args, task, home, deadline):
        self.what, self.fn, self.args, self.task = what, fn, args, task
        self.home, self.deadline = home, deadline
        self.abandoned = False

    def timed_out(self) -> ShareTimeout:
        return ShareTimeout(f"{self.what}: the share did not answer within {TIMEOUT:g} s")


_HOME: trio.lowlevel.RunVar = trio.lowlevel.RunVar("snapfs_io_home")


class _Home:
    """One trio loop's side of the workers: the calls it waits for, results coming back,
    and a watchdog that fails calls the share has not answered in time.

    Workers append results and ask the loop to collect them only when no collection is
    already due: at iodepth 16 on a slow share, one wake-up often brings back several.  A
    single watchdog replaces a cancel scope per call (a tenth of the loop's time there)."""

    def __init__(self, token):
        self.token = token
        self.pending: set[_Job] = set()
        self.done: collections.deque = collections.deque()
        self.collect_due = False
        self.watching = False  # the watchdog runs (not before the first call, nor after the
        #                        run's main task ended)

    @classmethod
    def current(cls) -> "_Home":
        try:
            return _HOME.get()
        except LookupError:
            home = cls(trio.lowlevel.current_trio_token())
            _HOME.set(home)
            try:
                trio.lowlevel.spawn_system_task(home._watch, name="snapfs share-call watchdog")
                home.watching = True
            except RuntimeError:  # the run is ending: calls time themselves out
                pass
            return home

    def finished(self, job: _Job, result) -> None:
        """In the worker thread: hand ``result`` back (atomic steps only: no lock)."""
        self.done.append((job, result))
        if not self.collect_due:
            self.collect_due = True
            try:
                self.token.run_sync_soon(self._collect)
            except trio.RunFinishedError:
                pass  # the loop that asked is gone

    def _collect(self) -> None:
        # cleared first: a result appended from now on asks for another collection
        self.collect_due = False
        while self.done:
            job, result = self.done.popleft()
            if not job.abandoned:
                job.abandoned = True  # answered: the watchdog leaves it alone
                self.pending.discard(job)
                trio.lowlevel.reschedule(job.task, result)

    async def _watch(self) -> None:
        try:
            while True:
                await trio.sleep(min(1.0, TIMEOUT / 10))
                now = trio.current_time()
                for job in [j for j in self.pending if j.deadline <= now]:
                    job.abandoned = True
                    self.pending.discard(job)
                    trio.lowlevel.reschedule(job.task, outcome.Error(job.timed_out()))
        finally:
            self.watching = False


_WORKERS = _Workers(THREADS)


_FS_TYPES: dict[int, tuple[str, float]] = {}  # st_dev -> (type, when read)
FS_TYPE_TTL = 10.0  # seconds: a device number is reused only after an unmount


def fs_type(path: str) -> str:
    """The type of the file system holding ``path``, from /proc/self/mountinfo (remembered
    per device for a few seconds: a chain of many files is opened in a few milliseconds,
    and reading the mount table for each file took a quarter of that)."""
    try:
        dev = os.stat(path).st_dev
    except OSError:
        return _mount_type(path)
    now = time.monotonic()
    known = _FS_TYPES.get(dev)
    if known is None or now - known[1] > FS_TYPE_TTL:
        known = _FS_TYPES[dev] = (_mount_type(path), now)
    return known[0]


def _mount_type(path: str) -> str:
    path = os.path.realpath(path)
    best, best_type = "", "unknown"
    try:
        with open("/proc/self/mountinfo", encoding="utf-8") as f:
            for line in f:
                left, _, right = line.partition(" - ")
                mnt = left.split()[4].replace("\\040", " ")
                ftype = right.split()[0]
                inside = path == mnt or path.startswith(mnt.rstrip("/") + "/")
                if inside and len(mnt) >= len(best):
                    best, best_type = mnt, ftype
    except OSError:
        pass
    return best_type


def inline_policy(path: str) -> bool:
    """True when calls on files under ``path`` cannot block on the network.

    ``SNAPFS_IO=thread`` or ``SNAPFS_IO=inline`` overrides the detection (tests, benchmarks);
    an injected delay always uses threads, as a slow share must.
    """
    if DELAY:
        return False
    forced = os.environ.get("SNAPFS_IO")
    if forced in ("thread", "inline"):
        return forced == "inline"
    ftype = fs_type(path)
    return not (ftype in _REMOTE_FS or ftype.startswith("fuse"))


class BlockFile:
    """An open file on the share with positional I/O only (never a shared file offset).

    A call that the share answers with ESTALE (an NFS server that forgot the handle) reopens
    the file by name and is retried once; ``relock`` then takes the image locks again.  The
    descriptor is closed only once no abandoned call (timed out) can still use it."""

    def __init__(self, path: str, fd: int, writable: bool, inline: bool):
        self.path = path
        self.fd = fd
        self.writable = writable
        self.inline = inline
        self.closed = False
        self.relock = None  # called with the new descriptor after a reopen
        self.ino = os.fstat(fd).st_ino  # a reopen must find the same file, not a successor
        self._busy = 0  # calls running in worker threads
        self._mutex = threading.Lock()

    @classmethod
    async def open(cls, path: str, *, writable: bool = False, create: bool = False,
                   mode: int = 0o660, inline: bool | None = None) -> "BlockFile":
        flags = os.O_RDWR if writable else os.O_RDONLY
        flags |= os.O_CLOEXEC | os.O_NOFOLLOW
        if create:
            flags |= os.O_CREAT | os.O_EXCL
        if inline is None:
            inline = inline_policy(os.path.dirname(os.path.abspath(path)) or ".")
        fd = await _call(inline, f"open {path}", os.open, path, flags, mode)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise Invalid(f"{path} is not a regular file")
            if create and stat.S_IMODE(st.st_mode) != mode:
                os.fchmod(fd, mode)  # the share's policy, whatever the umask
        except BaseException:
            os.close(fd)
            raise
        return cls(path, fd, writable, inline)

    async def _run(self, what: str, fn, *args, thread: bool = False):
        try:
            return await self._call(what, fn, *args, thread=thread)
        except _Stale:
            pass
        log.warning("%s: stale file handle; reopening it by name", self.path)
        try:
            await self._call("reopen", self._reopen)
            return await self._call(what, fn, *args, thread=thread)
        except _Stale:
            raise ShareIOError(f"{what} {self.path}: stale file handle, also after reopening "
                               "it") from None

    async def _call(self, what: str, fn, *args, thread: bool = False):
        if self.inline and not thread:
            return await _call(True, f"{what} {self.path}", _estale(fn), self.fd, *args)
        if self.closed:
            raise ShareIOError(f"{what} {self.path}: the file is closed")
        return await _call(False, f"{what} {self.path}", self._in_thread, fn, *args)

    def _in_thread(self, fn, *args):
        with self._mutex:
            if self.closed:  # closed while the call waited for a worker
                raise OSError(errno.EBADF, "the file was closed")
            self._busy += 1
        try:
            return _estale(fn)(self.fd, *args)
        finally:
            with self._mutex:
                self._busy -= 1
                if self.closed and not self._busy:
                    os.close(self.fd)

    def _reopen(self, fd: int) -> None:
        try:
            new = os.open(self.path, (os.O_RDWR if self.writable else os.O_RDONLY)
                          | os.O_CLOEXEC | os.O_NOFOLLOW)
        except FileNotFoundError:
            raise Replaced(f"{self.path} is gone (another host changed the chain)") from None
        try:
            if os.fstat(new).st_ino != self.ino:
                raise Replaced(f"{self.path} was replaced by another file (another host "
                               "changed the chain)")
            os.dup2(new, fd)  # keep the number: the engine may hold it
        finally:
            os.close(new)
        if self.relock is not None:
            self.relock(fd)

    async def pread(self, offset: int, length: int) -> bytes:
        """Read up to ``length`` bytes; shorter only at end of file."""
        if length <= 0:
            return b""
        data = None
        if self.inline:
            # The common case without the layers below (a third of a 4 KiB read's time in
            # the engine); any error takes the full path, which retries the read.
            try:
                data = os.pread(self.fd, length, offset)
            except (OSError, OverflowError):
                pass
        if data is None:
            data = await self._run("read", os.pread, length, offset)
        if len(data) < length:
            # A short read not at EOF (signals, some network file systems): finish it.
            parts = [data]
            got = len(data)
            while got < length:
                more = await self._run("read", os.pread, length - got, offset + got)
                if not more:
                    break
                parts.append(more)
                got += len(more)
            data = b"".join(parts)
        return data

    async def pwrite(self, offset: int, data) -> None:
        view = memoryview(data)
        while len(view):
            n = await self._run("write", os.pwrite, view, offset)
            view = view[n:]
            offset += n

    async def pwritev(self, offset: int, buffers) -> None:
        """Write ``buffers`` one after the other from ``offset``, without joining them."""
        views = [memoryview(b) for b in buffers]
        while views:
            n = await self._run("write", os.pwritev, views[:IOV_MAX], offset)
            offset += n
            while views and n >= len(views[0]):
                n -= len(views.pop(0))
            if n:
                views[0] = views[0][n:]

    async def start_writeback(self) -> None:
        """Start writing the file's dirty pages to the share without waiting for them, so
        that the sync ending a long copy finds little left to write (advice: a file system
        without it just syncs everything then)."""
        await self._run("writeback", _start_writeback, thread=True)

    # fsync takes milliseconds even on a local disk: it never runs in the loop.
    async def fsync(self) -> None:
        await self._run("fsync", os.fsync, thread=True)

    async def fdatasync(self) -> None:
        await self._run("fdatasync", os.fdatasync, thread=True)

    async def truncate(self, size: int) -> None:
        await self._run("truncate", os.ftruncate, size)

    async def size(self) -> int:
        st = await self._run("stat", os.fstat)
        return st.st_size

    async def stat(self) -> os.stat_result:
        return await self._run("stat", os.fstat)

    async def close(self, unlinked: bool = False) -> None:
        """Close the descriptor.  ``unlinked``: the file is gone from the share (renamed
        over), so this last close frees all its pages and blocks for it (175 ms for 512 MiB
        here): done by a worker, not in the loop."""
        with self._mutex:
            if self.closed:
                return
            self.closed = True
            if self._busy:
                return  # the last abandoned call closes it
        if unlinked:
            try:
                with trio.CancelScope(shield=True):  # handed over, the descriptor must go
                    await _call(False, f"close {self.path}", os.close, self.fd)
            except SnapfsError as exc:  # nothing reads that file again: not the caller's failure
                log.warning("closing a file already replaced on the share: %s", exc.message)
            return
        os.close(self.fd)


_LIBC = ctypes.CDLL(None, use_errno=True)
_LIBC.sync_file_range.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
SYNC_FILE_RANGE_WRITE = 2  # start writeback of dirty pages not already under writeback


def _start_writeback(fd: int) -> None:
    if _LIBC.sync_file_range(fd, 0, 0, SYNC_FILE_RANGE_WRITE) != 0:
        err = ctypes.get_errno()
        if err not in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ESPIPE):
            raise OSError(err, os.strerror(err))


class _Stale(Exception):
    pass


class Replaced(ShareIOError):
    """A file went stale because another daemon renamed a new file over its name: its
    tables no longer describe what that name holds, so it is never reopened by name."""


def _estale(fn):
    def call(*args):
        try:
            return fn(*args)
        except OSError as exc:
            if exc.errno == errno.ESTALE:
                raise _Stale() from None
            raise
    return call


async def _call(inline: bool, what: str, fn, *args):
    try:
        if inline:
            return fn(*args)
        if DELAY:
            fn = _delayed(fn)
        return await _WORKERS.run(what, fn, *args)
    except OSError as exc:
        raise from_oserror(exc, what) from None
    except OverflowError:
        raise Invalid(f"{what}: offset out of range") from None


def _delayed(fn):
    def call(*args):
        time.sleep(DELAY)
        return fn(*args)
    return call


COPY_BLOCK = 8 << 20  # the buffer of copy_range's read-and-write fallback


async def copy_range(src: "BlockFile", src_off: int, dst: "BlockFile", dst_off: int,
                     length: int) -> int:
    """Copy bytes between share files with ``copy_file_range`` (in the kernel; on NFS 4.2 on
    the server), or by reading and writing where it is not supported.  Returns the bytes
    copied: fewer only where the source file ends."""
    def copy() -> int:
        s, d, left = src_off, dst_off, length
        while left:
            try:
                n = os.copy_file_range(src.fd, dst.fd, left, s, d)
            except OSError as exc:
                if exc.errno not in (errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
                    raise
                n = -1
            if n <= 0:
                data = os.pread(src.fd, min(left, COPY_BLOCK), s)
                if not data:
                    break  # the source file ends here
                os.pwrite(dst.fd, data, d)
                n = len(data)
            s, d, left = s + n, d + n, left - n
        return length - left
    return await _call(src.inline and dst.inline, f"copying {src.path} to {dst.path}", copy)


async def acquire_quickly(lock: trio.Lock) -> None:
    """Take ``lock`` without a pass through the scheduler when it is free (trio's ``acquire``
    always yields first, which costs more than a guest's 4 KiB write).  Only for requests
    that yield elsewhere anyway: a long loop of quick acquires would starve other tasks."""
    try:
        lock.acquire_nowait()
    except trio.WouldBlock:
        await lock.acquire()


async def checkpoint() -> None:
    """Let other tasks run (and cancellation reach us) inside a long loop."""
    await trio.lowlevel.checkpoint()


async def run_blocking(inline: bool, what: str, fn, *args):
    """Run a blocking call on the share (rename, unlink, fsync of a directory...)."""
    return await _call(inline, what, fn, *args)


class Gate:
    """Many I/O requests at once, or one chain switch alone.

    Guest reads and writes pass through ``shared()``; taking a snapshot or switching the
    active image takes ``exclusive()``, which waits for requests in flight to finish and holds
    new ones back until the switch is done (a pause of milliseconds)."""

    def __init__(self) -> None:
        self.active = 0
        self._closed: trio.Event | None = None  # while a switch holds the gate
        self._drained: trio.Event | None = None  # a switch waiting for requests to finish
        self._switch = trio.Lock()
        self._shared = _Shared(self)

    def shared(self) -> "_Shared":
        return self._shared  # stateless: one object serves every request

    async def _enter(self) -> None:
        while self._closed is not None:
            await self._closed.wait()
        self.active += 1

    def _leave(self) -> None:
        self.active -= 1
        if self.active == 0 and self._drained is not None:
            self._drained.set()

    def exclusive(self) -> "_Exclusive":
        return _Exclusive(self)


class _Shared:
    __slots__ = ("gate",)

    def __init__(self, gate: Gate):
        self.gate = gate

    async def __aenter__(self):
        await self.gate._enter()

    async def __aexit__(self, *exc):
        self.gate._leave()


class _Exclusive:
    def __init__(self, gate: Gate):
        self.gate = gate

    async def __aenter__(self):
        g = self.gate
        await g._switch.acquire()
        g._closed = trio.Event()
        try:
            while g.active:
                g._drained = trio.Event()
                await g._drained.wait()
        except BaseException:
            self._open()
            raise
        finally:
            g._drained = None

    async def __aexit__(self, *exc):
        self._open()

    def _open(self) -> None:
        g = self.gate
        closed, g._closed = g._closed, None
        closed.set()
        g._switch.release()


async def sleep(seconds: float) -> None:
    await trio.sleep(seconds)


def current_time() -> float:
    return trio.current_time()
