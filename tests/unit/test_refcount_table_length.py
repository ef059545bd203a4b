"""The refcount table is read up to its last non-zero byte; the page-at-a-time scan must agree
with the plain definition for every shape of table (512-byte tables, a last byte set, all
zeros, non-zero bytes inside the last page)."""

import random

from snapfs.chain.refcount import _used_length


def test_used_length_matches_rstrip():
    rng = random.Random(5)
    tables = [bytes(512), bytes(65536), b"\1" + bytes(65535), bytes(65535) + b"\1",
              bytes(4095) + b"\1" + bytes(4096), bytes(4096) + b"\1" + bytes(4095)]
    for _ in range(300):
        size = rng.choice([512, 4096, 65536, 3 * 4096 + 512])
        buf = bytearray(size)
        for _ in range(rng.randrange(4)):
            buf[rng.randrange(size)] = rng.randrange(1, 256)
        tables.append(bytes(buf))
    for t in tables:
        assert _used_length(t) == len(t.rstrip(b"\0")), len(t)
