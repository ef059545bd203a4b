"""The daemon as an admin runs it (CONTRACT.md sections 2 and 5): the mount.snapfs helper's
conventions, the share lease, signals, the ro/uid/gid/mode options, and kill -9 at any moment
of a write load or of a control operation followed by a remount that recovers by itself."""

import errno
import json
import os
import random
import signal
import stat
import subprocess
import sys
import threading
import time

import pytest

from snapfs.chain.leases import default_host_id
from snapfs.ctl import Client, ControlError
from tests import qemu
from tests.mount.conftest import REPO, start
from tests.mount.workload import (BLOCK, MiB, Writer, assert_same, check_share,
                                  compare_with_share, first_difference, is_mounted,
                                  lazy_unmount, point_in_time, read_file, scattered, tick, wait_jobs)
from tests.sharefiles import tmp_files

HELPER = os.path.join(REPO, "scripts", "mount.snapfs")


def run_helper(*args, timeout=60):
    env = dict(os.environ, SNAPFS_PYTHON=sys.executable, PYTHONPATH=REPO)
    return subprocess.run([HELPER, *map(str, args)], env=env, capture_output=True, text=True,
                          timeout=timeout)


def run_foreground(share, mnt, *opts, timeout=60):
    """``mount.snapfs --foreground`` expected to refuse: returns the finished process."""
    env = dict(os.environ, PYTHONPATH=REPO)
    argv = [sys.executable, "-m", "snapfs.mount", str(share), str(mnt), "--foreground"]
    if opts:
        argv += ["-o", ",".join(opts)]
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout)


def one_line(stderr: str) -> str:
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, f"expected a one-line reason, got {len(lines)} lines:\n{stderr}"
    return lines[0]


def lease_pid(share) -> int:
    """The pid of the daemon serving ``share`` (the only one, with the default host id)."""
    with open(os.path.join(str(share), ".snapfs", "hosts", f"{default_host_id()}.lease")) as f:
        return json.load(f)["pid"]


