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


def test_label_smoothing_follows_the_config():
    """The loss uses the config's label smoothing: at 0 it is the plain masked cross-entropy, at
    0.1 the smoothed one, (1 - 0.1) * CE + 0.1 * mean over codes of -log p, on the same draw."""
    from dataclasses import replace

    g = torch.Generator().manual_seed(1)
    tokens, rep = torch.randint(0, 256, (4, 64), generator=g), torch.randn(4, 256, generator=g)
    losses = {}
    for ls in (0.0, 0.1):
        torch.manual_seed(0)  # the same weights for both
        mage = MAGE(replace(MAGE_PRESETS["tiny"], label_smoothing=ls)).eval()  # eval: no dropout
        losses[ls] = mage_training_loss(mage, tokens, rep, generator=torch.Generator().manual_seed(2)).item()
    # The same draw by hand (mage_training_loss's order of random calls).
    g = torch.Generator().manual_seed(2)
    masked, dropped = sample_masks(mage.config, 4, generator=g)
    drop_rep = torch.rand(4, generator=g) < mage.config.rep_drop_prob
    rep_in = torch.where(drop_rep[:, None], mage.fake_latent.expand_as(rep), rep)
    with torch.no_grad():
        logits = mage(tokens.masked_fill(masked, mage.config.mask_token_id), rep_in, drop_mask=dropped)[masked]
    logp = logits.float().log_softmax(-1)
    plain = -logp.gather(-1, tokens[masked][:, None]).mean().item()
    smoothed = 0.9 * plain + 0.1 * (-logp.mean(-1)).mean().item()
    assert abs(plain - smoothed) > 1e-4  # the two losses are distinguishable on this draw
    assert abs(losses[0.0] - plain) < 1e-5
    assert abs(losses[0.1] - smoothed) < 1e-5
