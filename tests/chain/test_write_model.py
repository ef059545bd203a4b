"""Model-based write tests: random operation sequences against an in-memory bytearray.

Hypothesis draws lists of operations (writes of any offset/length -- 1 byte, unaligned,
straddling clusters, subclusters and L2 tables, the image end and the backing file's end --,
write_zeroes with and without unmap, discard, grow-only resize, flush, read-back checks and
close/reopen).  Offsets are drawn symbolically (an anchor such as "a cluster boundary" or "the
end of the backing file", an index and a small delta) and resolved against the image's
geometry when the operation runs, so one strategy serves every cluster size.

Each sequence runs on

- images created by the engine (``create_qcow2``): cluster sizes 512/4096/16384/65536,
  extended L2 on/off, refcount widths 1/16/64, no backing file or a raw/qcow2 backing file
  (filled with a pattern, shorter and longer than the overlay);
- images created by qemu-img: compat=0.10 (v2) and 1.1, several cluster sizes, extended L2,
  ``preallocation=metadata``, compressed clusters (``convert -c``, zlib and zstd), an internal
  snapshot (``qemu-img snapshot -c``), a qemu-made overlay, all pre-filled with qemu-io.

After every sequence the image is closed and must be clean for ``qemu-img check`` (exit 0) and
the engine's own check, with no refcount on clusters beyond the end of the file (a leak
qemu-img check only sees once the file grows); ``qemu-img convert -O raw`` must equal the
model, the engine must read the model back after a reopen, and for the snapshot images the
snapshot's content must be untouched.

``test_no_per_byte_loop`` proves big requests are handled per cluster (or per extent), never per
byte or per 512-byte sector: it counts Python function calls with cProfile (no timing).

Knob: ``SNAPFS_MODEL_EXAMPLES`` (hypothesis examples per parametrized case, default 25).
"""

from __future__ import annotations

import cProfile
import itertools
import os
import pstats
import random
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st

from snapfs.chain.chain import open_chain
from snapfs.chain.check import check_image
from snapfs.chain.image import create_qcow2
from tests import qemu
from tests.chain.test_crash import refcounts_beyond_eof

KIB = 1024
MIB = 1 << 20
EXAMPLES = int(os.environ.get("SNAPFS_MODEL_EXAMPLES", "25"))
MAX_SIZE = 5 * MIB  # resize never grows past this

