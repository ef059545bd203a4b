"""What snapfs keeps on a share besides the volumes, as tests look at it."""

from __future__ import annotations

import os


def tmp_files(share) -> list[str]:
    """Names of the temporary files under ``.snapfs/tmp`` (each host has a directory)."""
    out = []
    for _, _, files in os.walk(os.path.join(share, ".snapfs", "tmp")):
        out.extend(files)
    return sorted(out)
