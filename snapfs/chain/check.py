"""Consistency check and repair of one qcow2 image, with qemu-img check's categories.

The expected refcount of every cluster is rebuilt from the metadata (header, L1/L2 tables of the
active state and of every internal snapshot, refcount structures, snapshot table, bitmaps) and
compared with the stored one: stored > expected is a leak, stored < expected a corruption.
Leaks are harmless and repairable; corruptions mean the image must not be written.
"""

from __future__ import annotations

import logging
import struct
from array import array
from dataclasses import dataclass, field

from snapfs.chain.format import (
    AUTOCLEAR_BITMAPS, EXT_BITMAPS, L1_RESERVED, OFFSET_MASK, OFLAG_COMPRESSED, OFLAG_COPIED,
    snapshot_table_length)
from snapfs.chain.qcow2 import Qcow2Image
from snapfs.errors import Corrupt, SnapfsError
from snapfs.io import checkpoint

log = logging.getLogger(__name__)

MAX_MESSAGES = 100


@dataclass
class CheckResult:
    corruptions: int = 0
    leaks: int = 0
    corruptions_fixed: int = 0
    leaks_fixed: int = 0
    messages: list[str] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        """0 clean, 2 corrupt, 3 leaked clusters only (as qemu-img check)."""
        if self.corruptions:
            return 2
        return 3 if self.leaks else 0

    def say(self, msg: str) -> None:
        if len(self.messages) < MAX_MESSAGES:
            self.messages.append(msg)

    def corrupt(self, msg: str) -> None:
        self.corruptions += 1
        self.say("ERROR " + msg)


class _Counts:
    """Expected refcount per cluster: an array over the file, a dict beyond its end."""

    def __init__(self, clusters: int):
        self.arr = array("I", bytes(4 * clusters))
        self.beyond: dict[int, int] = {}

    def add(self, ci: int, n: int = 1) -> None:
        if ci < len(self.arr):
            self.arr[ci] += n
        else:
            self.beyond[ci] = self.beyond.get(ci, 0) + n

    def get(self, ci: int) -> int:
        return self.arr[ci] if ci < len(self.arr) else self.beyond.get(ci, 0)

    def end(self) -> int:
        return max([len(self.arr)] + [c + 1 for c in self.beyond])


async def check_image(path: str, fmt: str = "qcow2", repair: str | None = None) -> CheckResult:
    """Check one image file (its backing files are not opened)."""
    if fmt == "raw":
        return CheckResult()
    img = await Qcow2Image.open(path, writable=bool(repair))
    try:
        res = await _check(img)
        if repair and (res.leaks or (repair == "all" and res.corruptions)):
            async with img.lock:
                fixed = await _repair(img, res, repair)
            res = await _check(img)
            res.leaks_fixed, res.corruptions_fixed = fixed
        return res
    finally:
        await img.close()


async def check_and_repair(img: Qcow2Image, mode: str) -> CheckResult:
    """Repair an image opened for writing that a crash left dirty (called while opening), or
    whose writes the share refused (called while closing)."""
    res = await _check(img)
    if res.leaks or res.corruptions:
        log.warning("%s: repairing %d leaked clusters, %d errors", img.path, res.leaks,
                    res.corruptions)
        await _repair(img, res, mode)
        res = await _check(img)
        if res.corruptions:
            raise Corrupt(f"{img.path} is damaged beyond repair: {res.messages[0]}")
    await img._flush()
    await img._clear_dirty_bit()
    await img.f.fsync()
    return res


