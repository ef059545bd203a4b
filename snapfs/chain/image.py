"""Opening, creating and probing single images."""

from __future__ import annotations

import os
import struct

from snapfs.chain.format import (
    COMPRESSION_ZLIB, COMPRESSION_ZSTD, EXT_BACKING_FORMAT, INCOMPAT_COMPRESSION, INCOMPAT_EXTL2,
    MAGIC, MAX_BACKING_NAME, MAX_VIRTUAL_SIZE, Header, encode_extension, l1_entries_for)
from snapfs.chain.qcow2 import Qcow2Image
from snapfs.chain.raw import RawImage
from snapfs.chain.refcount import RefcountBlock
from snapfs.errors import Exists, Invalid, from_oserror
from snapfs.io import BlockFile

FORMATS = ("raw", "qcow2")
Image = Qcow2Image | RawImage


async def open_image(path: str, fmt: str, *, writable: bool = False) -> Image:
    """Open one image (no backing file) in a format the caller knows."""
    if fmt == "qcow2":
        return await Qcow2Image.open(path, writable=writable)
    if fmt == "raw":
        return await RawImage.open(path, writable=writable)
    raise Invalid(f"unknown image format {fmt!r}")


async def probe_format(path: str) -> str:
    """qcow2 if the file starts with the qcow2 magic, else raw -- as qemu-img guesses.

    Only for tools run by an admin on a file they name (``snapfs convert``): snapfs never
    probes data a guest could have written (DESIGN.md, Security)."""
    f = await BlockFile.open(path)
    try:
        head = await f.pread(0, 4)
    finally:
        await f.close()
    return "qcow2" if head == MAGIC else "raw"


async def create_raw(path: str, size: int, *, mode: int = 0o660) -> None:
    """A sparse raw file of ``size`` bytes, created exclusively."""
    f = await _create(path, mode)
    try:
        await f.truncate(size)
        await f.fsync()
    finally:
        await f.close()


async def _create(path: str, mode: int) -> BlockFile:
    try:
        return await BlockFile.open(path, writable=True, create=True, mode=mode)
    except Exists:
        raise Exists(f"{os.path.basename(path)} already exists") from None


def _layout(size: int, cbits: int, l2_entries: int, refcount_order: int) -> tuple[int, int, int]:
    """Clusters for (refcount table, refcount blocks, L1 table) after the header cluster."""
    cs = 1 << cbits
    per_block = cs * 8 >> refcount_order
    l1_clusters = -(-l1_entries_for(size, cbits, l2_entries) * 8 // cs)
    t, b = 1, 1
    while True:
        total = 1 + t + b + l1_clusters
        nb = -(-total // per_block)
        nt = -(-nb * 8 // cs)
        if (nb, nt) == (b, t):
            return t, b, l1_clusters
        b, t = nb, nt


async def create_qcow2(path: str, size: int, *, cluster_size: int = 65536,
                       backing_file: str | None = None, backing_format: str | None = None,
                       extended_l2: bool = False, refcount_bits: int = 16,
                       compression_type: str = "zlib", mode: int = 0o660) -> None:
    """Create an empty qcow2 v3 image laid out as qemu-img lays it out."""
    cbits = cluster_size.bit_length() - 1
    if cluster_size != 1 << cbits or not 9 <= cbits <= 21:
        raise Invalid(f"invalid cluster size {cluster_size}")
    if extended_l2 and cbits < 14:
        raise Invalid("extended L2 entries need clusters of 16 KiB or more")
    if refcount_bits not in (1, 2, 4, 8, 16, 32, 64):
        raise Invalid(f"invalid refcount width {refcount_bits}")
    if size < 0 or size % 512 or size > MAX_VIRTUAL_SIZE:
        raise Invalid(f"invalid virtual size {size}")
    ctype = {"zlib": COMPRESSION_ZLIB, "zstd": COMPRESSION_ZSTD}.get(compression_type)
    if ctype is None:
        raise Invalid(f"unknown compression type {compression_type!r}")
    if backing_file is not None:
        if backing_format not in FORMATS:
            raise Invalid("a backing file needs its format (raw or qcow2)")
        if not backing_file or len(backing_file.encode()) > MAX_BACKING_NAME:
            raise Invalid("invalid backing file name")
    order = refcount_bits.bit_length() - 1
    incompat = (INCOMPAT_EXTL2 if extended_l2 else 0) | (INCOMPAT_COMPRESSION if ctype else 0)
    l2_entries = cluster_size // (16 if extended_l2 else 8)
    t, b, l1c = _layout(size, cbits, l2_entries, order)
    h = Header(version=3, backing_file_offset=0, backing_file_size=0, cluster_bits=cbits,
               size=size, crypt_method=0, l1_size=l1_entries_for(size, cbits, l2_entries),
               l1_table_offset=(1 + t + b) * cluster_size if l1_entries_for(size, cbits, l2_entries)
               else 0, refcount_table_offset=cluster_size, refcount_table_clusters=t,
               nb_snapshots=0, snapshots_offset=0, incompatible_features=incompat,
               refcount_order=order, header_length=112, compression_type=ctype)
    exts = b""
    if backing_file is not None:
        exts += encode_extension(EXT_BACKING_FORMAT, backing_format.encode())
    exts += struct.pack(">II", 0, 0)
    name = backing_file.encode() if backing_file is not None else b""
    if name:
        h.backing_file_offset = h.header_length + len(exts)
        h.backing_file_size = len(name)
    first = h.encode_fixed() + exts + name
    if len(first) > cluster_size:
        raise Invalid("the backing file name does not fit in the first cluster")
    used = 1 + t + b + l1c
    per_block = cluster_size * 8 >> order
    blocks = []
    for k in range(b):
        blk = RefcountBlock(bytearray(cluster_size), refcount_bits, 0)
        for c in range(k * per_block, min(used, (k + 1) * per_block)):
            blk.set(c - k * per_block, 1)
        blocks.append(bytes(blk.data))
    table = [(1 + t + k) * cluster_size for k in range(b)]
    table += [0] * (t * cluster_size // 8 - b)
    f = await _create(path, mode)
    try:
        await f.pwrite(0, first)
        await f.pwrite(cluster_size, struct.pack(f">{len(table)}Q", *table))
        await f.pwrite((1 + t) * cluster_size, b"".join(blocks))
        await f.truncate(used * cluster_size)
        await f.fsync()
    except BaseException:
        await f.close()
        try:
            os.unlink(path)
        except OSError as exc:
            raise from_oserror(exc, f"cleaning up {path}") from None
        raise
    await f.close()
