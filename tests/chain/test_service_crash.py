"""Crash consistency of the service's operations (CONTRACT.md section 5): kill -9 at any moment.

A prepared share (volumes of 32-64 MiB holding several MiB of data, raw and qcow2 bases,
chains of one to three snapshots, files waiting to be managed) is copied for every kill point.
A child process (``sys.executable`` running a script written to the test's tmp directory) starts
a ``VolumeService`` on the copy, prints ``start``, runs ONE control operation -- for
``delete-snapshot`` also its background merge -- and prints ``replied`` when the request
returned and ``done`` when the service is idle.  The parent SIGKILLs it at a random moment after
``start``: the delays are spread over the operation's measured duration (an undisturbed run of
the same operation, capped at 150 ms), so most kills land inside the operation.

After each kill a fresh ``VolumeService`` starts on the share (its ``running()`` recovers) and,
once idle, the share must hold either the OLD state (the prepared share) or the NEW state (the
undisturbed run's result) -- as a whole: every volume's size, base format and content, every
snapshot's size and content, and the files no volume owns, never a mix; the NEW state as soon as
the child printed ``replied`` (a completed control operation is never lost).  Besides:

- no volume is failed; nothing is left in ``.snapfs/tmp`` or ``.snapfs/intents``;
- every ``volume-<vid>*`` file is in its volume's chain or is its ``.info``; no such file exists
  for a volume that does not exist; every record under ``.snapfs/volumes`` is an existing
  volume's (a left-over record would decide the format of a future file of that name);
- ``qemu-img check`` exits 0 on every qcow2 file of every volume, and ``qemu-img convert`` of the
  active file of the volumes the operation touches equals what snapfs serves.

All kill points are run (two at a time) and every failure is reported at the end, grouped by
operation.  Knobs: ``SNAPFS_CRASH_SEED``, ``SNAPFS_CRASH_KILLS`` (kill points per operation,
default 6; 23 operations).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import select
import shutil
import subprocess
import sys
import tempfile
import time
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio

from snapfs.chain.resolve import resolve
from snapfs.chain.service import VolumeService
from tests import qemu
from tests.sharefiles import tmp_files

ROOT = Path(__file__).resolve().parents[2]
SEED = int(os.environ.get("SNAPFS_CRASH_SEED", "20241125"))
KILLS = int(os.environ.get("SNAPFS_CRASH_KILLS", "6"))
WORKERS = 2
MAX_DELAY = 0.150
MIB = 1 << 20
CHUNK = 4 * MIB

CHILD = r'''
import json, sys, time
import trio
from snapfs.chain.service import VolumeService

share, request = sys.argv[1], json.loads(sys.argv[2])

def say(word):
    sys.stdout.write(word + "\n")
    sys.stdout.flush()

async def main():
    svc = VolumeService(share)
    async with svc.running():
        say("start")
        t0 = time.perf_counter()
        await svc.handle(request)
        say("replied")
        await svc.wait_idle()
        say(f"done {time.perf_counter() - t0:.6f}")
        if svc.failed:
            say("failed " + json.dumps(svc.failed))
    say("closed")

trio.run(main)
'''

# --------------------------------------------------------------------------------------------
# the prepared share
# --------------------------------------------------------------------------------------------


def data(rng: random.Random, n: int) -> bytes:
    return rng.randbytes(n).replace(b"\0", b"\1")


async def scatter(svc: VolumeService, vid: str, rng: random.Random, total: int,
                  span: int) -> None:
    """Write ``total`` bytes of random data in 64-512 KiB pieces at random places."""
    vol = await svc.volume(vid)
    done = 0
    while done < total:
        n = rng.randrange(64 << 10, 512 << 10)
        off = rng.randrange(0, span - n)
        await vol.write(off, data(rng, n))
        done += n
    await vol.flush()
    await svc.release(vid)


async def build(root: Path) -> None:
    rng = random.Random(SEED)
    svc = VolumeService(str(root))
    async with svc.running():
        h = svc.handle
        # A: qcow2 base, 48 MiB, two snapshots, data before, between and after them
        await h({"op": "create-volume", "volume": "A", "size": 48 * MIB, "format": "qcow2"})
        await scatter(svc, "A", rng, 4 * MIB, 48 * MIB)
        await h({"op": "create-snapshot", "volume": "A", "snapshot": "a1"})
        await scatter(svc, "A", rng, 3 * MIB, 48 * MIB)
        await h({"op": "create-snapshot", "volume": "A", "snapshot": "a2"})
        await scatter(svc, "A", rng, 3 * MIB, 48 * MIB)
        # B: raw base, 32 MiB, one snapshot
        await h({"op": "create-volume", "volume": "B", "size": 32 * MIB, "format": "raw"})
        await scatter(svc, "B", rng, 4 * MIB, 32 * MIB)
        await h({"op": "create-snapshot", "volume": "B", "snapshot": "b1"})
        await scatter(svc, "B", rng, 4 * MIB, 32 * MIB)
        # C: raw, D: qcow2, no snapshots
        await h({"op": "create-volume", "volume": "C", "size": 32 * MIB, "format": "raw"})
        await scatter(svc, "C", rng, 4 * MIB, 32 * MIB)
        await h({"op": "create-volume", "volume": "D", "size": 32 * MIB, "format": "qcow2"})
        await scatter(svc, "D", rng, 4 * MIB, 32 * MIB)
        # E: qcow2, three snapshots (deleting the oldest rebases an overlay that is not active)
        await h({"op": "create-volume", "volume": "E", "size": 32 * MIB, "format": "qcow2"})
        for sid in ("e1", "e2", "e3"):
            await scatter(svc, "E", rng, 2 * MIB, 32 * MIB)
            await h({"op": "create-snapshot", "volume": "E", "snapshot": sid})
        await scatter(svc, "E", rng, 2 * MIB, 32 * MIB)
        # F: qcow2 base holding little under a big f1 overlay (deleting f1 streams the base up)
        await h({"op": "create-volume", "volume": "F", "size": 32 * MIB, "format": "qcow2"})
        await scatter(svc, "F", rng, 1 * MIB, 32 * MIB)
        await h({"op": "create-snapshot", "volume": "F", "snapshot": "f1"})
        await scatter(svc, "F", rng, 6 * MIB, 32 * MIB)
        await h({"op": "create-snapshot", "volume": "F", "snapshot": "f2"})
        await scatter(svc, "F", rng, 1 * MIB, 32 * MIB)
        # G: raw base, a small g1 overlay under a big active g2 overlay
        await h({"op": "create-volume", "volume": "G", "size": 32 * MIB, "format": "raw"})
        await scatter(svc, "G", rng, 4 * MIB, 32 * MIB)
        await h({"op": "create-snapshot", "volume": "G", "snapshot": "g1"})
        await scatter(svc, "G", rng, 1 * MIB, 32 * MIB)
        await h({"op": "create-snapshot", "volume": "G", "snapshot": "g2"})
        await scatter(svc, "G", rng, 6 * MIB, 32 * MIB)
    # files waiting to be managed
    with open(root / "import.img", "wb") as f:
        f.truncate(32 * MIB)
        for _ in range(16):
            f.seek(rng.randrange(0, 31 * MIB))
            f.write(data(rng, 256 << 10))
    qemu.img("convert", "-q", "-f", "raw", "-O", "qcow2", str(root / "import.img"),
             str(root / "import.qcow2"))
    os.rename(root / "import.img", root / "import-raw.img")
    shutil.copyfile(root / "import-raw.img", root / "import.img")


#: (name, request, volumes the operation touches)
OPS = [
    ("create-volume-qcow2", {"op": "create-volume", "volume": "N", "size": 64 * MIB,
                             "format": "qcow2"}, {"N"}),
    ("create-volume-raw", {"op": "create-volume", "volume": "N", "size": 64 * MIB,
                           "format": "raw"}, {"N"}),
    ("create-snapshot-qcow2-chain", {"op": "create-snapshot", "volume": "A", "snapshot": "a3"},
     {"A"}),
    ("create-snapshot-raw-chain", {"op": "create-snapshot", "volume": "B", "snapshot": "b2"},
     {"B"}),
    ("create-snapshot-first", {"op": "create-snapshot", "volume": "C", "snapshot": "c1"}, {"C"}),
    ("delete-snapshot-under-active", {"op": "delete-snapshot", "volume": "A", "snapshot": "a1"},
     {"A"}),
    ("delete-snapshot-active-overlay", {"op": "delete-snapshot", "volume": "A",
                                        "snapshot": "a2"}, {"A"}),
    ("delete-snapshot-only-raw", {"op": "delete-snapshot", "volume": "B", "snapshot": "b1"},
     {"B"}),
    ("delete-snapshot-oldest-of-3", {"op": "delete-snapshot", "volume": "E", "snapshot": "e1"},
     {"E"}),
    ("delete-snapshot-stream-into-base", {"op": "delete-snapshot", "volume": "F",
                                          "snapshot": "f1"}, {"F"}),
    ("delete-snapshot-stream-up-active", {"op": "delete-snapshot", "volume": "G",
                                          "snapshot": "g2"}, {"G"}),
    ("clone-volume-qcow2", {"op": "clone", "volume": "N", "source_volume": "A",
                            "format": "qcow2"}, {"N", "A"}),
    ("clone-snapshot-raw-larger", {"op": "clone", "volume": "N", "source_volume": "A",
                                   "source_snapshot": "a1", "size": 64 * MIB, "format": "raw"},
     {"N", "A"}),
    ("clone-raw-chain", {"op": "clone", "volume": "N", "source_volume": "B"}, {"N", "B"}),
    ("revert-qcow2", {"op": "revert", "volume": "A", "snapshot": "a1"}, {"A"}),
    ("revert-raw", {"op": "revert", "volume": "B", "snapshot": "b1"}, {"B"}),
    ("extend-qcow2-chain", {"op": "extend-volume", "volume": "A", "size": 64 * MIB}, {"A"}),
    ("extend-raw", {"op": "extend-volume", "volume": "C", "size": 64 * MIB}, {"C"}),
    ("extend-qcow2-grow-l1", {"op": "extend-volume", "volume": "D", "size": 1536 * MIB}, {"D"}),
    ("delete-volume-raw", {"op": "delete-volume", "volume": "C"}, {"C"}),
    ("delete-volume-qcow2", {"op": "delete-volume", "volume": "D"}, {"D"}),
    ("manage-raw", {"op": "manage", "volume": "M", "source": "import.img", "format": "raw"},
     {"M"}),
    ("manage-qcow2", {"op": "manage", "volume": "M", "source": "import.qcow2",
                      "format": "qcow2"}, {"M"}),
]

#: merges that must go up (overlay, lower file): the lower file's name ends on the overlay's inode
STREAMED_UP = {"delete-snapshot-stream-into-base": ("volume-F.f1", "volume-F"),
               "delete-snapshot-stream-up-active": ("volume-G.g2", "volume-G.g1")}

# --------------------------------------------------------------------------------------------
# the state of a share, and what must hold after recovery
# --------------------------------------------------------------------------------------------


class Problem(Exception):
    pass


ZERO_MARK = b"<zero chunk>"
ZERO = bytes(CHUNK)


class Digest:
    """sha256 of a content, 4 MiB chunk by chunk, an all-zero chunk standing for itself by a
    marker -- so that sparse regions need not be read, whatever the format."""

    def __init__(self) -> None:
        self.h = hashlib.sha256()

    def chunk(self, data: bytes | None, n: int) -> None:
        if data is None or data == (ZERO if n == CHUNK else bytes(n)):
            self.h.update(ZERO_MARK + str(n).encode())
        else:
            self.h.update(data)

    def hexdigest(self) -> str:
        return self.h.hexdigest()[:20]


async def content(img, size: int) -> str:
    """Digest of an image's guest content through its chain (zero runs are not read)."""
    d = Digest()
    for off in range(0, size, CHUNK):
        n = min(CHUNK, size - off)
        parts = await resolve(img, off, n)
        d.chunk(None if all(src is None for src, _ in parts) else await img.read(off, n), n)
    return d.hexdigest()


