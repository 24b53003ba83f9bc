"""What a synthetic cache is: its plan (model, source, settings, seed, versions), the spec
that must match for a rerun to resume, and the manifest written once every shard is complete.

A stale cache (built with another model, source, setting, seed or version) is detected here,
mechanically, by comparing specs; :class:`StaleCacheError` names every difference.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from ..settings import ADDED_LATER
from .cache_files import (
    MANIFEST_NAME,
    PLAN_NAME,
    atomic_write,
    json_bytes,
    read_json,
    shard_complete,
)

CACHE_FORMAT = "rcg-augment/synthetic-cache"
# 2: the columns origin, pool_index and similarity (retrieved records beside the variants).
CACHE_FORMAT_VERSION = 2
# Plan keys that must match for a rerun to resume; everything else in the plan is provenance.
SPEC_KEYS = ("format", "format_version", "model", "source", "generation", "seed", "layout",
             "quality_threshold", "versions", "device", "pool", "cpu_matmul")

OPTIONAL_SPEC_KEYS = ("pool", "cpu_matmul")


class StaleCacheError(ValueError):
    """``out_dir`` holds a cache built with a different model, source, setting, seed or version."""


def versions() -> dict:
    """The versions a cache's bytes depend on (part of its spec)."""
    import datasets
    import PIL

    from .. import __version__

    return {"rcg_augment": __version__, "torch": torch.__version__, "datasets": datasets.__version__,
            "pillow": PIL.__version__, "numpy": np.__version__}


def cache_features(classes: Sequence[str]):
    """The cache's ``datasets.Features``: the columns of every shard."""
    import datasets

    return datasets.Features({
        "image": datasets.Image(),
        "label": datasets.ClassLabel(names=list(classes)),
        "source_index": datasets.Value("int64"),
        "variant_index": datasets.Value("int64"),
        "noise_level": datasets.Value("float64"),
        "seed": datasets.Value("int64"),
        # "variant" (generated) or "retrieved" (a real pool image); the next two are null for variants.
        "origin": datasets.Value("string"),
        "pool_index": datasets.Value("int64"),
        "similarity": datasets.Value("float64"),
    })


def describe_differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key, "<absent>"), new.get(key, "<absent>")
        name = f"{prefix}{key}"
        if isinstance(a, dict) and isinstance(b, dict):
            out.extend(describe_differences(a, b, name + "."))
        elif a != b:
            def show(v):
                s = json.dumps(v)
                return s if len(s) <= 40 else s[:37] + "..."
            out.append(f"{name} (cache {show(a)}, now {show(b)})")
    return out


def spec_of(plan: dict) -> dict:
    """The plan's identity: ``pool`` and ``cpu_matmul`` count only when the build has them (so caches
    built before they existed, or without them, keep their identity)."""
    return {k: plan.get(k) for k in SPEC_KEYS if k not in OPTIONAL_SPEC_KEYS or plan.get(k) is not None}


def hash_spec(spec: dict) -> str:
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()


def check_plan(out_dir: Path, plan: dict) -> None:
    """Refuse a directory built with a different spec."""
    for name in (MANIFEST_NAME, PLAN_NAME):
        existing = read_json(out_dir / name)
        if existing is None:
            if (out_dir / name).exists():
                raise StaleCacheError(f"{out_dir / name} is unreadable; rebuild with overwrite=True (--overwrite)")
            continue
        diffs = describe_differences(spec_of(existing), spec_of(plan))
        if diffs:
            raise StaleCacheError(
                f"{out_dir} holds a cache built with different settings: " + "; ".join(diffs)
                + ". Rebuild it with overwrite=True (--overwrite) or choose another output directory")
        return


def identity_settings(settings: dict, *, requested: bool = False) -> dict:
    """Generation settings as a cache records them: resolved (every field), or (``requested``)
    as the caller gave them, None where not given. A setting added later (``ADDED_LATER``:
    ``repaint_fraction``, ``token_temperature``) is left out at the value that does what was done before it (1.0; also
    None when ``requested``), so caches built before it existed keep their identity."""
    out = dict(settings)
    for name, value in ADDED_LATER.items():
        if out[name] in ((None, value) if requested else (value,)):
            del out[name]
    return out


def finalise(out_dir: Path, plan: dict, n_shards: int, spec_hash: str, known: dict) -> dict | None:
    """Write manifest.json if every shard is complete; returns all sidecars, or None."""
    metas = {}
    for s in range(n_shards):
        meta = shard_complete(out_dir, s, spec_hash, verify=s not in known)
        if meta is None:
            return None
        metas[s] = meta
    manifest = dict(plan)
    if "label_filter" in plan["generation"]:
        manifest["label_filter_draws"] = sum_draws(metas.values(), plan["source"]["classes"])
    manifest.update({
        "complete": True,
        "records": sum(m["records"] for m in metas.values()),
        "dropped": sum(m["dropped"] for m in metas.values()),
        "skipped_sources": [list(x) for x in plan["provenance"]["skipped"]],
        "shards": [{k: metas[s][k] for k in ("shard", "file", "record_range", "records", "dropped", "bytes",
                                              "sha256", "label_filter") if k in metas[s]} for s in range(n_shards)],
    })
    atomic_write(out_dir / MANIFEST_NAME, json_bytes(manifest))
    return metas


def sum_draws(metas, classes) -> dict[str, dict[str, int]]:
    """Per class name: draws generated and variants accepted by the label filter, over shards."""
    total = {c: {"generated": 0, "accepted": 0} for c in classes}
    for m in metas:
        d = m.get("label_filter")
        if d is None:
            continue
        for k, c in enumerate(classes):
            total[c]["generated"] += d["generated"][k]
            total[c]["accepted"] += d["accepted"][k]
    return total


__all__ = ["CACHE_FORMAT", "CACHE_FORMAT_VERSION", "SPEC_KEYS", "StaleCacheError", "check_plan", "describe_differences",
           "cache_features", "finalise", "hash_spec", "identity_settings", "spec_of", "sum_draws", "versions"]
