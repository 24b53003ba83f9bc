"""MAGE's training objective (rcg_augment.training.mage): mask sampling and the masked-token loss."""

from __future__ import annotations

import torch

from rcg_augment.models import MAGE, MAGE_PRESETS
from rcg_augment.training.mage import mage_training_loss, sample_masks, truncated_normal


def test_mage_training_loss_masks_and_backward():
    c = MAGE_PRESETS["tiny"]
    mage = MAGE(c).train()
    g = torch.Generator().manual_seed(0)
    masked, dropped = sample_masks(mage.config, 4, generator=g)
    assert torch.all(dropped <= masked)  # dropped positions are among the masked ones
    assert torch.all(dropped.sum(1) == 32)  # ceil(64 * 0.5)
    assert torch.all(masked.sum(1) == masked.sum(1)[0]) and masked.sum(1)[0] >= 32
    loss = mage_training_loss(mage, torch.randint(0, 256, (4, 64)), torch.randn(4, 256), generator=g)
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    assert mage.latent_prior_proj.weight.grad.abs().sum() > 0
    assert mage.token_emb.word_embeddings.weight.grad is not None


def test_truncated_normal_range_and_moments():
    x = truncated_normal(20000, 0.75, 0.25, 0.5, 1.0, generator=torch.Generator().manual_seed(0))
    assert x.min() >= 0.5 and x.max() <= 1.0
    # Mean of N(0.75, 0.25) truncated symmetrically to [0.5, 1.0] is 0.75.
    assert abs(x.mean().item() - 0.75) < 0.01
