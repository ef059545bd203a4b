"""Read corpus: qcow2/raw images built at test time by qemu-img/qemu-io, read through the engine.

Every image is generated here (nothing binary is committed), then read through
``open_chain(path, fmt)`` + ``read`` and compared byte for byte with
``qemu-img convert -O raw`` of the same image (``tests.qemu.to_raw``), the oracle.

Each case is checked twice: the whole virtual disk in a single read, and a set of
unaligned windows (fixed seed, plus windows placed on cluster, L2-table and
backing-end boundaries of every layer of the chain) against the same slice of the
qemu-img raw output.

Data is written with distinct ``-P`` byte patterns and with ``-s`` source files of
seeded random bytes (a length that is no power of two), so a cluster mix-up, a
wrong intra-cluster offset or a layer mix-up all show as a mismatch.
"""

from __future__ import annotations

import json
import random
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest

from tests import qemu

KiB = 1024
MiB = 1024 * KiB

# --------------------------------------------------------------------------------------
# generator helpers
# --------------------------------------------------------------------------------------


def _io(path: Path, *cmds: str, fmt: str = "qcow2") -> None:
    if cmds:
        qemu.io(str(path), *cmds, fmt=fmt)


def _create(d: Path, name: str, size: int | str | None, *opts: str, fmt: str = "qcow2",
            backing: str | None = None, backing_fmt: str | None = None) -> Path:
    """qemu-img create; ``backing`` is a bare name, resolved by qemu in the image's directory."""
    p = d / name
    argv = ["create", "-q", "-f", fmt]
    if backing:
        argv += ["-b", backing, "-F", backing_fmt or "qcow2"]
    for o in opts:
        argv += ["-o", o]
    argv.append(str(p))
    if size is not None:
        argv.append(str(size))
    qemu.img(*argv)
    return p


def _snapshot(path: Path, *args: str) -> None:
    qemu.img("snapshot", *args, str(path))


def _src(d: Path, seed: int, length: int = 12289, alphabet: bytes | None = None) -> str:
    """A file of seeded bytes for ``qemu-io write -s`` (qemu repeats it to fill the write)."""
    p = d / f"src-{seed}-{length}-{len(alphabet) if alphabet else 256}.bin"
    if not p.exists():
        p.write_bytes(_bytes(seed, length, alphabet))
    return str(p)


def _bytes(seed: int, length: int, alphabet: bytes | None = None) -> bytes:
    rng = random.Random(seed)
    if alphabet is None:
        return rng.randbytes(length)
    return bytes(rng.choice(alphabet) for _ in range(length))


# Compressible yet position-dependent: 2 bits of entropy per byte.
LOW_ENTROPY = b"\x11\x5a\xa5\xee"


