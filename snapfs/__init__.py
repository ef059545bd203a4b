"""snapfs: a snapshot layer for file-based block storage.

Volumes live on a share as qcow2 overlay chains in upstream Cinder's layout and are served
through FUSE as plain raw files.  ``snapfs.chain`` is the engine (no FUSE), ``snapfs.fs`` the
FUSE adapter.
"""

__version__ = "0.1.0"
