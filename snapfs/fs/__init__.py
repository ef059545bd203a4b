"""The FUSE adapter (pyfuse3 + trio): the mount's files, each backed by one engine call."""