def file_digest(path: Path) -> str:
    """The same digest of a raw file (holes are not read)."""
    d = Digest()
    with open(path, "rb") as f:
        fd = f.fileno()
        size = os.fstat(fd).st_size
        for off in range(0, size, CHUNK):
            n = min(CHUNK, size - off)
            try:
                hole = os.lseek(fd, off, os.SEEK_DATA) >= off + n
            except OSError:  # ENXIO: no data after off
                hole = True
            d.chunk(None if hole else os.pread(fd, n, off), n)
    return d.hexdigest()


async def recover_and_describe(root: Path, touched: set[str]) -> dict:
    """Start a service on the share (recovery), wait until idle, check the invariants and
    return the state: {vid: {size, format, content, snapshots}, "unmanaged": {...}}."""
    svc = VolumeService(str(root))
    problems: list[str] = []
    state: dict = {}
    finished = False
    async with svc.running():
        await svc.wait_idle()
        for leftover in ("tmp", "intents"):
            left = tmp_files(root) if leftover == "tmp" else os.listdir(root / ".snapfs" / leftover)
            if left:
                problems.append(f".snapfs/{leftover} holds {left} after recovery")
        vids = (await svc.handle({"op": "list"}))["volumes"]
        unmanaged = (await svc.handle({"op": "list", "unmanaged": True}))["unmanaged"]
        state["unmanaged"] = {e["name"]: file_digest(root / e["name"]) for e in unmanaged}
        names = os.listdir(root)
        for n in names:
            if n.startswith("volume-") and n[len("volume-"):].split(".")[0] not in vids:
                problems.append(f"{n} belongs to no volume")
        for rec in os.listdir(root / ".snapfs" / "volumes"):
            if rec.endswith(".json") and rec[:-5] not in vids:
                problems.append(f"record .snapfs/volumes/{rec} of a volume that does not exist")
        for vid in vids:
            try:
                state[vid] = await describe_volume(svc, root, vid, vid in touched)
            except Problem as exc:
                problems.append(str(exc))
            except Exception as exc:  # noqa: BLE001 -- reported with the others
                problems.append(f"volume {vid}: {type(exc).__name__}: {exc}")
        if svc.failed:
            problems.append(f"failed volumes after recovery: {svc.failed}")
        finished = True
    if not finished:  # running() can lose an exception raised inside it
        problems.append("describing the share stopped half way (an exception was lost)")
    return state, problems