async def _check(img: Qcow2Image) -> CheckResult:
    res = CheckResult()
    counts = _Counts(-(-img.file_size // img.cs) + 1)
    await _count_references(img, res, counts)
    await _compare(img, res, counts, fix=None)
    await _check_copied(img, res, fix=False)
    return res


async def _count_references(img: Qcow2Image, res: CheckResult, counts: _Counts) -> None:
    h, cs = img.h, img.cs

    def add_range(off: int, length: int) -> None:
        if length <= 0:
            return
        for c in range(off >> img.cbits, ((off + length - 1) >> img.cbits) + 1):
            counts.add(c)

    add_range(0, cs)
    add_range(h.l1_table_offset, h.l1_size * 8)
    walked: dict[int, list[int]] = {}
    await _walk_l1(img, res, counts, img.l1, walked, "active")
    seen_l1 = {h.l1_table_offset}
    for snap in img.snapshots:
        add_range(snap.l1_table_offset, snap.l1_size * 8)
        if not snap.l1_size:
            continue
        if snap.l1_table_offset in seen_l1:
            res.corrupt(f"snapshot {snap.id!r} shares its L1 table with another state")
            continue
        seen_l1.add(snap.l1_table_offset)
        raw = await img.f.pread(snap.l1_table_offset, snap.l1_size * 8)
        l1 = list(struct.unpack(f">{len(raw) // 8}Q", raw))
        await _walk_l1(img, res, counts, l1, walked, f"snapshot {snap.id!r}")
    if h.nb_snapshots:
        buf = await img.f.pread(h.snapshots_offset, min(img.file_size - h.snapshots_offset, 64 << 20))
        add_range(h.snapshots_offset, snapshot_table_length(buf, h.nb_snapshots))
    add_range(h.refcount_table_offset, h.refcount_table_clusters * cs)
    for bi, off in enumerate(img.refs.table):
        if off:
            if off + cs > img.file_size:
                res.corrupt(f"refcount block {bi} at 0x{off:x} is outside the image")
            counts.add(off >> img.cbits)
    await _count_bitmaps(img, res, add_range)


async def _walk_l1(img: Qcow2Image, res: CheckResult, counts: _Counts, l1: list[int],
                   walked: dict[int, list[int]], what: str) -> None:
    seen: set[int] = set()
    for i, e in enumerate(l1):
        if e & L1_RESERVED:
            res.corrupt(f"{what} L1 entry {i} has reserved bits set")
        off = e & OFFSET_MASK
        if not off:
            continue
        if off & (img.cs - 1) or off < img.cs:
            res.corrupt(f"{what} L2 table offset 0x{off:x} is invalid")
            continue
        counts.add(off >> img.cbits)
        if off in seen:
            res.corrupt(f"{what} L1 references L2 table 0x{off:x} twice")
            continue
        seen.add(off)
        refs = walked.get(off)
        if refs is None:
            refs = await _l2_references(img, res, off)
            walked[off] = refs
        for c in refs:
            counts.add(c)


async def _l2_references(img: Qcow2Image, res: CheckResult, off: int) -> list[int]:
    """The host clusters one L2 table's entries hold a reference to."""
    try:
        table = await img._l2_table(off)
    except SnapfsError as exc:
        res.corrupt(exc.message)
        return []
    refs: list[int] = []
    esize = img.esize
    for i in range(len(table) // esize):
        entry = struct.unpack_from(">Q", table, i * esize)[0]
        if not entry and not (img.ext and table[i * esize + 8:i * esize + 16] != bytes(8)):
            continue
        if entry & OFLAG_COMPRESSED:
            if entry & OFLAG_COPIED:
                res.corrupt(f"compressed cluster entry 0x{entry:x} has the copied flag set")
            first, n = img.compressed_clusters(entry)
            refs.extend(range(first, first + n))
            continue
        host = entry & OFFSET_MASK
        if img.ext:
            bitmap = struct.unpack_from(">Q", table, i * esize + 8)[0]
            alloc, zero = bitmap & 0xFFFFFFFF, bitmap >> 32
            if alloc & zero:
                res.corrupt(f"L2 table 0x{off:x} entry {i}: subclusters both allocated and zero")
            if alloc and not host:
                res.corrupt(f"L2 table 0x{off:x} entry {i}: allocated subclusters without a cluster")
        if not host:
            continue
        if host & (img.cs - 1):
            res.corrupt(f"cluster offset 0x{host:x} in L2 table 0x{off:x} is not aligned")
            continue
        refs.append(host >> img.cbits)
    return refs


async def _count_bitmaps(img: Qcow2Image, res: CheckResult, add_range) -> None:
    if not img.h.autoclear_features & AUTOCLEAR_BITMAPS:
        return
    for etype, data in img.h.extensions:
        if etype != EXT_BITMAPS or len(data) < 24:
            continue
        nb, _, dir_size, dir_off = struct.unpack_from(">IIQQ", data)
        if dir_size > 64 << 20:
            res.corrupt("bitmap directory is too large")
            return
        add_range(dir_off, dir_size)
        d = await img.f.pread(dir_off, dir_size)
        pos = 0
        for _ in range(nb):
            if pos + 24 > len(d):
                res.corrupt("bitmap directory is truncated")
                return
            toff, tsize, _flags, _t, _g, name_size, extra = struct.unpack_from(">QIIBBHI", d, pos)
            pos = (pos + 24 + extra + name_size + 7) & ~7
            add_range(toff, tsize * 8)
            table = await img.f.pread(toff, min(tsize * 8, 64 << 20))
            for (e,) in struct.iter_unpack(">Q", table[:len(table) // 8 * 8]):
                if e & OFFSET_MASK:
                    add_range(e & OFFSET_MASK, img.cs)


async def _compare(img: Qcow2Image, res: CheckResult, counts: _Counts, fix: str | None) -> int:
    """Compare stored and expected refcounts; with ``fix``, set stored ones right.

    Work stays bounded on hostile images: every cluster of the file is compared, beyond the
    file only clusters something refers to or that a (distinct) refcount block counts."""
    refs = img.refs
    per = refs.per_block
    inside = len(counts.arr)
    beyond: dict[int, list[int]] = {}
    for c in counts.beyond:
        beyond.setdefault(c // per, []).append(c)
    bis = set(range(-(-inside // per))) | set(beyond)
    bis |= {bi for bi, off in enumerate(refs.table) if off}
    seen_blocks: set[int] = set()
    fixed = 0
    for n, bi in enumerate(sorted(bis)):
        if n % 64 == 0:
            await checkpoint()
        blk = None
        if bi < len(refs.table) and refs.table[bi]:
            try:
                blk = await refs.block(bi)
            except SnapfsError as exc:
                res.corrupt(exc.message)
        base = bi * per
        duplicate = blk is not None and blk.offset in seen_blocks
        if blk is not None:
            seen_blocks.add(blk.offset)
        if base + per <= inside and blk is not None and _same(blk, counts, base, per):
            continue
        if base >= inside:
            idx = set(beyond.get(bi, []))
            if blk is not None and not duplicate and any(blk.data):
                idx |= {base + i for i in range(per) if blk.get(i)}
            candidates = sorted(idx)
        else:
            candidates = list(range(base, min(base + per, inside)))
            if blk is not None and base + per > inside:
                # Refcounts past the end of the file (a crash between refcount and table
                # writes) are leaks too, though qemu-img sees them only once the file grows.
                candidates += [base + i for i in range(inside - base, per) if blk.get(i)]
            candidates = sorted(set(candidates) | set(beyond.get(bi, [])))
        for ci in candidates:
            i = ci - base
            stored = blk.get(i) if blk is not None else 0
            want = counts.get(ci)
            if stored == want:
                continue
            if stored > want:
                res.leaks += 1
                if len([m for m in res.messages if m.startswith("Leaked")]) < 10:
                    res.say(f"Leaked cluster {ci} refcount={stored} reference={want}")
                if fix:
                    blk.set(i, want)
                    refs.dirty.add(bi)
                    fixed += 1
            else:
                res.corrupt(f"cluster {ci} (0x{ci << img.cbits:x}) refcount={stored} "
                            f"reference={want}")
                if fix == "all":
                    if blk is None:
                        blk = await _new_block(img, bi)
                    blk.set(i, min(want, refs.max_ref))
                    refs.dirty.add(bi)
                    fixed += 1
    return fixed


def _same(blk, counts: _Counts, base: int, per: int) -> bool:
    """Fast path: a whole block whose stored refcounts equal the expected ones."""
    want = counts.arr[base:base + per]
    if blk.bits in (8, 16, 32, 64):
        code = {8: "B", 16: "H", 32: "I", 64: "Q"}[blk.bits]
        return list(struct.unpack(f">{per}{code}", blk.data)) == want.tolist()
    return all(blk.get(i) == want[i] for i in range(per))


async def _new_block(img: Qcow2Image, bi: int):
    """Create a missing refcount block during repair, beyond every referenced cluster."""
    refs = img.refs
    if bi >= refs.capacity:
        raise Corrupt("refcount table too small to repair the image")
    refs.free_hint = refs.end_cluster
    off = await refs.alloc(1)
    if bi in refs.blocks:
        return refs.blocks[bi]
    from snapfs.chain.refcount import RefcountBlock
    blk = RefcountBlock(bytearray(img.cs), refs.bits, off)
    refs.blocks[bi] = blk
    refs.set_entry(bi, off)
    refs.table_dirty.add(bi)
    refs.dirty.add(bi)
    return blk


async def _check_copied(img: Qcow2Image, res: CheckResult, fix: bool) -> int:
    """The copied flag of active L1/L2 entries must say whether the refcount is exactly 1."""
    fixed = 0
    for i, e in enumerate(img.l1):
        off = e & OFFSET_MASK
        if not off or off & (img.cs - 1) or off < img.cs:
            continue
        rc = await img.refs.get(off >> img.cbits)
        if bool(e & OFLAG_COPIED) != (rc == 1):
            res.corrupt(f"OFLAG_COPIED L2 cluster: l1_index={i} l1_entry={e:x} refcount={rc}")
            if fix:
                img.l1[i] = e ^ OFLAG_COPIED
                img.l1_dirty.add(i)
                fixed += 1
        try:
            table = await img._l2_table(off)
        except SnapfsError:
            continue
        for j in range(len(table) // img.esize):
            entry, bitmap = img._entry(table, j)
            host = entry & OFFSET_MASK
            if entry & OFLAG_COMPRESSED or not host or host & (img.cs - 1):
                continue
            rc = await img.refs.get(host >> img.cbits)
            if bool(entry & OFLAG_COPIED) != (rc == 1):
                res.corrupt(f"OFLAG_COPIED data cluster: l2_entry={entry:x} refcount={rc}")
                if fix:
                    img._set_entry(off, table, j, entry ^ OFLAG_COPIED, bitmap)
                    fixed += 1
    return fixed


async def _repair(img: Qcow2Image, res: CheckResult, mode: str) -> tuple[int, int]:
    """Set stored refcounts to the expected ones (leaks only, or everything), make it durable."""
    counts = _Counts(-(-img.file_size // img.cs) + 1)
    scratch = CheckResult()
    await _count_references(img, scratch, counts)
    fixed = await _compare(img, scratch, counts, fix=mode)
    copied = 0
    if mode == "all":
        copied = await _check_copied(img, CheckResult(), fix=True)
    await img._set_dirty_bit()
    await img._flush()
    leaks_fixed = min(fixed, res.leaks)
    return leaks_fixed, fixed - leaks_fixed + copied