class Writer:
    """Builds a qemu-io command list with distinct patterns and seeded source files."""

    def __init__(self, d: Path, seed: int):
        self.d = d
        self.seed = seed
        self.n = 0
        self.cmds: list[str] = []

    def _next(self) -> int:
        self.n += 1
        return self.n

    def pat(self, off: int, length: int, flags: str = "") -> "Writer":
        n = self._next()
        byte = 1 + (self.seed * 37 + n * 11) % 254       # never 0x00, varies per write
        self.cmds.append(f"write {flags} -P {byte} {off} {length}".replace("  ", " "))
        return self

    def rnd(self, off: int, length: int, flags: str = "", alphabet: bytes | None = None) -> "Writer":
        n = self._next()
        src = _src(self.d, self.seed * 1000 + n, alphabet=alphabet)
        self.cmds.append(f"write {flags} -s {src} {off} {length}".replace("  ", " "))
        return self

    def zero(self, off: int, length: int, unmap: bool = False) -> "Writer":
        self.cmds.append(f"write -z {'-u ' if unmap else ''}{off} {length}")
        return self

    def discard(self, off: int, length: int) -> "Writer":
        self.cmds.append(f"discard {off} {length}")
        return self

    def scatter(self, size: int, cs: int, count: int = 10, maxlen: int | None = None) -> "Writer":
        """A mix of writes over [0, size): first cluster, a boundary straddle, random
        unaligned writes (alternating pattern/random data) and the last bytes."""
        rng = random.Random(self.seed)
        maxlen = maxlen or max(3 * cs + 777, 9000)
        self.pat(0, min(cs, size))
        if 2 * cs < size:
            self.rnd(cs - 100, min(300 + cs, size - cs + 100))
        for i in range(count):
            off = rng.randrange(size)
            length = rng.randint(1, min(maxlen, size - off))
            (self.pat if i % 2 else self.rnd)(off, length)
        tail = min(size, 777 + cs // 2)
        self.rnd(size - tail, tail)
        return self

    def run(self, path: Path, fmt: str = "qcow2") -> None:
        # one qemu-io process per ~200 commands keeps the argv small and the run fast
        for i in range(0, len(self.cmds), 200):
            _io(path, *self.cmds[i:i + 200], fmt=fmt)
        self.cmds = []


def _raw_base(d: Path, name: str, size: int, seed: int, cs: int = 4096) -> Path:
    p = d / name
    p.write_bytes(b"")
    with open(p, "wb") as f:
        f.truncate(size)
    Writer(d, seed).scatter(size, cs, count=8).run(p, fmt="raw")
    return p


def _qcow2_base(d: Path, name: str, size: int, seed: int, *opts: str, cs: int = 65536,
                dense: bool = False) -> Path:
    p = _create(d, name, size, f"cluster_size={cs}", *opts)
    w = Writer(d, seed)
    if dense:
        w.rnd(0, size)
    w.scatter(size, cs, count=8).run(p)
    return p


def _compressible_raw(d: Path, name: str, size: int, seed: int, chunk: int = 16 * KiB) -> Path:
    """Raw source for `convert -c`: low-entropy, random, uniform and zero chunks."""
    rng = random.Random(seed)
    out = bytearray()
    kinds = ["low", "low", "rand", "uniform", "zero", "low"]
    i = 0
    while len(out) < size:
        n = min(chunk + rng.randrange(chunk), size - len(out))
        kind = kinds[i % len(kinds)]
        i += 1
        if kind == "low":
            out += _bytes(seed * 100 + i, n, LOW_ENTROPY)
        elif kind == "rand":
            out += _bytes(seed * 100 + i, n)
        elif kind == "uniform":
            out += bytes([1 + i % 254]) * n
        else:
            out += bytes(n)
    p = d / name
    p.write_bytes(bytes(out))
    return p


def _convert_compressed(d: Path, name: str, src: Path, *opts: str) -> Path:
    p = d / name
    argv = ["convert", "-q", "-c", "-f", "raw", "-O", "qcow2"]
    for o in opts:
        argv += ["-o", o]
    qemu.img(*argv, str(src), str(p))
    return p


# --------------------------------------------------------------------------------------
# the corpus: name -> builder(dir) -> (top image path, top format)
# --------------------------------------------------------------------------------------

Builder = Callable[[Path], "tuple[Path, str]"]
CASES: dict[str, Builder] = {}


def case(name: str):
    def deco(fn):
        assert name not in CASES, name
        CASES[name] = fn
        return fn
    return deco


_CS = {"512": 512, "4k": 4096, "64k": 65536, "2M": 2 * MiB}
# virtual sizes: several L2 tables for 512 (32 KiB per table) and 4k (2 MiB per table)
_SIZE = {512: 512 * KiB + 4567, 4096: 5 * MiB + 123 * 512, 65536: 4 * MiB, 2 * MiB: 7 * MiB}


def _version_case(compat: str, cs: int):
    def build(d: Path):
        size = _SIZE[cs]
        p = _create(d, "img.qcow2", size, f"compat={compat}", f"cluster_size={cs}")
        w = Writer(d, cs + (1 if compat == "1.1" else 0))
        if cs == 512:
            w.rnd(100, 300 * KiB)          # a dense run over ~10 L2 tables
        w.scatter(size, cs, count=14).run(p)
        return p, "qcow2"
    return build


for _compat, _v in (("0.10", "v2"), ("1.1", "v3")):
    for _label, _cs in _CS.items():
        case(f"{_v}-cs{_label}")(_version_case(_compat, _cs))


# ---- plain raw -----------------------------------------------------------------------

@case("raw-plain")
def _raw_plain(d):
    return _raw_base(d, "disk.raw", 3 * MiB + 17, seed=5), "raw"


@case("raw-unaligned-1000000")
def _raw_unaligned(d):
    return _raw_base(d, "disk.raw", 1000000, seed=6), "raw"


# ---- backing chains ------------------------------------------------------------------

@case("chain-qcow2-over-raw")
def _over_raw(d):
    _raw_base(d, "base.raw", 2 * MiB, seed=10)
    p = _create(d, "top.qcow2", 2 * MiB, "cluster_size=4096", backing="base.raw", backing_fmt="raw")
    Writer(d, 11).scatter(2 * MiB, 4096, count=8, maxlen=20000).run(p)
    return p, "qcow2"


@case("chain-qcow2-over-qcow2")
def _over_qcow2(d):
    _qcow2_base(d, "base.qcow2", 3 * MiB, 12, cs=65536, dense=True)
    p = _create(d, "top.qcow2", 3 * MiB, "cluster_size=4096", backing="base.qcow2")
    Writer(d, 13).scatter(3 * MiB, 4096, count=12, maxlen=20000).run(p)
    return p, "qcow2"


@case("chain-v2-over-v3-mixed-cs")
def _v2_over_v3(d):
    _qcow2_base(d, "base.qcow2", 2 * MiB, 14, "compat=1.1", cs=512)
    p = _create(d, "top.qcow2", 2 * MiB, "compat=0.10", "cluster_size=65536", backing="base.qcow2")
    Writer(d, 15).scatter(2 * MiB, 512, count=10, maxlen=5000).run(p)
    return p, "qcow2"


@case("chain-backing-shorter")
def _backing_shorter(d):
    # base ends at 1 MiB + 1536 (qcow2 sizes round to 512): a 64k overlay cluster straddles it
    _qcow2_base(d, "base.qcow2", MiB + 1536, 16, cs=4096, dense=True)
    p = _create(d, "top.qcow2", 3 * MiB, "cluster_size=65536", backing="base.qcow2")
    w = Writer(d, 17)
    w.pat(1000, 3000)                       # partial cluster: rest COW'd from the base
    w.rnd(MiB + 1000, 700)                  # partial cluster straddling base EOF
    w.pat(2 * MiB + 5, 4000)                # beyond the base entirely
    w.run(p)
    return p, "qcow2"


@case("chain-raw-backing-shorter-unaligned")
def _raw_backing_shorter(d):
    _raw_base(d, "base.raw", 1000001, seed=18)
    p = _create(d, "top.qcow2", 2 * MiB, "cluster_size=65536", backing="base.raw", backing_fmt="raw")
    w = Writer(d, 19)
    w.pat(0, 512)
    w.rnd(1000001 - 3000, 1000)             # partial COW inside the cluster holding base EOF
    w.run(p)
    return p, "qcow2"


@case("chain-raw-backing-shorter-untouched")
def _raw_backing_shorter2(d):
    # the cluster holding base EOF is not allocated in the overlay: read through to base
    _raw_base(d, "base.raw", 1000001, seed=20)
    p = _create(d, "top.qcow2", 3 * MiB, "cluster_size=4096", backing="base.raw", backing_fmt="raw")
    Writer(d, 21).pat(0, 4096).pat(2 * MiB, 4096).run(p)
    return p, "qcow2"


@case("chain-backing-longer")
def _backing_longer(d):
    _qcow2_base(d, "base.qcow2", 4 * MiB, 22, cs=65536, dense=True)
    p = _create(d, "top.qcow2", 2 * MiB - 512, "cluster_size=65536", backing="base.qcow2")
    Writer(d, 23).scatter(2 * MiB - 512, 65536, count=6).run(p)
    return p, "qcow2"


@case("chain-raw-backing-longer")
def _raw_backing_longer(d):
    _raw_base(d, "base.raw", 3 * MiB, seed=24)
    p = _create(d, "top.qcow2", MiB + 512, "cluster_size=4096", backing="base.raw", backing_fmt="raw")
    Writer(d, 25).pat(4096 * 3 + 5, 100).run(p)
    return p, "qcow2"


@case("chain-3-sizes-grow-shrink")
def _three_sizes(d):
    _qcow2_base(d, "a.qcow2", 2 * MiB, 26, cs=4096, dense=True)
    b = _create(d, "b.qcow2", MiB, "cluster_size=512", backing="a.qcow2")
    Writer(d, 27).scatter(MiB, 512, count=6, maxlen=3000).run(b)
    c = _create(d, "c.qcow2", 3 * MiB, "cluster_size=65536", backing="b.qcow2")
    Writer(d, 28).pat(MiB - 100, 200).rnd(2 * MiB + 3, 5000).run(c)
    return c, "qcow2"


@case("chain-32-deep")
def _chain32(d):
    size = MiB + 512
    _raw_base(d, "l00.raw", size, seed=30)
    below, below_fmt = "l00.raw", "raw"
    top = None
    for i in range(1, 32):
        cs = (512, 4096, 65536)[i % 3]
        compat = "0.10" if i % 4 == 0 else "1.1"
        name = f"l{i:02d}.qcow2"
        top = _create(d, name, size, f"cluster_size={cs}", f"compat={compat}",
                      backing=below, backing_fmt=below_fmt)
        w = Writer(d, 30 + i)
        # distinct region per layer, plus a shared region every layer overwrites in part
        w.pat(i * 30000 + i, 9000 + i)
        w.rnd(700000 + i * 1000, 4000)
        if compat == "1.1" and i % 5 == 0:
            w.zero(i * 30000 + 4096 * 4, 65536)        # zero over lower layers' data
        if i % 7 == 0:
            w.discard(0, 65536 * 2)
        w.run(top)
        below, below_fmt = name, "qcow2"
    return top, "qcow2"


# ---- zero / unallocated / discarded --------------------------------------------------

def _base_and_top(d, seed, size=2 * MiB, cs=65536, compat="1.1", base_cs=4096):
    _qcow2_base(d, "base.qcow2", size, seed, cs=base_cs, dense=True)
    return _create(d, "top.qcow2", size, f"cluster_size={cs}", f"compat={compat}",
                   backing="base.qcow2")


@case("zero-clusters-v3")
def _zero_v3(d):
    size = 2 * MiB
    p = _create(d, "img.qcow2", size, "cluster_size=65536")
    Writer(d, 40).rnd(0, size).zero(65536, 65536 * 3).zero(5 * 65536 + 100, 70000) \
        .zero(size - 65536, 65536).run(p)
    return p, "qcow2"


@case("zero-clusters-v3-over-backing")
def _zero_v3_backing(d):
    p = _base_and_top(d, 41)
    Writer(d, 42).zero(0, 65536).zero(3 * 65536, 65536 * 4).zero(10 * 65536 + 4000, 65536) \
        .pat(12 * 65536, 1000).run(p)
    return p, "qcow2"


@case("zero-clusters-v2-over-backing")
def _zero_v2_backing(d):
    p = _base_and_top(d, 43, compat="0.10")
    Writer(d, 44).zero(0, 65536).zero(3 * 65536 + 7, 65536 * 2).run(p)
    return p, "qcow2"


@case("zero-prealloc-offset")
def _zero_alloc(d):
    # write data, then write -z without -u on v3: qemu keeps the host cluster (ZERO|offset)
    size = 2 * MiB
    p = _create(d, "img.qcow2", size, "cluster_size=65536")
    Writer(d, 45).rnd(0, size).zero(2 * 65536, 65536 * 5).zero(20 * 65536, 65536).run(p)
    return p, "qcow2"


@case("zero-prealloc-offset-over-backing")
def _zero_alloc_backing(d):
    p = _base_and_top(d, 46)
    Writer(d, 47).rnd(0, 16 * 65536).zero(65536, 65536 * 3).zero(10 * 65536, 65536 * 2) \
        .pat(11 * 65536 + 300, 500).run(p)   # data written into a ZERO|offset cluster again
    return p, "qcow2"


@case("zero-unmap")
def _zero_unmap(d):
    size = 2 * MiB
    p = _create(d, "img.qcow2", size, "cluster_size=4096")
    Writer(d, 48).rnd(0, size).zero(8192, 40000, unmap=True).zero(MiB, 4096 * 9, unmap=True).run(p)
    return p, "qcow2"


@case("zero-unmap-over-backing")
def _zero_unmap_backing(d):
    p = _base_and_top(d, 49, cs=4096)
    Writer(d, 50).rnd(0, MiB).zero(8192, 40000, unmap=True).zero(MiB + 4096, 4096 * 9, unmap=True) \
        .run(p)
    return p, "qcow2"


@case("unallocated-over-backing")
def _unalloc(d):
    p = _base_and_top(d, 51, cs=65536, base_cs=512)
    Writer(d, 52).pat(65536 * 2 + 10, 20).rnd(65536 * 9, 65536).run(p)
    return p, "qcow2"


@case("discard-v3")
def _discard_v3(d):
    size = 2 * MiB
    p = _create(d, "img.qcow2", size, "cluster_size=65536")
    Writer(d, 53).rnd(0, size).discard(65536, 65536 * 4).discard(9 * 65536 + 5, 3 * 65536) \
        .discard(size - 65536, 65536).run(p)
    return p, "qcow2"


@case("discard-v3-over-backing")
def _discard_v3_backing(d):
    p = _base_and_top(d, 54)
    Writer(d, 55).rnd(0, 20 * 65536).discard(65536, 65536 * 4).discard(9 * 65536 + 5, 3 * 65536) \
        .discard(25 * 65536, 65536).run(p)
    return p, "qcow2"


@case("discard-v2")
def _discard_v2(d):
    size = 2 * MiB
    p = _create(d, "img.qcow2", size, "cluster_size=4096", "compat=0.10")
    Writer(d, 56).rnd(0, size).discard(4096, 4096 * 20).discard(MiB + 1, 50000).run(p)
    return p, "qcow2"


@case("discard-v2-over-backing")
def _discard_v2_backing(d):
    p = _base_and_top(d, 57, compat="0.10", cs=4096)
    Writer(d, 58).rnd(0, MiB).discard(4096, 4096 * 20).discard(500000 + 1, 50000).run(p)
    return p, "qcow2"


# ---- compressed ----------------------------------------------------------------------

def _compressed_case(ctype: str, cs: int, size: int):
    def build(d):
        src = _compressible_raw(d, "src.raw", size, seed=60 + cs % 97)
        return _convert_compressed(d, "img.qcow2", src, f"cluster_size={cs}",
                                   f"compression_type={ctype}"), "qcow2"
    return build


for _ct in ("zlib", "zstd"):
    for _label, _cs, _sz in (("512", 512, 300 * KiB + 512), ("4k", 4096, 2 * MiB + 4096),
                             ("64k", 65536, 3 * MiB), ("2M", 2 * MiB, 5 * MiB)):
        case(f"compressed-convert-{_ct}-cs{_label}")(_compressed_case(_ct, _cs, _sz))


@case("compressed-convert-v2-zlib")
def _compressed_v2(d):
    src = _compressible_raw(d, "src.raw", 2 * MiB, seed=70)
    return _convert_compressed(d, "img.qcow2", src, "compat=0.10", "cluster_size=65536"), "qcow2"


def _write_c_case(ctype: str, backing: bool):
    def build(d):
        cs = 65536
        size = 2 * MiB
        if backing:
            _qcow2_base(d, "base.qcow2", size, 71, cs=4096, dense=True)
        p = _create(d, "img.qcow2", size, f"cluster_size={cs}", f"compression_type={ctype}",
                    backing="base.qcow2" if backing else None)
        w = Writer(d, 72 if ctype == "zlib" else 73)
        for k in (0, 1, 2, 5, 9, 10, 20, 31):
            w.rnd(k * cs, cs, flags="-c", alphabet=LOW_ENTROPY)
        w.pat(3 * cs, cs, flags="-c")                         # highly compressible
        w.rnd(4 * cs, cs, flags="-c")                         # incompressible: stored plain
        w.pat(9 * cs + 1000, 3000)                            # partial overwrite of compressed
        w.zero(10 * cs, cs)                                   # compressed -> zero
        w.run(p)
        return p, "qcow2"
    return build


for _ct in ("zlib", "zstd"):
    case(f"compressed-write-c-{_ct}")(_write_c_case(_ct, False))
    case(f"compressed-write-c-{_ct}-over-backing")(_write_c_case(_ct, True))


@case("compressed-backing-under-overlay")
def _compressed_backing(d):
    src = _compressible_raw(d, "src.raw", 2 * MiB, seed=74)
    _convert_compressed(d, "base.qcow2", src, "cluster_size=4096", "compression_type=zstd")
    p = _create(d, "top.qcow2", 2 * MiB, "cluster_size=65536", backing="base.qcow2")
    Writer(d, 75).pat(100, 1000).rnd(MiB - 7, 70000).run(p)
    return p, "qcow2"


@case("compressed-write-c-cs512")
def _compressed_512(d):
    p = _create(d, "img.qcow2", 256 * KiB, "cluster_size=512")
    w = Writer(d, 76)
    for k in range(0, 400, 3):
        w.rnd(k * 512, 512, flags="-c", alphabet=LOW_ENTROPY)
    w.run(p)
    return p, "qcow2"


# ---- extended L2 ---------------------------------------------------------------------

def _extl2_case(cs: int, backing: bool):
    def build(d):
        size = 4 * MiB
        sub = cs // 32
        if backing:
            _qcow2_base(d, "base.qcow2", size, 80, cs=65536, dense=True)
        p = _create(d, "img.qcow2", size, "extended_l2=on", f"cluster_size={cs}",
                    backing="base.qcow2" if backing else None)
        w = Writer(d, 81 + cs // 65536)
        w.pat(sub, sub)                            # one subcluster of cluster 0
        w.rnd(3 * sub, 2 * sub)                    # two more, gap in between
        w.pat(cs + 5 * sub + 100, 300)             # unaligned inside one subcluster
        w.rnd(2 * cs - sub - 50, 2 * sub + 100)    # straddles a cluster boundary
        w.rnd(4 * cs, cs)                          # whole cluster
        w.zero(4 * cs + 2 * sub, 3 * sub)          # zero subclusters in an allocated cluster
        w.zero(6 * cs + 7 * sub, 2 * sub)          # zero subclusters in an unallocated cluster
        w.zero(7 * cs + sub, sub, unmap=True)
        w.pat(8 * cs, cs // 2)
        w.discard(8 * cs, cs)
        w.rnd(9 * cs + 31 * sub, sub)              # last subcluster of a cluster
        w.pat(10 * cs, cs, flags="-c")             # compressed cluster in an ext-L2 image
        w.scatter(size, sub, count=6, maxlen=3 * sub)
        w.run(p)
        return p, "qcow2"
    return build


for _label, _cs in (("64k", 65536), ("128k", 131072)):
    case(f"extl2-cs{_label}")(_extl2_case(_cs, False))
    case(f"extl2-cs{_label}-over-backing")(_extl2_case(_cs, True))


# ---- refcount widths -----------------------------------------------------------------

def _refcount_case(bits: int):
    def build(d):
        size = 2 * MiB
        p = _create(d, "img.qcow2", size, f"refcount_bits={bits}", "cluster_size=4096")
        Writer(d, 90 + bits).scatter(size, 4096, count=8, maxlen=60000).run(p)
        if bits > 1:                                 # refcount 2 does not fit in 1 bit
            _snapshot(p, "-c", "s1")
            Writer(d, 200 + bits).scatter(size, 4096, count=6, maxlen=30000).run(p)
        return p, "qcow2"
    return build


for _bits in (1, 2, 4, 8, 16, 32, 64):
    case(f"refcount-bits{_bits}")(_refcount_case(_bits))


# ---- preallocation -------------------------------------------------------------------

def _prealloc_case(mode: str, compat: str = "1.1"):
    def build(d):
        size = 3 * MiB
        p = _create(d, "img.qcow2", size, f"preallocation={mode}", f"compat={compat}",
                    "cluster_size=65536")
        Writer(d, 100 + len(mode)).scatter(size, 65536, count=6, maxlen=50000) \
            .zero(20 * 65536, 65536).run(p)
        return p, "qcow2"
    return build


case("prealloc-metadata")(_prealloc_case("metadata"))
case("prealloc-metadata-v2")(_prealloc_case("metadata", "0.10"))
case("prealloc-falloc")(_prealloc_case("falloc"))
case("prealloc-full")(_prealloc_case("full"))


@case("prealloc-metadata-extl2-over-backing")
def _prealloc_extl2_backing(d):
    # qemu allows preallocation with a backing file only with extended L2
    _qcow2_base(d, "base.qcow2", 2 * MiB, 105, cs=4096, dense=True)
    p = _create(d, "img.qcow2", 2 * MiB, "preallocation=metadata", "extended_l2=on",
                "cluster_size=65536", backing="base.qcow2")
    Writer(d, 106).pat(2048, 2048).rnd(65536 * 5 + 100, 9000).run(p)
    return p, "qcow2"


# ---- internal snapshots --------------------------------------------------------------

@case("snapshot-active-state")
def _snap_active(d):
    size = 2 * MiB
    p = _create(d, "img.qcow2", size, "cluster_size=65536")
    Writer(d, 110).rnd(0, size).run(p)
    _snapshot(p, "-c", "snap1")
    Writer(d, 111).scatter(size, 65536, count=8).zero(5 * 65536, 65536).discard(9 * 65536, 65536 * 2) \
        .run(p)
    _snapshot(p, "-c", "snap2")
    Writer(d, 112).pat(70000, 100000).run(p)
    return p, "qcow2"


@case("snapshot-v2")
def _snap_v2(d):
    size = MiB
    p = _create(d, "img.qcow2", size, "cluster_size=4096", "compat=0.10")
    Writer(d, 113).rnd(0, size).run(p)
    _snapshot(p, "-c", "snap1")
    Writer(d, 114).scatter(size, 4096, count=8).run(p)
    return p, "qcow2"


@case("snapshot-applied")
def _snap_applied(d):
    size = MiB
    p = _create(d, "img.qcow2", size, "cluster_size=4096")
    Writer(d, 115).rnd(0, size // 2).run(p)
    _snapshot(p, "-c", "snap1")
    Writer(d, 116).pat(1000, size - 2000).run(p)        # overwritten ...
    _snapshot(p, "-a", "snap1")                          # ... and reverted
    Writer(d, 117).pat(300000, 5000).run(p)
    return p, "qcow2"


@case("snapshot-deleted")
def _snap_deleted(d):
    size = MiB
    p = _create(d, "img.qcow2", size, "cluster_size=512")
    Writer(d, 118).rnd(0, size).run(p)
    _snapshot(p, "-c", "s1")
    Writer(d, 119).scatter(size, 512, count=8, maxlen=50000).run(p)
    _snapshot(p, "-c", "s2")
    _snapshot(p, "-d", "s1")
    Writer(d, 120).pat(512 * 100 + 3, 40000).run(p)
    return p, "qcow2"


@case("snapshot-over-backing")
def _snap_backing(d):
    p = _base_and_top(d, 121)
    Writer(d, 122).pat(0, 200000).run(p)
    _snapshot(p, "-c", "snap1")
    Writer(d, 123).zero(0, 65536).discard(65536, 65536).pat(300000, 10).run(p)
    return p, "qcow2"


# ---- unaligned virtual sizes ---------------------------------------------------------

def _unaligned_case(cs: int, compat: str):
    def build(d):
        size = 1000000            # qcow2 rounds to 1000448; the engine must report qemu's size
        p = _create(d, "img.qcow2", size, f"cluster_size={cs}", f"compat={compat}")
        real = qemu.info(str(p))["virtual-size"]
        Writer(d, 130 + cs % 1000).scatter(real, cs, count=8, maxlen=100000) \
            .pat(real - 3, 3).run(p)
        return p, "qcow2"
    return build


for _label, _cs in (("512", 512), ("4k", 4096), ("64k", 65536), ("2M", 2 * MiB)):
    case(f"unaligned-size-cs{_label}")(_unaligned_case(_cs, "1.1"))
case("unaligned-size-v2-cs4k")(_unaligned_case(4096, "0.10"))


# --------------------------------------------------------------------------------------
# building (once per module) and comparing
# --------------------------------------------------------------------------------------


@dataclass
class Built:
    path: Path
    fmt: str
    raw_path: Path
    size: int                       # qemu's virtual size (length of the convert output)
    hints: list[int] = field(default_factory=list)

    def expected(self) -> bytes:
        return self.raw_path.read_bytes()

    def sizes_ok(self) -> set[int]:
        """Acceptable engine sizes. qemu rounds a raw image's size up to 512 bytes and
        reads the padding as zeros; the exact file size is just as right for raw."""
        if self.fmt == "raw":
            return {self.size, self.path.stat().st_size}
        return {self.size}

    @property
    def window_size(self) -> int:
        return min(self.sizes_ok())


def _hints(path: Path, fmt: str) -> list[int]:
    """Offsets worth a window: cluster and L2-table boundaries and the end of each layer."""
    out = qemu.img("info", "-U", "--backing-chain", "--output=json", "-f", fmt, str(path)).stdout
    layers = json.loads(out)
    if isinstance(layers, dict):
        layers = [layers]
    hints: list[int] = []
    for layer in layers:
        vs = layer["virtual-size"]
        hints.append(vs)
        cs = layer.get("cluster-size")
        if cs:
            ext = layer.get("format-specific", {}).get("data", {}).get("extended-l2", False)
            l2 = cs * (cs // (16 if ext else 8))
            hints += [cs, 3 * cs, l2, 2 * l2]
            if ext:
                hints += [cs // 32, 5 * cs // 32]
    return sorted(set(hints))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    cache: dict[str, Built] = {}

    def get(name: str) -> Built:
        if name not in cache:
            d = tmp_path_factory.mktemp(name)
            path, fmt = CASES[name](d)
            raw_path = d / "expected.raw"
            raw = qemu.to_raw(str(path), str(raw_path), fmt)
            cache[name] = Built(path, fmt, raw_path, len(raw), _hints(path, fmt))
        return cache[name]

    return get


def _windows(name: str, size: int, hints: list[int]) -> list[tuple[int, int]]:
    rng = random.Random(zlib.crc32(name.encode()))
    wins = [(0, min(size, 1)), (size - 1, 1), (max(0, size - 4097), min(size, 4097)),
            (0, min(size, 3 * 65536 + 333))]
    for h in hints:
        if 0 < h < size:
            start = max(0, h - 333)
            wins.append((start, min(size, h + 1001) - start))
    for i in range(10):
        off = rng.randrange(size)
        cap = (511, 4099, 70001, 300007, 1000003)[i % 5]
        wins.append((off, rng.randint(1, min(cap, size - off))))
    return sorted(set(w for w in wins if w[1] > 0))


def _describe_mismatch(got: bytes, exp: bytes, base: int = 0) -> str:
    if len(got) != len(exp):
        return f"length {len(got)} != expected {len(exp)}"
    first = next(i for i in range(len(exp)) if got[i] != exp[i]) if len(exp) < 4096 else None
    if first is None:
        # find the first differing 512-byte block quickly, then the byte
        step = 512
        blk = next(i for i in range(0, len(exp), step) if got[i:i + step] != exp[i:i + step])
        first = next(i for i in range(blk, min(blk + step, len(exp))) if got[i] != exp[i])
    ndiff_blocks = sum(1 for i in range(0, len(exp), 512) if got[i:i + 512] != exp[i:i + 512])
    return (f"first difference at offset {base + first} (0x{base + first:x}): "
            f"got {got[first:first + 16].hex()} expected {exp[first:first + 16].hex()}; "
            f"{ndiff_blocks} differing 512-byte block(s)")


async def _open(built: Built):
    from snapfs.chain.chain import open_chain
    return await open_chain(str(built.path), built.fmt)


CASE_IDS = list(CASES)


@pytest.mark.parametrize("name", CASE_IDS)
async def test_whole_image(corpus, name):
    built = corpus(name)
    exp = built.expected()
    img = await _open(built)
    try:
        assert img.size in built.sizes_ok(), f"size {img.size} != qemu-img {built.size}"
        size = img.size
        got = await img.read(0, size)
    finally:
        await img.close()
    exp = exp[:size]
    if got != exp:       # never let pytest diff megabytes
        pytest.fail(f"{name}: whole read: {_describe_mismatch(got, exp)}", pytrace=False)


@pytest.mark.parametrize("name", CASE_IDS)
async def test_windows(corpus, name):
    built = corpus(name)
    exp = built.expected()
    problems = []
    img = await _open(built)
    try:
        for off, length in _windows(name, built.window_size, built.hints):
            got = await img.read(off, length)
            want = exp[off:off + length]
            if got != want:
                problems.append(f"read({off}, {length}): {_describe_mismatch(got, want, off)}")
    finally:
        await img.close()
    if problems:
        pytest.fail(f"{name}: {len(problems)} window(s) differ:\n" + "\n".join(problems),
                    pytrace=False)


async def test_large_read(tmp_path):
    """A 64 MiB single read over a 1 MiB-cluster image with scattered data and holes."""
    size = 64 * MiB
    cs = MiB
    p = _create(tmp_path, "big.qcow2", size, f"cluster_size={cs}")
    w = Writer(tmp_path, 140)
    for k in range(0, 64, 5):
        (w.rnd if k % 2 else w.pat)(k * cs + k * 1001, cs // 2 + 12345)
    w.rnd(size - cs - 7, cs + 7).zero(20 * cs, cs).run(p)
    raw_path = tmp_path / "big.raw"
    exp = qemu.to_raw(str(p), str(raw_path), "qcow2")
    from snapfs.chain.chain import open_chain
    img = await open_chain(str(p), "qcow2")
    try:
        assert img.size == size
        got = await img.read(0, size)
    finally:
        await img.close()
    if got != exp:
        pytest.fail(f"large read: {_describe_mismatch(got, exp)}", pytrace=False)