#: fingerprint of a volume's files (names and digests) -> its state, once fully checked: a
#: volume whose files are byte for byte the same as a checked one's needs no second reading
CHECKED: dict[tuple, dict] = {}


def fingerprint(root: Path, vid: str) -> tuple:
    base = f"volume-{vid}"
    names = sorted(n for n in os.listdir(root) if n == base or n.startswith(base + "."))
    rec = root / ".snapfs" / "volumes" / f"{vid}.json"
    fmt = json.loads(rec.read_text()).get("format") if rec.exists() else None
    return (vid, fmt) + tuple((n, file_digest(root / n)) for n in names)


async def describe_volume(svc: VolumeService, root: Path, vid: str, touched: bool) -> dict:
    base, info_name = f"volume-{vid}", f"volume-{vid}.info"
    info = svc.share.read_info(vid)
    meta = await svc.handle({"op": "info", "volume": vid})
    if meta.get("state") != "ok":
        raise Problem(f"volume {vid} is {meta.get('state')}: {meta.get('reason')}")
    fp = fingerprint(root, vid)
    if fp in CHECKED:
        return CHECKED[fp]
    vol = await svc.volume(vid)
    vol.users += 1
    try:
        chain = vol.names()
        files = {n for n in os.listdir(root) if n == base or n.startswith(base + ".")}
        want = set(chain) | ({info_name} if info is not None else set())
        if files != want:
            raise Problem(f"volume {vid}: files {sorted(files)} but chain {chain}"
                          f"{' + .info' if info is not None else ''}")
        if info is not None and set(info.values()) != set(chain) - {base} | {info['active']}:
            raise Problem(f"volume {vid}: .info {info} does not match the chain {chain}")
        snaps = {}
        for sid, name in sorted((info or {}).items()):
            if sid == "active":
                continue
            img = vol.below(name)
            snaps[sid] = (img.size, await content(img, img.size))
        st = {"size": vol.size, "format": vol.images[0].format,
              "content": await content(vol.top, vol.size), "snapshots": snaps}
    finally:
        vol.users -= 1
    await svc.release(vid)
    for n in chain:
        fmt = st["format"] if n == base else "qcow2"
        if fmt == "qcow2":
            rc, out = qemu.check(str(root / n))
            if rc != 0:
                raise Problem(f"qemu-img check {n}: exit {rc} {out}")
    if touched:
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "raw")
            fmt = st["format"] if chain[-1] == base else "qcow2"
            qemu.img("convert", "-U", "-f", fmt, "-O", "raw", str(root / chain[-1]), out)
            if file_digest(Path(out)) != st["content"]:
                raise Problem(f"volume {vid}: qemu-img convert of {chain[-1]} differs from "
                              "what snapfs serves")
    CHECKED[fp] = st
    return st


