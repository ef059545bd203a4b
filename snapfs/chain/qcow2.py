"""One qcow2 image: map, read, write, zero, discard, grow and flush (cf. QEMU's qcow2.c and
qcow2-cluster.c).

Metadata is cached and written back by ``flush`` in the order that makes a crash leak clusters
and never corrupt: data and copy-on-write, refcount blocks, refcount table, L2 tables, L1 table,
then the frees that the new tables made possible, and last the header's dirty bit.

Concurrency: every mutation holds ``self.lock`` across its awaits.  Reads take no lock; clusters
a mutation unlinks are only freed (and so become reusable) in ``flush`` once no read that could
still be using them is in flight.
"""

from __future__ import annotations

import logging
import os
import re
import struct
import zlib
from collections import OrderedDict

from snapfs.chain import extent as ex
from snapfs.chain.extent import Extent, zeros
from snapfs.chain.format import (
    AUTOCLEAR_BITMAPS, AUTOCLEAR_DATA_FILE_RAW, COMPAT_LAZY_REFCOUNTS, COMPRESSION_ZSTD,
    EXT_BACKING_FORMAT, EXT_BITMAPS, INCOMPAT_CORRUPT, INCOMPAT_DIRTY, L1_RESERVED, OFFSET_MASK, OFLAG_COMPRESSED,
    OFLAG_COPIED, OFLAG_ZERO, Header, Snapshot, encode_extension, l1_entries_for,
    parse_snapshots)
from snapfs.chain.locks import lock_for_writing
from snapfs.chain.refcount import Refcounts
from snapfs.errors import Corrupt, Invalid, ReadOnly, SnapfsError, Unsupported
from snapfs.io import BlockFile, Event, Lock, Replaced, acquire_quickly, checkpoint

log = logging.getLogger(__name__)

_NONZERO = re.compile(rb"[^\x00]")

#: Data written since the last sync above which a flush syncs it before taking the lock.
PRESYNC_BYTES = 4 << 20

L2_CACHE_BYTES = 32 << 20
REFBLOCK_CACHE_BYTES = 8 << 20
FROZEN_L2_TABLES = 8  # a frozen image is read through the volume's FlatMap, rarely itself
ALL_SUBCLUSTERS = 0xFFFFFFFF
_L2_ENTRY = struct.Struct(">Q")


