"""The worker threads that run share calls off the loop (snapfs/io.py): every caller gets
its own result back also when many finish at once, a call the share does not answer in
time fails with ShareTimeout and leaves the loop working, and a call cancelled before a
worker took it never runs."""

import os
import subprocess
import sys
import threading

import pytest
import trio

from snapfs import io


@pytest.fixture
def short_timeout():
    old = io.TIMEOUT
    io.set_timeout(0.5)
    yield
    io.set_timeout(old)


def test_each_caller_gets_its_own_result():
    results = {}

    async def caller(i: int) -> None:
        for k in range(20):
            results[(i, k)] = await io._call(False, "echo", lambda a, b: (a, b), i, k)

    async def main():
        with trio.fail_after(30):  # a result never handed back hangs its caller
            async with trio.open_nursery() as n:
                for i in range(40):
                    n.start_soon(caller, i)

    trio.run(main)
    assert results == {(i, k): (i, k) for i in range(40) for k in range(20)}


def test_unanswered_call_times_out_and_the_loop_goes_on(short_timeout):
    release = threading.Event()

    async def main():
        with pytest.raises(io.ShareTimeout, match="stuck: the share did not answer"):
            with trio.fail_after(5):  # the watchdog, not this, must end the call
                await io._call(False, "stuck", release.wait)
        assert await io._call(False, "after", lambda: 42) == 42
        release.set()
        await trio.sleep(0.1)  # the stuck call returns unseen
        assert await io._call(False, "after", lambda: 43) == 43

    trio.run(main)


def test_cancelled_call_that_no_worker_took_never_runs():
    release = threading.Event()
    ran = []

    async def main():
        async with trio.open_nursery() as n:
            for _ in range(io.THREADS):  # every worker busy
                n.start_soon(io._call, False, "hold", release.wait)
            await trio.sleep(0.2)
            with trio.move_on_after(0.1) as scope:
                await io._call(False, "late", ran.append, 1)
            assert scope.cancelled_caught
            release.set()
        assert await io._call(False, "next", lambda: 7) == 7

    trio.run(main)
    assert ran == []


def test_calls_made_after_the_main_task_ended_still_time_out(short_timeout):
    """An async generator trio finalizes after the main task returned (its watchdog is gone
    then) still gets ShareTimeout from a call the share does not answer."""
    release = threading.Event()
    seen = []

    async def cleanup_on_close():
        try:
            yield 1
        finally:
            with trio.CancelScope(shield=True):
                try:
                    await io._call(False, "cleanup", release.wait)
                    seen.append("returned")
                except io.ShareTimeout as exc:
                    seen.append(str(exc))

    async def main():
        await io._call(False, "warm", lambda: 1)  # the watchdog starts
        gen = cleanup_on_close()
        await gen.__anext__()
        keep.append(gen)  # left suspended: finalized once the main task returned

    keep: list = []
    unstick = threading.Timer(5, release.set)  # without a timeout the call returns then
    unstick.start()
    try:
        trio.run(main)
    finally:
        unstick.cancel()
        release.set()
    assert seen == ["cleanup: the share did not answer within 0.5 s"]


def test_workers_get_the_gil_back_quickly():
    """A worker whose call returned asks for the GIL within SWITCH_INTERVAL, not Python's
    default 5 ms, so that a loop busy with requests does not hold results back that long
    (a fresh interpreter: this one's workers may have started already)."""
    code = ("import sys, trio; from snapfs import io\n"
            "before = sys.getswitchinterval()\n"
            "async def main():\n"
            "    assert await io._call(False, 'echo', lambda: 7) == 7\n"
            "trio.run(main)\n"
            "print(before, sys.getswitchinterval(), io.SWITCH_INTERVAL)\n")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                         text=True, cwd=os.path.dirname(os.path.dirname(os.path.dirname(
                             os.path.abspath(__file__))))).stdout.split()
    before, after, wanted = map(float, out)
    assert before == pytest.approx(0.005) and after == pytest.approx(wanted) and wanted < before