def describe(root: Path, touched: set[str]) -> dict:
    """The recovered state; Problem if an invariant does not hold."""
    state, problems = trio.run(recover_and_describe, root, touched)
    if problems:
        raise Problem("; ".join(problems))
    return state


def state_diff(a: dict, b: dict) -> str:
    keys = sorted(set(a) | set(b))
    return ", ".join(f"{k}: {a.get(k, '-')} vs {b.get(k, '-')}" for k in keys
                     if a.get(k) != b.get(k))


# --------------------------------------------------------------------------------------------
# running the child
# --------------------------------------------------------------------------------------------


@dataclass
class Outcome:
    said: list[str]
    returncode: int
    stderr: str


def run_child(script: Path, share: Path, request: dict, kill_after: float | None) -> Outcome:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, str(script), str(share), json.dumps(request)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    said = []
    try:
        ready, _, _ = select.select([proc.stdout], [], [], 30)
        line = proc.stdout.readline().decode().strip() if ready else ""
        if line != "start":
            proc.kill()
            _, err = proc.communicate()
            raise Problem(f"the child did not start: {line!r} {err.decode()[-2000:]}")
        said.append(line)
        if kill_after is not None:
            time.sleep(kill_after)
            proc.kill()
        out, err = proc.communicate(timeout=120)
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    said += [w for w in out.decode().splitlines() if w]
    return Outcome(said, proc.returncode, err.decode())


