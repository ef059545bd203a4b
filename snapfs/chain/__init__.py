"""The snapfs engine: qcow2 images, chains, volumes and snapshots on the share.

No FUSE here (DESIGN.md, Layers).  The pieces, split by responsibility as QEMU splits
block/qcow2*.c:

- ``format``   on-disk structures of qcow2, decoded and validated, no I/O
- ``refcount`` cluster refcounts and the allocator
- ``image``    one image (qcow2 or raw) over a ``snapfs.io.BlockFile``: map, read, write, flush
- ``chain``    opening a stack of images safely, following backing files
- ``check``    consistency check and leak repair, with qemu-img's categories
"""