def pid_gone(pid: int) -> bool:
    """Exited (a zombie counts: our test process is not its parent, nobody may reap it)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def wait_gone(pid: int, timeout: float = 30) -> bool:
    deadline = time.monotonic() + timeout
    while not pid_gone(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


@pytest.fixture
def helper_mounts():
    """Mounts made by the daemonizing helper: unmounted, and their daemons waited for (killed
    when they will not go), in teardown."""
    made = []  # (mnt, share)
    yield made
    for mnt, share in made:
        try:
            pid = lease_pid(share)
        except (OSError, ValueError):
            pid = None
        if is_mounted(mnt):
            r = subprocess.run(["fusermount3", "-u", str(mnt)], capture_output=True)
            if r.returncode != 0:
                lazy_unmount(str(mnt))
        if pid is not None and not wait_gone(pid):
            os.kill(pid, signal.SIGKILL)
            wait_gone(pid, 10)


class Daemon:
    """One share served by successive foreground daemons; kill -9 and remount."""

    def __init__(self, tmp_path):
        self.share = tmp_path / "share"
        self.share.mkdir()
        self.mnt = tmp_path / "mnt"
        self.tmp = tmp_path
        self.m = None
        self.n = 0

    def mount(self, *opts):
        self.n += 1
        self.m = start(self.share, self.mnt, *opts, log=self.tmp / f"mnt-{self.n}.log")
        return self.m

    def kill9(self):
        os.kill(self.m.proc.pid, signal.SIGKILL)
        self.m.proc.wait(30)
        lazy_unmount(str(self.mnt))
        assert not is_mounted(str(self.mnt))

    def close(self):
        if self.m is not None and self.m.proc.poll() is None:
            self.m.unmount()
        lazy_unmount(str(self.mnt))

    def logs(self) -> str:
        out = []
        for i in range(1, self.n + 1):
            p = self.tmp / f"mnt-{i}.log"
            if p.exists():
                out.append(f"--- mount {i}\n{p.read_text()[-3000:]}")
        return "\n".join(out)


@pytest.fixture
def daemon(tmp_path):
    d = Daemon(tmp_path)
    try:
        yield d
    finally:
        d.close()


# -- the helper's conventions --------------------------------------------------------------

def test_fake_mount_mounts_nothing(tmp_path):
    share, mnt = tmp_path / "share", tmp_path / "mnt"
    share.mkdir()
    mnt.mkdir()
    r = run_helper("-f", share, mnt, "-o", f"log={tmp_path / 'log'}")
    assert r.returncode == 0, r.stderr
    r = run_helper(share, mnt, "-f", "-v", "-o", "defaults")
    assert r.returncode == 0, r.stderr
    assert not is_mounted(str(mnt))
    assert not os.path.exists(share / ".snapfs" / "lease.json")


def test_helper_returns_once_the_mount_is_ready(tmp_path, helper_mounts):
    """`-s -n -v -N NS` and the generic options are ignored; when the daemonizing helper
    returns 0 the mount is there and serves control requests at once."""
    share, mnt = tmp_path / "share", tmp_path / "mnt"
    share.mkdir()
    mnt.mkdir()
    helper_mounts.append((mnt, share))
    r = run_helper(share, mnt, "-s", "-n", "-v", "-N", "/proc/self/ns/mnt", "-o",
                   f"defaults,rw,_netdev,nofail,x-foo,x-systemd.automount,log={tmp_path / 'log'}")
    assert r.returncode == 0, r.stderr
    assert is_mounted(str(mnt)) and os.path.ismount(str(mnt))
    with Client(str(mnt)) as c:
        assert c.request("list") == {"volumes": []}
        c.request("create-volume", volume="v", size=MiB)
    assert os.path.getsize(mnt / "volume-v") == MiB
    pid = lease_pid(share)
    assert not pid_gone(pid)
    # umount(8) unmounts it; the daemon then exits
    r = subprocess.run(["umount", str(mnt)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert wait_gone(pid), "the daemon did not exit after umount"
    assert not is_mounted(str(mnt))


def test_daemonized_sigterm_unmounts(tmp_path, helper_mounts):
    share, mnt = tmp_path / "share", tmp_path / "mnt"
    share.mkdir()
    mnt.mkdir()
    helper_mounts.append((mnt, share))
    r = run_helper(share, mnt, "-o", f"log={tmp_path / 'log'}")
    assert r.returncode == 0, r.stderr
    pid = lease_pid(share)
    os.kill(pid, signal.SIGTERM)
    assert wait_gone(pid), "the daemon did not exit on SIGTERM"
    assert not is_mounted(str(mnt))


@pytest.mark.parametrize("args,word", [
    (["-o", "no_such_option"], "no_such_option"),
    (["-o", "rw,uid=abc"], "uid"),
    (["-o", "unrecorded_format=vmdk"], "unrecorded_format"),
    (["-o", "busy_poll=-5"], "busy_poll"),
    (["-o", "busy_poll=soon"], "busy_poll"),
    (["--no-such-flag"], "no-such-flag"),
])
def test_bad_options_are_refused_with_one_line(tmp_path, args, word):
    share, mnt = tmp_path / "share", tmp_path / "mnt"
    share.mkdir()
    mnt.mkdir()
    r = run_helper(share, mnt, *args)
    assert r.returncode != 0
    assert word in one_line(r.stderr)
    assert not is_mounted(str(mnt))


def test_missing_share_is_refused_with_one_line(tmp_path):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    r = run_helper(tmp_path / "nowhere", mnt)
    assert r.returncode != 0
    one_line(r.stderr)
    assert not is_mounted(str(mnt))


# -- the share lease -----------------------------------------------------------------------

def test_second_mount_of_a_share_refused_then_remount_after_unmount(tmp_path, helper_mounts):
    share = tmp_path / "share"
    share.mkdir()
    mnt1, mnt2 = tmp_path / "mnt1", tmp_path / "mnt2"
    mnt2.mkdir()
    m1 = start(share, mnt1)
    m2 = None
    try:
        with Client(m1.mnt) as c:
            c.request("create-volume", volume="v", size=MiB)
        with open(m1.path("volume-v"), "r+b") as f:
            f.write(b"first" * 100)
        # a second daemon over the same share refuses, foreground or daemonizing
        r = run_foreground(share, mnt2, f"log={tmp_path / 'second.log'}")
        assert r.returncode != 0
        reason = one_line(r.stderr)
        assert not is_mounted(str(mnt2))
        helper_mounts.append((mnt2, share))
        r = run_helper(share, mnt2, "-o", f"log={tmp_path / 'second.log'}")
        assert r.returncode != 0
        one_line(r.stderr)
        assert not is_mounted(str(mnt2))
        helper_mounts.remove((mnt2, share))
        assert "already" in reason or "served" in reason or "lease" in reason, reason
        # the first mount is unharmed
        with Client(m1.mnt) as c:
            assert c.request("list")["volumes"] == ["v"]
        # unmount and remount at once: the new daemon waits (bounded) for the old one
        subprocess.run(["fusermount3", "-u", m1.mnt], check=True)
        m2 = start(share, mnt2)
        assert m1.proc.wait(30) == 0
        with open(m2.path("volume-v"), "rb") as f:
            assert f.read(500) == b"first" * 100
    finally:
        if m2 is not None:
            m2.unmount()
        m1.unmount()
        lazy_unmount(str(mnt1))
        lazy_unmount(str(mnt2))


# -- signals -------------------------------------------------------------------------------

def test_sigterm_unmounts_cleanly(daemon):
    m = daemon.mount()
    data = random.Random(5).randbytes(2 * MiB)
    with Client(m.mnt) as c:
        c.request("create-volume", volume="v", size=4 * MiB, format="qcow2")
        with open(m.path("volume-v"), "r+b") as f:
            f.write(data)
        c.request("create-snapshot", volume="v", snapshot="s")
    fd = os.open(m.path("volume-v"), os.O_RDWR)  # still open, written, not fsync'd
    try:
        os.pwrite(fd, b"\xee" * MiB, 3 * MiB)
        m.proc.send_signal(signal.SIGTERM)
        assert m.proc.wait(30) == 0, m.log_text()
        assert not is_mounted(m.mnt)
    finally:
        try:
            os.close(fd)
        except OSError:
            pass
    # clean: no leaks, dirty bits cleared, and no image lock left (no -U)
    for p in (daemon.share / "volume-v", daemon.share / "volume-v.s"):
        r = qemu.img("check", "-f", "qcow2", str(p), check=False)
        assert r.returncode == 0, r.stdout + r.stderr
        assert not qemu.info(str(p)).get("dirty-flag"), p
    m = daemon.mount()
    content = read_file(m.path("volume-v"))
    assert content == data + bytes(MiB) + b"\xee" * MiB
    assert read_file(m.path(".snapshots", "volume-v", "s")) == data + bytes(2 * MiB)


# -- options -------------------------------------------------------------------------------

def share_tree(share) -> dict:
    """Every file on the share with its content digest and metadata."""
    import hashlib
    out = {}
    for root, _dirs, files in os.walk(str(share)):
        for n in files:
            p = os.path.join(root, n)
            st = os.stat(p)
            with open(p, "rb") as f:
                digest = hashlib.sha256(f.read()).hexdigest()
            out[os.path.relpath(p, str(share))] = (digest, st.st_size, stat.S_IMODE(st.st_mode),
                                                   st.st_uid, st.st_gid)
    return out


def test_read_only_mount(daemon):
    m = daemon.mount()
    data = random.Random(6).randbytes(MiB)
    with Client(m.mnt) as c:
        c.request("create-volume", volume="q", size=2 * MiB, format="qcow2")
        c.request("create-volume", volume="r", size=2 * MiB, format="raw")
        for vid in ("q", "r"):
            with open(m.path(f"volume-{vid}"), "r+b") as f:
                f.write(data)
        c.request("create-snapshot", volume="q", snapshot="s")
    m.unmount()
    before = share_tree(daemon.share)
    m = daemon.mount("ro")
    assert os.statvfs(m.mnt).f_flag & os.ST_RDONLY
    for vid in ("q", "r"):
        path = m.path(f"volume-{vid}")
        assert read_file(path) == data + bytes(MiB)
        assert os.stat(path).st_mode & 0o222 == 0
        for flags in (os.O_RDWR, os.O_WRONLY, os.O_WRONLY | os.O_TRUNC):
            with pytest.raises(OSError) as e:
                os.open(path, flags)
            assert e.value.errno == errno.EROFS
        for call in (lambda: os.truncate(path, 4 * MiB), lambda: os.unlink(path),
                     lambda: os.chmod(path, 0o600)):
            with pytest.raises(OSError) as e:
                call()
            assert e.value.errno == errno.EROFS
    assert read_file(m.path(".snapshots", "volume-q", "s")) == data + bytes(MiB)
    with pytest.raises(OSError) as e:
        open(m.path("volume-new"), "wb")
    assert e.value.errno == errno.EROFS
    assert sorted(os.listdir(m.mnt)) == [".snapfs", ".snapshots", "volume-q", "volume-r"]
    m.unmount()
    after = share_tree(daemon.share)
    changed = [k for k in before if not k.startswith(".snapfs/") and after.get(k) != before[k]]
    assert not changed, f"a read-only mount changed share files: {changed}"


def test_owner_and_mode_options_and_chmod_chown(daemon):
    opts = ("uid=1234", "gid=2345", "mode=0640")
    m = daemon.mount(*opts)
    with Client(m.mnt) as c:
        c.request("create-volume", volume="a", size=MiB, format="qcow2")
        c.request("create-snapshot", volume="a", snapshot="s")
    with open(m.path("volume-b"), "wb"):  # a volume created as a file
        pass
    for vid in ("a", "b"):
        st = os.stat(m.path(f"volume-{vid}"))
        assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (1234, 2345, 0o640), vid
        assert stat.S_ISREG(st.st_mode)
    st = os.stat(m.path(".snapshots", "volume-a", "s"))
    assert (st.st_uid, st.st_gid) == (1234, 2345) and st.st_mode & 0o222 == 0
    share_files = {n: os.stat(daemon.share / n) for n in os.listdir(daemon.share)
                   if n.startswith("volume-")}
    os.chmod(m.path("volume-a"), 0o600)
    os.chown(m.path("volume-a"), 111, 222)
    st = os.stat(m.path("volume-a"))
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (111, 222, 0o600)
    st = os.stat(m.path("volume-b"))
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (1234, 2345, 0o640)
    # not applied to the share's files
    for n, before in share_files.items():
        now = os.stat(daemon.share / n)
        assert (now.st_uid, now.st_gid, now.st_mode) == \
            (before.st_uid, before.st_gid, before.st_mode), n
    # kept across remounts, with the same options and without any
    for again in (opts, ()):
        m.unmount()
        m = daemon.mount(*again)
        st = os.stat(m.path("volume-a"))
        assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (111, 222, 0o600), again
        st = os.stat(m.path("volume-b"))
        want = (1234, 2345, 0o640) if again else (0, 0, 0o660)
        assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == want, again
    with open(m.path("volume-a"), "rb") as f:
        assert f.read(512) == bytes(512)


# -- kill -9 -------------------------------------------------------------------------------

def recover_and_check(d: Daemon, vids, formats) -> None:
    """After a remount: let the recovery and its merges finish, open and close every volume
    for writing through the mount (so snapfs repairs what the crash leaked), then every
    qcow2 file on the share passes qemu-img check and reads as the mount serves it."""
    m = d.m
    wait_jobs(m.mnt)
    for vid in vids:
        with open(m.path(f"volume-{vid}"), "r+b") as f:
            f.read(512)
    check_share(str(d.share))
    for vid in vids:
        compare_with_share(m.path(f"volume-{vid}"), str(d.share), vid, formats[vid])
        with Client(m.mnt) as c:
            info = c.request("info", volume=vid)
        assert info["state"] == "ok", info["reason"]
    assert not tmp_files(d.share)


def chain_files(share, vid) -> set:
    return {n for n in os.listdir(share) if n.startswith(f"volume-{vid}.")
            and n != f"volume-{vid}.info"}


def snapshots_everywhere(d: Daemon, vid) -> list:
    """The volume's snapshots, the same in the mount, `info` and the share's .info."""
    m = d.m
    in_mount = sorted(os.listdir(m.path(".snapshots", f"volume-{vid}")))
    with Client(m.mnt) as c:
        in_info = sorted(s["id"] for s in c.request("info", volume=vid)["snapshots"])
    p = d.share / f"volume-{vid}.info"
    on_share = sorted(k for k in json.loads(p.read_text()) if k != "active") \
        if p.exists() else []
    assert in_mount == in_info == on_share, (in_mount, in_info, on_share)
    overlays = {json.loads(p.read_text())[s] for s in on_share}
    assert chain_files(d.share, vid) == overlays, \
        f"files {sorted(chain_files(d.share, vid))} for snapshots {on_share}"
    return in_mount


class Request(threading.Thread):
    """A control request on its own request file, in a thread: its events and outcome.
    ``after`` runs in the thread as soon as the reply is in; ``done`` is set when the request
    has finished (its request file is closed only afterwards)."""

    def __init__(self, mnt, op, after=None, **args):
        super().__init__(daemon=True)
        self.mnt, self.op, self.args, self.after = mnt, op, args, after
        self.sent = self.replied = None
        self.error = None
        self.ready = threading.Event()
        self.done = threading.Event()

    def running(self) -> bool:
        return not self.done.is_set()

    def run(self):
        c = None
        try:
            c = Client(self.mnt)
            self.ready.set()
            self.sent = tick()
            c.request(self.op, **self.args)
            self.replied = tick()
            if self.after is not None:
                self.after()
        except (ControlError, OSError) as exc:
            self.error = exc
        finally:
            self.done.set()
            self.ready.set()
            if c is not None:
                try:
                    c.close()
                except OSError:
                    pass  # the daemon is gone


def kill_during(d: Daemon, req: Request, when) -> int:
    """Send ``req`` and kill -9 the daemon at a point of the operation: a delay in seconds
    after sending, "intent" (its intent record is on the share), "replied", ("exists", name)
    (a file appears on the share), ("info", vid, sid, present) (the share's .info lists the
    snapshot or not), ("file", prefix, size) (a temporary file has grown that big).  If the
    request finishes first, the kill comes right after it.  Returns the kill's event."""
    share = d.share
    tmp = share / ".snapfs" / "tmp"

    def info_has(vid, sid):
        try:
            return sid in json.loads((share / f"volume-{vid}.info").read_text())
        except (OSError, ValueError):
            return False

    def big_enough(prefix, size):
        for d, _, names in os.walk(tmp):
            for n in names:
                try:
                    if n.startswith(prefix) and os.path.getsize(os.path.join(d, n)) >= size:
                        return True
                except OSError:
                    pass
        return False

    if isinstance(when, (int, float)) or when == "replied":
        reached = lambda: False  # noqa: E731
    elif when == "intent":
        reached = lambda: bool(os.listdir(share / ".snapfs" / "intents"))  # noqa: E731
    elif when[0] == "exists":
        reached = lambda: os.path.exists(share / when[1])  # noqa: E731
    elif when[0] == "info":
        reached = lambda: info_has(when[1], when[2]) == when[3]  # noqa: E731
    elif when[0] == "file":
        reached = lambda: big_enough(when[1], when[2])  # noqa: E731
    else:
        raise ValueError(when)
    req.start()
    req.ready.wait(10)
    deadline = time.monotonic() + 60
    while req.sent is None and req.running():
        time.sleep(0.0001)
    if isinstance(when, (int, float)):
        time.sleep(when)
    else:
        while req.running() and not reached():
            assert time.monotonic() < deadline, f"{when} never came"
    killed = tick()
    d.kill9()
    req.join(30)
    assert not req.is_alive()
    return killed


