"""One sha256 per record of a synthetic cache: what the build tests compare across kills,
resumes and refusals."""

from __future__ import annotations

import hashlib
import json


def record_hashes(out_dir, *, verify: bool = False) -> list[str]:
    """One sha256 per record over its PNG bytes and every other column, in record order
    (``verify``: check the shards' sha256 against the manifest first)."""
    import datasets

    from rcg_augment.data import load_synthetic

    ds = load_synthetic(out_dir, verify=verify).cast_column("image", datasets.Image(decode=False))
    out = []
    for row in ds:
        h = hashlib.sha256(row["image"]["bytes"])
        h.update(json.dumps({k: row[k] for k in sorted(row) if k != "image"}, sort_keys=True).encode())
        out.append(h.hexdigest())
    return out