def copy_share(src: Path, dst: Path) -> None:
    subprocess.run(["cp", "-a", "--sparse=always", str(src), str(dst)], check=True)


# --------------------------------------------------------------------------------------------
# the test
# --------------------------------------------------------------------------------------------


def calibrate(script: Path, template: Path, work: Path, name: str, request: dict,
              touched: set[str], old_state: dict) -> tuple[str, dict | None, float, str | None]:
    """The undisturbed run: (name, new state, seconds the operation took, problem)."""
    copy_share(template, work)
    try:
        streamed = STREAMED_UP.get(name)
        upper_ino = os.stat(work / streamed[0]).st_ino if streamed else None
        out = run_child(script, work, request, None)
        if out.returncode != 0 or not any(w.startswith("done") for w in out.said):
            raise Problem(f"undisturbed run failed (exit {out.returncode}): {out.said} "
                          f"{out.stderr[-1500:]}")
        failed = [w for w in out.said if w.startswith("failed")]
        if failed:
            raise Problem(f"undisturbed run left failed volumes: {failed}")
        elapsed = float(next(w for w in out.said if w.startswith("done")).split()[1])
        new_state = describe(work, touched)
        if new_state == old_state:
            raise Problem("the undisturbed run changed nothing")
        check_new_state(name, request, old_state, new_state)
        if streamed and os.stat(work / streamed[1]).st_ino != upper_ino:
            raise Problem(f"{streamed[0]} was committed down, not streamed up")
        return name, new_state, elapsed, None
    except Problem as exc:
        return name, None, 0.0, f"[undisturbed run] {exc}"
    except Exception as exc:  # noqa: BLE001
        return name, None, 0.0, f"[undisturbed run] {type(exc).__name__}: {exc}"
    finally:
        shutil.rmtree(work, ignore_errors=True)


def kill_point(script: Path, template: Path, work: Path, name: str, request: dict,
               touched: set[str], old_state: dict, new_state: dict,
               delay: float) -> tuple[str, str | None, str]:
    """One kill: (name, problem or None, where the child was when it died)."""
    copy_share(template, work)
    try:
        out = run_child(script, work, request, delay)
        phase = ("closed" if "closed" in out.said else "done" if any(
            w.startswith("done") for w in out.said) else "replied" if "replied" in out.said
            else "in op")
        at = f"kill at {delay * 1000:.1f} ms ({phase})"
        got, problems = trio.run(recover_and_describe, work, touched)
        if phase != "in op" and got != new_state:
            problems.append(f"the completed operation was lost: {state_diff(got, new_state)}")
        elif got != old_state and got != new_state:
            problems.append(f"neither old nor new; vs old: {state_diff(got, old_state)}; "
                            f"vs new: {state_diff(got, new_state)}")
        return name, (f"{at}: " + "; ".join(problems)) if problems else None, phase
    except Problem as exc:
        return name, f"kill at {delay * 1000:.1f} ms: {exc}", "?"
    except Exception as exc:  # noqa: BLE001 -- recovery itself blew up: report, go on
        return name, f"kill at {delay * 1000:.1f} ms: {type(exc).__name__}: {exc}", "?"
    finally:
        shutil.rmtree(work, ignore_errors=True)