def fill(path, size, seed, step=2 * MiB, chunk=MiB) -> bytearray:
    """Write random data to every other MiB of a volume; returns the expected content."""
    rng = random.Random(seed)
    model = bytearray(size)
    fd = os.open(path, os.O_RDWR)
    try:
        for off in range(0, size, step):
            data = rng.randbytes(min(chunk, size - off))
            os.pwrite(fd, data, off)
            model[off:off + len(data)] = data
        os.fsync(fd)
    finally:
        os.close(fd)
    return model


def test_kill9_during_writes(daemon):
    m = daemon.mount()
    size = 8 * MiB
    nslots = size // BLOCK
    formats = {"q": "qcow2", "r": "raw"}
    with Client(m.mnt) as c:
        for vid, fmt in formats.items():
            c.request("create-volume", volume=vid, size=size, format=fmt)
    writers = {vid: Writer(m.path(f"volume-{vid}"), scattered(0, nslots), nslots)
               for vid in formats}
    for w in writers.values():
        w.start()
    try:
        for w in writers.values():
            w.wait_acks(30)
        with Client(m.mnt) as c:
            snap = (tick(), c.request("create-snapshot", volume="q", snapshot="s"), tick())
        for w in writers.values():
            w.wait_acks(w.acks + 40)
        killed = tick()
        daemon.kill9()
    finally:
        for w in writers.values():
            w.stop()
    for w in writers.values():
        assert w.errors, "the writer did not notice the crash"
        assert w.errors[-1].error in (errno.ENOTCONN, errno.ECONNABORTED, errno.EIO), \
            errno.errorcode.get(w.errors[-1].error)
    m = daemon.mount()
    for vid, w in writers.items():
        content = read_file(m.path(f"volume-{vid}"))
        assert len(content) == size
        point_in_time(content, w.recs, killed, killed, what=f"volume {vid}", acked_only=True)
    assert snapshots_everywhere(daemon, "q") == ["s"]
    point_in_time(read_file(m.path(".snapshots", "volume-q", "s")), writers["q"].recs,
                  snap[0], snap[2], what="snapshot s", acked_only=True)
    recover_and_check(daemon, formats, formats)


