"""qcow2 on-disk structures (docs/interop/qcow2.txt), decoded and validated without I/O.

Everything read from an image is untrusted: ``Header.parse`` refuses what QEMU refuses and
bounds every size before anything is allocated for it.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field, replace

from snapfs.errors import Corrupt, Unsupported

MAGIC = b"QFI\xfb"

# Incompatible feature bits.
INCOMPAT_DIRTY = 1 << 0
INCOMPAT_CORRUPT = 1 << 1
INCOMPAT_DATA_FILE = 1 << 2
INCOMPAT_COMPRESSION = 1 << 3
INCOMPAT_EXTL2 = 1 << 4
INCOMPAT_KNOWN = INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_COMPRESSION | INCOMPAT_EXTL2
# Compatible feature bits.
COMPAT_LAZY_REFCOUNTS = 1 << 0
# Autoclear feature bits we understand (and keep when writing).
AUTOCLEAR_BITMAPS = 1 << 0
AUTOCLEAR_DATA_FILE_RAW = 1 << 1

# Header extension types.
EXT_END = 0x00000000
EXT_BACKING_FORMAT = 0xE2792ACA
EXT_FEATURE_TABLE = 0x6803F857
EXT_BITMAPS = 0x23852875
EXT_CRYPTO = 0x0537BE77
EXT_DATA_FILE = 0x44415441

COMPRESSION_ZLIB = 0
COMPRESSION_ZSTD = 1

# L1/L2/refcount table entry bits.
OFLAG_COPIED = 1 << 63
OFLAG_COMPRESSED = 1 << 62
OFLAG_ZERO = 1 << 0
OFFSET_MASK = 0x00FFFFFFFFFFFE00
L1_RESERVED = 0x7F000000000001FF
L2_RESERVED = 0x3F000000000001FE
REFT_RESERVED = 0x00000000000001FF

MIN_CLUSTER_BITS = 9
MAX_CLUSTER_BITS = 21
V2_HEADER_LENGTH = 72
V3_HEADER_LENGTH = 104
# Limits taken from QEMU (block/qcow2.h) so that hostile headers cannot make us allocate much.
MAX_L1_BYTES = 32 * 1024 * 1024
MAX_REFTABLE_BYTES = 8 * 1024 * 1024
MAX_SNAPSHOTS = 65536
MAX_SNAPSHOTS_BYTES = 64 * 1024 * 1024
MAX_VIRTUAL_SIZE = 1 << 62
MAX_BACKING_NAME = 1023

_V2 = struct.Struct(">4sIQIIQIIQQIIQ")  # 72 bytes
_V3 = struct.Struct(">QQQII")  # 32 bytes following the v2 part


@dataclass
class Header:
    """The qcow2 header plus the extensions snapfs understands."""

    version: int
    backing_file_offset: int
    backing_file_size: int
    cluster_bits: int
    size: int
    crypt_method: int
    l1_size: int
    l1_table_offset: int
    refcount_table_offset: int
    refcount_table_clusters: int
    nb_snapshots: int
    snapshots_offset: int
    incompatible_features: int = 0
    compatible_features: int = 0
    autoclear_features: int = 0
    refcount_order: int = 4
    header_length: int = V3_HEADER_LENGTH
    compression_type: int = COMPRESSION_ZLIB
    backing_file: str | None = None
    backing_format: str | None = None
    extensions: list[tuple[int, bytes]] = field(default_factory=list)

    @property
    def cluster_size(self) -> int:
        return 1 << self.cluster_bits

    @property
    def extended_l2(self) -> bool:
        return bool(self.incompatible_features & INCOMPAT_EXTL2)

    @property
    def l2_entry_size(self) -> int:
        return 16 if self.extended_l2 else 8

    @property
    def l2_entries(self) -> int:
        return self.cluster_size // self.l2_entry_size

    @property
    def refcount_bits(self) -> int:
        return 1 << self.refcount_order

    @classmethod
    def parse(cls, buf: bytes, file_size: int) -> "Header":
        """Decode and validate the first cluster of an image (``buf`` holds at least 64 KiB
        or the whole file if shorter)."""
        if len(buf) < _V2.size:
            raise Corrupt("file too short for a qcow2 header")
        (magic, version, bf_off, bf_size, cbits, size, crypt, l1_size, l1_off, rt_off, rt_clusters,
         nb_snap, snap_off) = _V2.unpack_from(buf, 0)
        if magic != MAGIC:
            raise Corrupt("not a qcow2 image (bad magic)")
        if version not in (2, 3):
            raise Unsupported(f"unsupported qcow2 version {version}")
        h = cls(version, bf_off, bf_size, cbits, size, crypt, l1_size, l1_off, rt_off,
                rt_clusters, nb_snap, snap_off)
        if version == 3:
            if len(buf) < V3_HEADER_LENGTH:
                raise Corrupt("file too short for a qcow2 v3 header")
            (h.incompatible_features, h.compatible_features, h.autoclear_features,
             h.refcount_order, h.header_length) = _V3.unpack_from(buf, _V2.size)
            if h.header_length < V3_HEADER_LENGTH or h.header_length % 8:
                raise Corrupt(f"invalid header length {h.header_length}")
            if h.header_length > V3_HEADER_LENGTH:
                h.compression_type = buf[V3_HEADER_LENGTH] if len(buf) > V3_HEADER_LENGTH else 0
        else:
            h.header_length = V2_HEADER_LENGTH
            h.refcount_order = 4
        h._validate(file_size)
        h._parse_extensions(buf)
        h._parse_backing_name(buf)
        return h

    def _validate(self, file_size: int) -> None:
        if not MIN_CLUSTER_BITS <= self.cluster_bits <= MAX_CLUSTER_BITS:
            raise Corrupt(f"unsupported cluster size 2^{self.cluster_bits}")
        cs = self.cluster_size
        if self.header_length > cs:
            raise Corrupt("header length larger than a cluster")
        if self.crypt_method:
            raise Unsupported("encrypted qcow2 images are not supported")
        unknown = self.incompatible_features & ~INCOMPAT_KNOWN & ~INCOMPAT_DATA_FILE
        if unknown:
            raise Unsupported(f"unknown incompatible features 0x{unknown:x}")
        if self.incompatible_features & INCOMPAT_DATA_FILE:
            raise Unsupported("qcow2 images with an external data file are not supported")
        if self.incompatible_features & INCOMPAT_COMPRESSION:
            if self.compression_type not in (COMPRESSION_ZLIB, COMPRESSION_ZSTD):
                raise Unsupported(f"unknown compression type {self.compression_type}")
        elif self.compression_type != COMPRESSION_ZLIB:
            raise Corrupt("compression type set without its feature bit")
        if self.extended_l2 and self.cluster_bits < 14:
            raise Corrupt("extended L2 entries need clusters of 16 KiB or more")
        if self.refcount_order > 6:
            raise Corrupt(f"invalid refcount order {self.refcount_order}")
        if self.size > MAX_VIRTUAL_SIZE:
            raise Corrupt(f"virtual size {self.size} is too large")
        self._validate_table("L1 table", self.l1_table_offset, self.l1_size * 8, MAX_L1_BYTES,
                             file_size)
        needed = l1_entries_for(self.size, self.cluster_bits, self.l2_entries)
        if self.l1_size < needed:
            raise Corrupt(f"L1 table too small for the virtual size ({self.l1_size} < {needed})")
        if self.refcount_table_clusters == 0:
            raise Corrupt("image has no refcount table")
        self._validate_table("refcount table", self.refcount_table_offset,
                             self.refcount_table_clusters * cs, MAX_REFTABLE_BYTES, file_size)
        if self.nb_snapshots > MAX_SNAPSHOTS:
            raise Corrupt("too many internal snapshots")
        if self.nb_snapshots:
            self._validate_table("snapshot table", self.snapshots_offset, 40 * self.nb_snapshots,
                                 MAX_SNAPSHOTS_BYTES, file_size)
        l1 = (self.l1_table_offset, self.l1_size * 8)
        rt = (self.refcount_table_offset, self.refcount_table_clusters * cs)
        if self.l1_size and overlaps(l1, rt):
            raise Corrupt("L1 table overlaps the refcount table")

    def _validate_table(self, what: str, offset: int, length: int, limit: int,
                        file_size: int) -> None:
        if length == 0:
            return
        if offset % self.cluster_size:
            raise Corrupt(f"{what} offset 0x{offset:x} is not cluster aligned")
        if offset == 0:
            raise Corrupt(f"{what} overlaps the header")
        if length > limit:
            raise Corrupt(f"{what} is too large ({length} bytes)")
        if offset + length > file_size:
            raise Corrupt(f"{what} lies beyond the end of the file")

    def _parse_extensions(self, buf: bytes) -> None:
        pos = self.header_length
        limit = min(self.cluster_size, len(buf))
        if self.backing_file_offset:
            limit = min(limit, self.backing_file_offset)
        while True:
            if pos + 8 > limit:
                if self.version == 2 and pos >= limit:
                    return  # v2 images may end their header without an end marker
                raise Corrupt("header extensions run past the first cluster")
            etype, elen = struct.unpack_from(">II", buf, pos)
            if etype == EXT_END:
                return
            pos += 8
            if pos + elen > limit:
                raise Corrupt(f"header extension 0x{etype:08x} runs past the first cluster")
            data = bytes(buf[pos:pos + elen])
            if etype == EXT_BACKING_FORMAT:
                try:
                    self.backing_format = data.decode("ascii")
                except UnicodeDecodeError:
                    raise Corrupt("backing format is not ASCII") from None
            elif etype == EXT_CRYPTO:
                raise Unsupported("encrypted qcow2 images are not supported")
            elif etype == EXT_DATA_FILE:
                raise Unsupported("qcow2 images with an external data file are not supported")
            else:
                self.extensions.append((etype, data))
            pos += (elen + 7) & ~7

    def _parse_backing_name(self, buf: bytes) -> None:
        if not self.backing_file_offset:
            if self.backing_file_size:
                raise Corrupt("backing file size without an offset")
            return
        end = self.backing_file_offset + self.backing_file_size
        if self.backing_file_size > MAX_BACKING_NAME or end > min(self.cluster_size, len(buf)):
            raise Corrupt("backing file name does not fit in the first cluster")
        if self.backing_file_offset < self.header_length:
            raise Corrupt("backing file name overlaps the header")
        raw = bytes(buf[self.backing_file_offset:end])
        try:
            self.backing_file = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise Corrupt("backing file name is not UTF-8") from None
        if not self.backing_file:
            self.backing_file = None

    def encode_fixed(self) -> bytes:
        """The fixed header fields (72 or 104/112 bytes), as written at offset 0."""
        out = _V2.pack(MAGIC, self.version, self.backing_file_offset, self.backing_file_size,
                       self.cluster_bits, self.size, self.crypt_method, self.l1_size,
                       self.l1_table_offset, self.refcount_table_offset,
                       self.refcount_table_clusters, self.nb_snapshots, self.snapshots_offset)
        if self.version == 3:
            out += _V3.pack(self.incompatible_features, self.compatible_features,
                            self.autoclear_features, self.refcount_order, self.header_length)
            if self.header_length > V3_HEADER_LENGTH:
                out += bytes([self.compression_type]) + bytes(self.header_length - 105)
        return out

    def copy(self, **changes) -> "Header":
        return replace(self, **changes)


def encode_extension(etype: int, data: bytes) -> bytes:
    pad = (-len(data)) % 8
    return struct.pack(">II", etype, len(data)) + data + bytes(pad)


def l1_entries_for(size: int, cluster_bits: int, l2_entries: int) -> int:
    """How many L1 entries a virtual size needs."""
    per_l1 = l2_entries << cluster_bits
    return -(-size // per_l1)


def overlaps(a: tuple[int, int], b: tuple[int, int]) -> bool:
    return a[1] > 0 and b[1] > 0 and a[0] < b[0] + b[1] and b[0] < a[0] + a[1]


@dataclass(frozen=True)
class Snapshot:
    """An internal snapshot's table entry: only what keeping its clusters alive needs."""

    l1_table_offset: int
    l1_size: int
    id: str
    name: str


