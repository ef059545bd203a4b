"""Model-based tests of the volume/snapshot service (CONTRACT.md sections 1 and 3).

Hypothesis drives random sequences of control operations and guest I/O against
``VolumeService`` and an in-memory model (the bytes of every volume; per snapshot its frozen
bytes, whose length is the snapshot's size):

- guest writes (any offset and length, random / constant / all-zero patterns, write_zeroes),
  always flushed; through a volume the test holds open (as a FUSE open file would) or opened
  for the write only;
- ``create-volume`` (raw, qcow2 or the default), ``create-snapshot`` (also an id it already
  has), ``delete-snapshot`` of any snapshot (the only one, the oldest, a middle one, the newest
  = the one whose overlay is active, the one under the active file), sometimes followed at once
  by guest writes or the next operation while the background merge still runs;
- ``clone`` from a volume (also while the source is held open: the temporary-snapshot path) or
  from a snapshot, at the source's size or larger, raw / qcow2 / default format;
- ``revert`` to any snapshot, ``extend-volume`` (also to the same size), ``delete-volume``
  (EBUSY while the volume has snapshots, with nothing changed);
- restarting the service (close everything, new ``VolumeService`` on the same share).

A third of the examples run with ``SNAPFS_IO=thread`` so every share call yields to trio and the
background merge really interleaves with the guest writes that follow a ``delete-snapshot``.

After every step (after the background merges are done) the share must match the model
(qemu-img after every control operation and restart; after pure guest I/O only the service's
view, qemu-img sees those writes at the next operation):

- through the service: every volume's size and content, every snapshot's size and content
  (``vol.below(info[sid])``);
- upstream's ``.info`` shape: absent for a volume that never had a snapshot, present while it
  has some, exactly ``{"active": <chain file>, sid: "volume-<vid>.<sid>", ...}`` for the live
  snapshots (``{"active": "volume-<vid>"}`` or absent once none is left); the
  volume's chain is exactly its base plus the overlays the ``.info`` names, and the share holds
  no other ``volume-<vid>*`` file and nothing in ``.snapfs/tmp`` or ``.snapfs/intents``;
- through qemu-img: ``qemu-img check`` exits 0 on every qcow2 file, ``qemu-img convert -O
  raw`` of the active file equals the model, and each snapshot's content equals the convert of
  the file its overlay backs onto (whose name is a bare file name of the same volume).

``test_space_after_deleting_all_snapshots`` checks that merging every snapshot away leaves no
overlay behind and no bloat: the volume's files use at most what its data needs plus one
cluster per L2 table plus the qcow2 metadata of a single image.

Knobs: ``SNAPFS_SERVICE_EXAMPLES`` (default 36), ``SNAPFS_SERVICE_STEPS`` (max steps per
example, default 30), ``SNAPFS_SERVICE_SHRINK=1`` (let hypothesis shrink a failing walk; off by
default because every walk costs a second or more -- the failing walk's steps are printed
either way).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import itertools
import json
import os
import random
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import trio
from hypothesis import HealthCheck, Phase, event, given, note, settings
from hypothesis import strategies as st

from snapfs.chain.service import VolumeService
from snapfs.errors import SnapfsError
from tests import qemu
from tests.sharefiles import tmp_files

KIB = 1024
MIB = 1 << 20
CS = 64 * KIB  # the engine's default cluster size
MAX_SIZE = 10 * MIB
VIDS = ("a", "b", "c")
EXAMPLES = int(os.environ.get("SNAPFS_SERVICE_EXAMPLES", "36"))
STEPS = int(os.environ.get("SNAPFS_SERVICE_STEPS", "30"))

SHRINK = os.environ.get("SNAPFS_SERVICE_SHRINK") == "1"
SETTINGS = settings(max_examples=EXAMPLES, deadline=None, database=None,
                    phases=[p for p in Phase if SHRINK or p not in (Phase.shrink, Phase.explain)],
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# --------------------------------------------------------------------------------------------
# the model
# --------------------------------------------------------------------------------------------

VERSIONS = itertools.count(1)


@dataclass
class MVol:
    data: bytearray
    fmt: str  # the base file's format
    snaps: dict[str, bytes] = field(default_factory=dict)  # creation order
    digests: dict[str, str] = field(default_factory=dict)  # sid -> digest of its frozen bytes
    had_info: bool = False  # a snapshot (even a temporary one) was taken: a .info may exist
    version: int = field(default_factory=lambda: next(VERSIONS))  # new on every change of data

    def changed(self) -> None:
        self.version = next(VERSIONS)


def freeze(mv: MVol, sid: str) -> None:
    mv.snaps[sid] = bytes(mv.data)
    mv.digests[sid] = digest(mv.snaps[sid])
    mv.had_info = True


def digest(b) -> str:
    return hashlib.sha256(b).hexdigest()[:16]


def assert_bytes(got, want, what: str) -> None:
    """Equality of two large buffers with a short message (never a multi-MiB diff)."""
    if len(got) != len(want):
        raise AssertionError(f"{what}: length {len(got)} != expected {len(want)}")
    if got != want:
        i = next(i for i in range(0, len(want), 4096) if got[i:i + 4096] != want[i:i + 4096])
        j = next(k for k in range(i, min(i + 4096, len(want))) if got[k] != want[k])
        raise AssertionError(f"{what}: first difference at byte {j} (got "
                             f"{bytes(got[j:j + 8]).hex()}, want {bytes(want[j:j + 8]).hex()})")


def pattern(kind: str, seed: int, n: int) -> bytes:
    if kind == "random":
        return random.Random(seed).randbytes(n)
    if kind == "fill":
        return bytes([seed % 255 + 1]) * n
    return bytes(n)  # "zeros": data that happens to be all zero


# --------------------------------------------------------------------------------------------
# checking the share against the model
# --------------------------------------------------------------------------------------------

class Checker:
    def __init__(self, root: str, tmp: str):
        self.root = root
        self.tmp = tmp  # scratch space for qemu-img convert
        self.qemu = True  # False: this check skips qemu-img (after guest writes only)
        # checks that passed, keyed by the signatures (inode, size, times) of the files they
        # read and the model's state: redone only when one of those changes
        self.done: set[tuple] = set()

    def path(self, name: str) -> str:
        return os.path.join(self.root, name)

    def volume_files(self, vid: str) -> set[str]:
        b = f"volume-{vid}"
        return {n for n in os.listdir(self.root) if n == b or n.startswith(b + ".")}

    async def check(self, svc: VolumeService, model: dict[str, MVol], held: dict) -> None:
        await svc.wait_idle()
        assert not svc.jobs
        assert not svc.failed, f"service reports failed volumes: {svc.failed}"
        for leftover in ("tmp", "intents"):
            d = os.path.join(self.root, ".snapfs", leftover)
            left = tmp_files(self.root) if leftover == "tmp" else os.listdir(d)
            assert not left, f".snapfs/{leftover} not empty: {left}"
        stray = [n for n in os.listdir(self.root)
                 if n.startswith("volume-") and n.split(".")[0][len("volume-"):] not in model]
        assert not stray, f"files of volumes that do not exist: {stray}"
        for vid, mv in model.items():
            await self.check_volume(svc, vid, mv, held)

    async def check_volume(self, svc: VolumeService, vid: str, mv: MVol, held: dict) -> None:
        base = f"volume-{vid}"
        info_file = f"volume-{vid}.info"
        info = svc.share.read_info(vid)
        files = self.volume_files(vid)

        # upstream's .info
        if info is None:  # fine once no snapshot is left (upstream keeps {"active": base})
            assert not mv.snaps, f"{vid}: snapshots {list(mv.snaps)} but no .info"
            assert info_file not in files
        else:
            assert mv.had_info, f"{vid}: a .info for a volume that never had a snapshot: {info}"
            with open(self.path(info_file), "rb") as f:
                raw = json.loads(f.read())
            assert raw == info
            assert set(raw) == {"active"} | set(mv.snaps), f"{vid}: .info keys {sorted(raw)}"
            assert all(isinstance(v, str) for v in raw.values())
            for sid in mv.snaps:
                assert raw[sid] == f"volume-{vid}.{sid}", f"{vid}: .info[{sid}] = {raw[sid]}"
            if not mv.snaps:
                assert raw["active"] == base, f"{vid}: no snapshots left but active {raw['active']}"
        active = info["active"] if info else base

        # The model's state is part of every key (a coarse file timestamp alone could miss a
        # change made within the same clock tick): the snapshots' for the frozen files, also
        # the data's version for the active file.
        frozen = tuple(mv.digests.items())
        sigs = {n: self.signature(n) + frozen for n in files}
        sigs[active] += (mv.version,)

        # through the service
        vol = await svc.volume(vid)
        try:
            names = vol.names()
            assert names[0] == base and names[-1] == active, \
                f"{vid}: chain {names}, active {active}"
            chain = {base} | {v for k, v in (info or {}).items()}
            assert set(names) == chain and len(names) == len(chain), \
                f"{vid}: chain {names} != base + .info files {sorted(chain)}"
            want_files = chain | ({info_file} if info is not None else set())
            assert files == want_files, \
                f"{vid}: files on the share {sorted(files)} != {sorted(want_files)}"
            assert vol.size == len(mv.data), f"{vid}: size {vol.size} != {len(mv.data)}"
            assert_bytes(await vol.read(0, vol.size), mv.data, f"{vid}: guest content")
            for sid, snap in mv.snaps.items():
                img = vol.below(info[sid])
                below = names[:names.index(info[sid])]
                key = ("service", sid, tuple(sigs[n] for n in below), mv.digests[sid])
                if key in self.done:
                    continue  # none of the files holding it changed since it last matched
                assert img.size == len(snap), f"{vid}@{sid}: size {img.size} != {len(snap)}"
                assert_bytes(await img.read(0, img.size), snap, f"{vid}@{sid}: snapshot content")
                self.done.add(key)
        finally:
            if vid not in held:
                await svc.release(vid)

        # through qemu-img (each result kept until one of the files it read changes)
        if not self.qemu:
            return
        for n in names:
            key = ("check", sigs[n])
            if (mv.fmt if n == base else "qcow2") == "qcow2" and key not in self.done:
                rc, out = qemu.check(self.path(n))
                assert rc == 0, f"qemu-img check {n}: exit {rc}: {out}"
                self.done.add(key)
        out = os.path.join(self.tmp, "out.raw")
        key = ("convert", tuple(sigs[n] for n in names))
        if key not in self.done:
            got = qemu.to_raw(self.path(active), out, mv.fmt if active == base else "qcow2")
            assert_bytes(got, mv.data, f"{vid}: qemu-img convert of {active}")
            self.done.add(key)
        for sid, snap in mv.snaps.items():
            i = names.index(info[sid])
            key = ("snapshot", sid, tuple(sigs[n] for n in names[:i + 1]), mv.digests[sid])
            if key in self.done:
                continue
            meta = qemu.info(self.path(info[sid]))
            backing = meta.get("backing-filename")
            bfmt = meta.get("backing-filename-format")
            assert backing == names[i - 1], \
                f"{vid}@{sid}: {info[sid]} backs onto {backing!r}, not {names[i - 1]}"
            assert bfmt == (mv.fmt if backing == base else "qcow2"), \
                f"{vid}@{sid}: backing format {bfmt}"
            got = qemu.to_raw(self.path(backing), out, bfmt)
            assert_bytes(got, snap, f"{vid}@{sid}: qemu-img convert of {backing}")
            self.done.add(key)

    def signature(self, name: str) -> tuple:
        st = os.stat(self.path(name))
        return (name, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


# --------------------------------------------------------------------------------------------
# the random walk
# --------------------------------------------------------------------------------------------

def sizes(lo: int = 1 * MIB, hi: int = 8 * MIB):
    return st.one_of(st.integers(lo // MIB, hi // MIB).map(lambda k: k * MIB),
                     st.integers(lo // 512, hi // 512).map(lambda k: k * 512))


def offsets(size: int):
    """Anywhere, or close to a cluster / L2-range boundary, or close to the end."""
    return st.one_of(
        st.integers(0, size - 1),
        st.tuples(st.integers(0, (size - 1) // CS), st.integers(-600, 600))
        .map(lambda t: min(max(t[0] * CS + t[1], 0), size - 1)),
        st.integers(1, min(size, 300 * KIB)).map(lambda d: size - d),
    )


async def guest_write(svc, held, vid: str, mv: MVol, off: int, n: int, kind: str, seed: int):
    """Open (unless held open), write, flush, close -- as a guest's open file does."""
    vol = held.get(vid) or await svc.volume(vid)
    vol.users += 1
    try:
        if kind == "write_zeroes":
            await vol.write_zeroes(off, n)
            mv.data[off:off + n] = bytes(n)
            mv.changed()
        else:
            buf = pattern(kind, seed, n)
            await vol.write(off, buf)
            mv.data[off:off + n] = buf
            mv.changed()
        await vol.flush()
    finally:
        vol.users -= 1
        if vid not in held:
            await svc.release(vid)


