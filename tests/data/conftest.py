"""Fixtures for the synthetic-cache tests: a random tiny grayscale pipeline and a small image folder."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from rcg_augment import RCGPipeline

# Small generation settings: every build in these tests is a few seconds at most.
FAST = {"num_iter": 2, "rdm_steps": 2}


@pytest.fixture(autouse=True)
def one_thread(one_torch_thread):
    """Intra-op threads thrash on a shared 2-core box (60x slower); results do not depend on it."""


@pytest.fixture(scope="session")
def tiny_pipeline_dir(gray_dir):
    return Path(gray_dir)


@pytest.fixture(scope="session")
def tiny_pipeline(tiny_pipeline_dir):
    return RCGPipeline.from_pretrained(tiny_pipeline_dir)


def make_image_folder(root, per_class=3, classes=("cat", "dog"), size=12, seed=0):
    rng = np.random.default_rng(seed)
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / c / f"{i}.png")
    return root


@pytest.fixture
def make_folder():
    return make_image_folder


@pytest.fixture
def image_folder(tmp_path):
    return make_image_folder(tmp_path / "images")