@pytest.mark.parametrize("when", [0.0, "intent", ("exists", "volume-v.s"),
                                  ("info", "v", "s", True), "replied"])
def test_kill9_during_create_snapshot(daemon, when):
    m = daemon.mount()
    size = 8 * MiB
    nslots = size // BLOCK
    with Client(m.mnt) as c:
        c.request("create-volume", volume="v", size=size, format="qcow2")
    prior = fill(m.path("volume-v"), size, 1, step=4 * MiB)
    w = Writer(m.path("volume-v"), scattered(0, nslots), nslots)
    w.start()
    try:
        w.wait_acks(20)
        req = Request(m.mnt, "create-snapshot", volume="v", snapshot="s")
        killed = kill_during(daemon, req, when)
    finally:
        w.stop()
    print(f"create-snapshot killed {'after' if req.replied else 'before'} its reply")
    m = daemon.mount()
    content = read_file(m.path("volume-v"))
    point_in_time(content, w.recs, killed, killed, prior=bytes(prior), what="the volume",
                  acked_only=True)
    snaps = snapshots_everywhere(daemon, "v")
    if req.replied is not None:
        assert snaps == ["s"], "a completed create-snapshot was lost"
    if snaps:
        assert snaps == ["s"]
        point_in_time(read_file(m.path(".snapshots", "volume-v", "s")), w.recs, req.sent,
                      req.replied or killed, prior=bytes(prior), what="snapshot s",
                      acked_only=True)
    # Cinder retries: the same request now succeeds
    with Client(m.mnt) as c:
        c.request("create-snapshot", volume="v", snapshot="s")
    assert snapshots_everywhere(daemon, "v") == ["s"]
    recover_and_check(daemon, ["v"], {"v": "qcow2"})


