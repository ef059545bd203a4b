"""Cluster refcounts and the allocator of one qcow2 image (cf. QEMU's qcow2-refcount.c).

Refcount blocks are cached and written back by ``Image.flush`` before any L2 table that depends
on them ("leak, never corrupt").  Growing the refcount table is rare and done on the spot: new
blocks and table are made durable before the header points at them.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Awaitable, Callable

from snapfs.chain.format import REFT_RESERVED, Header

MAX_OFFSET = 1 << 56
from snapfs.errors import Corrupt
from snapfs.io import BlockFile

log = logging.getLogger(__name__)


class RefcountBlock:
    """One refcount block: an array of ``bits``-wide big-endian counters."""

    __slots__ = ("data", "bits", "offset")

    def __init__(self, data: bytearray, bits: int, offset: int):
        self.data = data
        self.bits = bits
        self.offset = offset

    def get(self, i: int) -> int:
        bits = self.bits
        if bits >= 8:
            w = bits >> 3
            return int.from_bytes(self.data[i * w:(i + 1) * w], "big")
        per = 8 // bits
        return (self.data[i // per] >> (bits * (i % per))) & ((1 << bits) - 1)

    def set(self, i: int, value: int) -> None:
        bits = self.bits
        if bits >= 8:
            w = bits >> 3
            self.data[i * w:(i + 1) * w] = value.to_bytes(w, "big")
            return
        per = 8 // bits
        shift = bits * (i % per)
        mask = ((1 << bits) - 1) << shift
        self.data[i // per] = (self.data[i // per] & ~mask) | (value << shift)

    def first_free(self, start: int, count: int) -> int:
        """Index of the first zero counter in [start, count), or ``count``."""
        bits = self.bits
        if bits in (8, 16, 32, 64):
            w = bits >> 3
            zero = bytes(w)
            data = self.data
            i = start
            while i < count:
                pos = data.find(zero, i * w)
                if pos < 0:
                    return count
                if pos % w == 0:
                    return min(pos // w, count)
                i = pos // w + 1
            return count
        for i in range(start, count):
            if self.get(i) == 0:
                return i
        return count


class Refcounts:
    """Refcount table and blocks of one image, with a write-back block cache."""

    def __init__(self, f: BlockFile, header: Header, file_size: int,
                 write_reftable_header: Callable[[int, int], Awaitable[None]]):
        self.f = f
        self.cs = header.cluster_size
        self.cbits = header.cluster_bits
        self.bits = header.refcount_bits
        self.max_ref = (1 << self.bits) - 1
        self.per_block = self.cs * 8 // self.bits
        self.table_offset = header.refcount_table_offset
        self.table_clusters = header.refcount_table_clusters
        self.table: list[int] = []
        self.blocks: dict[int, RefcountBlock] = {}
        self.dirty: set[int] = set()
        self.table_dirty: set[int] = set()
        self.free_hint = 0
        self.end_cluster = -(-file_size // self.cs)
        self._write_reftable_header = write_reftable_header
        #: Clusters holding metadata; filled by the image when opened for writing.  The
        #: allocator refuses to hand them out even if refcounts claim they are free.
        self.meta: set[int] | None = None

    @property
    def capacity(self) -> int:
        return self.table_clusters * self.cs // 8

    async def load(self) -> None:
        raw = await self.f.pread(self.table_offset, self.table_clusters * self.cs)
        if len(raw) < self.table_clusters * self.cs:
            raise Corrupt("refcount table is truncated")
        # Kept up to its last block only: most tables are one cluster of zeros with a few
        # entries in front, and hundreds of open images would each hold a 64 KiB list (and
        # opening a chain of them would check thousands of zeros, one at a time).
        used = -(-_used_length(raw) // 8)
        entries = struct.unpack(f">{used}Q", raw[:used * 8])
        for i, e in enumerate(entries):
            if e & REFT_RESERVED:
                raise Corrupt(f"refcount table entry {i} has reserved bits set")
            if e and e & (self.cs - 1):
                raise Corrupt(f"refcount block {i} offset 0x{e:x} is not cluster aligned")
        self.table = list(entries)

    def set_entry(self, bi: int, off: int) -> None:
        """Point refcount table entry ``bi`` at a block (the list grows as needed)."""
        if bi >= len(self.table):
            self.table.extend([0] * (bi + 1 - len(self.table)))
        self.table[bi] = off

    async def block(self, bi: int) -> RefcountBlock | None:
        blk = self.blocks.get(bi)
        if blk is not None:
            return blk
        if bi >= len(self.table) or self.table[bi] == 0:
            return None
        off = self.table[bi]
        if off >= MAX_OFFSET:
            raise Corrupt(f"refcount block {bi} offset 0x{off:x} is out of range")
        data = await self.f.pread(off, self.cs)
        if len(data) < self.cs:
            raise Corrupt(f"refcount block at 0x{off:x} lies beyond the end of the file")
        blk = RefcountBlock(bytearray(data), self.bits, off)
        self.blocks[bi] = blk
        return blk

    async def get(self, ci: int) -> int:
        blk = await self.block(ci // self.per_block)
        return 0 if blk is None else blk.get(ci % self.per_block)

    async def add(self, ci: int, delta: int) -> int:
        bi, i = divmod(ci, self.per_block)
        blk = await self.block(bi)
        if blk is None:
            raise Corrupt(f"cluster {ci} has no refcount block")
        value = blk.get(i) + delta
        if value < 0:
            raise Corrupt(f"refcount of cluster 0x{ci << self.cbits:x} would drop below zero")
        if value > self.max_ref:
            raise Corrupt(f"refcount of cluster 0x{ci << self.cbits:x} would overflow")
        blk.set(i, value)
        self.dirty.add(bi)
        if value == 0 and ci < self.free_hint:
            self.free_hint = ci
        return value

    async def alloc(self, n: int = 1) -> int:
        """Allocate ``n`` contiguous clusters; returns the host offset of the first."""
        ci = self.free_hint
        run_start, run_len = ci, 0
        first_seen = -1  # the first free cluster the scan met (runs too short included)
        while run_len < n:
            bi, i = divmod(ci, self.per_block)
            if bi >= self.capacity:
                await self._grow_table(bi)
                ci = run_start = self.free_hint = max(self.free_hint, self.end_cluster)
                run_len, first_seen = 0, -1
                continue
            blk = await self.block(bi)
            if blk is None:
                # No block covers this region yet: the new block describes itself, at ``ci``.
                self._claim(ci)
                blk = RefcountBlock(bytearray(self.cs), self.bits, ci << self.cbits)
                blk.set(i, 1)
                self.blocks[bi] = blk
                self.set_entry(bi, blk.offset)
                self.dirty.add(bi)
                self.table_dirty.add(bi)
                self.end_cluster = max(self.end_cluster, ci + 1)
                ci += 1
                run_start, run_len = ci, 0
                continue
            if run_len == 0:
                j = blk.first_free(i, self.per_block)
                if j == self.per_block:
                    ci = (bi + 1) * self.per_block
                    run_start = ci
                    continue
                ci = run_start = bi * self.per_block + j
                if first_seen < 0:
                    first_seen = ci
                run_len = 1
                ci += 1
                continue
            if blk.get(i) == 0:
                run_len += 1
                ci += 1
            else:
                ci += 1
                run_start, run_len = ci, 0
        for c in range(run_start, run_start + n):
            if self.meta is not None and c in self.meta:
                raise Corrupt(f"refcounts claim metadata cluster 0x{c << self.cbits:x} is free")
        for c in range(run_start, run_start + n):
            bi, i = divmod(c, self.per_block)
            blk = self.blocks[bi]
            blk.set(i, 1)
            self.dirty.add(bi)
        # Nothing below the first free cluster met is free: the next scan starts there (or
        # past this run), not again at the hint, which may sit on allocated clusters.
        if first_seen >= self.free_hint:
            self.free_hint = run_start + n if first_seen == run_start else first_seen
        self.end_cluster = max(self.end_cluster, run_start + n)
        return run_start << self.cbits

    def _claim(self, ci: int) -> None:
        """Record a new metadata cluster (refusing one that already is)."""
        if self.meta is not None:
            if ci in self.meta:
                raise Corrupt(f"refcounts claim metadata cluster 0x{ci << self.cbits:x} is free")
            self.meta.add(ci)

    async def _grow_table(self, need_index: int) -> None:
        """Move the refcount table to the end of the image, larger; durable before returning."""
        cs, per = self.cs, self.per_block
        start = self.end_cluster
        entries = max(need_index + 1, 2 * len(self.table), cs // 8)
        while True:
            t = -(-entries * 8 // cs)
            missing: list[int] = []
            b = 0
            while True:
                span = range(start // per, (start + t + b - 1) // per + 1)
                missing = [bi for bi in span if bi >= len(self.table) or self.table[bi] == 0]
                if len(missing) == b:
                    break
                b = len(missing)
            if max(missing + [need_index]) < t * cs // 8:
                break
            entries = max(missing + [need_index]) + 1
        log.debug("growing refcount table to %d clusters at 0x%x", t, start * cs)
        new_table = self.table + [0] * (t * cs // 8 - len(self.table))
        for k, bi in enumerate(missing):
            off = (start + t + k) * cs
            self.blocks[bi] = RefcountBlock(bytearray(cs), self.bits, off)
            new_table[bi] = off
            self.dirty.add(bi)
        for c in range(start, start + t + b):
            self._claim(c)
            bi, i = divmod(c, per)
            (await self.block(bi)).set(i, 1)
            self.dirty.add(bi)
        old_offset, old_clusters = self.table_offset, self.table_clusters
        self.table = new_table
        await self.write_blocks()
        await self.f.pwrite(start * cs, struct.pack(f">{len(new_table)}Q", *new_table))
        await self.f.fsync()
        await self._write_reftable_header(start * cs, t)
        self.table_offset, self.table_clusters = start * cs, t
        self.table_dirty.clear()
        self.end_cluster = start + t + b
        for c in range(old_offset // cs, old_offset // cs + old_clusters):
            if self.meta is not None:
                self.meta.discard(c)
            await self.add(c, -1)

    async def write_blocks(self) -> bool:
        """Write every dirty refcount block; True if anything was written."""
        if not self.dirty:
            return False
        for bi in sorted(self.dirty):
            blk = self.blocks[bi]
            await self.f.pwrite(blk.offset, blk.data)
        self.dirty.clear()
        return True

    async def write_table(self) -> bool:
        """Write the refcount table entries that point at new blocks."""
        if not self.table_dirty:
            return False
        for bi in sorted(self.table_dirty):
            await self.f.pwrite(self.table_offset + bi * 8, struct.pack(">Q", self.table[bi]))
        self.table_dirty.clear()
        return True

    def trim_cache(self, limit: int) -> None:
        """Drop clean cached blocks beyond ``limit`` blocks."""
        if len(self.blocks) <= limit:
            return
        for bi in list(self.blocks):
            if len(self.blocks) <= limit:
                break
            if bi not in self.dirty:
                del self.blocks[bi]


_ZERO_PAGE = bytes(4096)


def _used_length(raw: bytes) -> int:
    """The length of ``raw`` without its trailing zero bytes (whole zero pages compared at
    memcmp speed first: rstrip looks at one byte at a time)."""
    n = len(raw)
    while n >= 4096 and raw[n - 4096:n] == _ZERO_PAGE:
        n -= 4096
    return len(raw[:n].rstrip(b"\0"))
