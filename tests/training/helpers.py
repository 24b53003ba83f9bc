"""Shared tiny settings for the trainer tests: a micro pipeline and a few real digits."""

from __future__ import annotations

import functools

import numpy as np

from rcg_augment.training.api import new_pipeline

# Smaller than the "tiny" preset so a training step takes milliseconds on a loaded 2-core box.
MICRO = {
    "encoder": {"embed_dim": 32, "depth": 1, "num_heads": 2, "proj_hidden_dim": 64, "rep_dim": 32},
    "rdm": {"rep_dim": 32, "hidden_dim": 64, "num_blocks": 1, "time_embed_dim": 32, "sampling_steps": 5},
    "tokenizer": {"image_size": 16, "ch": 8, "z_channels": 8, "codebook_size": 32, "norm_groups": 4},
    "mage": {"rep_dim": 32, "num_tokens": 16, "codebook_size": 32, "fake_class_id": 32, "embed_dim": 32, "depth": 1,
             "num_heads": 2, "decoder_embed_dim": 32, "decoder_depth": 1, "decoder_num_heads": 2, "num_iter": 2},
}
MICRO["encoder"]["image_size"] = 16


def micro_pipeline(in_channels: int = 1, seed: int = 0):
    return new_pipeline("tiny", in_channels=in_channels, overrides=MICRO, seed=seed)


@functools.lru_cache(maxsize=1)
def _digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    return np.round(d.images * (255.0 / 16.0)).astype(np.uint8), d.target


def digits_array(n: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """The first ``n`` sklearn digits as a uint8 (n, 8, 8) array and their labels."""
    images, labels = _digits()
    return images[:n].copy(), labels[:n].copy()


def digits_source(n: int = 32):
    from rcg_augment.data import open_source

    images, labels = digits_array(n)
    return open_source(images, labels=labels.tolist())


FAST = {"batch_size": 8, "log_every": 1, "progress": False, "checkpoint_every": 0}
