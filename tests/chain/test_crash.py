"""Crash consistency: a writer process is killed with a real SIGKILL mid-work.

A writer subprocess (``python -m tests.chain.test_crash --writer ...``, same interpreter,
PYTHONPATH = the repo) opens an engine-created image writable and runs a deterministic,
seeded stream of operations: writes of random offsets/lengths whose bytes derive from the
operation's sequence number, occasional write_zeroes (unmap or not), discard and grow-only
resize, and a ``flush()`` every few operations.  It keeps a journal:

- ``B i`` before it starts operation ``i`` (not fsync'd: SIGKILL loses no completed write(2),
  and a kill between the line and the operation only widens the uncertain window);
- ``F n`` after a ``flush()`` returned, fsync'd: operations ``0..n-1`` are durable.

Two ways to pick the moment of the kill:

- ``test_sigkill``: the parent waits until the writer reports that the image is open, sleeps
  a random 3-300 ms and kills it (``os.kill(pid, SIGKILL)``).  9 parameter sets (clusters of
  512 B and 64 KiB, extended L2 on/off, no backing file, raw or qcow2 backing file shorter or
  longer than the image), ``SNAPFS_CRASH_KILLS`` rounds each (default 6: 54 kills);
- ``test_sigkill_at_each_write``: a fixed sequence is first run to count its file writes,
  then replayed from the same starting image once per kill point n, the writer SIGKILLing
  itself just before its n-th pwrite/ftruncate -- reproducible crash points inside flush,
  copy-on-write and resize.  Seeded sequences get ~``SNAPFS_CRASH_POINTS`` (default 20) points
  spread over them; the short scripted prologue (metadata-only allocations at the end of the
  file) gets every point.  About 150 more kills.

After every kill the parent checks:

1. ``qemu-img check`` reports no corruption (exit 0 or 3: leaks are allowed after a crash);
2. the content (``qemu-img convert``, and the engine opened read-only) satisfies the criterion
   below against the model replayed from the same seeded stream;
3. opening the image with the engine writable and closing it leaves it fully clean
   (``qemu-img check`` exit 0, engine check clean, and no refcount left on clusters at or beyond
   the end of the file -- invisible to qemu-img check until the file grows past them) with
   the content unchanged.

In ``test_sigkill`` the next kill round continues on the same image from the content just
verified, with a new seed, so later rounds also run on images that have already crashed and
been repaired.

The criterion: let F be the last journalled flush (ops ``0..F-1`` durable) and K the number of
operations the writer may have started (last ``B i`` + 1).  Let M_j be the model after the
first j operations (zero-padded to the image's size: a grown range reads as zeros until
written).  The image's virtual size must be len(M_j) for some F <= j <= K, and every byte b
must equal M_j[b] for *some* F <= j <= K.  Bytes no operation after F touched are therefore
exactly the durable content; bytes an unflushed operation touched may show that operation's
data, any later one's, or what was there at F -- never anything else (stale data of a freed
or reused cluster, garbage from a half-written table, backing data over zeroed ranges...).
The criterion is per byte, not per operation, because the engine may legitimately persist a
multi-cluster write partially (e.g. in-place overwrites of owned clusters land immediately,
while newly allocated clusters only become visible when their L2 table is written).

Knobs: ``SNAPFS_CRASH_KILLS``, ``SNAPFS_CRASH_POINTS``, ``SNAPFS_CRASH_SEED``.  A failing kill
keeps the image as it was right after the crash (``crashed.qcow2`` in the test's tmp dir).
"""

from __future__ import annotations

import json
import os
import random
import select
import shutil
import signal
import struct
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests import qemu

ROOT = Path(__file__).resolve().parents[2]
KIB = 1024
MIB = 1 << 20
KILLS = int(os.environ.get("SNAPFS_CRASH_KILLS", "6"))
SEED = int(os.environ.get("SNAPFS_CRASH_SEED", "4242"))
SIZE = 2 * MIB + 1536   # not a multiple of the cluster size
MAX_SIZE = 4 * MIB      # resize never grows past this
READY_TIMEOUT = 30.0


# --------------------------------------------------------------------------------------------
# the deterministic operation stream, shared by the writer and the parent's replay
# --------------------------------------------------------------------------------------------