def parse_snapshots(buf: bytes, count: int, cluster_size: int, file_size: int) -> list[Snapshot]:
    snaps = []
    pos = 0
    for _ in range(count):
        if pos + 40 > len(buf):
            raise Corrupt("internal snapshot table is truncated")
        l1_off, l1_size, id_len, name_len = struct.unpack_from(">QIHH", buf, pos)
        extra = struct.unpack_from(">I", buf, pos + 36)[0]
        pos += 40 + extra
        end = pos + id_len + name_len
        if end > len(buf):
            raise Corrupt("internal snapshot table is truncated")
        sid = bytes(buf[pos:pos + id_len]).decode("utf-8", "replace")
        name = bytes(buf[pos + id_len:end]).decode("utf-8", "replace")
        pos = (end + 7) & ~7
        if l1_size * 8 > MAX_L1_BYTES or (l1_size and (l1_off % cluster_size or l1_off == 0
                                                       or l1_off + l1_size * 8 > file_size)):
            raise Corrupt(f"internal snapshot {sid!r} has an invalid L1 table")
        snaps.append(Snapshot(l1_off, l1_size, sid, name))
    return snaps


def snapshot_table_length(buf: bytes, count: int) -> int:
    """Byte length of a snapshot table already validated by ``parse_snapshots``."""
    pos = 0
    for _ in range(count):
        id_len, name_len = struct.unpack_from(">HH", buf, pos + 12)
        extra = struct.unpack_from(">I", buf, pos + 36)[0]
        pos = (pos + 40 + extra + id_len + name_len + 7) & ~7
    return pos