async def expect(svc, request: dict, errno_name: str | None):
    note(f"  request {request}")
    if errno_name is None:
        return await svc.handle(request)
    with pytest.raises(SnapfsError) as ei:
        await svc.handle(request)
    assert ei.value.errno_name == errno_name, f"{request}: {ei.value.errno_name} {ei.value.message}"
    assert ei.value.errno == getattr(errno, errno_name)
    return None


RESTART, NO_CHECK, CHECK, LIGHT_CHECK = "restart", "no check", "check", "light check"


async def run_walk(root: str, scratch: str, data) -> None:
    model: dict[str, MVol] = {}
    checker = Checker(root, scratch)
    counter = iter(range(10 ** 6))
    steps = data.draw(st.integers(min(12, STEPS), STEPS), label="steps")
    step = 0
    while step < steps:
        svc = VolumeService(root)
        note(f"[service start, step {step}]")
        error = None
        async with svc.running():
            # A failure is carried out of running() by hand: running() can lose an exception
            # raised in its body (see the module's report of snapfs bugs).
            try:
                held: dict = {}  # vid -> Volume the "guest" keeps open
                while step < steps:
                    step += 1
                    then = await one_step(svc, model, held, data, counter)
                    if then == RESTART:
                        break
                    if then == NO_CHECK:  # go on while the merge may still run
                        continue
                    # qemu-img after every control operation; after guest I/O the service's
                    # view is checked (qemu-img sees those writes at the next operation)
                    checker.qemu = then == CHECK
                    await checker.check(svc, model, held)
                    checker.qemu = True
                for vid, vol in held.items():
                    vol.users -= 1
                    await svc.release(vid)
                await checker.check(svc, model, {})
            except trio.Cancelled:
                raise
            except BaseException as exc:  # noqa: BLE001 -- re-raised below
                error = exc
        if error is not None:
            raise error
    # one last time on a service that starts on the final share (nothing to recover)
    svc = VolumeService(root)
    finished = False
    async with svc.running():
        await checker.check(svc, model, {})
        finished = True
    assert finished, "VolumeService.running() swallowed an exception raised inside it"