@pytest.mark.slow
def test_kill_anywhere(tmp_path: Path) -> None:
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    template = tmp_path / "template"
    template.mkdir()
    trio.run(build, template)
    old_state = describe(template, set())
    rng = random.Random(SEED)
    problems: dict[str, list[str]] = {}

    # workers are processes (spawned: no trio state forked), two at a time
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(WORKERS, mp_context=ctx) as pool:
        futures = [pool.submit(calibrate, script, template, tmp_path / f"calibrate-{name}",
                               name, request, touched, old_state)
                   for name, request, touched in OPS]
        plans = []
        durations = []
        for (name, request, touched), fut in zip(OPS, futures):
            _, new_state, elapsed, problem = fut.result()
            if problem:
                problems.setdefault(name, []).append(problem)
                continue
            durations.append(f"{name} {elapsed * 1000:.0f} ms")
            span = min(MAX_DELAY, max(elapsed * 1.25, 0.002))
            for k in range(KILLS):  # stratified over the operation's duration
                plans.append((name, request, touched, new_state,
                              span * (k + rng.random()) / KILLS))
        futures = [pool.submit(kill_point, script, template, tmp_path / f"kill-{i}", name,
                               request, touched, old_state, new_state, delay)
                   for i, (name, request, touched, new_state, delay) in enumerate(plans)]
        phases: dict[str, int] = {}
        for fut in futures:
            name, problem, phase = fut.result()
            phases[phase] = phases.get(phase, 0) + 1
            if problem:
                problems.setdefault(name, []).append(problem)

    print(f"\noperations (undisturbed): {', '.join(durations)}")
    print(f"{len(plans)} kill points; where the kills landed: {phases}")
    if problems:
        lines = []
        for name, ps in problems.items():
            lines.append(f"{name}: {len(ps)} problem(s)")
            lines += [f"    {p[:1500]}" for p in ps[:4]]
        pytest.fail("crash consistency problems:\n" + "\n".join(lines), pytrace=False)
    assert len(plans) >= min(100, KILLS * len(OPS)), f"only {len(plans)} kill points"


def check_new_state(name: str, request: dict, old: dict, new: dict) -> None:
    """The undisturbed run did what the operation means (so that "old or new" means something)."""
    op = request["op"]
    vid = request.get("volume")
    others = {k for k in set(old) | set(new) if k not in (vid, request.get("source_volume"),
                                                          "unmanaged")}
    for k in others:
        if old.get(k) != new.get(k):
            raise Problem(f"{op} changed volume {k}")

    def expect(cond, what):
        if not cond:
            raise Problem(f"undisturbed {name}: {what}: {new.get(vid)}")

    if op == "create-volume":
        expect(vid in new and new[vid]["size"] == request["size"]
               and new[vid]["format"] == request["format"] and not new[vid]["snapshots"],
               "not an empty volume of that size and format")
    elif op == "create-snapshot":
        snap = new[vid]["snapshots"].get(request["snapshot"])
        expect(snap == (old[vid]["size"], old[vid]["content"]), "snapshot content")
        expect({k: v for k, v in new[vid].items() if k != "snapshots"}
               == {k: v for k, v in old[vid].items() if k != "snapshots"}, "volume changed")
    elif op == "delete-snapshot":
        expect(request["snapshot"] not in new[vid]["snapshots"], "snapshot still there")
        rest = dict(old[vid]["snapshots"])
        del rest[request["snapshot"]]
        expect(new[vid]["snapshots"] == rest, "other snapshots changed")
        expect(new[vid]["content"] == old[vid]["content"], "volume content changed")
    elif op == "clone":
        src = old[request["source_volume"]]
        size, digest = ((src["size"], src["content"]) if "source_snapshot" not in request
                        else src["snapshots"][request["source_snapshot"]])
        expect(new[request["source_volume"]] == src, "the source changed")
        expect(new[vid]["size"] == request.get("size", size), "size")
        expect(new[vid]["format"] == request.get("format", "raw"), "format")
        if request.get("size", size) == size:
            expect(new[vid]["content"] == digest, "content differs from the source")
    elif op == "revert":
        size, digest = old[vid]["snapshots"][request["snapshot"]]
        if size == old[vid]["size"]:
            expect(new[vid]["content"] == digest, "content is not the snapshot's")
        expect(new[vid]["snapshots"] == old[vid]["snapshots"], "snapshots changed")
    elif op == "extend-volume":
        expect(new[vid]["size"] == request["size"], "size")
        expect(new[vid]["snapshots"] == old[vid]["snapshots"], "snapshots changed")
    elif op == "delete-volume":
        expect(vid not in new, "still there")
    elif op == "manage":
        expect(vid in new and request["source"] not in new["unmanaged"], "not managed")
        expect(new[vid]["format"] == request["format"], "format")
        expect(new[vid]["content"] == old["unmanaged"]["import-raw.img"], "content")
