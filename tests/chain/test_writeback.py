"""Long copies (merges, clones) start the writeback of what they wrote as they go
(BlockFile.start_writeback), so that their closing sync waits for little.

What the kernel writes back is read from /proc/vmstat: 128 MiB written and left alone stay
dirty for 30 s (dirty_expire_centisecs, far below the background threshold), so seeing them
leave the dirty count within seconds shows the call started their writeback."""

import os
import time

import trio

from snapfs.io import BlockFile

MiB = 1 << 20
SIZE = 128 * MiB


def _dirty_pages() -> int:
    with open("/proc/vmstat") as f:
        for line in f:
            name, value = line.split()
            if name == "nr_dirty":
                return int(value)
    raise AssertionError("no nr_dirty in /proc/vmstat")


def test_start_writeback_writes_dirty_pages_without_a_sync(tmp_path):
    path = str(tmp_path / "file")
    chunk = os.urandom(MiB)

    async def run() -> int:
        f = await BlockFile.open(path, writable=True, create=True, mode=0o600)
        try:
            for off in range(0, SIZE, MiB):
                await f.pwrite(off, chunk)
            before = _dirty_pages()
            await f.start_writeback()
            return before
        finally:
            await f.close()

    before = trio.run(run)
    pages = SIZE // os.sysconf("SC_PAGE_SIZE")
    assert before >= pages // 2, f"only {before} dirty pages after writing {pages}"
    deadline = time.monotonic() + 20
    while _dirty_pages() > before - pages // 2:
        assert time.monotonic() < deadline, \
            f"{_dirty_pages()} pages still dirty (of {before} when writeback was asked for)"
        time.sleep(0.1)
    with open(path, "rb") as f:
        assert f.read(MiB) == chunk


def test_start_writeback_on_a_pipe_is_no_error(tmp_path):
    r, w = os.pipe()
    try:
        async def run() -> None:
            f = BlockFile(str(tmp_path / "pipe"), w, True, True)
            await f.start_writeback()
        trio.run(run)
    finally:
        os.close(r)
        os.close(w)