async def one_step(svc, model, held, data, counter):
    """One random step; returns what to do next: RESTART, NO_CHECK, CHECK or LIGHT_CHECK."""
    free = [v for v in VIDS if v not in model]
    ops = []
    if free:
        ops += ["create-volume"] * (6 if len(model) < 2 else 1)
    if model:
        ops += ["write"] * 5 + ["create-snapshot"] * 4 + ["snapshot-series"] * 2 + [
            "extend-volume", "delete-volume", "hold", "hold", "restart"]
        if free:
            ops += ["clone"] * 2
    if any(m.snaps for m in model.values()):
        ops += ["delete-snapshot"] * 5 + ["revert"] * 2 + (["clone-snapshot"] if free else [])
    op = data.draw(st.sampled_from(ops), label="op")
    event(f"op {op}")
    vids = sorted(model)
    snapped = [v for v in vids if model[v].snaps]

    if op == "create-volume":
        vid = data.draw(st.sampled_from(free), label="vid")
        size = data.draw(sizes(), label="size")
        fmt = data.draw(st.sampled_from([None, "raw", "qcow2", "qcow2"]), label="format")
        req = {"op": "create-volume", "volume": vid, "size": size}
        if fmt:
            req["format"] = fmt
        note(f"create-volume {vid} {size} {fmt}")
        await expect(svc, req, None)
        model[vid] = MVol(bytearray(size), fmt or "raw")
        return CHECK

    if op == "restart":
        note("restart")
        return RESTART

    if op == "hold":
        vid = data.draw(st.sampled_from(vids), label="vid")
        if vid in held:
            note(f"close {vid}")
            vol = held.pop(vid)
            vol.users -= 1
            await svc.release(vid)
        else:
            note(f"open {vid}")
            vol = await svc.volume(vid)
            vol.users += 1
            held[vid] = vol
        return LIGHT_CHECK

    if op == "write":
        vid = data.draw(st.sampled_from(vids), label="vid")
        mv = model[vid]
        for _ in range(data.draw(st.integers(1, 3), label="writes")):
            await write_step(svc, held, vid, mv, data)
        return LIGHT_CHECK

    if op == "create-snapshot":
        vid = data.draw(st.sampled_from(vids), label="vid")
        mv = model[vid]
        again = bool(mv.snaps) and data.draw(st.integers(0, 9), label="again") == 0
        if again:
            sid = data.draw(st.sampled_from(list(mv.snaps)), label="sid")
        else:
            sid = data.draw(st.sampled_from(["short", "uuid", "tmp-snap"]), label="id kind")
            n = next(counter)
            sid = {"short": f"s{n}", "uuid": str(uuid.UUID(int=n + 1)),
                   "tmp-snap": f"tmp-snap-{uuid.UUID(int=n + 1)}"}[sid]
        note(f"create-snapshot {vid} {sid}{' (again)' if again else ''}")
        await expect(svc, {"op": "create-snapshot", "volume": vid, "snapshot": sid}, None)
        if not again:
            freeze(mv, sid)
        return CHECK

    if op == "snapshot-series":
        # several snapshots of one volume with writes in between: long chains
        vid = data.draw(st.sampled_from(vids), label="vid")
        mv = model[vid]
        for _ in range(data.draw(st.integers(2, 5), label="snapshots")):
            for _ in range(data.draw(st.integers(0, 2), label="writes")):
                await write_step(svc, held, vid, mv, data)
            sid = f"s{next(counter)}"
            note(f"create-snapshot {vid} {sid}")
            await expect(svc, {"op": "create-snapshot", "volume": vid, "snapshot": sid}, None)
            freeze(mv, sid)
        return CHECK

    if op == "delete-snapshot":
        # prefer the volumes with the longest chains
        by_len = sorted(snapped, key=lambda v: -len(model[v].snaps))
        vid = data.draw(st.sampled_from(by_len[:1] * 3 + by_len), label="vid")
        mv = model[vid]
        sids = list(mv.snaps)
        k = len(sids)
        # position first, so that every position is drawn about as often as the others
        positions = {"only": [0]} if k == 1 else {
            "newest (active overlay)": [k - 1], "under the active": [k - 2],
            "oldest": [0] if k > 2 else [], "middle": list(range(1, k - 2))}
        where = data.draw(st.sampled_from(sorted(p for p, ix in positions.items() if ix)),
                          label="position")
        i = data.draw(st.sampled_from(positions[where]), label="which")
        sid = sids[i]
        after = data.draw(st.sampled_from(["wait", "writes", "next-op"]), label="then")
        note(f"delete-snapshot {vid} {sid} [{where}], then {after}")
        event(f"delete-snapshot: {where} ({model[vid].fmt} base)")
        await expect(svc, {"op": "delete-snapshot", "volume": vid, "snapshot": sid}, None)
        del mv.snaps[sid], mv.digests[sid]
        if after == "writes":
            # guest writes while the merge runs in the background
            for _ in range(data.draw(st.integers(1, 4), label="writes")):
                await write_step(svc, held, vid, mv, data)
                await trio.sleep(0)
        return NO_CHECK if after == "next-op" else CHECK

    if op == "revert":
        vid = data.draw(st.sampled_from(snapped), label="vid")
        mv = model[vid]
        sid = data.draw(st.sampled_from(list(mv.snaps)), label="sid")
        note(f"revert {vid} to {sid}{' (held open)' if vid in held else ''}")
        await expect(svc, {"op": "revert", "volume": vid, "snapshot": sid}, None)
        snap = mv.snaps[sid]
        mv.data[:] = snap + bytes(len(mv.data) - len(snap))
        mv.changed()
        return CHECK

    if op == "extend-volume":
        vid = data.draw(st.sampled_from(vids), label="vid")
        mv = model[vid]
        grow = data.draw(st.one_of(st.just(0), st.integers(1, 6 * 1024).map(lambda k: k * 512)),
                         label="grow")
        size = min(len(mv.data) + grow, MAX_SIZE)
        note(f"extend-volume {vid} {len(mv.data)} -> {size}{' (held open)' if vid in held else ''}")
        await expect(svc, {"op": "extend-volume", "volume": vid, "size": size}, None)
        mv.data += bytes(size - len(mv.data))
        mv.changed()
        return CHECK

    if op == "delete-volume":
        vid = data.draw(st.sampled_from(vids), label="vid")
        mv = model[vid]
        if vid in held:
            vol = held.pop(vid)
            vol.users -= 1
            await svc.release(vid)
        note(f"delete-volume {vid}{' (has snapshots: EBUSY)' if mv.snaps else ''}")
        if mv.snaps:
            await expect(svc, {"op": "delete-volume", "volume": vid}, "EBUSY")
        else:
            await expect(svc, {"op": "delete-volume", "volume": vid}, None)
            del model[vid]
        return CHECK

    if op in ("clone", "clone-snapshot"):
        vid = data.draw(st.sampled_from(free), label="new vid")
        if op == "clone":
            src = data.draw(st.sampled_from(vids), label="source")
            sid = None
            content = bytes(model[src].data)
        else:
            src = data.draw(st.sampled_from(snapped), label="source")
            sid = data.draw(st.sampled_from(list(model[src].snaps)), label="source snapshot")
            content = model[src].snaps[sid]
        grow = data.draw(st.one_of(st.none(), st.just(0),
                                   st.integers(1, 4 * 1024).map(lambda k: k * 512)), label="grow")
        fmt = data.draw(st.sampled_from([None, "raw", "qcow2", "qcow2"]), label="format")
        req = {"op": "clone", "volume": vid, "source_volume": src}
        if sid is not None:
            req["source_snapshot"] = sid
        size = len(content)
        if grow is not None:
            size = min(len(content) + grow, max(MAX_SIZE, len(content)))
            req["size"] = size
        if fmt:
            req["format"] = fmt
        live = sid is None and src in held
        event(f"clone: {'live ' if live else ''}{'snapshot' if sid else 'volume'}")
        note(f"clone {vid} from {src}{'@' + sid if sid else ''}{' (live source)' if live else ''}"
             f" size {size} format {fmt}")
        res = await expect(svc, req, None)
        assert res["size"] == size
        model[vid] = MVol(bytearray(content + bytes(size - len(content))), fmt or "raw")
        if live:
            model[src].had_info = True  # the temporary snapshot leaves upstream's .info behind
        return CHECK

    raise AssertionError(op)