def setup_two_snapshots(d: Daemon, size=32 * MiB):
    """v (qcow2): data A, snapshot s1, B over all of it, snapshot s2, C over half; the
    overlays of s1 and s2 hold much (long merges)."""
    m = d.mount()
    with Client(m.mnt) as c:
        c.request("create-volume", volume="v", size=size, format="qcow2")
        a = fill(m.path("volume-v"), size, 1, step=8 * MiB)
        c.request("create-snapshot", volume="v", snapshot="s1")
        b = fill(m.path("volume-v"), size, 2, step=MiB)  # all of it
        c.request("create-snapshot", volume="v", snapshot="s2")
        with open(m.path("volume-v"), "r+b") as f:
            f.seek(4 * MiB)
            f.write(b"C" * 16 * MiB)
        cur = bytearray(b)
        cur[4 * MiB:20 * MiB] = b"C" * 16 * MiB
    return m, {"s1": bytes(a), "s2": bytes(b)}, bytes(cur)


@pytest.mark.parametrize("sid,when", [("s1", "intent"), ("s1", ("info", "v", "s1", False)),
                                      ("s1", "job"), ("s2", "job"), ("s2", 0.002)])
def test_kill9_during_delete_snapshot_and_its_merge(daemon, sid, when):
    """s1's overlay is frozen (below s2's); s2's is the active one, written meanwhile."""
    m, snaps, cur = setup_two_snapshots(daemon)
    nslots = len(cur) // BLOCK
    w = None
    if sid == "s2":
        w = Writer(m.path("volume-v"), scattered(0, nslots), nslots)
        w.start()
        w.wait_acks(10)
    try:
        if when == "job":
            # freeze the daemon the moment the reply arrives, while its merge runs
            pid = m.proc.pid
            req = Request(m.mnt, "delete-snapshot", volume="v", snapshot=sid,
                          after=lambda: os.kill(pid, signal.SIGSTOP))
            req.start()
            assert req.done.wait(60)
            assert req.error is None, req.error
            if not os.path.exists(daemon.share / ".snapfs" / "intents" / "v.json"):
                os.kill(pid, signal.SIGCONT)
                with Client(m.mnt) as c:
                    info = c.request("info", volume="v")
                assert info["state"] == "ok", info["reason"]
                raise AssertionError("the merge finished before it could be interrupted")
            killed = tick()
            daemon.kill9()
            req.join(30)
        else:
            req = Request(m.mnt, "delete-snapshot", volume="v", snapshot=sid)
            killed = kill_during(daemon, req, when)
    finally:
        if w is not None:
            w.stop()
    m = daemon.mount()
    wait_jobs(m.mnt)
    left = snapshots_everywhere(daemon, "v")
    if req.replied is not None:
        assert sid not in left, "a completed delete-snapshot came back"
    other = "s2" if sid == "s1" else "s1"
    assert other in left
    for s in left:
        assert_same(read_file(m.path(".snapshots", "volume-v", s)), snaps[s], f"snapshot {s}")
    content = read_file(m.path("volume-v"))
    if w is None:
        assert_same(content, cur, "the volume")
    else:
        point_in_time(content, w.recs, killed, killed, prior=cur, what="the volume",
                      acked_only=True)
    recover_and_check(daemon, ["v"], {"v": "qcow2"})
    # and the snapshot can be deleted (again) to the end
    with Client(m.mnt) as c:
        c.request("delete-snapshot", volume="v", snapshot=sid)
    wait_jobs(m.mnt)
    assert snapshots_everywhere(daemon, "v") == [other]


