"""snapfs benchmarks: the same chains served by snapfs, qemu-storage-daemon and a raw file,
measured side by side in one run (``python -m bench``; ``--quick`` proves the harness)."""