async def write_step(svc, held, vid, mv, data) -> None:
    size = len(mv.data)
    off = data.draw(offsets(size), label="offset")
    n = data.draw(st.one_of(st.integers(1, 4 * KIB), st.integers(1, 300 * KIB),
                            st.sampled_from([CS, 2 * CS, 512])), label="length")
    n = min(n, size - off)
    kind = data.draw(st.sampled_from(["random", "random", "fill", "zeros", "write_zeroes"]),
                     label="pattern")
    seed = data.draw(st.integers(0, 2 ** 16), label="seed")
    note(f"  write {vid} [{off}, +{n}) {kind}")
    await guest_write(svc, held, vid, mv, off, n, kind, seed)


def trio_run(fn, *args):
    """trio.run, with a lone exception out of a nursery unwrapped (so hypothesis sees its own
    control exceptions and a failure reads as itself)."""
    try:
        return trio.run(fn, *args)
    except BaseExceptionGroup as eg:
        exc = eg
        while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
            exc = exc.exceptions[0]
        if exc is eg:
            raise
        raise exc from None


@contextlib.contextmanager
def io_mode(mode: str):
    old = os.environ.get("SNAPFS_IO")
    os.environ["SNAPFS_IO"] = mode
    try:
        yield
    finally:
        if old is None:
            del os.environ["SNAPFS_IO"]
        else:
            os.environ["SNAPFS_IO"] = old


