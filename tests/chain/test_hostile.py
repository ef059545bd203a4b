"""Hostile and damaged qcow2 images: a typed error (or a sane read), never anything else.

Every image a user can point snapfs at is untrusted.  Whatever its bytes say, opening it,
reading all of it and (when writable) writing to it must either work with sane results or raise
a ``snapfs.errors.SnapfsError`` with a one-line message -- never another exception, never a
hang, never a huge allocation.

The base images are built with qemu-img/qemu-io at test time, then damaged in two ways:

- targeted cases, one test each, for every header field and table QEMU validates;
- a seeded mutation fuzzer (bit flips in the header cluster, L1, L2, refcount and snapshot
  tables and compressed data, 4/8-byte overwrites with extreme values, truncations); each
  mutant is opened read-only and read in full, or opened writable, read, written, flushed and
  read back, or given to ``check_image``.

The engine runs in a worker subprocess (``python -m tests.chain.test_hostile --worker``) under
``RLIMIT_AS`` (a hostile size must not make it allocate gigabytes), with ``trio.fail_after``
around each case, a faulthandler backstop for hangs that never yield to trio and a hard
deadline in the parent, so a bug shows up as a failed test, not as a stuck or OOM-killed run.

Knobs: ``SNAPFS_HOSTILE_SEED`` (default fixed) and ``SNAPFS_HOSTILE_MUTANTS`` (mutants per base
image, default 150; 8 base images).  A failing fuzz mutant is kept under the test's tmp
directory (``failures/``) next to a JSON file with the mutation that produced it.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import select
import shutil
import struct
import subprocess
import sys
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests import qemu

ROOT = Path(__file__).resolve().parents[2]

SEED = int(os.environ.get("SNAPFS_HOSTILE_SEED", "20240917"))
MUTANTS_PER_BASE = int(os.environ.get("SNAPFS_HOSTILE_MUTANTS", "150"))
MAX_HANGS_PER_BASE = 2      # each costs seconds: stop fuzzing a base image after this many
CASE_TIMEOUT = 2.0          # trio.fail_after per image (open + read all + write + flush + close)
MEMORY_HEADROOM = 256 << 20  # RLIMIT_AS above the worker's footprint once the engine is imported
RSS_GROWTH_LIMIT = 200 << 20
MIB = 1 << 20
VSIZE = 4 * MIB

# --------------------------------------------------------------------------------------------
# qcow2 layout, parsed here independently of the engine (docs/interop/qcow2.txt)
# --------------------------------------------------------------------------------------------

MAGIC = b"QFI\xfb"
_HDR = struct.Struct(">4sIQIIQIIQQIIQ")
_HDR3 = struct.Struct(">QQQII")
FIELDS = ("magic", "version", "backing_file_offset", "backing_file_size", "cluster_bits", "size",
          "crypt_method", "l1_size", "l1_table_offset", "refcount_table_offset",
          "refcount_table_clusters", "nb_snapshots", "snapshots_offset")
FIELDS3 = ("incompatible_features", "compatible_features", "autoclear_features",
           "refcount_order", "header_length")
# (offset, struct format) of every fixed header field.
OFF = {
    "magic": (0, ">4s"), "version": (4, ">I"), "backing_file_offset": (8, ">Q"),
    "backing_file_size": (16, ">I"), "cluster_bits": (20, ">I"), "size": (24, ">Q"),
    "crypt_method": (32, ">I"), "l1_size": (36, ">I"), "l1_table_offset": (40, ">Q"),
    "refcount_table_offset": (48, ">Q"), "refcount_table_clusters": (56, ">I"),
    "nb_snapshots": (60, ">I"), "snapshots_offset": (64, ">Q"),
    "incompatible_features": (72, ">Q"), "compatible_features": (80, ">Q"),
    "autoclear_features": (88, ">Q"), "refcount_order": (96, ">I"), "header_length": (100, ">I"),
    "compression_type": (104, ">B"),
}
OFFSET_MASK = 0x00FFFFFFFFFFFE00
COPIED = 1 << 63
COMPRESSED = 1 << 62
EXT_BACKING_FORMAT = 0xE2792ACA
EXT_FEATURE_TABLE = 0x6803F857
EXT_CRYPTO = 0x0537BE77
EXT_DATA_FILE = 0x44415441


def u64(buf, pos: int) -> int:
    return struct.unpack_from(">Q", buf, pos)[0]


def header(buf) -> dict:
    h = dict(zip(FIELDS, _HDR.unpack_from(buf, 0)))
    if h["version"] >= 3:
        h.update(zip(FIELDS3, _HDR3.unpack_from(buf, 72)))
    else:
        h.update(incompatible_features=0, compatible_features=0, autoclear_features=0,
                 refcount_order=4, header_length=72)
    h["cluster_size"] = 1 << h["cluster_bits"]
    h["extended_l2"] = bool(h["incompatible_features"] & (1 << 4))
    return h


def extensions(buf, h: dict) -> list[tuple[int, int, int]]:
    """(type, position of the extension header, data length) up to the end marker."""
    out = []
    pos = h["header_length"]
    limit = h["cluster_size"]
    if h["backing_file_offset"]:
        limit = min(limit, h["backing_file_offset"])
    while pos + 8 <= limit:
        etype, elen = struct.unpack_from(">II", buf, pos)
        out.append((etype, pos, elen))
        if etype == 0:
            break
        pos += 8 + ((elen + 7) & ~7)
    return out


@dataclass
class Layout:
    """Where an image keeps its metadata (file offsets), for targeted patches and the fuzzer."""

    h: dict
    file_size: int
    header_used: int                      # bytes of the first cluster holding anything
    l1: list[int]                         # L1 entries
    l2_tables: list[int]                  # offsets of L2 tables in use
    reftable: list[int]                   # refcount table entries
    refblocks: list[int]                  # offsets of refcount blocks in use
    snapshot_table: tuple[int, int] | None = None    # (offset, length)
    snapshot_l1s: list[tuple[int, int]] = field(default_factory=list)
    data_entries: list[tuple[int, int]] = field(default_factory=list)        # (pos, L2 entry)
    compressed_entries: list[tuple[int, int]] = field(default_factory=list)  # (pos, L2 entry)

    @property
    def cs(self) -> int:
        return self.h["cluster_size"]

    @property
    def l2_entry_size(self) -> int:
        return 16 if self.h["extended_l2"] else 8

    def compressed_extent(self, entry: int) -> tuple[int, int]:
        """(host offset, byte length upper bound) of a compressed cluster's data."""
        x = 62 - (self.h["cluster_bits"] - 8)
        off = entry & ((1 << x) - 1)
        nsect = ((entry >> x) & ((1 << (self.h["cluster_bits"] - 8)) - 1)) + 1
        return off, (off & ~511) + nsect * 512 - off


