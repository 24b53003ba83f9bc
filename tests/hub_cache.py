"""Publish a folder into a Hugging Face Hub cache the way a download leaves it, with no network.

The layout is huggingface_hub's own: ``models--<org>--<name>/blobs/<hash>`` (the file contents),
``snapshots/<commit>/<file>`` (relative symlinks to the blobs) and ``refs/<branch or tag>`` (the
commit a name points to). ``huggingface_hub.scan_cache_dir`` reads it back in the tests.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def publish_to_cache(files: dict[str, bytes], repo_id: str, cache_dir: str | os.PathLike, *,
                     refs: tuple[str, ...] = ("main",)) -> str:
    """Write ``files`` (name -> bytes) as one commit of ``repo_id``; point ``refs`` at it; return the commit."""
    storage = Path(cache_dir) / ("models--" + repo_id.replace("/", "--"))
    digest = hashlib.sha1(repo_id.encode())
    for name in sorted(files):
        digest.update(name.encode() + hashlib.sha256(files[name]).digest())
    commit = digest.hexdigest()  # 40 hex digits, like a git commit
    snapshot = storage / "snapshots" / commit
    snapshot.mkdir(parents=True, exist_ok=True)
    (storage / "blobs").mkdir(exist_ok=True)
    for name, data in files.items():
        blob = hashlib.sha256(data).hexdigest()
        (storage / "blobs" / blob).write_bytes(data)
        link = snapshot / name
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(os.path.join("..", "..", "blobs", blob))
    (storage / "refs").mkdir(exist_ok=True)
    for ref in refs:
        (storage / "refs" / ref).write_text(commit)
    return commit


def publish_folder(folder: str | os.PathLike, repo_id: str, cache_dir: str | os.PathLike, **kwargs) -> str:
    folder = Path(folder)
    return publish_to_cache({p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}, repo_id, cache_dir,
                            **kwargs)