def op_data(seed: int, i: int, n: int) -> bytes:
    """The bytes operation ``i`` writes: derived from the seed and the sequence number."""
    return random.Random(seed * 1_000_003 + i).randbytes(n)


def scripted_ops(size: int, cs: int) -> list[tuple]:
    """A fixed prologue (seed -1): metadata-only allocations at the end of the file --
    zeroing and discarding ranges nothing ever wrote allocates L2 tables but no data, so a
    crash can leave refcounts beyond the end of the file --, then a grow and more of it."""
    f = prefill_end(size, cs) + cs // 2
    return [("zero", f, 96 * KIB, False), ("flush",),
            ("discard", f + 200 * KIB, 40 * KIB), ("flush",),
            ("resize", size + 128 * KIB), ("zero", size - 512, 100 * KIB, True), ("flush",),
            ("write", size + 64 * KIB, 1000), ("flush",)]


def prefill_end(size: int, cs: int) -> int:
    """Where the deterministic test's prefill stops (the rest of the image is untouched)."""
    return size * 3 // 5 // cs * cs


def op_stream(seed: int, size: int, cs: int):
    """Yield operations forever: ("write", off, n) | ("zero", off, n, unmap) |
    ("discard", off, n) | ("resize", new_size) | ("flush",).  Seed -1 starts with
    ``scripted_ops``."""
    if seed < 0:
        for op in scripted_ops(size, cs):
            if op[0] == "resize":
                size = op[1]
            yield op
    rng = random.Random(seed)
    until_flush = rng.randint(1, 6)
    while True:
        if until_flush == 0:
            until_flush = rng.randint(1, 6)
            yield ("flush",)
            continue
        until_flush -= 1
        r = rng.random()
        if r < 0.04:
            new = min(MAX_SIZE, size + 512 * rng.randint(1, 300))
            if new > size:
                size = new
                yield ("resize", new)
                continue
        if rng.random() < 0.5:
            off = rng.randrange(size)
        else:  # near a cluster boundary
            off = rng.randrange(size // cs + 1) * cs + rng.randint(-700, 700)
            off = min(size - 1, max(0, off))
        n = rng.choice([rng.randint(1, 600), rng.randint(1, 2 * cs + 1000),
                        rng.randint(1, 160 * KIB)])
        n = min(n, size - off)
        if r < 0.14:
            yield ("zero", off, n, rng.random() < 0.5)
        elif r < 0.21:
            yield ("discard", off, n)
        else:
            yield ("write", off, n)


def apply_model(model: bytearray, seed: int, i: int, op) -> None:
    kind = op[0]
    if kind == "write":
        _, off, n = op
        model[off:off + n] = op_data(seed, i, n)
    elif kind in ("zero", "discard"):
        off, n = op[1], op[2]
        model[off:off + n] = bytes(n)
    elif kind == "resize":
        model += bytes(op[1] - len(model))


# --------------------------------------------------------------------------------------------
# the writer (runs in the child process)
# --------------------------------------------------------------------------------------------

def _kill_at_write(n: int) -> list[int]:
    """SIGKILL this process just before its ``n``-th file write (pwrite or ftruncate).

    Not a mock: the writes really happen, and the kill is a real SIGKILL; this only picks the
    moment deterministically (the engine's I/O goes through ``os.pwrite``/``os.ftruncate``,
    looked up at call time in snapfs.io)."""
    count = [0]

    def hook(fn):
        def wrapped(*args):
            if count[0] == n:
                os.kill(os.getpid(), signal.SIGKILL)
            count[0] += 1
            return fn(*args)
        return wrapped

    os.pwrite = hook(os.pwrite)
    os.ftruncate = hook(os.ftruncate)
    return count


async def _writer(path: str, seed: int, size: int, cs: int, journal: str, kill_at: int,
                  limit: int) -> None:
    from snapfs.chain.chain import open_chain

    count = _kill_at_write(kill_at) if kill_at >= 0 else None
    img = await open_chain(path, "qcow2", writable=True)
    if img.size != size:
        raise SystemExit(f"writer: image size {img.size} != expected {size}")
    jfd = os.open(journal, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.write(1, b"ready\n")
    for i, op in enumerate(op_stream(seed, size, cs)):
        if i == limit:
            # the dry run of the deterministic test: report the writes made, leave no trace
            os.write(1, f"writes {count[0]}\n".encode())
            os._exit(0)
        os.write(jfd, f"B {i}\n".encode())
        kind = op[0]
        if kind == "write":
            await img.write(op[1], op_data(seed, i, op[2]))
        elif kind == "zero":
            await img.write_zeroes(op[1], op[2], unmap=op[3])
        elif kind == "discard":
            await img.discard(op[1], op[2])
        elif kind == "resize":
            await img.resize(op[1])
        elif kind == "flush":
            await img.flush()
            os.write(jfd, f"F {i + 1}\n".encode())
            os.fsync(jfd)


def writer_main(argv: list[str]) -> None:
    import trio

    path, seed, size, cs, journal, kill_at, limit = argv
    trio.run(_writer, path, int(seed), int(size), int(cs), journal, int(kill_at), int(limit))
    raise SystemExit("writer: the operation stream ended")  # never: it is infinite


# --------------------------------------------------------------------------------------------
# parent side
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Params:
    cs: int
    ext: bool = False
    backing: str | None = None  # "raw-long" | "raw-short" | "qcow2-long" | "qcow2-short"

    def __str__(self) -> str:
        return f"cs{self.cs}{'-ext' if self.ext else ''}-{self.backing or 'nobacking'}"


PARAMS = [
    Params(512),
    Params(512, backing="raw-long"),
    Params(512, backing="qcow2-short"),
    Params(65536),
    Params(65536, backing="raw-short"),
    Params(65536, backing="qcow2-long"),
    Params(65536, ext=True),
    Params(65536, ext=True, backing="raw-long"),
    Params(65536, ext=True, backing="qcow2-short"),
]

BACKING_SIZES = {"long": 3 * MIB + 512, "short": 1 * MIB + 2560}


def make_backing(d: Path, key: str) -> tuple[str, str, bytes]:
    """(file name, format, guest content) of a backing file filled with a pattern."""
    fmt, length = key.split("-")
    size = BACKING_SIZES[length]
    content = bytearray(random.Random(key).randbytes(size))
    content[size // 3:size // 3 + 150 * KIB] = bytes(150 * KIB)  # a hole
    content = bytes(content)
    raw = d / f"backing-{key}.raw"
    raw.write_bytes(content)
    if fmt == "raw":
        return raw.name, "raw", content
    name = f"backing-{key}.qcow2"
    qemu.img("convert", "-q", "-f", "raw", "-O", "qcow2", "-o", "cluster_size=4096", str(raw),
             str(d / name))
    raw.unlink()
    return name, "qcow2", content


def parse_journal(path: Path) -> tuple[int, int]:
    """(ops durable, ops possibly started) from the writer's journal."""
    flushed, started = 0, 0
    if path.exists():
        text = path.read_text()
        for line in text.split("\n")[:-1]:  # only complete lines
            kind, _, num = line.partition(" ")
            if kind == "F":
                flushed = max(flushed, int(num))
            elif kind == "B":
                started = max(started, int(num) + 1)
    return flushed, max(started, flushed)


def first_bad_byte(actual: bytes, states: list[bytes]) -> int | None:
    """The first byte equal to no state's byte (states already cut/padded to len(actual))."""
    chunk = 4096
    for start in range(0, len(actual), chunk):
        a = actual[start:start + chunk]
        if any(a == s[start:start + chunk] for s in states):
            continue
        for b in range(start, min(len(actual), start + chunk)):
            if not any(actual[b] == s[b] for s in states):
                return b
    return None


def describe(actual: bytes, states: list[bytes], b: int, log: list[str]) -> str:
    lines = [f"byte {b} (0x{b:x}) = {actual[b]:#04x} matches no allowed state:"]
    for j, s in enumerate(states):
        lines.append(f"  state {j}: {s[b]:#04x}  around: {s[b - 4 if b >= 4 else 0:b + 4].hex()}")
    lines.append(f"  actual around: {actual[b - 4 if b >= 4 else 0:b + 4].hex()}")
    lines.append("ops since the last flush:\n  " + "\n  ".join(log))
    return "\n".join(lines)


def engine_read(path: Path) -> bytes:
    import trio

    from snapfs.chain.chain import open_chain

    async def main():
        img = await open_chain(str(path), "qcow2", writable=False)
        try:
            return await img.read(0, img.size)
        finally:
            await img.close()

    return trio.run(main)


def engine_open_close(path: Path) -> None:
    import trio

    from snapfs.chain.chain import open_chain

    async def main():
        img = await open_chain(str(path), "qcow2", writable=True)
        await img.close()

    trio.run(main)


def engine_check(path: Path):
    import trio

    from snapfs.chain.check import check_image

    return trio.run(check_image, str(path))


def run_writer(path: Path, seed: int, size: int, cs: int, journal: Path, errlog: Path,
               delay: float) -> None:
    """Start the writer, let it run ``delay`` seconds after it opened the image, SIGKILL it."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("SNAPFS_IO", None)
    with open(errlog, "wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tests.chain.test_crash", "--writer", str(path), str(seed),
             str(size), str(cs), str(journal), "-1", "-1"],
            cwd=str(ROOT), env=env, stdout=subprocess.PIPE, stderr=err)
    try:
        ready, _, _ = select.select([proc.stdout], [], [], READY_TIMEOUT)
        line = proc.stdout.readline() if ready else b""
        if line != b"ready\n":
            proc.kill()
            proc.wait()
            raise AssertionError(f"writer did not start (exit {proc.returncode}): "
                                 f"{errlog.read_text()[-3000:]}")
        time.sleep(delay)
        if proc.poll() is not None:
            raise AssertionError(f"writer died before the kill (exit {proc.returncode}): "
                                 f"{errlog.read_text()[-3000:]}")
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        assert proc.returncode == -signal.SIGKILL, (proc.returncode, errlog.read_text()[-3000:])
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()


def refcounts_beyond_eof(path: Path) -> list[int]:
    """Clusters at or beyond the end of the file whose refcount is not zero.

    qemu-img check only compares refcounts of clusters inside the file, so these go unnoticed
    -- until the file grows past them and they show up as leaks.  A crash can leave them
    (refcount blocks are written before the new tables they count), so a repair must clear
    them; a clean close never leaves any (every cluster allocated is written by then).
    Parsed here independently of the engine (docs/interop/qcow2.txt)."""
    data = Path(path).read_bytes()
    version, = struct.unpack_from(">I", data, 4)
    cbits, = struct.unpack_from(">I", data, 20)
    rt_off, rt_clusters = struct.unpack_from(">QI", data, 48)
    order = struct.unpack_from(">I", data, 96)[0] if version >= 3 else 4
    cs, bits = 1 << cbits, 1 << order
    per = cs * 8 // bits
    end = -(-len(data) // cs)
    found: list[int] = []
    for bi in range(rt_clusters * cs // 8):
        off = struct.unpack_from(">Q", data, rt_off + 8 * bi)[0] & ~0x1FF
        first = bi * per
        if not off or first + per <= end:
            continue
        blk = data[off:off + cs].ljust(cs, b"\0")
        i0 = max(0, end - first)
        bit0 = i0 * bits
        byte0 = -(-bit0 // 8)
        entries = list(range(i0, min(per, byte0 * 8 // bits)))  # a partly covered first byte
        if blk[byte0:].count(0) != cs - byte0:
            entries += range(byte0 * 8 // bits, per)
        for i in entries:
            if bits >= 8:
                v = int.from_bytes(blk[i * bits // 8:(i + 1) * bits // 8], "big")
            else:
                v = blk[i * bits // 8] >> (i * bits % 8) & ((1 << bits) - 1)
            if v:
                found.append(first + i)
    return found


def verify_crash(path: Path, base: bytes, seed: int, cs: int, flushed: int, started: int,
                 ctx: str, stats: dict) -> bytes:
    """All checks after one kill; returns the (verified) content for the next round."""
    scratch = path.with_name("out.raw")

    # 1. no corruption, only (possibly) leaks
    rc, info = qemu.check(str(path))
    assert rc in (0, 3), f"{ctx}: qemu-img check exit {rc}: {json.dumps(info)[:3000]}"
    assert not info.get("corruptions") and not info.get("check-errors"), (ctx, info)
    stats["leaky"] += rc == 3

    # 2. replay: the durable state and every state an unflushed prefix could produce
    model = bytearray(base)
    states: list[bytes] = []
    log: list[str] = []
    for i, op in enumerate(op_stream(seed, len(base), cs)):
        if i >= started:
            break
        if i == flushed:
            states.append(bytes(model))
        apply_model(model, seed, i, op)
        if i >= flushed:
            log.append(f"{i}: {op}")
            states.append(bytes(model))
    if not states:
        states.append(bytes(model))
    stats["flushed_ops"] += flushed
    stats["unflushed_ops"] += started - flushed

    actual = qemu.to_raw(str(path), str(scratch))
    sizes = {len(s) for s in states}
    assert len(actual) in sizes, f"{ctx}: virtual size {len(actual)} not in {sorted(sizes)}"
    cut = [s[:len(actual)] + bytes(max(0, len(actual) - len(s))) for s in states]
    bad = first_bad_byte(actual, cut)
    assert bad is None, f"{ctx} (qemu-img convert): {describe(actual, cut, bad, log)}"
    via_engine = engine_read(path)
    assert via_engine == actual, f"{ctx}: the engine reads the crashed image differently"

    # 3. the engine repairs on a writable open; close leaves it clean, content unchanged
    crashed = path.with_name("crashed.qcow2")  # kept for reproduction on failure
    shutil.copyfile(path, crashed)
    ctx += f" (crashed image kept as {crashed})"
    engine_open_close(path)
    rc, info = qemu.check(str(path))
    assert rc == 0, f"{ctx}: after engine open+close, qemu-img check exit {rc}: {info}"
    res = engine_check(path)
    assert res.exit_code == 0, f"{ctx}: engine check after repair: {res.messages}"
    beyond = refcounts_beyond_eof(path)
    assert not beyond, (f"{ctx}: after repair, clusters beyond the end of the file still have "
                        f"refcounts (leaks once the file grows): {beyond[:20]}")
    after = qemu.to_raw(str(path), str(scratch))
    assert after == actual, f"{ctx}: content changed by the engine's repair"
    crashed.unlink()
    scratch.unlink()
    return after


@pytest.fixture(scope="module")
def backings(tmp_path_factory):
    d = tmp_path_factory.mktemp("crash-backings")
    return d, {k: make_backing(d, k) for k in ("raw-long", "raw-short", "qcow2-long",
                                               "qcow2-short")}


def make_image(p: Params, backings, d: Path) -> tuple[Path, bytearray]:
    """An engine-created image in ``d`` (with its backing file next to it) and its content."""
    import trio

    from snapfs.chain.image import create_qcow2

    bdir, bfiles = backings
    path = d / "disk.qcow2"
    bname = bfmt = None
    base = bytearray(SIZE)
    if p.backing:
        bname, bfmt, bcontent = bfiles[p.backing]
        os.link(bdir / bname, d / bname)  # the backing must sit next to the overlay
        shown = bcontent[:SIZE]
        base = bytearray(shown + bytes(SIZE - len(shown)))
    trio.run(lambda: create_qcow2(str(path), SIZE, cluster_size=p.cs, extended_l2=p.ext,
                                  backing_file=bname, backing_format=bfmt))
    return path, base


@pytest.mark.parametrize("p", PARAMS, ids=str)
def test_sigkill(p: Params, backings, tmp_path: Path) -> None:
    rng = random.Random(f"{SEED}-{p}")
    path, base = make_image(p, backings, tmp_path)
    stats = {"kills": 0, "flushed_ops": 0, "unflushed_ops": 0, "leaky": 0}

    for round_ in range(KILLS):
        seed = rng.randrange(1 << 30)
        journal = tmp_path / f"journal-{round_}"
        errlog = tmp_path / f"writer-{round_}.err"
        delay = rng.uniform(0.003, 0.3)
        run_writer(path, seed, len(base), p.cs, journal, errlog, delay)
        stats["kills"] += 1
        flushed, started = parse_journal(journal)
        ctx = (f"round {round_} seed {seed} delay {delay:.3f}s: {flushed} ops flushed, "
               f"{started} started")
        base = bytearray(verify_crash(path, base, seed, p.cs, flushed, started, ctx, stats))
        for f in (journal, errlog):
            f.unlink()

    assert stats["kills"] == KILLS
    print(f"{p}: {stats}")


# --------------------------------------------------------------------------------------------
# deterministic kill points: before the n-th write of a fixed operation sequence
# --------------------------------------------------------------------------------------------

EXACT_PARAMS = [  # (parameters, seed: None = a seeded stream covering every operation)
    (Params(512, backing="raw-long"), None),
    (Params(512), -1),
    (Params(65536), None),
    (Params(65536, ext=True), -1),
    (Params(65536, ext=True, backing="qcow2-short"), None),
]
EXACT_OPS = 30
EXACT_POINTS = int(os.environ.get("SNAPFS_CRASH_POINTS", "20"))


def exact_seed(size: int, cs: int) -> int:
    """The first seed whose first EXACT_OPS operations include every kind of operation and
    zero or discard a range the prefill left untouched (new L2 tables without data)."""
    for seed in range(SEED, SEED + 100_000):
        ops = [op for _, op in zip(range(EXACT_OPS), op_stream(seed, size, cs))]
        kinds = {op[0] for op in ops}
        fresh = any(op[0] in ("zero", "discard") and op[1] >= prefill_end(size, cs)
                    for op in ops)
        if fresh and kinds >= {"write", "zero", "discard", "resize", "flush"}:
            return seed
    raise AssertionError("no seed covers every operation")


def run_writer_exact(path: Path, seed: int, size: int, cs: int, journal: Path,
                     kill_at: int, limit: int) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("SNAPFS_IO", None)
    return subprocess.run(
        [sys.executable, "-m", "tests.chain.test_crash", "--writer", str(path), str(seed),
         str(size), str(cs), str(journal), str(kill_at), str(limit)],
        cwd=str(ROOT), env=env, capture_output=True, timeout=120)


async def _prefill(path: Path, cs: int) -> None:
    """Existing data for the sequence to overwrite, zero and discard (then a clean close);
    the last 40% of the image stay untouched."""
    from snapfs.chain.chain import open_chain

    img = await open_chain(str(path), "qcow2", writable=True)
    rng = random.Random(7)
    for k in range(0, prefill_end(img.size, cs) - 3 * cs, 5 * cs // 2):
        await img.write(k + rng.randrange(cs), rng.randbytes(rng.randint(1, 2 * cs)))
    await img.write_zeroes(img.size // 3, 4 * cs)
    await img.close()


@pytest.mark.parametrize("p,seed", EXACT_PARAMS,
                         ids=[f"{p}-{'scripted' if s else 'seeded'}" for p, s in EXACT_PARAMS])
def test_sigkill_at_each_write(p: Params, seed: int | None, backings, tmp_path: Path) -> None:
    """Kill the writer just before its n-th file write, for n spread over a whole fixed
    sequence (every n when the sequence makes at most SNAPFS_CRASH_POINTS writes): crash
    points inside flush (between refcount blocks, L2 tables, L1 entries, frees and the
    header's dirty bit), inside copy-on-write and inside a resize, reproducibly."""
    import trio

    path, _ = make_image(p, backings, tmp_path)
    trio.run(_prefill, path, p.cs)
    base = qemu.to_raw(str(path), str(tmp_path / "out.raw"))
    template = tmp_path / "template.qcow2"
    shutil.copyfile(path, template)
    if seed is None:
        seed = exact_seed(len(base), p.cs)
    journal = tmp_path / "journal"

    # a scripted prologue is short: kill before every one of its writes
    limit = len(scripted_ops(len(base), p.cs)) if seed < 0 else EXACT_OPS
    dry = run_writer_exact(path, seed, len(base), p.cs, journal, 1 << 62, limit)
    assert dry.returncode == 0 and dry.stdout.startswith(b"ready\nwrites "), dry
    total = int(dry.stdout.split()[-1])
    assert total > 10, dry.stdout
    step = 1 if seed < 0 else max(1, total // EXACT_POINTS)
    points = sorted(set(range(0, total, step)) | {total - 1})
    stats = {"kills": 0, "flushed_ops": 0, "unflushed_ops": 0, "leaky": 0}
    for n in points:
        shutil.copyfile(template, path)
        journal.unlink(missing_ok=True)
        proc = run_writer_exact(path, seed, len(base), p.cs, journal, n, limit)
        assert proc.returncode == -signal.SIGKILL, (n, proc)
        stats["kills"] += 1
        flushed, started = parse_journal(journal)
        ctx = (f"seed {seed}, killed before write {n} of {total}: {flushed} ops flushed, "
               f"{started} started")
        verify_crash(path, base, seed, p.cs, flushed, started, ctx, stats)
    print(f"{p}: {total} writes, {stats}")


if __name__ == "__main__" and sys.argv[1:2] == ["--writer"]:
    writer_main(sys.argv[2:])
