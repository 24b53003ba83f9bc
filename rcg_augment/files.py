"""File helpers every layer shares: the sha256 of a file on disk.

One home for it: the pipeline records its weights' digest, the official-file loader records
each checkpoint's, and the synthetic cache checks its shards against theirs.
"""

from __future__ import annotations

import hashlib
import os


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """The hex sha256 of the file at ``path``, read in ``chunk``-byte blocks (any size of file)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


__all__ = ["sha256_file"]