@pytest.mark.parametrize("live,when", [(False, ("file", "volume-dst.", 4 * MiB)),
                                       (True, ("file", "volume-dst.", 4 * MiB)),
                                       (True, ("exists", "volume-dst"))])
def test_kill9_during_clone(daemon, live, when):
    """Killed while copying, or (live source) after the copy is in place but before the
    temporary snapshot of the source is dropped."""
    m = daemon.mount()
    size = 64 * MiB
    with Client(m.mnt) as c:
        c.request("create-volume", volume="src", size=size, format="qcow2")
        src = fill(m.path("volume-src"), size, 3)
        c.request("create-snapshot", volume="src", snapshot="keep")
    holder = os.open(m.path("volume-src"), os.O_RDWR) if live else None  # a guest has it open
    try:
        req = Request(m.mnt, "clone", volume="dst", source_volume="src", format="qcow2")
        kill_during(daemon, req, when)
    finally:
        if holder is not None:
            try:
                os.close(holder)
            except OSError:
                pass
    m = daemon.mount()
    wait_jobs(m.mnt)
    with Client(m.mnt) as c:
        vols = c.request("list")["volumes"]
    if req.replied is not None:
        assert "dst" in vols
    # the source is as it was: its content and only its own snapshot (no temporary one)
    assert_same(read_file(m.path("volume-src")), bytes(src), "the source")
    assert snapshots_everywhere(daemon, "src") == ["keep"]
    if "dst" in vols:
        assert_same(read_file(m.path("volume-dst")), bytes(src), "the clone")
    else:  # nothing of the clone is left
        assert not os.path.exists(daemon.share / "volume-dst")
        assert not chain_files(daemon.share, "dst")
        assert not tmp_files(daemon.share)
        assert not os.path.exists(daemon.share / ".snapfs" / "volumes" / "dst.json"), \
            "a format record of the volume the crashed clone never made is left on the share"
    # Cinder retries the clone
    if "dst" not in vols:
        with Client(m.mnt) as c:
            c.request("clone", volume="dst", source_volume="src", format="qcow2")
        assert_same(read_file(m.path("volume-dst")), bytes(src), "the clone, retried")
    recover_and_check(daemon, ["src", "dst"], {"src": "qcow2", "dst": "qcow2"})