def layout(buf: bytes) -> Layout:
    h = header(buf)
    cs = h["cluster_size"]
    exts = extensions(buf, h)
    used = max([p + 8 + e for _, p, e in exts] + [h["header_length"]])
    if h["backing_file_offset"]:
        used = max(used, h["backing_file_offset"] + h["backing_file_size"])
    l1 = [u64(buf, h["l1_table_offset"] + 8 * i) for i in range(h["l1_size"])]
    rt_n = h["refcount_table_clusters"] * cs // 8
    reftable = [u64(buf, h["refcount_table_offset"] + 8 * i) for i in range(rt_n)]
    lay = Layout(h, len(buf), used, l1, sorted({e & OFFSET_MASK for e in l1 if e & OFFSET_MASK}),
                 reftable, sorted({e & ~0x1FF for e in reftable if e}))
    if h["nb_snapshots"]:
        pos = h["snapshots_offset"]
        for _ in range(h["nb_snapshots"]):
            l1_off, l1_size, id_len, name_len = struct.unpack_from(">QIHH", buf, pos)
            extra = struct.unpack_from(">I", buf, pos + 36)[0]
            lay.snapshot_l1s.append((l1_off, l1_size))
            pos = (pos + 40 + extra + id_len + name_len + 7) & ~7
        lay.snapshot_table = (h["snapshots_offset"], pos - h["snapshots_offset"])
    es = lay.l2_entry_size
    for t in lay.l2_tables:
        for i in range(cs // es):
            e = u64(buf, t + i * es)
            if e & COMPRESSED:
                lay.compressed_entries.append((t + i * es, e))
            elif e & OFFSET_MASK:
                lay.data_entries.append((t + i * es, e))
    return lay


def patch(path: Path, offset: int, fmt: str, value) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(struct.pack(fmt, value))


def patch_field(path: Path, name: str, value) -> None:
    off, fmt = OFF[name]
    patch(path, off, fmt, value)


def patch_bytes(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def read_layout(path: Path) -> Layout:
    return layout(path.read_bytes())


def set_backing_name(path: Path, name: str | bytes, fmt: str | None = None) -> None:
    """Rewrite the backing file name (and optionally the backing format extension) in place."""
    buf = bytearray(path.read_bytes())
    h = header(buf)
    raw = name.encode() if isinstance(name, str) else name
    off = h["backing_file_offset"]
    assert off, "image has no backing file name to patch"
    end = off + max(len(raw), h["backing_file_size"])
    assert end <= h["cluster_size"]
    buf[off:end] = raw.ljust(end - off, b"\0")
    struct.pack_into(">I", buf, 16, len(raw))
    if fmt is not None:
        for etype, pos, elen in extensions(buf, h):
            if etype == EXT_BACKING_FORMAT:
                padded = (elen + 7) & ~7
                assert len(fmt) <= padded
                struct.pack_into(">I", buf, pos + 4, len(fmt))
                buf[pos + 8:pos + 8 + padded] = fmt.encode().ljust(padded, b"\0")
    path.write_bytes(bytes(buf))


def add_extension(path: Path, etype: int, data: bytes) -> None:
    """Insert a header extension just before the end marker."""
    buf = bytearray(path.read_bytes())
    h = header(buf)
    exts = extensions(buf, h)
    assert exts and exts[-1][0] == 0, "no end-of-extensions marker"
    pos = exts[-1][1]
    blob = struct.pack(">II", etype, len(data)) + data + bytes((-len(data)) % 8)
    blob += struct.pack(">II", 0, 0)
    limit = h["backing_file_offset"] or h["cluster_size"]
    assert pos + len(blob) <= limit
    buf[pos:pos + len(blob)] = blob
    path.write_bytes(bytes(buf))


# --------------------------------------------------------------------------------------------
# Base images, built with qemu at test time
# --------------------------------------------------------------------------------------------

BASES = ("v3_64k", "v2_512", "v3_512_rc64", "backing", "compressed", "compressed_zstd",
         "extl2", "snapshot")


def _text_cluster(rng: random.Random, n: int) -> bytes:
    words = [b"snapfs", b"qcow2", b"cluster", b"refcount", b"backing", b"hostile", b"L2 ",
             b"zlib", b"\x00\x00", b"\xff"]
    out = bytearray()
    while len(out) < n:
        out += rng.choice(words)
        if rng.random() < 0.02:
            out += rng.randbytes(8)
    return bytes(out[:n])


def build_bases(d: Path) -> dict[str, Path]:
    """Create the base images in ``d`` and return name -> path."""
    p = {n: d / f"{n}.qcow2" for n in BASES}

    qemu.create(str(p["v3_64k"]), VSIZE, "compat=1.1", "cluster_size=65536")
    qemu.io(str(p["v3_64k"]), "write -P 0x11 0 64k", "write -P 0x22 100k 8k",
            "write -P 0x33 1M 192k", "write -z 2M 64k", "write -P 0x44 4032k 64k",
            "discard 1M 64k")

    qemu.create(str(p["v2_512"]), VSIZE, "compat=0.10", "cluster_size=512")
    qemu.io(str(p["v2_512"]), "write -P 0x55 0 3k", "write -P 0x66 700k 5k",
            "write -P 0x77 3M 1k", "write -P 0x78 4095k 1k")

    qemu.create(str(p["v3_512_rc64"]), VSIZE, "compat=1.1", "cluster_size=512",
                "refcount_bits=64")
    qemu.io(str(p["v3_512_rc64"]), "write -P 0x5a 0 20k", "write -P 0x6a 1536k 3k",
            "write -z 2M 2k", "write -P 0x7a 4094k 2k")

    bk = d / "bk_base.qcow2"
    qemu.create(str(bk), VSIZE, "compat=1.1", "cluster_size=65536")
    qemu.io(str(bk), "write -P 0x81 0 256k", "write -P 0x82 2M 64k", "write -P 0x83 4000k 96k")
    qemu.create(str(p["backing"]), VSIZE, "compat=1.1", "cluster_size=65536",
                backing=bk.name, backing_fmt="qcow2")     # a bare name, as Cinder's layout
    qemu.io(str(p["backing"]), "write -P 0x91 64k 64k", "write -P 0x92 2052k 4k",
            "write -z 4000k 8k")

    rng = random.Random(7)
    src = d / "compressed_src.raw"
    raw = bytearray(VSIZE)
    for c in (0, 1, 2, 5, 17, 40, 63):
        raw[c * 65536:(c + 1) * 65536] = _text_cluster(rng, 65536)
    raw[30 * 65536:31 * 65536] = b"\x42" * 65536
    src.write_bytes(bytes(raw))
    for name, ctype in (("compressed", "zlib"), ("compressed_zstd", "zstd")):
        qemu.img("convert", "-q", "-c", "-f", "raw", "-O", "qcow2", "-o",
                 f"compat=1.1,cluster_size=65536,compression_type={ctype}", str(src),
                 str(p[name]))
        qemu.io(str(p[name]), "write -P 0xc1 1M 64k", "write -P 0xc2 2k 1k")  # COW of one
    src.unlink()

    qemu.create(str(p["extl2"]), VSIZE, "compat=1.1", "cluster_size=65536", "extended_l2=on")
    qemu.io(str(p["extl2"]), "write -P 0xa1 0 2k", "write -P 0xa2 6k 4k", "write -z 64k 2k",
            "write -P 0xa3 1M 64k", "write -P 0xa4 3102k 3k", "discard 1M 4k")

    qemu.create(str(p["snapshot"]), VSIZE, "compat=1.1", "cluster_size=65536")
    qemu.io(str(p["snapshot"]), "write -P 0xb1 0 128k", "write -P 0xb4 3M 64k")
    qemu.img("snapshot", "-c", "snap1", str(p["snapshot"]))
    qemu.io(str(p["snapshot"]), "write -P 0xb2 64k 64k", "write -P 0xb3 3M 4k")

    for n, path in p.items():
        rc, data = qemu.check(str(path))
        assert rc == 0, f"base image {n} is not clean: {data}"
    return p


def guest_content(path: Path, scratch: Path) -> bytes:
    out = scratch / (path.name + ".raw")
    data = qemu.to_raw(str(path), str(out), "qcow2")
    out.unlink()
    return data


# --------------------------------------------------------------------------------------------
# The worker: runs the engine on one image per request, in a subprocess with bounded memory
# --------------------------------------------------------------------------------------------

WRITE_PATTERN = b"HOSTILE!"
READ_ALL_LIMIT = 64 * MIB     # bigger virtual sizes: read the first and last MiB only


def _exc_info(exc: BaseException) -> dict:
    import traceback

    def leaves(e):
        if isinstance(e, BaseExceptionGroup):
            for sub in e.exceptions:
                yield from leaves(sub)
        else:
            yield e

    message = getattr(exc, "message", None)
    return {
        "cls": type(exc).__name__,
        "module": type(exc).__module__,
        "mro": [c.__name__ for c in type(exc).__mro__],
        "errno": getattr(exc, "errno", None),
        "message": message if isinstance(message, str) else str(exc),
        "leaves": [type(e).__name__ for e in leaves(exc)],
        "tb": "".join(traceback.format_exception(exc))[-4000:],
    }


def _classify(res: dict, exc: BaseException) -> None:
    """Record an exception from the engine: a typed refusal, or one of the failure kinds."""
    import trio

    from snapfs.errors import SnapfsError

    info = _exc_info(exc)
    res.update(info)
    if isinstance(exc, trio.TooSlowError):
        res["outcome"] = "timeout"
    elif isinstance(exc, MemoryError) or "MemoryError" in info["leaves"]:
        res["outcome"] = "memory"
    elif isinstance(exc, SnapfsError):
        res["outcome"] = "error"
    else:
        res["outcome"] = "other"


async def _run_check(case: dict) -> dict:
    """``check_image`` (no repair: read-only) on one image."""
    import trio

    from snapfs.chain.check import check_image

    res: dict = {"outcome": "ok", "stage": "check"}
    try:
        with trio.fail_after(case.get("timeout", CASE_TIMEOUT)):
            r = await check_image(case["path"], fmt=case.get("fmt", "qcow2"))
        res.update(corruptions=r.corruptions, leaks=r.leaks, exit_code=r.exit_code,
                   messages=list(r.messages)[:5])
        bad = [m for m in r.messages if not isinstance(m, str) or "\n" in m]
        if bad or not isinstance(r.corruptions, int) or r.exit_code not in (0, 2, 3):
            raise AssertionError(f"insane check result {r!r}")
    except BaseException as exc:    # classified; the worker must survive everything
        _classify(res, exc)
    return res


async def _run_case(case: dict) -> dict:
    import trio

    if case.get("check"):
        return await _run_check(case)

    from snapfs.chain.chain import open_chain
    from snapfs.errors import SnapfsError

    res: dict = {"outcome": "ok", "stage": "open"}
    img = None
    try:
        with trio.fail_after(case.get("timeout", CASE_TIMEOUT)):
            img = await open_chain(case["path"], fmt=case.get("fmt", "qcow2"),
                                   writable=case.get("writable", False))
            size = img.size
            res["size"] = size
            if not isinstance(size, int) or size < 0:
                raise AssertionError(f"insane virtual size {size!r}")
            res["stage"] = "read"
            h = hashlib.sha256()
            spans = ([(0, size)] if size <= READ_ALL_LIMIT
                     else [(0, MIB), (size - MIB, MIB)])
            for off, n in spans:
                data = await img.read(off, n)
                if not isinstance(data, (bytes, bytearray, memoryview)) or len(data) != n:
                    raise AssertionError(f"read({off}, {n}) returned {type(data).__name__} "
                                         f"of length {len(data) if data is not None else None}")
                h.update(data)
            res["sha"] = h.hexdigest()
            if case.get("write") and case.get("writable") and size > 0:
                res["stage"] = "write"
                off, n = case["write"]
                n = min(n, size)
                off = max(0, min(off, size - n))
                payload = (WRITE_PATTERN * (n // 8 + 1))[:n]
                await img.write(off, payload)
                res["stage"] = "flush"
                await img.flush()
                res["stage"] = "readback"
                back = await img.read(off, n)
                if bytes(back) != payload:
                    raise AssertionError(f"read after write at {off}+{n} returned other data")
            res["stage"] = "close"
            await img.close()
            img = None
    except BaseException as exc:    # classified; the worker must survive everything
        _classify(res, exc)
    finally:
        if img is not None:
            try:
                with trio.move_on_after(1):
                    await img.close()
            except SnapfsError:
                pass
            except BaseException as exc:
                if res["outcome"] in ("ok", "error"):
                    res.update(_exc_info(exc))
                    res["outcome"] = "other"
                    res["stage"] = "close after error"
    return res


def _vm_size() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    return 0


def _worker_main() -> None:
    import faulthandler
    import resource
    import traceback

    out = sys.stdout
    sys.stdout = sys.stderr          # engine prints must not garble the protocol
    try:
        import trio
        import snapfs.chain.chain  # noqa: F401  (the engine must be importable)
        import snapfs.chain.check  # noqa: F401
        trio.run(_run_case, {"path": "/nonexistent/warmup.qcow2", "timeout": 5})
    except BaseException:
        out.write(json.dumps({"ready": False, "error": traceback.format_exc()}) + "\n")
        out.flush()
        return
    limit = _vm_size() + MEMORY_HEADROOM
    resource.setrlimit(resource.RLIMIT_AS, (limit, resource.getrlimit(resource.RLIMIT_AS)[1]))
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    out.write(json.dumps({"ready": True, "pid": os.getpid(), "rlimit_as": limit}) + "\n")
    out.flush()
    for line in sys.stdin:
        case = json.loads(line)
        fds0 = len(os.listdir("/proc/self/fd"))
        faulthandler.dump_traceback_later(case.get("timeout", CASE_TIMEOUT) + 1, exit=True)
        t0 = time.monotonic()
        try:
            res = trio.run(_run_case, case)
        except BaseException as exc:    # trio itself failing (e.g. MemoryError in the loop)
            res = {"outcome": "other", "stage": "trio.run", **_exc_info(exc)}
            if isinstance(exc, MemoryError):
                res["outcome"] = "memory"
        faulthandler.cancel_dump_traceback_later()
        res["elapsed"] = round(time.monotonic() - t0, 3)
        res["fd_leak"] = len(os.listdir("/proc/self/fd")) - fds0
        res["rss_growth"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss0
        out.write(json.dumps(res) + "\n")
        out.flush()


class Worker:
    """One engine subprocess; restarted after a crash or hang."""

    def __init__(self, scratch: Path, tag: str):
        self.scratch = scratch
        self.tag = tag
        self.proc: subprocess.Popen | None = None
        self.buf = b""
        self.restarts = -1
        self.errlog = scratch / f"worker-{tag}.stderr"
        self.start()

    def start(self) -> None:
        env = dict(os.environ)
        env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"]
                                         if env.get("PYTHONPATH") else "")
        env["SNAPFS_IO"] = "inline"
        env["MALLOC_ARENA_MAX"] = "2"
        env["PYTHONFAULTHANDLER"] = "1"
        self.err = open(self.errlog, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.chain.test_hostile", "--worker"],
            cwd=ROOT, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.err)
        self.buf = b""
        self.restarts += 1
        hello = self._readline(60)
        if hello is None:
            raise RuntimeError(f"worker did not start: {self._stderr_tail()}")
        info = json.loads(hello)
        if not info.get("ready"):
            raise RuntimeError(f"engine not importable in the worker:\n{info.get('error')}")
        self.rlimit_as = info["rlimit_as"]

    def _stderr_tail(self, since: int = 0) -> str:
        self.err.flush()
        try:
            with open(self.errlog, "rb") as f:
                f.seek(since)
                return f.read()[-6000:].decode(errors="replace")
        except OSError:
            return ""

    def _readline(self, timeout: float) -> bytes | None:
        deadline = time.monotonic() + timeout
        fd = self.proc.stdout.fileno()
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            r, _, _ = select.select([fd], [], [], left)
            if r:
                chunk = os.read(fd, 1 << 16)
                if not chunk:
                    return None
                self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\n")
        return line

    def run(self, **case) -> dict:
        case.setdefault("timeout", CASE_TIMEOUT)
        case["path"] = str(case["path"])
        errpos = self.errlog.stat().st_size
        try:
            self.proc.stdin.write((json.dumps(case) + "\n").encode())
            self.proc.stdin.flush()
        except BrokenPipeError:
            pass
        line = self._readline(case["timeout"] + 6)
        if line is not None:
            return json.loads(line)
        # No answer: a hang that never yields to trio (faulthandler exits the worker after
        # timeout + 1 s and leaves the stack in the log) or a crash of the interpreter.
        alive = self.proc.poll() is None
        if alive:
            self.proc.kill()
        self.proc.wait()
        tail = self._stderr_tail(errpos)
        kind = "hang" if (alive or "Timeout (" in tail) else "crash"
        self.start()
        return {"outcome": kind, "cls": None, "message": None, "stage": "?", "tb": tail,
                "returncode": self.proc.returncode}

    def close(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.err.close()


# --------------------------------------------------------------------------------------------
# Fixtures and assertion helpers
# --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def env(tmp_path_factory):
    d = tmp_path_factory.mktemp("hostile")
    bases = d / "bases"
    bases.mkdir()
    paths = build_bases(bases)
    raws = {n: guest_content(p, d) for n, p in paths.items()}
    shas = {n: hashlib.sha256(r).hexdigest() for n, r in raws.items()}
    return {"dir": d, "bases": bases, "paths": paths, "raws": raws, "shas": shas, "n": [0]}


@pytest.fixture(scope="module")
def workers(env):
    ws = [Worker(env["dir"], "a"), Worker(env["dir"], "b")]
    yield ws
    for w in ws:
        w.close()


@pytest.fixture
def worker(workers):
    return workers[0]


def mutant(env, base: str, tag: str) -> Path:
    """A fresh copy of base image ``base`` next to it (so its backing file resolves)."""
    env["n"][0] += 1
    dst = env["bases"] / f"t{env['n'][0]:03d}_{tag}.qcow2"
    shutil.copyfile(env["paths"][base], dst)
    return dst


def describe(res: dict) -> str:
    s = (f"outcome={res.get('outcome')} stage={res.get('stage')} "
         f"exc={res.get('module')}.{res.get('cls')} errno={res.get('errno')} "
         f"message={res.get('message')!r}")
    if res.get("outcome") not in ("ok", "error"):
        s += "\n" + (res.get("tb") or "")
    return s


def assert_sane(res: dict) -> None:
    """Success or a SnapfsError with a one-line message; no hang, no memory blow-up."""
    assert res["outcome"] in ("ok", "error"), describe(res)
    if res["outcome"] == "error":
        msg = res["message"]
        assert isinstance(msg, str) and msg.strip(), describe(res)
        assert "\n" not in msg, f"message is not one line: {msg!r}"
    assert res.get("rss_growth", 0) < RSS_GROWTH_LIMIT, f"max RSS grew by {res['rss_growth']}"


def assert_refused(res: dict, *classes: str, errnos=(errno.EIO,)) -> None:
    assert_sane(res)
    assert res["outcome"] == "error", f"hostile image was accepted: {describe(res)}"
    if classes:
        assert set(classes) & set(res["mro"]), (
            f"expected {' or '.join(classes)}, got {describe(res)}")
    if errnos:
        assert res["errno"] in errnos, f"errno {res['errno']} not in {errnos}: {describe(res)}"


# --------------------------------------------------------------------------------------------
# 0. The base images themselves read back as qemu sees them (else the rest proves nothing)
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("base", BASES)
def test_base_images_read_like_qemu(env, worker, base):
    res = worker.run(path=env["paths"][base])
    assert res["outcome"] == "ok", describe(res)
    assert res["size"] == VSIZE
    assert res["sha"] == env["shas"][base], "engine and qemu disagree on the guest content"
    assert res["fd_leak"] == 0


# --------------------------------------------------------------------------------------------
# 1. Targeted cases
# --------------------------------------------------------------------------------------------

CORRUPT = ("Corrupt",)
REFUSED = ("Corrupt", "Unsupported")


SANE = None     # "classes" of a case where success is as acceptable as a typed error


def _header_case(base, tag, fn, classes=REFUSED):
    return pytest.param(base, fn, classes, id=tag)


HEADER_CASES = [
    _header_case("v3_64k", "bad-magic", lambda p, L: patch_bytes(p, 0, b"QFI\xfa")),
    _header_case("v3_64k", "magic-zero", lambda p, L: patch_bytes(p, 0, b"\0\0\0\0")),
    _header_case("v3_64k", "version-1", lambda p, L: patch_field(p, "version", 1)),
    _header_case("v3_64k", "version-4", lambda p, L: patch_field(p, "version", 4)),
    _header_case("v2_512", "v2-version-4", lambda p, L: patch_field(p, "version", 4)),
    _header_case("v3_64k", "version-huge", lambda p, L: patch_field(p, "version", 0xFFFFFFFF)),
    _header_case("v3_64k", "cluster-bits-8", lambda p, L: patch_field(p, "cluster_bits", 8)),
    _header_case("v3_64k", "cluster-bits-22", lambda p, L: patch_field(p, "cluster_bits", 22)),
    _header_case("v3_64k", "cluster-bits-0", lambda p, L: patch_field(p, "cluster_bits", 0)),
    _header_case("v3_64k", "cluster-bits-63",
                 lambda p, L: patch_field(p, "cluster_bits", 63)),
    _header_case("v3_64k", "cluster-bits-huge",
                 lambda p, L: patch_field(p, "cluster_bits", 0xFFFFFFFF)),
    _header_case("v3_64k", "crypt-method-aes",
                 lambda p, L: patch_field(p, "crypt_method", 1), ("Unsupported", "Corrupt")),
    _header_case("v2_512", "v2-crypt-method-aes",
                 lambda p, L: patch_field(p, "crypt_method", 1), ("Unsupported", "Corrupt")),
    _header_case("v3_64k", "crypt-method-luks",
                 lambda p, L: patch_field(p, "crypt_method", 2), ("Unsupported", "Corrupt")),
    _header_case("v3_64k", "incompat-bit-20",
                 lambda p, L: patch_field(p, "incompatible_features", 1 << 20),
                 ("Unsupported",)),
    _header_case("v3_64k", "incompat-bit-63",
                 lambda p, L: patch_field(p, "incompatible_features", 1 << 63),
                 ("Unsupported",)),
    _header_case("v3_64k", "external-data-file-bit",
                 lambda p, L: patch_field(p, "incompatible_features", 1 << 2),
                 ("Unsupported",)),
    _header_case("v3_64k", "external-data-file-bit-and-extension",
                 lambda p, L: (add_extension(p, EXT_DATA_FILE, b"data.raw"),
                               patch_field(p, "incompatible_features", 1 << 2)),
                 ("Unsupported",)),
    _header_case("v3_64k", "external-data-file-extension-without-bit",
                 lambda p, L: add_extension(p, EXT_DATA_FILE, b"data.raw"), SANE),
    _header_case("v3_64k", "encryption-extension",
                 lambda p, L: add_extension(p, EXT_CRYPTO, struct.pack(">QQ", 65536, 65536)),
                 ("Unsupported", "Corrupt")),
    _header_case("v3_64k", "l1-offset-unaligned",
                 lambda p, L: patch_field(p, "l1_table_offset", L.h["l1_table_offset"] + 8)),
    _header_case("v3_64k", "l1-offset-zero", lambda p, L: patch_field(p, "l1_table_offset", 0)),
    _header_case("v3_64k", "l1-offset-beyond-eof",
                 lambda p, L: patch_field(p, "l1_table_offset", 1 << 40)),
    _header_case("v3_64k", "l1-offset-just-past-eof",
                 lambda p, L: patch_field(p, "l1_table_offset",
                                          (L.file_size + L.cs - 1) // L.cs * L.cs)),
    _header_case("v2_512", "v2-l1-offset-unaligned",
                 lambda p, L: patch_field(p, "l1_table_offset", L.h["l1_table_offset"] + 8)),
    _header_case("v3_64k", "l1-size-huge", lambda p, L: patch_field(p, "l1_size", 0x7FFFFFFF)),
    _header_case("v3_64k", "l1-size-max", lambda p, L: patch_field(p, "l1_size", 0xFFFFFFFF)),
    _header_case("v3_64k", "l1-size-past-eof",
                 lambda p, L: patch_field(p, "l1_size", (L.file_size // 8) + 1)),
    _header_case("v3_64k", "l1-size-zero", lambda p, L: patch_field(p, "l1_size", 0)),
    _header_case("v2_512", "l1-size-too-small",
                 lambda p, L: patch_field(p, "l1_size", L.h["l1_size"] - 1)),
    # the last entry of the table, after the zeros (the table is read up to its last block)
    _header_case("v3_64k", "reftable-last-entry-reserved-bits",
                 lambda p, L: patch(p, L.h["refcount_table_offset"]
                                    + L.h["refcount_table_clusters"] * L.cs - 8, ">Q", 1),
                 CORRUPT),
    _header_case("v3_64k", "reftable-last-entry-unaligned",
                 lambda p, L: patch(p, L.h["refcount_table_offset"]
                                    + L.h["refcount_table_clusters"] * L.cs - 8, ">Q",
                                    L.cs + 512), CORRUPT),
    _header_case("v3_64k", "refcount-table-offset-zero",
                 lambda p, L: patch_field(p, "refcount_table_offset", 0)),
    _header_case("v3_64k", "refcount-table-offset-beyond-eof",
                 lambda p, L: patch_field(p, "refcount_table_offset", 1 << 40)),
    _header_case("v3_64k", "refcount-table-offset-unaligned",
                 lambda p, L: patch_field(p, "refcount_table_offset",
                                          L.h["refcount_table_offset"] + 512)),
    _header_case("v3_64k", "refcount-table-clusters-huge",
                 lambda p, L: patch_field(p, "refcount_table_clusters", 0xFFFFFFFF)),
    _header_case("v3_64k", "refcount-table-clusters-past-eof",
                 lambda p, L: patch_field(p, "refcount_table_clusters", 1000)),
    _header_case("v2_512", "v2-refcount-table-clusters-huge",
                 lambda p, L: patch_field(p, "refcount_table_clusters", 0x7FFFFFFF)),
    _header_case("v3_64k", "refcount-table-clusters-zero",
                 lambda p, L: patch_field(p, "refcount_table_clusters", 0)),
    _header_case("v3_64k", "refcount-order-7", lambda p, L: patch_field(p, "refcount_order", 7)),
    _header_case("v3_64k", "refcount-order-huge",
                 lambda p, L: patch_field(p, "refcount_order", 0xFFFFFFFF)),
    _header_case("v3_64k", "header-length-not-multiple-of-8",
                 lambda p, L: patch_field(p, "header_length", 105)),
    _header_case("v3_64k", "header-length-too-small",
                 lambda p, L: patch_field(p, "header_length", 72)),
    _header_case("v3_64k", "header-length-above-cluster",
                 lambda p, L: patch_field(p, "header_length", 0x10008)),
    _header_case("v3_512_rc64", "header-length-above-512-cluster",
                 lambda p, L: patch_field(p, "header_length", 520)),
    _header_case("v3_64k", "header-length-huge",
                 lambda p, L: patch_field(p, "header_length", 0xFFFFFFF8)),
    _header_case("v3_64k", "extension-length-past-cluster",
                 lambda p, L: patch(p, L.h["header_length"] + 4, ">I", 0x10000)),
    _header_case("v3_64k", "extension-length-huge",
                 lambda p, L: patch(p, L.h["header_length"] + 4, ">I", 0xFFFFFFFF)),
    _header_case("v3_512_rc64", "extension-length-past-512-cluster",
                 lambda p, L: patch_bytes(p, L.h["header_length"],
                                          struct.pack(">II", 0x12345678, 400))),
    _header_case("v3_64k", "extensions-without-end-marker",
                 lambda p, L: patch_bytes(p, L.h["header_length"],
                                          struct.pack(">II", 0x12345678, 0xFFF0)
                                          + b"\xab" * (L.cs - L.h["header_length"] - 8))),
    _header_case("v3_64k", "compression-type-unknown",
                 lambda p, L: (patch_field(p, "incompatible_features", 1 << 3),
                               patch_field(p, "compression_type", 7)),
                 ("Unsupported", "Corrupt")),
    _header_case("v3_64k", "virtual-size-2^63-1",
                 lambda p, L: patch_field(p, "size", (1 << 63) - 1)),
    _header_case("v3_64k", "virtual-size-2^64-1",
                 lambda p, L: patch_field(p, "size", (1 << 64) - 1)),
    _header_case("v3_64k", "virtual-size-2^63-1-with-l1-size",
                 lambda p, L: (patch_field(p, "size", (1 << 63) - 1),
                               patch_field(p, "l1_size", 0x7FFFFFFF))),
    _header_case("v3_64k", "truncated-to-50-bytes", lambda p, L: os.truncate(p, 50)),
    _header_case("v3_64k", "truncated-to-0-bytes", lambda p, L: os.truncate(p, 0)),
    _header_case("v3_64k", "truncated-to-100-bytes", lambda p, L: os.truncate(p, 100)),
    _header_case("v3_64k", "truncated-inside-l1",
                 lambda p, L: os.truncate(p, L.h["l1_table_offset"] + 4)),
    _header_case("v3_64k", "truncated-inside-refcount-table",
                 lambda p, L: os.truncate(p, L.h["refcount_table_offset"] + 4)),
    _header_case("snapshot", "nb-snapshots-huge",
                 lambda p, L: patch_field(p, "nb_snapshots", 0xFFFFFFFF)),
    _header_case("snapshot", "snapshots-offset-beyond-eof",
                 lambda p, L: patch_field(p, "snapshots_offset", 1 << 40)),
    _header_case("snapshot", "snapshots-offset-unaligned",
                 lambda p, L: patch_field(p, "snapshots_offset", L.h["snapshots_offset"] + 8)),
    # The snapshot table's contents: QEMU refuses at open; not reading it at all is fine too.
    _header_case("snapshot", "snapshot-l1-size-huge",
                 lambda p, L: patch(p, L.h["snapshots_offset"] + 8, ">I", 0x7FFFFFFF), SANE),
    _header_case("snapshot", "snapshot-l1-offset-beyond-eof",
                 lambda p, L: patch(p, L.h["snapshots_offset"], ">Q", 1 << 40), SANE),
    _header_case("snapshot", "snapshot-extra-data-huge",
                 lambda p, L: patch(p, L.h["snapshots_offset"] + 36, ">I", 0xFFFFFFFF), SANE),
    _header_case("snapshot", "snapshot-name-length-huge",
                 lambda p, L: patch(p, L.h["snapshots_offset"] + 14, ">H", 0xFFFF), SANE),
    _header_case("backing", "backing-name-size-huge",
                 lambda p, L: patch_field(p, "backing_file_size", 0xFFFFFFFF)),
    _header_case("backing", "backing-name-offset-beyond-cluster",
                 lambda p, L: patch_field(p, "backing_file_offset", 1 << 40)),
    _header_case("backing", "backing-name-not-utf8",
                 lambda p, L: set_backing_name(p, b"\xff\xfe.qcow2"),
                 ("Corrupt", "Unsupported", "Invalid", "NotFound")),
]


@pytest.mark.parametrize("base,damage,classes", HEADER_CASES)
def test_damaged_header(env, worker, base, damage, classes):
    p = mutant(env, base, "hdr")
    damage(p, read_layout(p))
    for writable in (False, True):
        res = worker.run(path=p, writable=writable, write=(4096, 4096))
        if classes is SANE:
            assert_sane(res)
        else:
            assert_refused(res, *classes, errnos=(errno.EIO, errno.EINVAL, errno.ENOENT))
        assert res["fd_leak"] == 0, "file descriptors leaked by a refused open"


def test_truncated_to_half(env, worker):
    """The data clusters of the top half are gone: an error, or (like QEMU) zeros."""
    for base in ("v3_64k", "v2_512", "compressed", "snapshot"):
        p = mutant(env, base, "half")
        os.truncate(p, p.stat().st_size // 2)
        res = worker.run(path=p)
        assert_sane(res)
        if res["outcome"] == "error":
            assert "Corrupt" in res["mro"] or "ShareIOError" in res["mro"], describe(res)


def test_corrupt_bit_reads_but_refuses_writes(env, worker):
    p = mutant(env, "v3_64k", "corruptbit")
    patch_field(p, "incompatible_features", 1 << 1)
    res = worker.run(path=p)
    assert res["outcome"] == "ok", f"reading an image marked corrupt must work: {describe(res)}"
    assert res["sha"] == env["shas"]["v3_64k"]
    res = worker.run(path=p, writable=True, write=(0, 512))
    assert_sane(res)
    assert res["outcome"] == "error" and res["stage"] == "open", (
        f"writable open of an image marked corrupt: {describe(res)}")
    assert res["errno"] in (errno.EIO, errno.EROFS)
    assert res["fd_leak"] == 0


def test_dirty_bit(env, worker):
    """Dirty (lazy refcounts) is legal: reads work; a writable open repairs or refuses."""
    p = mutant(env, "v3_64k", "dirty")
    patch_field(p, "incompatible_features", 1 << 0)
    res = worker.run(path=p)
    assert res["outcome"] == "ok", describe(res)
    assert res["sha"] == env["shas"]["v3_64k"]
    res = worker.run(path=p, writable=True, write=(8192, 4096))
    assert_sane(res)
    if res["outcome"] == "ok":
        rc, data = qemu.check(str(p))
        assert rc == 0, f"dirty image written by snapfs is not clean for qemu-img: {data}"


# --- backing files ---------------------------------------------------------------------------

BACKING_NAME_REFUSED = ("Corrupt", "Unsupported", "Invalid")
NAME_ERRNOS = (errno.EIO, errno.EINVAL, errno.EPERM, errno.EACCES)


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_backing_name_absolute_etc_passwd(env, worker, fmt):
    p = mutant(env, "backing", "abs")
    set_backing_name(p, "/etc/passwd", fmt=fmt)
    res = worker.run(path=p)
    assert_refused(res, *BACKING_NAME_REFUSED, errnos=NAME_ERRNOS)


def test_backing_name_absolute_to_valid_image(env, worker):
    """An absolute name is refused even when it names a perfectly good qcow2 image."""
    p = mutant(env, "backing", "absvalid")
    set_backing_name(p, str(env["bases"] / "bk_base.qcow2"))
    res = worker.run(path=p)
    assert_refused(res, *BACKING_NAME_REFUSED, errnos=NAME_ERRNOS)


def test_backing_name_with_slash(env, worker):
    sub = env["bases"] / "sub"
    sub.mkdir(exist_ok=True)
    shutil.copyfile(env["bases"] / "bk_base.qcow2", sub / "bk_base.qcow2")
    p = mutant(env, "backing", "slash")
    set_backing_name(p, "sub/bk_base.qcow2")
    res = worker.run(path=p)
    assert_refused(res, *BACKING_NAME_REFUSED, errnos=NAME_ERRNOS)


@pytest.mark.parametrize("name", ["..", ".", "../bases/bk_base.qcow2", "..\\bk_base.qcow2",
                                  "bk_base.qcow2\0trailing", ""])
def test_backing_name_dots_and_odd(env, worker, name):
    p = mutant(env, "backing", "dots")
    set_backing_name(p, name)
    res = worker.run(path=p)
    assert_sane(res)
    if name == "":
        # An empty name is "no backing file" to some readers: if accepted, it must read as
        # the overlay alone (the backing's clusters are then zeros).
        return
    assert res["outcome"] == "error", f"backing name {name!r} was accepted: {describe(res)}"
    assert set(BACKING_NAME_REFUSED + ("NotFound",)) & set(res["mro"]), describe(res)
    assert res["fd_leak"] == 0


def test_backing_file_symlink_to_etc_passwd(env, worker):
    """A bare name that is a symlink out of the directory: never followed."""
    link = env["bases"] / "lnk_base.qcow2"
    if not link.is_symlink():
        link.symlink_to("/etc/passwd")
    p = mutant(env, "backing", "symlink")
    set_backing_name(p, link.name, fmt="raw")
    res = worker.run(path=p)
    assert_refused(res, errnos=None)
    assert res["fd_leak"] == 0


def test_backing_file_missing(env, worker):
    p = mutant(env, "backing", "missing")
    set_backing_name(p, "no_such_base.qcow2")
    res = worker.run(path=p)
    assert_refused(res, "NotFound", "Corrupt", errnos=(errno.ENOENT, errno.EIO))
    assert res["fd_leak"] == 0, "the overlay's descriptor leaked when its backing is missing"
    res = worker.run(path=p, writable=True, write=(0, 512))
    assert_refused(res, "NotFound", "Corrupt", errnos=(errno.ENOENT, errno.EIO))
    assert res["fd_leak"] == 0


def test_backing_file_is_directory(env, worker):
    (env["bases"] / "adir.qcow2").mkdir(exist_ok=True)
    p = mutant(env, "backing", "isdir")
    set_backing_name(p, "adir.qcow2")
    res = worker.run(path=p)
    assert_refused(res, errnos=None)
    assert res["fd_leak"] == 0


def test_backing_file_is_garbage(env, worker):
    (env["bases"] / "garbage.qcow2").write_bytes(random.Random(3).randbytes(5000))
    p = mutant(env, "backing", "garbage")
    set_backing_name(p, "garbage.qcow2")
    res = worker.run(path=p)
    assert_refused(res, *REFUSED)
    assert res["fd_leak"] == 0


def _loop_dir(env, name: str) -> Path:
    d = env["bases"] / name
    d.mkdir()
    return d


def test_backing_loop_two_images(env, worker):
    d = _loop_dir(env, "loop2")
    a, b = d / "la.qcow2", d / "lb.qcow2"
    qemu.img("create", "-q", "-f", "qcow2", "-u", "-b", "lb.qcow2", "-F", "qcow2", str(a), "4M")
    qemu.img("create", "-q", "-f", "qcow2", "-u", "-b", "la.qcow2", "-F", "qcow2", str(b), "4M")
    assert read_layout(a).h["backing_file_offset"] and read_layout(b).h["backing_file_offset"]
    for top in (a, b):
        for writable in (False, True):
            res = worker.run(path=top, writable=writable, write=(0, 512))
            assert_refused(res, "Corrupt", "Invalid", "Unsupported",
                           errnos=(errno.EIO, errno.EINVAL, errno.ELOOP))
            assert res["fd_leak"] == 0


def test_backing_self_loop(env, worker):
    d = _loop_dir(env, "loop1")
    a = d / "self.qcow2"
    qemu.img("create", "-q", "-f", "qcow2", "-u", "-b", "xxxx.qcow2", "-F", "qcow2", str(a), "4M")
    set_backing_name(a, "self.qcow2")
    res = worker.run(path=a)
    assert_refused(res, "Corrupt", "Invalid", "Unsupported",
                   errnos=(errno.EIO, errno.EINVAL, errno.ELOOP))
    assert res["fd_leak"] == 0


def test_backing_loop_three_images(env, worker):
    d = _loop_dir(env, "loop3")
    names = ["l0.qcow2", "l1.qcow2", "l2.qcow2"]
    for i, n in enumerate(names):
        qemu.img("create", "-q", "-f", "qcow2", "-u", "-b", names[(i + 1) % 3], "-F", "qcow2",
                 str(d / n), "4M")
    res = worker.run(path=d / "l0.qcow2")
    assert_refused(res, "Corrupt", "Invalid", "Unsupported",
                   errnos=(errno.EIO, errno.EINVAL, errno.ELOOP))


def chain_depth_limit() -> int | None:
    """The engine's chain depth limit, if it defines one as a module constant."""
    try:
        import snapfs.chain.chain as chain_mod
    except Exception:
        return None
    for name in dir(chain_mod):
        up = name.upper()
        val = getattr(chain_mod, name)
        if (isinstance(val, int) and not isinstance(val, bool) and name == up
                and ("DEPTH" in up or "CHAIN" in up) and 1 < val < 100000):
            return val
    return None


def _build_deep_chain(d: Path, depth: int) -> Path:
    """c0000 (no backing) <- c0001 <- ... <- c<depth-1>, made by patching one template."""
    qemu.create(str(d / "c0000.qcow2"), "1M", "compat=1.1", "cluster_size=512")
    qemu.io(str(d / "c0000.qcow2"), "write -P 0xd0 0 512")
    tmpl = d / "template.qcow2"
    qemu.img("create", "-q", "-f", "qcow2", "-u", "-o", "compat=1.1,cluster_size=512",
             "-b", "c0000.qcow2", "-F", "qcow2", str(tmpl), "1M")
    buf = bytearray(tmpl.read_bytes())
    h = header(buf)
    assert h["backing_file_size"] == len("c0000.qcow2")
    for i in range(1, depth):
        buf[h["backing_file_offset"]:h["backing_file_offset"] + 11] = f"c{i - 1:04d}.qcow2".encode()
        (d / f"c{i:04d}.qcow2").write_bytes(buf)
    tmpl.unlink()
    return d / f"c{depth - 1:04d}.qcow2"


def test_backing_chain_too_deep(env, worker):
    limit = chain_depth_limit()
    depth = max(300, (limit or 0) + 5)
    d = _loop_dir(env, "deep")
    top = _build_deep_chain(d, depth)
    res = worker.run(path=top, timeout=10)
    assert_refused(res, "Corrupt", "Invalid", "Unsupported",
                   errnos=(errno.EIO, errno.EINVAL, errno.ELOOP))
    assert res["fd_leak"] == 0, "descriptors of the opened part of the chain leaked"


def test_backing_chain_at_limit_opens(env, worker):
    """A chain just within the engine's limit still opens and reads through to the bottom."""
    limit = chain_depth_limit()
    depth = min(limit, 64) if limit else 32
    d = _loop_dir(env, "shallow")
    top = _build_deep_chain(d, depth)
    res = worker.run(path=top, timeout=10)
    assert res["outcome"] == "ok", f"chain of {depth} images (limit {limit}): {describe(res)}"
    assert res["size"] == MIB


# --- L1 / L2 damage (only visible on access) -------------------------------------------------

def _first_data_entry(L: Layout) -> tuple[int, int]:
    assert L.data_entries, "base image has no allocated data cluster"
    return L.data_entries[0]


def test_l2_entry_unaligned(env, worker):
    for base in ("v3_64k", "extl2", "v2_512"):
        p = mutant(env, base, "l2unal")
        L = read_layout(p)
        pos, e = _first_data_entry(L)
        if L.cs == 512:
            # 512 B clusters: every offset is aligned; set a reserved low bit instead, which
            # QEMU ignores when reading (only qemu-img check reports it).
            patch(p, pos, ">Q", e | 0x100)
        else:
            patch(p, pos, ">Q", e + 0x200)
        for writable in (False, True):
            res = worker.run(path=p, writable=writable, write=(0, 4096))
            if L.cs == 512:
                assert_sane(res)
            else:
                assert_refused(res, *CORRUPT)


def test_l2_entry_beyond_eof(env, worker):
    for base in ("v3_64k", "extl2", "v2_512"):
        p = mutant(env, base, "l2eof")
        L = read_layout(p)
        pos, e = _first_data_entry(L)
        patch(p, pos, ">Q", (e & ~OFFSET_MASK) | (1 << 40))
        res = worker.run(path=p)
        assert_sane(res)
        if res["outcome"] == "error":
            assert "Corrupt" in res["mro"], describe(res)


def test_l2_entry_points_at_header(env, worker):
    """A data cluster at offset 0 with the COPIED flag: rewriting it would hit the header."""
    p = mutant(env, "v3_64k", "l2hdr")
    L = read_layout(p)
    pos, e = _first_data_entry(L)
    patch(p, pos, ">Q", COPIED | 0)            # offset 0 = "unallocated" by the spec
    res = worker.run(path=p, writable=True, write=(0, 4096))
    assert_sane(res)
    assert p.read_bytes()[:4] == MAGIC, "the header was overwritten"


def test_l2_table_offset_beyond_eof(env, worker):
    for base in ("v3_64k", "v2_512", "snapshot"):
        p = mutant(env, base, "l2tabeof")
        L = read_layout(p)
        idx = next(i for i, e in enumerate(L.l1) if e & OFFSET_MASK)
        patch(p, L.h["l1_table_offset"] + 8 * idx, ">Q", COPIED | (L.file_size // L.cs + 16) * L.cs)
        for writable in (False, True):
            res = worker.run(path=p, writable=writable, write=(0, 4096))
            assert_refused(res, *CORRUPT)


def test_l2_table_offset_unaligned(env, worker):
    p = mutant(env, "v3_64k", "l2tabunal")
    L = read_layout(p)
    patch(p, L.h["l1_table_offset"], ">Q", L.l1[0] + 0x200)
    for writable in (False, True):
        res = worker.run(path=p, writable=writable, write=(0, 4096))
        assert_refused(res, *CORRUPT)


def test_l1_reserved_bits(env, worker):
    p = mutant(env, "v3_64k", "l1resv")
    L = read_layout(p)
    patch(p, L.h["l1_table_offset"], ">Q", L.l1[0] | (1 << 60) | 0x1)
    res = worker.run(path=p)
    assert_sane(res)


def _metadata_untouched(p: Path, before: bytes) -> None:
    """Guest data never lands on the metadata the image had before the write (header, L1,
    refcount table, L2 tables, refcount blocks); the header's identity fields stay put."""
    after = p.read_bytes()
    assert after[:4] == MAGIC, "header magic overwritten"
    assert after[4:36] == before[4:36], "header fields (version..size) changed under a write"
    L = layout(before)
    regions = ([("header", 0, L.header_used),
                ("L1 table", L.h["l1_table_offset"], 8 * L.h["l1_size"]),
                ("refcount table", L.h["refcount_table_offset"],
                 L.h["refcount_table_clusters"] * L.cs)]
               + [("L2 table", t, L.cs) for t in L.l2_tables]
               + [("refcount block", b, L.cs) for b in L.refblocks])
    for what, off, n in regions:
        assert WRITE_PATTERN not in after[off:off + n], (
            f"guest data written over the {what} at 0x{off:x}")


def written(raw: bytes, off: int, n: int) -> str:
    """sha256 of a guest image ``raw`` after the worker's pattern write at (off, n)."""
    n = min(n, len(raw))
    off = max(0, min(off, len(raw) - n))
    payload = (WRITE_PATTERN * (n // 8 + 1))[:n]
    return hashlib.sha256(raw[:off] + payload + raw[off + n:]).hexdigest()


@pytest.mark.parametrize("target", ["header", "l1-table", "refcount-table"])
def test_l1_entry_points_at_metadata(env, worker, target):
    """An L1 entry naming the header, the L1 table or the refcount table as its L2 table:
    reads may interpret those bytes, but a guest write must never land on metadata."""
    base = "v3_64k"
    p = mutant(env, base, f"l1meta-{target}")
    L = read_layout(p)
    off = {"header": 0, "l1-table": L.h["l1_table_offset"],
           "refcount-table": L.h["refcount_table_offset"]}[target]
    patch(p, L.h["l1_table_offset"], ">Q", COPIED | off)
    before = p.read_bytes()
    res = worker.run(path=p)
    assert_sane(res)
    res = worker.run(path=p, writable=True, write=(0, 65536))
    assert_sane(res)
    _metadata_untouched(p, before)


def test_l1_entry_points_at_header_512(env, worker):
    """With 512 B clusters, cluster 1 is still inside what the header uses on some images;
    point the first L1 entry at the refcount table and write."""
    p = mutant(env, "v2_512", "l1meta512")
    L = read_layout(p)
    patch(p, L.h["l1_table_offset"], ">Q", COPIED | L.h["refcount_table_offset"])
    before = p.read_bytes()
    res = worker.run(path=p, writable=True, write=(0, 512))
    assert_sane(res)
    _metadata_untouched(p, before)


def test_l2_tables_shared_between_l1_entries(env, worker):
    """Two L1 entries naming the same L2 table (refcount 1, COPIED): reads are defined, a
    write through one must not silently change what the other reads... or be refused."""
    p = mutant(env, "v2_512", "l2shared")
    L = read_layout(p)
    patch(p, L.h["l1_table_offset"] + 8 * 5, ">Q", L.l1[0])
    res = worker.run(path=p)
    assert_sane(res)
    res = worker.run(path=p, writable=True, write=(0, 512))
    assert_sane(res)


# --- compressed clusters ---------------------------------------------------------------------

@pytest.mark.parametrize("base", ["compressed", "compressed_zstd"])
def test_compressed_data_beyond_eof(env, worker, base):
    p = mutant(env, base, "ceof")
    L = read_layout(p)
    assert L.compressed_entries, "no compressed clusters in the base image"
    pos, e = L.compressed_entries[0]
    x = 62 - (L.h["cluster_bits"] - 8)
    patch(p, pos, ">Q", (e & ~((1 << x) - 1)) | (L.file_size + 4096))
    for writable in (False, True):
        res = worker.run(path=p, writable=writable, write=(0, 4096))   # COW needs the data
        assert_refused(res, *CORRUPT)


@pytest.mark.parametrize("base", ["compressed", "compressed_zstd"])
def test_compressed_data_garbage(env, worker, base):
    p = mutant(env, base, "cgarbage")
    L = read_layout(p)
    rng = random.Random(11)
    with open(p, "r+b") as f:
        for _, e in L.compressed_entries:
            off, n = L.compressed_extent(e)
            f.seek(off)
            f.write(rng.randbytes(min(n, L.file_size - off)))
    for writable in (False, True):
        res = worker.run(path=p, writable=writable, write=(0, 4096))
        assert_refused(res, *CORRUPT)


@pytest.mark.parametrize("base", ["compressed", "compressed_zstd"])
def test_compressed_data_truncated_stream(env, worker, base):
    """Valid stream start, but the descriptor's sector count cut to one sector."""
    p = mutant(env, base, "cshort")
    L = read_layout(p)
    x = 62 - (L.h["cluster_bits"] - 8)
    hits = 0
    for pos, e in L.compressed_entries:
        off, n = L.compressed_extent(e)
        if n > 1024:
            patch(p, pos, ">Q", (e & ~(((1 << (L.h["cluster_bits"] - 8)) - 1) << x)))
            hits += 1
    assert hits, "no multi-sector compressed cluster to cut"
    res = worker.run(path=p)
    assert_refused(res, *CORRUPT)


@pytest.mark.parametrize("base", ["compressed", "compressed_zstd"])
def test_compressed_sector_count_max(env, worker, base):
    """The largest sector count a descriptor can hold: bounded reads, no blow-up."""
    p = mutant(env, base, "cmax")
    L = read_layout(p)
    x = 62 - (L.h["cluster_bits"] - 8)
    pos, e = L.compressed_entries[0]
    patch(p, pos, ">Q", e | (((1 << (L.h["cluster_bits"] - 8)) - 1) << x))
    res = worker.run(path=p)
    assert_sane(res)


def test_compressed_bomb(env, worker):
    """A zlib stream that inflates far past one cluster must not be inflated in full."""
    p = mutant(env, "compressed", "bomb")
    L = read_layout(p)
    co = zlib.compressobj(9, zlib.DEFLATED, -12)
    bomb = co.compress(bytes(64 * MIB)) + co.flush()
    off = (L.file_size + 511) & ~511
    with open(p, "r+b") as f:
        f.seek(off)
        f.write(bomb)
    nsect = (len(bomb) + 511) // 512
    x = 62 - (L.h["cluster_bits"] - 8)
    maxsect = (1 << (L.h["cluster_bits"] - 8)) - 1
    pos, e = L.compressed_entries[0]
    patch(p, pos, ">Q", COMPRESSED | (min(nsect - 1, maxsect) << x) | off)
    res = worker.run(path=p)
    assert_sane(res)


def test_compressed_flag_in_extended_l2(env, worker):
    """Compressed clusters with a non-zero subcluster bitmap are invalid in extended L2."""
    p = mutant(env, "extl2", "extl2comp")
    L = read_layout(p)
    pos, e = _first_data_entry(L)
    patch(p, pos, ">Q", COMPRESSED | (e & OFFSET_MASK))
    res = worker.run(path=p)
    assert_sane(res)


def test_extended_l2_bitmap_alloc_and_zero(env, worker):
    """A subcluster both allocated and zero is invalid (QEMU: -EIO)."""
    p = mutant(env, "extl2", "extl2bits")
    L = read_layout(p)
    pos, e = _first_data_entry(L)
    patch(p, pos + 8, ">Q", 0xFFFFFFFF_FFFFFFFF)
    res = worker.run(path=p)
    assert_refused(res, *CORRUPT)


def test_extended_l2_on_small_clusters(env, worker):
    p = mutant(env, "v3_512_rc64", "extl2small")
    patch_field(p, "incompatible_features", 1 << 4)
    res = worker.run(path=p)
    assert_refused(res, *REFUSED)


# --- refcount damage (reads must not care; writes must not trust it blindly) -----------------

def test_refcount_block_beyond_eof(env, worker):
    for base in ("v3_64k", "v2_512"):
        p = mutant(env, base, "rbeof")
        L = read_layout(p)
        patch(p, L.h["refcount_table_offset"], ">Q", (L.file_size // L.cs + 64) * L.cs)
        res = worker.run(path=p)
        assert_sane(res)
        if res["outcome"] == "ok":
            assert res["sha"] == env["shas"][base], "refcounts changed what a read returns"
        res = worker.run(path=p, writable=True, write=(3 * MIB, 8192))
        assert_sane(res)


def test_refcount_blocks_zeroed_then_write(env, worker):
    """Every refcount says "free": a write must not allocate over live metadata or data."""
    for base in ("v3_64k", "v2_512", "snapshot"):
        p = mutant(env, base, "rbzero")
        L = read_layout(p)
        with open(p, "r+b") as f:
            for rb in L.refblocks:
                f.seek(rb)
                f.write(bytes(L.cs))
        before = p.read_bytes()
        wr = (3 * MIB + 4096, 65536)
        res = worker.run(path=p, writable=True, write=wr)
        assert_sane(res)
        _metadata_untouched(p, before)
        if res["outcome"] == "ok":
            # Whatever it did, the data the guest had must still be there.
            res2 = worker.run(path=p)
            assert res2["outcome"] == "ok", describe(res2)
            assert res2["sha"] == written(env["raws"][base], *wr), (
                "a write on an image whose refcounts say 'free' destroyed guest data")


@pytest.mark.parametrize("value", [1 << 63, (1 << 63) | 0x600, 1 << 62, OFFSET_MASK,
                                   (1 << 56) - 512])
@pytest.mark.parametrize("base", ["v3_64k", "v2_512"])
def test_refcount_table_entry_out_of_range(env, worker, base, value):
    """A refcount block "offset" far past EOF (or past what pread takes): reads don't need
    refcounts; a writable open (v2: checked at open) and the first allocation must refuse."""
    p = mutant(env, base, "rtrange")
    L = read_layout(p)
    patch(p, L.h["refcount_table_offset"], ">Q", value)
    res = worker.run(path=p)
    assert_sane(res)
    res = worker.run(path=p, writable=True, write=(3 * MIB + 4096, 65536))
    assert_refused(res, *CORRUPT)


@pytest.mark.parametrize("base,value", [("v2_512", COPIED | (1 << 40)),
                                        ("v3_64k", COPIED | (1 << 55)),
                                        ("v3_64k", OFFSET_MASK)])
def test_l2_entry_far_beyond_eof_writable(env, worker, base, value):
    """A data cluster at a huge offset: opening writable (a v2 image is checked at open) and
    writing elsewhere must not walk every cluster up to that offset."""
    p = mutant(env, base, "l2far")
    L = read_layout(p)
    pos, e = L.data_entries[-1]
    patch(p, pos, ">Q", value)
    res = worker.run(path=p, writable=True, write=(0, 512))
    assert_sane(res)


def _hostile_for_check(env) -> list[tuple[str, Path]]:
    out = []

    def make(base, tag, fn):
        p = mutant(env, base, f"chk-{tag}")
        fn(p, read_layout(p))
        out.append((tag, p))

    make("v2_512", "l2-entry-far", lambda p, L: patch(p, L.data_entries[0][0], ">Q",
                                                       COPIED | (1 << 55)))
    make("v3_64k", "l2-entry-far", lambda p, L: patch(p, L.data_entries[0][0], ">Q",
                                                       OFFSET_MASK))
    make("v3_64k", "reftable-2^63", lambda p, L: patch(p, L.h["refcount_table_offset"], ">Q",
                                                        1 << 63))
    make("v3_64k", "refblock-zeroed", lambda p, L: patch_bytes(p, L.refblocks[0], bytes(L.cs)))
    make("v3_64k", "l1-self", lambda p, L: patch(p, L.h["l1_table_offset"], ">Q",
                                                 COPIED | L.h["l1_table_offset"]))
    make("v3_64k", "l2-table-far", lambda p, L: patch(p, L.h["l1_table_offset"], ">Q",
                                                      COPIED | (1 << 54)))
    make("compressed", "compressed-far",
         lambda p, L: patch(p, L.compressed_entries[0][0], ">Q", COMPRESSED | ((1 << 54) - 1)))
    make("snapshot", "snapshot-l1-far",
         lambda p, L: patch(p, L.h["snapshots_offset"], ">Q", 1 << 50))
    make("snapshot", "snapshot-l1-huge",
         lambda p, L: patch(p, L.h["snapshots_offset"] + 8, ">I", 0x7FFFFFFF))
    make("extl2", "bitmap-all-ones", lambda p, L: patch(p, L.data_entries[0][0] + 8, ">Q",
                                                        (1 << 64) - 1))
    return out


def test_check_image_on_hostile_images(env, worker):
    """``check_image`` walks every table: it must finish quickly and report what
    ``qemu-img check`` reports (exit 2 when qemu-img finds corruption), or refuse."""
    bad = []
    for tag, p in _hostile_for_check(env):
        qrc, qdata = qemu.check(str(p))
        res = worker.run(path=p, check=True)
        try:
            assert_sane(res)
            if res["outcome"] == "ok" and qrc == 2:
                assert res["exit_code"] == 2, (
                    f"damage not reported (snapfs exit {res['exit_code']}, qemu-img check 2: "
                    f"{qdata.get('stderr', '').strip().splitlines()[:2]})")
        except AssertionError as exc:
            bad.append(f"{tag} ({p.name}): {exc}")
    assert not bad, "\n".join(bad)


# --------------------------------------------------------------------------------------------
# 2. Mutation fuzzer
# --------------------------------------------------------------------------------------------

def _extremes64(L: Layout) -> list[int]:
    fs, cs = L.file_size, L.cs
    eof_c = (fs + cs - 1) // cs * cs
    return [0, 1, 0x200, 1 << 63, (1 << 63) | 1, 1 << 62, (1 << 62) | (1 << 63),
            0xFFFFFFFFFFFFFFFF, 0x7FFFFFFFFFFFFFFF, OFFSET_MASK, fs, fs + 1, eof_c, eof_c + cs,
            COPIED | eof_c, COPIED | (eof_c + 1024 * cs), COPIED | cs, COPIED,
            COPIED | L.h["l1_table_offset"], COPIED | L.h["refcount_table_offset"],
            COMPRESSED | fs, 1 << 55, (1 << 56) - 1]


EXTREMES32 = [0, 1, 2, 3, 4, 7, 8, 9, 16, 21, 22, 31, 32, 63, 64, 104, 105, 112, 0x1000,
              0x7FFFFFFF, 0x80000000, 0xFFFFFFFF]


def _regions(L: Layout) -> dict[str, list[tuple[int, int]]]:
    """Named metadata regions (offset, length) the mutators aim at."""
    h, cs = L.h, L.cs
    r = {
        "header": [(0, min(max(L.header_used, 104), cs))],
        "l1": [(h["l1_table_offset"], 8 * h["l1_size"])],
        "l2": [(t, cs) for t in L.l2_tables],
        "reftable": [(h["refcount_table_offset"], 8 * max(1, len([e for e in L.reftable if e])))],
        "refblock": [(b, cs) for b in L.refblocks],
    }
    if L.snapshot_table:
        r["snapshots"] = [L.snapshot_table] + [(o, 8 * n) for o, n in L.snapshot_l1s if n]
    if L.compressed_entries:
        r["compressed"] = [L.compressed_extent(e) for _, e in L.compressed_entries]
    return {k: [(o, n) for o, n in v if n > 0 and o + n <= L.file_size] for k, v in r.items()}


def mutate(buf: bytes, L: Layout, rng: random.Random) -> tuple[bytearray, list]:
    """Apply 1-3 random mutations; returns the mutant and a replayable description."""
    out = bytearray(buf)
    ops = []
    regions = {k: v for k, v in _regions(L).items() if v}
    for _ in range(rng.choice((1, 1, 1, 2, 3))):
        kind = rng.choices(["flip", "over64", "over32", "truncate"], [50, 30, 10, 10])[0]
        if kind == "truncate":
            n = rng.choice([
                rng.randrange(0, max(1, len(out))),
                rng.randrange(0, min(len(out), 2 * L.cs) or 1),
                max(0, len(out) - rng.randrange(1, 4096)),
                max(0, L.h["l1_table_offset"] + rng.randrange(0, 16)),
            ])
            n = min(n, len(out))
            del out[n:]
            ops.append(("truncate", n))
            continue
        region = rng.choice(sorted(regions))
        off, length = rng.choice(regions[region])
        if region == "header" and rng.random() < 0.1:
            off, length = 0, L.cs          # anywhere in the first cluster
        if kind == "flip":
            for _ in range(rng.choice((1, 1, 2, 4))):
                pos = off + rng.randrange(length)
                bit = rng.randrange(8)
                if pos < len(out):
                    out[pos] ^= 1 << bit
                    ops.append(("flip", region, pos, bit))
        elif kind == "over64":
            if region == "header":
                name = rng.choice(["backing_file_offset", "size", "l1_table_offset",
                                   "refcount_table_offset", "snapshots_offset",
                                   "incompatible_features", "compatible_features",
                                   "autoclear_features"])
                pos = OFF[name][0]
            else:
                pos = off + rng.randrange(max(1, length // 8)) * 8
            val = rng.choice(_extremes64(L))
            if pos + 8 <= len(out):
                struct.pack_into(">Q", out, pos, val)
                ops.append(("over64", region, pos, val))
        else:
            if region == "header":
                name = rng.choice(["version", "backing_file_size", "cluster_bits",
                                   "crypt_method", "l1_size", "refcount_table_clusters",
                                   "nb_snapshots", "refcount_order", "header_length"])
                pos = OFF[name][0]
            else:
                pos = off + rng.randrange(max(1, length // 4)) * 4
            val = rng.choice(EXTREMES32)
            if pos + 4 <= len(out):
                struct.pack_into(">I", out, pos, val)
                ops.append(("over32", region, pos, val))
    return out, ops


def _fuzz_one(w: Worker, env, base: str, i: int, data: bytes, ops: list, mode: str,
              wr: tuple[int, int], failures_dir: Path) -> tuple[dict, str | None]:
    path = env["bases"] / f"fz_{w.tag}_{base}_{i:04d}.qcow2"
    path.write_bytes(data)
    writable = mode == "write"
    res = w.run(path=path, writable=writable, write=wr if writable else None,
                check=mode == "check")
    problem = None
    try:
        assert_sane(res)
        if res.get("fd_leak"):
            problem = f"leaked {res['fd_leak']} file descriptor(s)"
        refcount_only = ops and all(o[0] != "truncate" and o[1] in ("reftable", "refblock")
                                    for o in ops)
        if (refcount_only and mode == "read" and res["outcome"] == "ok"
                and res.get("sha") != env["shas"][base]):
            problem = "refcount-only damage changed the guest-visible content"
    except AssertionError as exc:
        problem = str(exc)
    if problem:
        keep = failures_dir / path.name
        shutil.copyfile(path, keep) if path.exists() else None
        (failures_dir / (path.name + ".json")).write_text(json.dumps(
            {"base": base, "index": i, "seed": SEED, "ops": ops, "mode": mode,
             "write": wr, "result": res}, indent=1, default=str))
    path.unlink(missing_ok=True)
    return res, problem


@pytest.mark.parametrize("base", BASES)
def test_mutation_fuzzer(env, workers, base):
    src = env["paths"][base]
    buf = src.read_bytes()
    L = layout(buf)
    rng = random.Random(f"{SEED}-{base}")
    failures_dir = env["dir"] / "failures"
    failures_dir.mkdir(exist_ok=True)
    jobs = []
    for i in range(MUTANTS_PER_BASE):
        data, ops = mutate(buf, L, rng)
        mode = rng.choices(["read", "write", "check"], [55, 35, 10])[0]
        wr = (rng.choice([0, 4096, 65536 + 512, 2 * MIB, 3 * MIB + 100, VSIZE - 4096]),
              rng.choice([512, 4096, 65536]))
        jobs.append((i, bytes(data), ops, mode, wr))
    hangs = [0]

    def drive(w: Worker, part):
        out = []
        for j in part:
            if hangs[0] >= MAX_HANGS_PER_BASE:
                break
            r = (j, *_fuzz_one(w, env, base, *j, failures_dir))
            hangs[0] += r[1]["outcome"] in ("hang", "timeout")
            out.append(r)
        return out

    with ThreadPoolExecutor(len(workers)) as ex:
        parts = [jobs[k::len(workers)] for k in range(len(workers))]
        results = [r for fut in [ex.submit(drive, w, part) for w, part in zip(workers, parts)]
                   for r in fut.result()]

    stats: dict[str, int] = {}
    bad = []
    for (i, _, ops, mode, wr), res, problem in results:
        key = f"{mode}:{res['outcome']}"
        stats[key] = stats.get(key, 0) + 1
        if problem:
            bad.append(f"#{i} mode={mode} write={wr} ops={ops}\n  -> {problem}")
    print(f"{base}: {len(results)} mutants, {dict(sorted(stats.items()))}")
    stopped = (f"; stopped after {MAX_HANGS_PER_BASE} hangs, {len(results)}/{len(jobs)} run"
               if len(results) < len(jobs) else "")
    assert not bad, (f"{len(bad)}/{len(results)} mutants of {base} misbehaved (seed {SEED}; "
                     f"kept in {failures_dir}{stopped}):\n" + "\n".join(bad[:15]))
    # Not vacuous: some mutants must get through and some must be refused.
    assert any(k.endswith(":ok") for k in stats) and any(k.endswith(":error") for k in stats)


# --------------------------------------------------------------------------------------------

if __name__ == "__main__":
    if sys.argv[1:] == ["--worker"]:
        _worker_main()
    else:
        sys.exit("usage: python -m tests.chain.test_hostile --worker")
