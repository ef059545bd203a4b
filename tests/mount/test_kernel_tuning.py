"""What the daemon asks of the kernel for its mount (snapfs/fs/kernel.py): 1 MiB readahead
and room for 64 asynchronous requests in flight instead of FUSE's 12, read back from sysfs."""

import os
import time

from snapfs.fs.kernel import FUSECTL, MAX_BACKGROUND, READ_AHEAD_KB


def _wait_for(m, text: str, timeout: float = 20) -> None:
    end = time.monotonic() + timeout
    while text not in m.log_text():
        assert time.monotonic() < end, m.log_text()[-2000:]
        time.sleep(0.05)


def test_mount_gets_readahead_and_requests_in_flight(mounted):
    _wait_for(mounted, f"up to {MAX_BACKGROUND} requests in flight")
    dev = os.stat(mounted.mnt).st_dev
    with open(f"/sys/class/bdi/{os.major(dev)}:{os.minor(dev)}/read_ahead_kb") as f:
        assert int(f.read()) == READ_AHEAD_KB
    conn = os.path.join(FUSECTL, str((os.major(dev) << 20) | os.minor(dev)))
    with open(os.path.join(conn, "max_background")) as f:
        assert int(f.read()) == MAX_BACKGROUND
    with open(os.path.join(conn, "congestion_threshold")) as f:
        assert int(f.read()) == MAX_BACKGROUND * 3 // 4


def _heap_flags(pid: int) -> str:
    with open(f"/proc/{pid}/smaps") as f:
        lines = f.read().splitlines()
    start = next(i for i, line in enumerate(lines) if line.endswith("[heap]"))
    return next(line for line in lines[start:] if line.startswith("VmFlags:"))


def _environ(pid: int) -> list[str]:
    with open(f"/proc/{pid}/environ", "rb") as f:
        return f.read().decode(errors="replace").split("\0")


def _thp_mode() -> str:
    """The kernel's transparent huge page mode: always, madvise or never."""
    with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
        return f.read().split("[")[1].split("]")[0]


def test_daemon_heap_uses_huge_pages(mounted):
    env = _environ(mounted.proc.pid)
    assert any(e.startswith("GLIBC_TUNABLES=") and "glibc.malloc.hugetlb=1" in e for e in env)
    # glibc advises the heap only where the kernel waits for advice; with "always" it gets huge
    # pages anyway, with "never" not at all
    if _thp_mode() == "madvise":
        assert " hg" in _heap_flags(mounted.proc.pid)  # madvise(MADV_HUGEPAGE) by glibc


def test_users_own_huge_page_setting_is_kept(tmp_path, monkeypatch):
    from tests.mount.conftest import start
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.hugetlb=0")
    share = tmp_path / "share"
    share.mkdir()
    m = start(share, tmp_path / "mnt")
    try:
        assert "GLIBC_TUNABLES=glibc.malloc.hugetlb=0" in _environ(m.proc.pid)
        assert " hg" not in _heap_flags(m.proc.pid)
    finally:
        m.unmount()
