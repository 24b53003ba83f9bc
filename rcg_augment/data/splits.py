"""The held-out test split of the built-in sources.

The few-shot benchmark evaluates on this split, and the recipes that train the bundled models
(`digits-tiny`, `faces-tiny`) train on its complement, so no generative model shipped with the
package has seen a benchmark test image. The split is stratified and fixed by its seed.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence

import numpy as np

TEST_FRACTION = 0.3
SPLIT_SEED = 20231205  # fixed forever: changing it changes what the bundled models may have seen


def stratified_holdout(labels: Sequence[int], *, test_fraction: float = TEST_FRACTION,
                       seed: int = SPLIT_SEED) -> tuple[list[int], list[int]]:
    """``(pool, test)`` index lists: ``test_fraction`` of every class (rounded, at least one) held out."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"`test_fraction` must be in (0, 1), got {test_fraction}")
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    test: list[int] = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        k = max(1, int(round(test_fraction * len(idx))))
        test.extend(rng.choice(idx, size=min(k, len(idx) - 1), replace=False).tolist())
    test_set = set(test)
    pool = [i for i in range(len(labels)) if i not in test_set]
    return pool, sorted(test)


def indices_sha256(indices: Sequence[int]) -> str:
    """A fingerprint of an index list, recorded in model metadata to prove what was held out."""
    return hashlib.sha256(json.dumps(sorted(int(i) for i in indices)).encode()).hexdigest()


def benchmark_split(source) -> tuple[list[int], list[int]]:
    """The benchmark's ``(pool, test)`` split of an ``ImageSource`` (or anything with ``.labels``)."""
    return stratified_holdout(source.labels)


__all__ = ["SPLIT_SEED", "TEST_FRACTION", "benchmark_split", "indices_sha256", "stratified_holdout"]