@pytest.mark.parametrize("fmt,when", [("qcow2", 0.0), ("qcow2", "intent"), ("raw", "intent"),
                                      ("qcow2", 0.05)])
def test_kill9_during_revert(daemon, fmt, when):
    m = daemon.mount()
    size = 48 * MiB
    with Client(m.mnt) as c:
        c.request("create-volume", volume="v", size=size, format=fmt)
        snap = fill(m.path("volume-v"), size, 4, step=8 * MiB)
        c.request("create-snapshot", volume="v", snapshot="s")
        cur = fill(m.path("volume-v"), size, 5, step=MiB)  # all of it changes
    req = Request(m.mnt, "revert", volume="v", snapshot="s")
    kill_during(daemon, req, when)
    m = daemon.mount()
    wait_jobs(m.mnt)
    content = read_file(m.path("volume-v"))
    if req.replied is not None:
        assert_same(content, bytes(snap), "the volume after a completed revert")
    else:
        assert content in (bytes(snap), bytes(cur)), \
            "an interrupted revert left a mix of the snapshot and the newer content: " \
            f"vs snapshot {differs(content, snap)}; vs before {differs(content, cur)}"
    assert snapshots_everywhere(daemon, "v") == ["s"]
    assert_same(read_file(m.path(".snapshots", "volume-v", "s")), bytes(snap), "snapshot s")
    recover_and_check(daemon, ["v"], {"v": fmt})