class Qcow2Image:
    format = "qcow2"

    def __init__(self, f: BlockFile, h: Header, file_size: int):
        self.f = f
        self.path = f.path
        self.h = h
        self.writable = f.writable
        self.size = h.size
        self.backing_name = h.backing_file
        self.backing = None  # set by chain.open_chain
        self.cs = h.cluster_size
        self.cbits = h.cluster_bits
        self.ext = h.extended_l2
        self.esize = h.l2_entry_size
        self.l2_bits = (self.cs // self.esize).bit_length() - 1
        self.l2_mask = (1 << self.l2_bits) - 1
        self.sc_bits = self.cbits - 5 if self.ext else self.cbits
        self.file_size = file_size
        self.l1: list[int] = []
        self.l1_dirty: set[int] = set()
        self.l2_cache: OrderedDict[int, bytearray] = OrderedDict()
        self.l2_dirty: set[int] = set()
        self.l2_cache_max = max(16, L2_CACHE_BYTES // self.cs)
        self.refs = Refcounts(f, h, file_size, self._write_reftable_header)
        self.pending_frees: list[tuple[int, int]] = []  # (first cluster, count)
        self.snapshots: list[Snapshot] = []
        self.lock = Lock()
        self.dirty_on_disk = bool(h.incompatible_features & INCOMPAT_DIRTY)
        self.leaky = False  # a mutation failed after allocating: clusters may have leaked
        self.below_map = None  # a FlatMap of the backing chain, set by the volume when deep
        self.data_written = False
        self.unsynced = 0  # bytes of data written since the last sync
        self.readers = 0
        self._readers_idle: Event | None = None
        self._zcache: tuple[int, bytes] | None = None
        self.failed: str | None = None
        csize_shift = 62 - (self.cbits - 8)
        self._csize_shift = csize_shift
        self._csize_mask = (1 << (self.cbits - 8)) - 1
        self._coffset_mask = (1 << csize_shift) - 1

    # -- opening -------------------------------------------------------------------------

    @classmethod
    async def open(cls, path: str, *, writable: bool = False) -> "Qcow2Image":
        f = await BlockFile.open(path, writable=writable)
        try:
            file_size = await f.size()
            first = await f.pread(0, 1 << 21 if file_size > 65536 else 65536)
            h = Header.parse(first, file_size)
            img = cls(f, h, file_size)
            await img._load()
            if writable:
                await img._open_for_writing()
            return img
        except BaseException:
            await f.close()
            raise

    async def _load(self) -> None:
        h = self.h
        raw = await self.f.pread(h.l1_table_offset, h.l1_size * 8)
        if len(raw) < h.l1_size * 8:
            raise Corrupt("L1 table is truncated")
        self.l1 = list(struct.unpack(f">{h.l1_size}Q", raw))
        for i, e in enumerate(self.l1):
            self._check_l1_entry(i, e)
        await self.refs.load()
        if h.nb_snapshots:
            length = min(self.file_size - h.snapshots_offset, 64 << 20)
            buf = await self.f.pread(h.snapshots_offset, length)
            self.snapshots = parse_snapshots(buf, h.nb_snapshots, self.cs, self.file_size)

    def _check_l1_entry(self, i: int, e: int) -> None:
        if e & L1_RESERVED:
            raise Corrupt(f"L1 entry {i} has reserved bits set")
        off = e & OFFSET_MASK
        if off & (self.cs - 1):
            raise Corrupt(f"L2 table offset 0x{off:x} is not cluster aligned")
        if off and off < self.cs:
            raise Corrupt("an L2 table overlaps the header")
        if off + self.cs > self.file_size and off:
            raise Corrupt(f"L2 table at 0x{off:x} lies beyond the end of the file")

    async def _open_for_writing(self) -> None:
        lock_for_writing(self.f.fd, os.path.basename(self.path))
        self.f.relock = lambda fd: lock_for_writing(fd, os.path.basename(self.path))
        self.refs.meta = await self._metadata_clusters()
        h = self.h
        if h.incompatible_features & INCOMPAT_CORRUPT:
            raise Corrupt(f"{os.path.basename(self.path)} is marked corrupt; refusing to write")
        if any(t == EXT_BITMAPS for t, _ in h.extensions) and h.autoclear_features & AUTOCLEAR_BITMAPS:
            raise Unsupported("writing images with persistent dirty bitmaps is not supported")
        changed = False
        known = AUTOCLEAR_BITMAPS | AUTOCLEAR_DATA_FILE_RAW
        if h.version == 3 and h.autoclear_features & ~known:
            h.autoclear_features &= known
            changed = True
        if changed:
            await self._write_header()
            await self.f.fsync()
        if h.version == 2 or self.dirty_on_disk:
            # A crash may have left leaked clusters (or, with lazy refcounts, stale refcounts).
            from snapfs.chain.check import check_and_repair
            lazy = bool(h.compatible_features & COMPAT_LAZY_REFCOUNTS) or self.dirty_on_disk
            await check_and_repair(self, "all" if lazy else "leaks")

    async def _metadata_clusters(self) -> set[int]:
        """Every cluster holding metadata; overlapping structures make the image unwritable
        (QEMU's overlap check): a guest write must never land on a table."""
        meta: set[int] = set()
        cbits, cs = self.cbits, self.cs

        def claim(off: int, length: int, what: str) -> None:
            if length <= 0:
                return
            for c in range(off >> cbits, ((off + length - 1) >> cbits) + 1):
                if c in meta:
                    raise Corrupt(f"{what} at 0x{off:x} overlaps other metadata")
                meta.add(c)

        h = self.h
        claim(0, cs, "the header")
        claim(h.l1_table_offset, h.l1_size * 8, "the L1 table")
        claim(h.refcount_table_offset, h.refcount_table_clusters * cs, "the refcount table")
        for off in self.refs.table:
            if not off:
                continue
            if off >= self.file_size:
                raise Corrupt(f"refcount block at 0x{off:x} lies beyond the end of the file")
            claim(off, cs, "a refcount block")
        for snap in self.snapshots:
            claim(snap.l1_table_offset, snap.l1_size * 8, "a snapshot L1 table")
        if h.nb_snapshots:
            meta.add(h.snapshots_offset >> cbits)
        for e in self.l1:
            off = e & OFFSET_MASK
            if off:
                claim(off, cs, "an L2 table")
        return meta

    def _check_data_write(self, host: int, length: int) -> None:
        meta = self.refs.meta
        if meta is None:
            return
        for c in range(host >> self.cbits, ((host + length - 1) >> self.cbits) + 1):
            if c in meta:
                raise Corrupt(f"refusing a data write onto metadata at 0x{c << self.cbits:x}")

    # -- header --------------------------------------------------------------------------

    async def _write_header(self) -> None:
        await self.f.pwrite(0, self.h.encode_fixed())

    async def _write_reftable_header(self, offset: int, clusters: int) -> None:
        self.h.refcount_table_offset = offset
        self.h.refcount_table_clusters = clusters
        await self._set_dirty_bit()
        await self._write_header()
        await self.f.fsync()

    async def _set_dirty_bit(self) -> None:
        if self.h.version == 3 and not self.dirty_on_disk:
            self.h.incompatible_features |= INCOMPAT_DIRTY
            await self._write_header()
            self.dirty_on_disk = True

    async def _clear_dirty_bit(self) -> None:
        if self.h.version == 3 and self.dirty_on_disk:
            self.h.incompatible_features &= ~INCOMPAT_DIRTY
            await self._write_header()
            self.dirty_on_disk = False

    async def set_backing_file(self, name: str | None, fmt: str | None) -> None:
        """Rewrite the backing file name and format in the header (``qemu-img rebase -u``);
        ``None`` leaves the image with no backing file."""
        h = self.h
        own = [(EXT_BACKING_FORMAT, fmt.encode())] if name is not None else []
        exts = b"".join(encode_extension(t, d) for t, d in own + h.extensions)
        exts += bytes(8)  # end of extensions
        raw = name.encode() if name is not None else b""
        if h.header_length + len(exts) + len(raw) > self.cs or len(raw) > 1023:
            raise Invalid("the backing file name does not fit in the header")
        async with self.lock:
            offset, size = h.backing_file_offset, h.backing_file_size
            h.backing_file_offset = h.header_length + len(exts) if raw else 0
            h.backing_file_size = len(raw)
            data = h.encode_fixed() + exts + raw
            # A frozen image is open read-only: rewrite its header through a descriptor of
            # its own (no other writer exists, so no image lock is needed for it).
            f = self.f if self.f.writable else await BlockFile.open(self.path, writable=True)
            try:
                await f.pwrite(0, data)
                await f.fsync()
            except BaseException:
                h.backing_file_offset, h.backing_file_size = offset, size
                raise
            finally:
                if f is not self.f:
                    await f.close()
            h.backing_file, h.backing_format = name, fmt
            self.backing_name = name

    # -- tables --------------------------------------------------------------------------

    async def _l2_table(self, off: int) -> bytearray:
        t = self.l2_cache.get(off)
        if t is not None:
            self.l2_cache.move_to_end(off)
            return t
        data = await self.f.pread(off, self.cs)
        if len(data) < self.cs:
            raise Corrupt(f"L2 table at 0x{off:x} lies beyond the end of the file")
        t = self.l2_cache.get(off)  # another task may have loaded it meanwhile
        if t is None:
            t = bytearray(data)
            self.l2_cache[off] = t
            if not self.writable and len(self.l2_cache) > self.l2_cache_max:
                self.l2_cache.popitem(last=False)  # read-only: every table is clean
        return t

    async def revalidate(self) -> None:
        """An image another daemon writes: read its header and L1 table again and forget the
        cached tables, so that reads see what that daemon has made durable since."""
        if self.writable:
            return
        file_size = await self.f.size()
        first = await self.f.pread(0, 1 << 21 if file_size > 65536 else 65536)
        h = Header.parse(first, file_size)
        if (h.cluster_size, h.backing_file) != (self.cs, self.h.backing_file):
            raise Replaced(f"{os.path.basename(self.path)} changed its layout (another host "
                           "changed the chain)")
        raw = await self.f.pread(h.l1_table_offset, h.l1_size * 8)
        if len(raw) < h.l1_size * 8:
            raise Corrupt("L1 table is truncated")
        l1 = list(struct.unpack(f">{h.l1_size}Q", raw))
        self.file_size = file_size
        for i, e in enumerate(l1):
            self._check_l1_entry(i, e)
        self.h, self.size, self.l1 = h, h.size, l1
        self.l2_cache.clear()
        self._zcache = None

    def freeze(self) -> None:
        """No more writes: drop what only writing needs, keep a small read cache."""
        self.writable = False
        self.refs.trim_cache(0)
        self.refs.meta = None
        self.l2_cache_max = FROZEN_L2_TABLES
        while len(self.l2_cache) > self.l2_cache_max:
            self.l2_cache.popitem(last=False)

    def _entry(self, table: bytearray, i: int) -> tuple[int, int]:
        if self.ext:
            return struct.unpack_from(">QQ", table, i * 16)
        return struct.unpack_from(">Q", table, i * 8)[0], 0

    def _set_entry(self, l2off: int, table: bytearray, i: int, entry: int, bitmap: int) -> None:
        if self.ext:
            struct.pack_into(">QQ", table, i * 16, entry, bitmap)
        else:
            struct.pack_into(">Q", table, i * 8, entry)
        self.l2_dirty.add(l2off)

    def _host(self, entry: int) -> int:
        host = entry & OFFSET_MASK
        if host & (self.cs - 1):
            raise Corrupt(f"cluster offset 0x{host:x} is not cluster aligned")
        if host and host < self.cs:
            raise Corrupt("a data cluster overlaps the header")
        return host

    # -- mapping and reading -------------------------------------------------------------

    def _check_range(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise Invalid(f"range {offset}+{length} outside the image ({self.size} bytes)")

    async def map(self, offset: int, length: int) -> list[Extent]:
        """This image's own view of a guest range, as runs (UNALLOC: look below)."""
        self._check_range(offset, length)
        out: list[Extent] = []
        pos, end = offset, offset + length
        cs, cbits = self.cs, self.cbits
        while pos < end:
            ci = pos >> cbits
            l1i = ci >> self.l2_bits
            l2off = self.l1[l1i] & OFFSET_MASK
            span_end = min(end, (l1i + 1) << (self.l2_bits + cbits))
            if not l2off:
                ex.append(out, ex.UNALLOC, pos, span_end - pos)
                pos = span_end
                continue
            table = await self._l2_table(l2off)
            width = 16 if self.ext else 8
            while pos < span_end:
                ci = pos >> cbits
                cstart = ci << cbits
                idx = ci & self.l2_mask
                entry, bitmap = self._entry(table, idx)
                if not entry and not bitmap:
                    # Unallocated: the whole stretch of empty entries in one step (found by
                    # a C-speed scan; a deep chain is mostly such stretches).
                    last = ((span_end - 1) >> cbits) & self.l2_mask
                    hit = _NONZERO.search(table, idx * width, (last + 1) * width)
                    empty = (hit.start() // width if hit else last + 1) - idx
                    stop = min(span_end, (ci + empty) << cbits)
                    ex.append(out, ex.UNALLOC, pos, stop - pos)
                    pos = stop
                    continue
                cend = min(span_end, cstart + cs)
                self._map_cluster(out, entry, bitmap, cstart, pos, cend)
                pos = cend
        return out

    async def stored_bytes(self) -> int:
        """Guest bytes this image itself stores (data and compressed clusters).

        Counted one L2 table at a time from the unpacked entries, with a pass through the
        scheduler after each: a merge chooses its direction from this with guest I/O going
        on, and mapping a 512 MiB image run by run held the loop for 40 ms."""
        total = 0
        width = 16 if self.ext else 8
        per_table = self.cs // width
        clusters = -(-self.size // self.cs)
        for l1i, l1e in enumerate(self.l1):
            l2off = l1e & OFFSET_MASK
            n = min(per_table, clusters - l1i * per_table)
            if not l2off or n <= 0:
                continue
            table = await self._l2_table(l2off)
            if self.ext:
                words = struct.unpack_from(f">{2 * n}Q", table)
                for entry, bitmap in zip(words[0::2], words[1::2]):
                    if entry & OFLAG_COMPRESSED:
                        total += self.cs
                    elif bitmap & ALL_SUBCLUSTERS:
                        total += (bitmap & ALL_SUBCLUSTERS).bit_count() << self.sc_bits
            else:
                for entry in filter(None, struct.unpack_from(f">{n}Q", table)):
                    if entry & OFLAG_COMPRESSED or (entry & OFFSET_MASK
                                                    and not entry & OFLAG_ZERO):
                        total += self.cs
            await checkpoint()
        return total

    def _map_cluster(self, out: list[Extent], entry: int, bitmap: int, cstart: int, pos: int,
                     end: int) -> None:
        if entry & OFLAG_COMPRESSED:
            ex.append(out, ex.COMPRESSED, pos, end - pos, entry)
            return
        host = self._host(entry)
        if not self.ext:
            if entry & OFLAG_ZERO:
                ex.append(out, ex.ZERO, pos, end - pos)
            elif host:
                ex.append(out, ex.DATA, pos, end - pos, host + pos - cstart)
            else:
                ex.append(out, ex.UNALLOC, pos, end - pos)
            return
        alloc, zero = bitmap & ALL_SUBCLUSTERS, bitmap >> 32
        if alloc & zero:
            raise Corrupt("a subcluster is marked both allocated and zero")
        if alloc and not host:
            raise Corrupt("allocated subclusters without a host cluster")
        if not alloc and not zero:
            ex.append(out, ex.UNALLOC, pos, end - pos)
            return
        sc = 1 << self.sc_bits
        while pos < end:
            s = (pos - cstart) >> self.sc_bits
            send = min(end, cstart + (s + 1) * sc)
            if alloc >> s & 1:
                ex.append(out, ex.DATA, pos, send - pos, host + pos - cstart)
            elif zero >> s & 1:
                ex.append(out, ex.ZERO, pos, send - pos)
            else:
                ex.append(out, ex.UNALLOC, pos, send - pos)
            pos = send

    async def read(self, offset: int, length: int) -> bytes:
        self._check_range(offset, length)
        self.readers += 1
        try:
            return await self._read(offset, length)
        finally:
            self.readers -= 1
            if self.readers == 0 and self._readers_idle is not None:
                self._readers_idle.set()

    async def _read(self, offset: int, length: int) -> bytes:
        if not self.ext and (offset & (self.cs - 1)) + length <= self.cs:
            data = await self._read_in_cluster(offset, length)
            if data is not None:
                return data
        parts = []
        for kind, off, n, host in await self.map(offset, length):
            if kind == ex.DATA:
                data = await self.f.pread(host, n)
                if len(data) < n:
                    data += zeros(n - len(data))
                parts.append(data)
            elif kind == ex.ZERO:
                parts.append(zeros(n))
            elif kind == ex.UNALLOC:
                parts.append(await self.read_below(off, n))
            else:
                cluster = await self._decompress(host)
                start = off & (self.cs - 1)
                parts.append(cluster[start:start + n])
        if len(parts) == 1:
            return parts[0]
        return b"".join(parts)

    async def _read_in_cluster(self, offset: int, length: int) -> bytes | None:
        """A read inside one cluster whose L2 table is cached (a guest's 4 KiB reads, nearly
        always): the entry looked up directly, without building a map of runs, which was a
        fifth of the daemon's time per read at queue depth 16.  None: take the general path
        (compressed or zero clusters, a table to load)."""
        ci = offset >> self.cbits
        l2off = self.l1[ci >> self.l2_bits] & OFFSET_MASK
        if not l2off:
            return await self.read_below(offset, length)
        table = self.l2_cache.get(l2off)
        if table is None:
            return None
        self.l2_cache.move_to_end(l2off)
        entry = _L2_ENTRY.unpack_from(table, (ci & self.l2_mask) << 3)[0]
        if entry & (OFLAG_COMPRESSED | OFLAG_ZERO):
            return None
        host = self._host(entry)
        if not host:
            return await self.read_below(offset, length)
        data = await self.f.pread(host + (offset & (self.cs - 1)), length)
        return data if len(data) == length else data + zeros(length - len(data))

    async def read_below(self, offset: int, length: int) -> bytes:
        """What shows through where this image has nothing: the backing file, or zeros."""
        b = self.backing
        if b is None or offset >= b.size:
            return zeros(length)
        n = min(length, b.size - offset)
        data = await (self.below_map.read(offset, n) if self.below_map else b.read(offset, n))
        return data if n == length else data + zeros(length - n)

    async def read_host(self, host: int, length: int) -> bytes:
        """Read data clusters at a host offset a map returned (counted as a reader, so that
        no cluster is freed under it)."""
        self.readers += 1
        try:
            data = await self.f.pread(host, length)
        finally:
            self.readers -= 1
            if self.readers == 0 and self._readers_idle is not None:
                self._readers_idle.set()
        return data if len(data) == length else data + zeros(length - len(data))

    def _compressed_range(self, entry: int) -> tuple[int, int]:
        coff = entry & self._coffset_mask
        nsec = ((entry >> self._csize_shift) & self._csize_mask) + 1
        return coff, nsec * 512 - (coff & 511)

    async def _decompress(self, entry: int) -> bytes:
        if self._zcache and self._zcache[0] == entry:
            return self._zcache[1]
        coff, csize = self._compressed_range(entry)
        raw = await self.f.pread(coff, csize)
        try:
            if self.h.compression_type == COMPRESSION_ZSTD:
                import zstandard
                out = zstandard.ZstdDecompressor().decompressobj().decompress(raw)
            else:
                out = zlib.decompressobj(-12).decompress(raw, self.cs)
        except (zlib.error, Exception) as exc:
            if isinstance(exc, SnapfsError):
                raise
            raise Corrupt(f"compressed cluster at 0x{coff:x} cannot be decompressed: {exc}") from None
        if len(out) < self.cs:
            raise Corrupt(f"compressed cluster at 0x{coff:x} is truncated")
        out = bytes(out[:self.cs])
        self._zcache = (entry, out)
        return out

    # -- writing -------------------------------------------------------------------------

    def _check_write(self, offset: int, length: int) -> None:
        if not self.writable:
            raise ReadOnly(f"{os.path.basename(self.path)} is open read-only")
        if self.failed:
            raise Corrupt(f"{os.path.basename(self.path)} is damaged: {self.failed}")
        self._check_range(offset, length)

    async def write(self, offset: int, data) -> None:
        self._check_write(offset, len(data))
        await acquire_quickly(self.lock)  # a guest write: free nearly always
        try:
            await self._guard(self._write(offset, memoryview(data)))
        finally:
            self.lock.release()

    async def _guard(self, coro):
        """Run a mutation; damage found on the way makes the image read-only."""
        try:
            result = await coro
        except Corrupt as exc:
            self.failed = exc.message
            log.error("%s: %s; the image is now read-only", self.path, exc.message)
            raise
        except SnapfsError:
            self.leaky = True  # a full or failing share: repaired when the image is closed
            raise
        await self._trim_caches()
        return result

    async def _write(self, offset: int, data: memoryview) -> None:
        if len(data) and not self.ext and (await self._overwrite_owned(offset, data)
                                           or await self._write_fresh(offset, data)):
            return
        writes: list[tuple[int, bytes | memoryview]] = []
        updates: list[tuple[int, bytearray, int, int, int]] = []
        frees: list[tuple[int, int]] = []
        pos, end = offset, offset + len(data)
        cs, cbits = self.cs, self.cbits
        while pos < end:
            ci = pos >> cbits
            cstart = ci << cbits
            wend = min(end, cstart + cs)
            l2off, table, idx = await self._l2_for_write(ci)
            entry, bitmap = self._entry(table, idx)
            chunk = data[pos - offset:wend - offset]
            host, new_entry, new_bitmap, payload_off, payload = await self._plan_cluster(
                entry, bitmap, cstart, pos, wend, chunk, frees)
            writes.append((host + payload_off, payload))
            if (new_entry, new_bitmap) != (entry, bitmap):
                updates.append((l2off, table, idx, new_entry, new_bitmap))
            pos = wend
        await self._pwrite_all(writes)
        for l2off, table, idx, e, b in updates:
            self._set_entry(l2off, table, idx, e, b)
        self.pending_frees.extend(frees)

    async def _overwrite_owned(self, offset: int, data: memoryview) -> bool:
        """A write into clusters this image owns, in a row on the host and under one cached
        L2 table (a guest overwriting its data, nearly always): one write, without planning
        it cluster by cluster.  False: nothing done, take the general path."""
        cbits = self.cbits
        first, last = offset >> cbits, (offset + len(data) - 1) >> cbits
        l1i = first >> self.l2_bits
        if last >> self.l2_bits != l1i:
            return False
        l1e = self.l1[l1i]
        table = self.l2_cache.get(l1e & OFFSET_MASK) if l1e & OFLAG_COPIED else None
        if table is None:
            return False
        entries = struct.unpack_from(f">{last - first + 1}Q", table, (first & self.l2_mask) << 3)
        start = entries[0] & OFFSET_MASK
        if not start:
            return False
        for k, e in enumerate(entries):
            if (e & ~OFFSET_MASK) != OFLAG_COPIED or (e & OFFSET_MASK) != start + (k << cbits):
                return False
        self._host(entries[0])  # alignment, not over the header
        await self._pwrite_all([(start + (offset & (self.cs - 1)), data)])
        return True

    async def _write_fresh(self, offset: int, data: memoryview) -> bool:
        """A write of whole clusters this image holds nothing of (or only zero flags), under
        one L2 table: nothing to copy, so the clusters are allocated together, in a row, and
        written in one go.  False: nothing done, take the general path."""
        cbits = self.cbits
        if (offset | len(data)) & (self.cs - 1):
            return False
        first, n = offset >> cbits, len(data) >> cbits
        l1i = first >> self.l2_bits
        if n < 2 or (first + n - 1) >> self.l2_bits != l1i:
            return False
        l2off = self.l1[l1i] & OFFSET_MASK
        if l2off:
            table = self.l2_cache.get(l2off)
            if table is None or any(e & ~OFLAG_ZERO for e in struct.unpack_from(
                    f">{n}Q", table, (first & self.l2_mask) << 3)):
                return False
        l2off, table, idx = await self._l2_for_write(first)
        host = await self.refs.alloc(n)
        await self._pwrite_all([(host, data)])
        for k in range(n):
            self._set_entry(l2off, table, idx + k, (host + (k << cbits)) | OFLAG_COPIED, 0)
        return True

    async def _plan_cluster(self, entry: int, bitmap: int, cstart: int, pos: int, wend: int,
                            chunk, frees: list) -> tuple[int, int, int, int, bytes]:
        """Decide where one cluster's part of a write goes.

        Returns (host cluster, new L2 entry, new bitmap, offset in the cluster, bytes)."""
        compressed = entry & OFLAG_COMPRESSED
        host = 0 if compressed else self._host(entry)
        owned = bool(host) and bool(entry & OFLAG_COPIED)
        if not self.ext:
            if owned and not entry & OFLAG_ZERO:
                return host, entry, 0, pos - cstart, chunk
            if owned:  # a preallocated zero cluster: reuse it, zeros around the write
                payload = await self._fill(cstart, pos, wend, chunk, zero_fill=True)
                return host, host | OFLAG_COPIED, 0, 0, payload
            payload = await self._fill(cstart, pos, wend, chunk, zero_fill=False)
            self._free_entry(entry, frees)
            new = await self.refs.alloc(1)
            return new, new | OFLAG_COPIED, 0, 0, payload
        alloc, zero = bitmap & ALL_SUBCLUSTERS, bitmap >> 32
        if compressed or (host and not owned):
            payload = await self._fill(cstart, pos, wend, chunk, zero_fill=False)
            self._free_entry(entry, frees)
            new = await self.refs.alloc(1)
            return new, new | OFLAG_COPIED, ALL_SUBCLUSTERS, 0, payload
        sc = 1 << self.sc_bits
        s0 = (pos - cstart) >> self.sc_bits
        s1 = (wend - cstart - 1) >> self.sc_bits
        touched = ((1 << (s1 + 1)) - 1) ^ ((1 << s0) - 1)
        head_start = cstart + s0 * sc if not alloc >> s0 & 1 else pos
        tail_end = min(cstart + (s1 + 1) * sc, self._cluster_limit(cstart)) \
            if not alloc >> s1 & 1 else wend
        payload = chunk  # the guest's bytes, joined only when subclusters need filling
        if head_start < pos:
            payload = await self._read_own(head_start, pos - head_start) + bytes(payload)
        if tail_end > wend:
            payload = bytes(payload) + await self._read_own(wend, tail_end - wend)
        if not host:
            host = await self.refs.alloc(1)
        new_bitmap = (alloc | touched) | ((zero & ~touched) << 32)
        return host, host | OFLAG_COPIED, new_bitmap, head_start - cstart, payload

    def _cluster_limit(self, cstart: int) -> int:
        return min(cstart + self.cs, self.size)

    async def _fill(self, cstart: int, pos: int, wend: int, chunk, zero_fill: bool) -> bytes:
        """A whole cluster's new content: the write, with the current content around it."""
        limit = self._cluster_limit(cstart)
        if pos == cstart and wend >= limit:  # the whole cluster: the guest's bytes as they are
            return chunk if wend == cstart + self.cs else bytes(chunk) + zeros(cstart + self.cs - wend)
        if zero_fill:
            return zeros(pos - cstart) + bytes(chunk) + zeros(cstart + self.cs - wend)
        # one read of the cluster's current content, the write laid over it
        cluster = bytearray(await self._read_own(cstart, limit - cstart))
        cluster[pos - cstart:wend - cstart] = chunk
        if len(cluster) < self.cs:
            cluster += zeros(self.cs - len(cluster))
        return cluster

    async def _read_own(self, offset: int, length: int) -> bytes:
        """Current guest content (used for copy-on-write, under the lock)."""
        if length <= 0:
            return b""
        return await self._read(offset, length)

    def compressed_clusters(self, entry: int) -> tuple[int, int]:
        """(first host cluster, count) that a compressed cluster's data touches."""
        coff = entry & self._coffset_mask
        nsec = ((entry >> self._csize_shift) & self._csize_mask) + 1
        start = coff & ~511
        first, last = start >> self.cbits, (start + nsec * 512 - 1) >> self.cbits
        return first, last - first + 1

    def _free_entry(self, entry: int, frees: list) -> None:
        if entry & OFLAG_COMPRESSED:
            frees.append(self.compressed_clusters(entry))
        else:
            host = entry & OFFSET_MASK
            if host:
                frees.append((host >> self.cbits, 1))

    async def _l2_for_write(self, ci: int) -> tuple[int, bytearray, int]:
        """The L2 table for cluster ``ci``, allocated or copied so that this image owns it."""
        l1i, idx = ci >> self.l2_bits, ci & self.l2_mask
        l1e = self.l1[l1i]
        l2off = l1e & OFFSET_MASK
        if l2off and l1e & OFLAG_COPIED:
            return l2off, await self._l2_table(l2off), idx
        if l2off:  # shared with an internal snapshot: copy it
            table = bytearray(await self._l2_table(l2off))
            self.pending_frees.append((l2off >> self.cbits, 1))
        else:
            table = bytearray(self.cs)
        new = await self.refs.alloc(1)
        self.refs._claim(new >> self.cbits)
        self.l2_cache[new] = table
        self.l2_dirty.add(new)
        self.l1[l1i] = new | OFLAG_COPIED
        self.l1_dirty.add(l1i)
        return new, table, idx

    async def _pwrite_all(self, writes: list[tuple[int, bytes | memoryview]]) -> None:
        """Issue the data writes, merging those that continue each other on the host."""
        for host, data in writes:
            self._check_data_write(host, len(data))
        i = 0
        while i < len(writes):
            host, data = writes[i]
            parts = [data]
            end = host + len(data)
            j = i + 1
            while j < len(writes) and writes[j][0] == end:
                parts.append(writes[j][1])
                end += len(writes[j][1])
                j += 1
            if len(parts) == 1:
                await self.f.pwrite(host, parts[0])
            else:
                await self.f.pwritev(host, parts)  # the guest's payload, not a joined copy
            self.file_size = max(self.file_size, end)
            i = j
        if writes:
            self.data_written = True
            self.unsynced += sum(len(d) for _, d in writes)

    async def write_zeroes(self, offset: int, length: int, unmap: bool = False) -> None:
        self._check_write(offset, length)
        async with self.lock:
            await self._guard(self._write_zeroes(offset, length, unmap))

    async def discard(self, offset: int, length: int) -> None:
        """Drop a range: it reads as zeros afterwards and its clusters are freed."""
        await self.write_zeroes(offset, length, unmap=True)

    async def _write_zeroes(self, offset: int, length: int, unmap: bool) -> None:
        pos, end = offset, offset + length
        cs, cbits = self.cs, self.cbits
        gran = (1 << self.sc_bits) if self.ext else cs
        while pos < end:
            cstart = (pos >> cbits) << cbits
            limit = self._cluster_limit(cstart)
            wend = min(end, cstart + cs)
            # Whole granules (clusters, or subclusters with extended L2) are zeroed in the table.
            g0 = -(-(pos - cstart) // gran)
            g1 = (wend - cstart) // gran if wend < limit else -(-(limit - cstart) // gran)
            if g1 > g0 and self._can_zero_in_table():
                if pos < cstart + g0 * gran:
                    await self._write(pos, memoryview(zeros(cstart + g0 * gran - pos)))
                await self._zero_granules(pos >> cbits, g0, g1, unmap)
                tail_from = min(cstart + g1 * gran, wend)
                if tail_from < wend:
                    await self._write(tail_from, memoryview(zeros(wend - tail_from)))
            else:
                await self._write(pos, memoryview(zeros(wend - pos)))
            pos = wend

    def _can_zero_in_table(self) -> bool:
        return self.h.version == 3

    async def _zero_granules(self, ci: int, g0: int, g1: int, unmap: bool) -> None:
        l2off, table, idx = await self._l2_for_write(ci)
        entry, bitmap = self._entry(table, idx)
        compressed = entry & OFLAG_COMPRESSED
        host = 0 if compressed else self._host(entry)
        owned = bool(host) and bool(entry & OFLAG_COPIED)
        if not self.ext:
            if owned and not unmap:
                new = host | OFLAG_COPIED | OFLAG_ZERO
            else:
                self._free_entry(entry, self.pending_frees)
                new = OFLAG_ZERO
            if new != entry:
                self._set_entry(l2off, table, idx, new, 0)
            return
        mask = ((1 << g1) - 1) ^ ((1 << g0) - 1)
        alloc, zero = bitmap & ALL_SUBCLUSTERS, bitmap >> 32
        if (compressed or (host and not owned)) and mask != ALL_SUBCLUSTERS:
            # Partly zeroing a cluster we do not own: make our own copy first.
            start = ci << self.cbits
            current = await self._read_own(start, min(self.cs, self.size - start))
            await self._write(start, memoryview(current))
            entry, bitmap = self._entry(table, idx)
            compressed, host, owned = 0, self._host(entry), True
            alloc, zero = bitmap & ALL_SUBCLUSTERS, bitmap >> 32
        alloc &= ~mask
        zero |= mask
        if compressed or (host and not owned) or (host and not alloc and unmap):
            self._free_entry(entry, self.pending_frees)
            entry, alloc = 0, 0
        elif host:
            entry = host | OFLAG_COPIED
        self._set_entry(l2off, table, idx, entry, alloc | (zero << 32))

    async def resize(self, size: int) -> None:
        """Grow the virtual size; the new range reads as zeros."""
        if not self.writable:
            raise ReadOnly(f"{os.path.basename(self.path)} is open read-only")
        if size < self.size:
            raise Invalid("shrinking an image is not supported")
        if size % 512:
            raise Invalid("the size must be a multiple of 512")
        async with self.lock:
            await self._guard(self._resize(size))

    async def _resize(self, size: int) -> None:
        old = self.size
        needed = l1_entries_for(size, self.cbits, 1 << self.l2_bits)
        if needed > len(self.l1):
            await self._grow_l1(needed)
        # The grown range must read as zeros: neither the backing file nor whatever lies
        # beyond the old end inside the last cluster may show through.
        zero_end = min(size, -(-old // self.cs) * self.cs)
        if self.backing is not None:
            zero_end = max(zero_end, min(size, self.backing.size))
        self.size = size
        try:
            if zero_end > old:
                await self._write_zeroes(old, zero_end - old, unmap=False)
            await self._flush()
            self.h.size = size
            await self._set_dirty_bit()
            await self._write_header()
            await self.f.fsync()
        except BaseException:
            self.size = old
            self.h.size = old
            raise
        await self._flush()

    async def _grow_l1(self, needed: int) -> None:
        await self._flush()
        clusters = -(-needed * 8 // self.cs)
        new_off = await self.refs.alloc(clusters)
        for c in range(new_off >> self.cbits, (new_off >> self.cbits) + clusters):
            self.refs._claim(c)
        table = self.l1 + [0] * (clusters * self.cs // 8 - len(self.l1))
        await self._set_dirty_bit()
        await self.refs.write_blocks()
        await self.refs.write_table()
        await self.f.pwrite(new_off, struct.pack(f">{len(table)}Q", *table))
        await self.f.fsync()
        old_off, old_n = self.h.l1_table_offset, len(self.l1)
        self.h.l1_table_offset, self.h.l1_size = new_off, len(table)
        await self._write_header()
        await self.f.fsync()
        self.l1 = table
        self.l1_dirty.clear()
        if old_n:
            first = old_off >> self.cbits
            for c in range(first, first + (-(-old_n * 8 // self.cs))):
                self.refs.meta.discard(c)
                await self.refs.add(c, -1)

    # -- flushing ------------------------------------------------------------------------

    async def start_writeback(self) -> None:
        """Start writing what a long copy wrote so far (BlockFile.start_writeback)."""
        if self.writable and self.data_written and not self.f.closed:
            await self.f.start_writeback()

    async def flush(self) -> None:
        """Make every write so far durable and leave the image clean on disk."""
        if not self.writable or self.f.closed:
            return
        if self.unsynced >= PRESYNC_BYTES and self._metadata_dirty():
            # The bulk of the data first, with guest writes going on: the ordered syncs below,
            # which hold the image's lock, then find little left to write.  Not for a few
            # MiB: that costs a sync more than it shortens the pause.
            synced = self.unsynced
            await self.f.fdatasync()
            self.unsynced -= synced
        async with self.lock:
            await self._guard(self._flush())

    def _metadata_dirty(self) -> bool:
        return bool(self.refs.dirty or self.refs.table_dirty or self.l2_dirty or self.l1_dirty
                    or self.pending_frees)

    async def _flush(self) -> None:
        if not self._metadata_dirty():
            if self.data_written:
                await self.f.fdatasync()
                self.data_written, self.unsynced = False, 0
            if self.dirty_on_disk:
                await self._clear_dirty_bit()
                await self.f.fdatasync()
            return
        f = self.f
        await self._set_dirty_bit()
        await self.refs.write_blocks()
        await f.fdatasync()  # data, copy-on-write and refcounts before anything points at them
        if await self.refs.write_table():
            await f.fdatasync()
        if self.l2_dirty:
            for off in sorted(self.l2_dirty):
                await f.pwrite(off, self.l2_cache[off])
            self.l2_dirty.clear()
            if self.l1_dirty or self.pending_frees:
                await f.fdatasync()
        if self.l1_dirty:
            await self._write_l1_entries()
            if self.pending_frees:
                await f.fdatasync()
        if self.pending_frees:
            await self._wait_for_readers()
            frees, self.pending_frees = self.pending_frees, []
            for first, count in frees:
                for c in range(first, first + count):
                    await self.refs.add(c, -1)
            await self.refs.write_blocks()
        await self._clear_dirty_bit()
        await f.fdatasync()
        self.data_written, self.unsynced = False, 0

    async def _write_l1_entries(self) -> None:
        base = self.h.l1_table_offset
        for i in sorted(self.l1_dirty):
            await self.f.pwrite(base + i * 8, struct.pack(">Q", self.l1[i]))
        self.l1_dirty.clear()

    async def _wait_for_readers(self) -> None:
        while self.readers:
            self._readers_idle = Event()
            await self._readers_idle.wait()
        self._readers_idle = None

    async def _trim_caches(self) -> None:
        over = len(self.l2_cache) - self.l2_cache_max
        if over > 0:
            if len(self.l2_dirty) > self.l2_cache_max // 2:
                await self._flush()
            for off in list(self.l2_cache):
                if over <= 0:
                    break
                if off not in self.l2_dirty:
                    del self.l2_cache[off]
                    over -= 1
        if len(self.refs.dirty) > REFBLOCK_CACHE_BYTES // self.cs:
            await self._flush()
        self.refs.trim_cache(max(8, REFBLOCK_CACHE_BYTES // self.cs))

    # -- lifetime ------------------------------------------------------------------------

    async def allocated(self) -> int:
        st = await self.f.stat()
        return st.st_blocks * 512

    async def close(self) -> None:
        if self.f.closed:
            return
        try:
            if self.writable and not self.failed:
                await self.finish_writing()
        finally:
            await self.f.close()
            if self.backing is not None:
                await self.backing.close()

    async def finish_writing(self) -> None:
        """Flush before the image is closed or frozen, and free the clusters that writes the
        share refused left allocated: a clean close leaves no leaks, as qemu-img expects."""
        await self.flush()
        if not self.leaky:
            return
        from snapfs.chain.check import check_and_repair
        try:
            async with self.lock:
                await check_and_repair(self, "leaks")
            self.leaky = False
        except SnapfsError as exc:
            log.warning("%s: leaked clusters stay until the next open: %s", self.path,
                        exc.message)

    def __repr__(self) -> str:
        return f"<Qcow2Image {os.path.basename(self.path)} {self.size}>"