SETTINGS = settings(max_examples=EXAMPLES, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# --------------------------------------------------------------------------------------------
# data helpers
# --------------------------------------------------------------------------------------------

def pattern(seed: int, n: int) -> bytes:
    return random.Random(seed).randbytes(n)


def compressible(seed: int, n: int) -> bytes:
    """Position-dependent text that deflates well (so convert -c really compresses)."""
    out = bytearray()
    i = 0
    while len(out) < n:
        out += f"<{seed}:{i:08x}>".encode() * 16
        i += 1
    return bytes(out[:n])


def sparse_pattern(seed: int, n: int) -> bytes:
    """A pattern with holes of zeros (which convert leaves unallocated in a qcow2 backing)."""
    buf = bytearray(pattern(seed, n))
    rng = random.Random(seed + 1)
    for _ in range(max(1, n // (256 * KIB))):
        off = rng.randrange(n)
        ln = rng.randint(1, 200 * KIB)
        buf[off:off + ln] = bytes(len(buf[off:off + ln]))
    return bytes(buf)


def first_diff(a: bytes, b: bytes) -> str:
    if len(a) != len(b):
        return f"lengths differ: {len(a)} != {len(b)}"
    lo, hi = 0, len(a)
    # bisect on whole slices (C speed) to find the first differing byte
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if a[lo:mid] != b[lo:mid]:
            hi = mid
        else:
            lo = mid
    i = lo
    j = i
    while j < len(a) and a[j] != b[j]:
        j += 1
    return (f"first difference at {i} (0x{i:x}), {j - i} bytes: "
            f"got {a[i:i + 8].hex()} want {b[i:i + 8].hex()}")


def assert_same(got: bytes, want: bytes, what: str) -> None:
    if got != want:
        raise AssertionError(f"{what}: {first_diff(bytes(got), bytes(want))}")


# --------------------------------------------------------------------------------------------
# configurations
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Backing:
    name: str
    fmt: str
    size: int
    kind: str  # how it is made: "raw" or "qcow2"
    qcow2_opts: tuple = ()


BACKINGS = {
    # raw, shorter than the overlays, size not even a multiple of 512
    "raw-short": Backing("b-short.raw", "raw", 1 * MIB + 777, "raw"),
    "raw-long": Backing("b-long.raw", "raw", 3 * MIB + 512, "raw"),
    "qcow2-short": Backing("b-short.qcow2", "qcow2", 1 * MIB + 2560, "qcow2",
                           ("cluster_size=65536",)),
    "qcow2-long": Backing("b-long.qcow2", "qcow2", 3 * MIB + 512, "qcow2",
                          ("cluster_size=4096",)),
}


@dataclass(frozen=True)
class EngineCfg:
    cs: int
    ext: bool = False
    rbits: int = 16
    backing: str | None = None
    size: int = 2 * MIB + 1536

    def __str__(self) -> str:
        return (f"cs{self.cs}{'-ext' if self.ext else ''}-rb{self.rbits}"
                f"-{self.backing or 'nobacking'}-{self.size}")


ENGINE_CFGS = [
    EngineCfg(512),
    EngineCfg(512, rbits=1, backing="raw-short"),
    EngineCfg(512, rbits=64, backing="qcow2-long", size=2 * MIB),
    EngineCfg(4096, rbits=16, backing="raw-long"),
    EngineCfg(4096, rbits=64, backing="qcow2-short"),
    EngineCfg(4096, rbits=1),
    EngineCfg(65536, size=2 * MIB),
    EngineCfg(65536, rbits=1, backing="qcow2-short"),
    EngineCfg(65536, rbits=64, backing="raw-long"),
    EngineCfg(65536, ext=True),
    EngineCfg(65536, ext=True, rbits=64, backing="raw-short"),
    EngineCfg(65536, ext=True, rbits=1, backing="qcow2-long"),
    EngineCfg(16384, ext=True, backing="raw-long", size=2 * MIB),
]


@dataclass(frozen=True)
class QemuCfg:
    name: str
    opts: tuple
    prefill: str = "scatter"  # scatter | compressed | none
    snapshot: str = ""  # "" | "fresh" (L2 tables still shared with it) | "diverged"
    backing: str | None = None
    size: int = 2 * MIB

    def __str__(self) -> str:
        return self.name


QEMU_CFGS = [
    QemuCfg("v2-64k", ("compat=0.10", "cluster_size=65536")),
    QemuCfg("v2-4k", ("compat=0.10", "cluster_size=4096"), size=2 * MIB + 1536),
    QemuCfg("v3-512", ("compat=1.1", "cluster_size=512")),
    QemuCfg("v3-64k-rb1", ("compat=1.1", "cluster_size=65536", "refcount_bits=1")),
    QemuCfg("v3-4k-rb64", ("compat=1.1", "cluster_size=4096", "refcount_bits=64")),
    QemuCfg("extl2-64k", ("cluster_size=65536", "extended_l2=on")),
    QemuCfg("extl2-16k", ("cluster_size=16384", "extended_l2=on"), size=2 * MIB + 1536),
    QemuCfg("prealloc-64k", ("cluster_size=65536", "preallocation=metadata")),
    QemuCfg("prealloc-4k-v2", ("compat=0.10", "cluster_size=4096", "preallocation=metadata")),
    QemuCfg("prealloc-extl2", ("cluster_size=65536", "extended_l2=on",
                               "preallocation=metadata")),
    QemuCfg("compressed-zlib-64k", ("cluster_size=65536",), prefill="compressed"),
    QemuCfg("compressed-zlib-4k", ("cluster_size=4096",), prefill="compressed"),
    QemuCfg("compressed-zstd-64k", ("cluster_size=65536", "compression_type=zstd"),
            prefill="compressed"),
    QemuCfg("compressed-extl2", ("cluster_size=32768", "extended_l2=on"), prefill="compressed"),
    QemuCfg("snapshot-v3-4k", ("cluster_size=4096",), snapshot="diverged"),
    QemuCfg("snapshot-v3-4k-fresh", ("cluster_size=4096",), snapshot="fresh"),
    QemuCfg("snapshot-512", ("cluster_size=512",), snapshot="diverged"),
    QemuCfg("snapshot-v2-64k-fresh", ("compat=0.10", "cluster_size=65536"), snapshot="fresh"),
    QemuCfg("snapshot-extl2-fresh", ("cluster_size=65536", "extended_l2=on"), snapshot="fresh"),
    QemuCfg("snapshot-compressed", ("cluster_size=65536",), prefill="compressed",
            snapshot="diverged"),
    QemuCfg("overlay-qcow2-long", ("cluster_size=65536",), backing="qcow2-long"),
    QemuCfg("overlay-raw-short-extl2", ("cluster_size=65536", "extended_l2=on"),
            backing="raw-short"),
]


# --------------------------------------------------------------------------------------------
# the shared directory: backing files and qemu-made templates, made once per module
# --------------------------------------------------------------------------------------------

class Env:
    """Backing files and qemu-made templates (a plain class: hypothesis prints it by repr)."""

    def __init__(self, d: Path):
        self.d = d
        self.backing_content: dict[str, bytes] = {}
        self.templates: dict[str, tuple[Path, bytes]] = {}  # QemuCfg name -> (path, content)
        self.snapshots: dict[str, bytes] = {}                # QemuCfg name -> snap1 content
        self.counter = itertools.count()

    def __repr__(self) -> str:
        return f"Env({str(self.d)!r})"

    def fresh(self, suffix: str = ".qcow2") -> Path:
        return self.d / f"ex{next(self.counter)}{suffix}"


def make_backing(d: Path, key: str) -> bytes:
    b = BACKINGS[key]
    seed = sum(key.encode())
    if b.kind == "raw":
        content = pattern(seed, b.size)
        (d / b.name).write_bytes(content)
        return content
    content = sparse_pattern(seed, b.size)
    src = d / (b.name + ".src")
    src.write_bytes(content)
    argv = ["convert", "-q", "-f", "raw", "-O", "qcow2"]
    for o in b.qcow2_opts:
        argv += ["-o", o]
    qemu.img(*argv, str(src), str(d / b.name))
    src.unlink()
    return content


def overlay_view(backing: bytes | None, size: int) -> bytearray:
    """What an empty overlay of ``size`` bytes shows over ``backing``."""
    if backing is None:
        return bytearray(size)
    shown = bytearray(backing[:size])
    shown += bytes(size - len(shown))
    return shown


def scatter_cmds(seed: int, size: int, cs: int) -> list[str]:
    """qemu-io commands leaving allocated, zeroed (both kinds) and discarded clusters."""
    rng = random.Random(seed)
    cmds = [f"write -P 0x5a 0 {min(cs, size)}"]
    if 2 * cs < size:
        cmds.append(f"write -P 0x33 {cs - 100} {cs + 300}")
    for i in range(12):
        off = rng.randrange(0, size - 1) & ~511
        ln = min(rng.randint(1, 3 * cs + 777) + 511 & ~511, size - off)
        cmds.append(f"write -P {0x10 + i * 7} {off} {ln}")
    for unmap in ("", "-u "):
        off = rng.randrange(0, size // cs) * cs
        cmds.append(f"write -z {unmap}{off} {min(2 * cs, size - off)}")
    off = rng.randrange(0, size // cs) * cs
    cmds.append(f"discard {off} {min(cs, size - off)}")
    cmds.append(f"write -P 0x77 {size - 512} 512")
    return cmds


def make_template(env: Env, cfg: QemuCfg) -> None:
    d = env.d
    path = d / f"tpl-{cfg.name}.qcow2"
    cs = 65536
    for o in cfg.opts:
        if o.startswith("cluster_size="):
            cs = int(o.split("=")[1])
    if cfg.prefill == "compressed":
        src = d / f"tpl-{cfg.name}.src"
        data = bytearray(compressible(len(cfg.name), cfg.size))
        # a few incompressible stretches (stored uncompressed) and holes
        data[cs:cs + 3000] = pattern(5, 3000)
        data[3 * cs:5 * cs] = bytes(2 * cs)
        src.write_bytes(bytes(data))
        argv = ["convert", "-q", "-c", "-f", "raw", "-O", "qcow2"]
        for o in cfg.opts:
            argv += ["-o", o]
        qemu.img(*argv, str(src), str(path))
        src.unlink()
        rc, info = qemu.check(str(path))
        assert rc == 0 and info.get("compressed-clusters", 0) > 0, info
    else:
        b = BACKINGS[cfg.backing] if cfg.backing else None
        qemu.create(str(path), cfg.size, *cfg.opts, backing=b.name if b else None,
                    backing_fmt=b.fmt if b else None)
        if cfg.prefill == "scatter":
            qemu.io(str(path), *scatter_cmds(len(cfg.name), cfg.size, cs))
    if cfg.snapshot:
        qemu.img("snapshot", "-c", "snap1", str(path))
        env.snapshots[cfg.name] = qemu.to_raw(str(path), str(d / "snap.raw"))
        if cfg.snapshot == "diverged":
            # some clusters (and L2 tables) stay shared with the snapshot, some do not
            qemu.io(str(path), f"write -P 0xc3 {cs // 2} {2 * cs}", f"write -z {4 * cs} {cs}",
                    f"discard {6 * cs} {cs}")
        snap = _snapshot_raw(path, d / "snap.raw")
        assert_same(snap, env.snapshots[cfg.name], "snapshot content after divergence")
    rc, info = qemu.check(str(path))
    assert rc == 0, info
    env.templates[cfg.name] = (path, qemu.to_raw(str(path), str(d / "tpl.raw")))


def _snapshot_raw(path: Path, out: Path) -> bytes:
    qemu.img("convert", "-U", "-l", "snapshot.name=snap1", "-O", "raw", str(path), str(out))
    return out.read_bytes()


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> Env:
    d = tmp_path_factory.mktemp("model")
    e = Env(d)
    for key in BACKINGS:
        e.backing_content[key] = make_backing(d, key)
    for cfg in QEMU_CFGS:
        make_template(e, cfg)
    return e


# --------------------------------------------------------------------------------------------
# operations
# --------------------------------------------------------------------------------------------

ANCHORS = ["any", "any", "cluster", "cluster", "granule", "l2", "end", "bend"]

positions = st.tuples(st.sampled_from(ANCHORS), st.integers(0, 1 << 24), st.integers(-600, 600))
lengths = st.one_of(
    st.integers(0, 3),
    st.integers(1, 1100),
    st.integers(1, 70000),
    st.tuples(st.integers(0, 5), st.integers(-513, 513)),  # ~k clusters
    st.integers(1, 700 * KIB),
)
ops_strategy = st.lists(
    st.one_of(
        st.tuples(st.just("write"), positions, lengths, st.integers(0, 1 << 30)),
        st.tuples(st.just("write"), positions, lengths, st.integers(0, 1 << 30)),
        st.tuples(st.just("zero"), positions, lengths, st.booleans()),
        st.tuples(st.just("discard"), positions, lengths, st.none()),
        st.tuples(st.just("resize"), st.none(), st.none(), st.integers(1, 4200)),
        st.tuples(st.just("flush"), st.none(), st.none(), st.none()),
        st.tuples(st.just("read"), positions, lengths, st.none()),
        st.tuples(st.just("reopen"), st.none(), st.none(), st.none()),
    ),
    min_size=1, max_size=25,
)


@dataclass
class Geometry:
    cs: int
    granule: int
    l2_span: int
    backing_size: int


def resolve(geo: Geometry, size: int, pos, length) -> tuple[int, int]:
    anchor, k, delta = pos
    if anchor == "any":
        off = k % size
    elif anchor == "end":
        off = size - 1 - (k % 2048) + min(delta, 0)
    elif anchor == "bend":
        off = geo.backing_size + delta
    else:
        unit = {"cluster": geo.cs, "granule": geo.granule, "l2": geo.l2_span}[anchor]
        off = (k % (size // unit + 1)) * unit + delta
    off = max(0, min(off, size - 1))
    if isinstance(length, tuple):
        n = max(0, length[0] * geo.cs + length[1])
    else:
        n = length
    return off, min(n, size - off)


async def run_ops(path: str, model: bytearray, ops, geo: Geometry, log: list) -> None:
    img = await open_chain(path, "qcow2", writable=True)
    try:
        assert img.size == len(model)
        for step, (kind, pos, length, extra) in enumerate(ops):
            size = len(model)
            if kind in ("write", "zero", "discard", "read"):
                off, n = resolve(geo, size, pos, length)
            if kind == "write":
                data = pattern(extra, n)
                log.append(f"{step}: write({off}, {n} bytes)")
                await img.write(off, data)
                model[off:off + n] = data
            elif kind == "zero":
                log.append(f"{step}: write_zeroes({off}, {n}, unmap={extra})")
                await img.write_zeroes(off, n, unmap=extra)
                model[off:off + n] = bytes(n)
            elif kind == "discard":
                log.append(f"{step}: discard({off}, {n})")
                await img.discard(off, n)
                model[off:off + n] = bytes(n)
            elif kind == "resize":
                new = min(MAX_SIZE, size + 512 * extra)
                log.append(f"{step}: resize({new})")
                await img.resize(new)
                model += bytes(new - size)
            elif kind == "flush":
                log.append(f"{step}: flush()")
                await img.flush()
            elif kind == "read":
                log.append(f"{step}: read({off}, {n})")
                assert_same(await img.read(off, n), model[off:off + n], f"step {step} read")
            elif kind == "reopen":
                log.append(f"{step}: close+reopen")
                await img.close()
                img = await open_chain(path, "qcow2", writable=True)
            assert img.size == len(model), f"step {step}: size {img.size} != {len(model)}"
        # one full read-back before closing (cached metadata path)
        assert_same(await img.read(0, len(model)), model, "full read before close")
    except BaseException:
        try:
            await img.close()
        except Exception as exc:  # the first failure is the interesting one
            log.append(f"close after failure raised {exc!r}")
        raise
    await img.close()


async def reread(path: str) -> bytes:
    img = await open_chain(path, "qcow2", writable=False)
    try:
        return await img.read(0, img.size)
    finally:
        await img.close()


def to_raw(path: Path, scratch: Path) -> bytes:
    """qemu.to_raw, failing with qemu-img's own message."""
    try:
        return qemu.to_raw(str(path), str(scratch))
    except subprocess.CalledProcessError as exc:
        raise AssertionError(f"qemu-img convert failed: {exc.stderr.strip()}") from None


def verify(path: Path, model: bytearray, scratch: Path) -> None:
    rc, info = qemu.check(str(path))
    assert rc == 0, f"qemu-img check exit {rc}: {info}"
    assert_same(to_raw(path, scratch), model, "qemu-img convert vs model")
    assert_same(trio.run(reread, str(path)), model, "engine reread vs model")
    res = trio.run(check_image, str(path))
    assert res.exit_code == 0, f"engine check: {res.messages}"
    beyond = refcounts_beyond_eof(path)
    assert not beyond, f"clusters beyond the end of the file have refcounts: {beyond[:20]}"


def run_sequence(env: Env, path: Path, model: bytearray, ops, geo: Geometry) -> None:
    log: list[str] = []
    try:
        trio.run(run_ops, str(path), model, ops, geo, log)
        verify(path, model, env.d / f"{path.stem}.raw")
    finally:
        note("\n".join(log))
        for p in (path, env.d / f"{path.stem}.raw"):
            if p.exists():
                p.unlink()


# --------------------------------------------------------------------------------------------
# the tests
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("cfg", ENGINE_CFGS, ids=str)
@SETTINGS
@given(ops=ops_strategy)
def test_engine_created(env: Env, cfg: EngineCfg, ops) -> None:
    path = env.fresh()
    b = BACKINGS[cfg.backing] if cfg.backing else None
    trio.run(lambda: create_qcow2(str(path), cfg.size, cluster_size=cfg.cs,
                                  backing_file=b.name if b else None,
                                  backing_format=b.fmt if b else None,
                                  extended_l2=cfg.ext, refcount_bits=cfg.rbits))
    model = overlay_view(env.backing_content[cfg.backing] if b else None, cfg.size)
    geo = Geometry(cfg.cs, cfg.cs // 32 if cfg.ext else cfg.cs,
                   cfg.cs * (cfg.cs // (16 if cfg.ext else 8)), b.size if b else cfg.size)
    run_sequence(env, path, model, ops, geo)


@pytest.mark.parametrize("cfg", QEMU_CFGS, ids=str)
@SETTINGS
@given(ops=ops_strategy)
def test_qemu_created(env: Env, cfg: QemuCfg, ops) -> None:
    tpl, content = env.templates[cfg.name]
    path = env.fresh()
    shutil.copyfile(tpl, path)
    model = bytearray(content)
    cs = 65536
    ext = "extended_l2=on" in cfg.opts
    for o in cfg.opts:
        if o.startswith("cluster_size="):
            cs = int(o.split("=")[1])
    b = BACKINGS[cfg.backing] if cfg.backing else None
    geo = Geometry(cs, cs // 32 if ext else cs, cs * (cs // (16 if ext else 8)),
                   b.size if b else cfg.size)
    try:
        if cfg.snapshot:
            _run_with_snapshot(env, cfg, path, model, ops, geo)
        else:
            run_sequence(env, path, model, ops, geo)
    finally:
        if path.exists():
            path.unlink()


def _run_with_snapshot(env: Env, cfg: QemuCfg, path: Path, model, ops, geo) -> None:
    log: list[str] = []
    scratch = env.d / f"{path.stem}.raw"
    try:
        trio.run(run_ops, str(path), model, ops, geo, log)
        verify(path, model, scratch)
        # qemu shows a snapshot at the image's current virtual size: a grown image shows the
        # snapshot's content followed by zeros
        orig = env.snapshots[cfg.name]
        snap = _snapshot_raw(path, scratch)
        assert_same(snap, orig + bytes(len(snap) - len(orig)), "internal snapshot snap1 changed")
        assert qemu.info(str(path)).get("snapshots", [{}])[0].get("name") == "snap1"
    finally:
        note("\n".join(log))
        if scratch.exists():
            scratch.unlink()


# --------------------------------------------------------------------------------------------
# no per-byte (or per-sector) loops
# --------------------------------------------------------------------------------------------

BIG = 64 * MIB
SECTORS = BIG // 512  # a per-sector loop makes at least this many calls per request


@pytest.mark.parametrize("ext", [False, True], ids=["std-l2", "ext-l2"])
def test_no_per_byte_loop(tmp_path: Path, ext: bool) -> None:
    """64 MiB requests on 64 KiB clusters (1024 clusters) cost a bounded number of Python calls.

    The bound is per request: well under one call per 512-byte sector (131072), so neither a
    per-byte nor a per-sector loop can hide in write, read, write_zeroes or discard; a few
    dozen calls per cluster is what a per-cluster walk costs.  With extended L2 the engine
    walks 2 KiB subclusters (32768 of them, ~4 calls each for a read even when a whole
    bitmap is uniform), so that case gets the looser 200k bound: a per-sector loop would
    still cost well over it (131072 iterations of at least two calls each).
    """
    cs = 65536
    bound = 60_000 if not ext else 200_000
    backing = tmp_path / "big-backing.raw"
    with open(backing, "wb") as f:  # sparse: reads as zeros, costs nothing
        f.truncate(BIG + cs)
        f.seek(BIG // 2)
        f.write(b"backing!" * 512)
    path = tmp_path / "big.qcow2"
    trio.run(lambda: create_qcow2(str(path), BIG + cs, cluster_size=cs, extended_l2=ext,
                                  backing_file=backing.name, backing_format="raw"))
    data = pattern(1, BIG)
    calls: dict[str, int] = {}

    async def main():
        img = await open_chain(str(path), "qcow2", writable=True)

        async def measured(name, coro_fn, *args):
            prof = cProfile.Profile()
            prof.enable()
            try:
                result = await coro_fn(*args)
            finally:
                prof.disable()
            calls[name] = pstats.Stats(prof).total_calls
            return result

        try:
            # fresh allocation, unaligned at both ends (COW of head and tail from the backing)
            await measured("write-fresh", img.write, 1, memoryview(data)[1:BIG - 1])
            got = await measured("read", img.read, 0, BIG)
            assert got[1:BIG - 1] == data[1:BIG - 1]
            # overwrite of allocated clusters, unaligned
            await measured("write-owned", img.write, 100, data[:BIG - 200])
            got = await measured("read-2", img.read, 0, BIG + cs)
            assert got[100:BIG - 100] == data[:BIG - 200]
            await measured("flush", img.flush)
            await measured("write_zeroes", img.write_zeroes, 513, BIG - 1024)
            await measured("discard", img.discard, 0, BIG)
            await measured("flush-2", img.flush)
            got = await measured("read-zero", img.read, 0, BIG)
            assert got == bytes(BIG)
        finally:
            await img.close()

    trio.run(main)
    rc, info = qemu.check(str(path))
    assert rc == 0, info
    over = {k: v for k, v in calls.items() if v > bound}
    assert not over, f"too many Python calls for 64 MiB (bound {bound}): {calls}"