def differs(a, b) -> str:
    return first_difference(bytes(a), bytes(b))


@pytest.mark.parametrize("fmt,when", [("qcow2", 0.0), ("qcow2", "replied"), ("raw", 0.0),
                                      ("raw", 0.002)])
def test_kill9_during_extend(daemon, fmt, when):
    m = daemon.mount()
    old, new = 4 * MiB, 12 * MiB
    with Client(m.mnt) as c:
        c.request("create-volume", volume="v", size=old, format=fmt)
        data = fill(m.path("volume-v"), old, 6)
        c.request("create-snapshot", volume="v", snapshot="s")
        with open(m.path("volume-v"), "r+b") as f:
            f.write(b"\x77" * BLOCK)
        data[:BLOCK] = b"\x77" * BLOCK
    req = Request(m.mnt, "extend-volume", volume="v", size=new)
    kill_during(daemon, req, when)
    m = daemon.mount()
    got = os.path.getsize(m.path("volume-v"))
    if req.replied is not None:
        assert got == new, "a completed extend was lost"
    assert got in (old, new)
    with Client(m.mnt) as c:
        assert c.request("info", volume="v")["size"] == got
    assert_same(read_file(m.path("volume-v")), bytes(data) + bytes(got - old), "the volume")
    assert os.path.getsize(m.path(".snapshots", "volume-v", "s")) == old
    recover_and_check(daemon, ["v"], {"v": fmt})
    # the extend can be finished (or repeated) after the crash
    with Client(m.mnt) as c:
        c.request("extend-volume", volume="v", size=new)
    assert os.path.getsize(m.path("volume-v")) == new