@SETTINGS
@given(data=st.data())
def test_service_model(data) -> None:
    mode = data.draw(st.sampled_from(["inline", "inline", "thread"]), label="SNAPFS_IO")
    with tempfile.TemporaryDirectory(prefix="snapfs-model-") as top, io_mode(mode):
        root, scratch = os.path.join(top, "share"), os.path.join(top, "scratch")
        os.mkdir(root)
        os.mkdir(scratch)
        trio_run(run_walk, root, scratch, data)


# --------------------------------------------------------------------------------------------
# space after merging every snapshot away
# --------------------------------------------------------------------------------------------

def used_bytes(root: Path, vid: str) -> int:
    b = f"volume-{vid}"
    return sum(os.stat(root / n).st_blocks * 512 for n in os.listdir(root)
               if n == b or n.startswith(b + "."))


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
@pytest.mark.parametrize("order", ["oldest-first", "newest-first", "middle-first", "no-wait"])
async def test_space_after_deleting_all_snapshots(share: Path, fmt: str, order: str) -> None:
    size = 8 * MIB
    rng = random.Random(f"{fmt}-{order}")
    model = bytearray(size)
    svc = VolumeService(str(share))
    finished = False
    async with svc.running():
        await svc.handle({"op": "create-volume", "volume": "v", "size": size, "format": fmt})
        sids = []
        for i in range(5):
            vol = await svc.volume("v")
            # some fresh clusters, some overwrites of what earlier snapshots hold
            for _ in range(12):
                if i and rng.random() < 0.5:
                    off = rng.randrange(0, 3 * MIB)
                else:
                    off = rng.randrange(0, size - 256 * KIB)
                n = rng.randrange(1, 200 * KIB)
                buf = rng.randbytes(n).replace(b"\0", b"\1")  # no zero bytes
                await vol.write(off, buf)
                model[off:off + n] = buf
            await vol.flush()
            await svc.release("v")
            if i < 4:
                sid = f"snap-{i}"
                await svc.handle({"op": "create-snapshot", "volume": "v", "snapshot": sid})
                sids.append(sid)
        if order == "newest-first":
            sids.reverse()
        elif order == "middle-first":
            sids = [sids[2], sids[1], sids[3], sids[0]]
        for sid in sids:
            await svc.handle({"op": "delete-snapshot", "volume": "v", "snapshot": sid})
            if order != "no-wait":
                await svc.wait_idle()
        await svc.wait_idle()
        assert not svc.failed, svc.failed
        vol = await svc.volume("v")
        assert_bytes(await vol.read(0, size), model, "content after merging")
        await svc.release("v")
        finished = True
    assert finished, "VolumeService.running() swallowed an exception raised inside it"

    files = sorted(n for n in os.listdir(share) if n.startswith("volume-"))
    assert files in (["volume-v"], ["volume-v", "volume-v.info"]), f"leftover files: {files}"
    if "volume-v.info" in files:
        assert json.loads((share / "volume-v.info").read_text()) == {"active": "volume-v"}
    if fmt == "qcow2":
        rc, out = qemu.check(str(share / "volume-v"))
        assert rc == 0, out
    with tempfile.TemporaryDirectory() as tmp:
        assert_bytes(qemu.to_raw(str(share / "volume-v"), os.path.join(tmp, "o"), fmt), model,
                     "qemu-img convert")

    data_clusters = sum(1 for c in range(0, size, CS) if any(model[c:c + CS]))
    l2_tables = -(-size // (CS * CS // 8))
    l1_clusters = -(-l2_tables * 8 // CS)
    # header + refcount table + refcount block + L1 + the L2 tables
    single_meta = (3 + l1_clusters + l2_tables) * CS if fmt == "qcow2" else 0
    info_file = 4 * KIB
    needed = data_clusters * CS
    limit = needed + l2_tables * CS + single_meta + info_file
    used = used_bytes(share, "v")
    assert used <= limit, (f"{fmt}/{order}: the volume's files use {used} bytes, its data needs "
                           f"{needed} (+{limit - needed} allowed): {used - limit} bytes of bloat")
