"""snapfs benchmarks: the same chains served by snapfs, qemu-storage-daemon and a raw file,
measured side by side in one run (``python -m bench``; ``--quick`` proves the harness)."""

#: The programs the bench runs, and the Debian package of each (for the install hint).
TOOLS = {"fio": "fio", "qemu-storage-daemon": "qemu-system-common", "qemu-img": "qemu-utils",
         "fusermount3": "fuse3"}
