"""MAGE decoding: mask schedule, guidance formula, one batched forward, determinism."""

from __future__ import annotations

import math

import pytest
import torch

from rcg_augment.models import MAGE, MAGE_PRESETS
from rcg_augment.sampling import apply_guidance, guidance_scale, mask_ratio, maskgit_decode
from rcg_augment.sampling.maskgit import keep_source_tokens


def test_mask_schedule_is_cosine():
    assert mask_ratio(0, 20) == pytest.approx(math.cos(math.pi / 2 / 20))
    assert mask_ratio(19, 20) == pytest.approx(0.0, abs=1e-12)
    values = [mask_ratio(i, 8) for i in range(8)]
    assert values == sorted(values, reverse=True)


def test_guidance_formula_and_linear_schedule():
    c, u = torch.tensor([1.0, 2.0]), torch.tensor([0.5, 3.0])
    torch.testing.assert_close(apply_guidance(c, u, 2.0), c + 2.0 * (c - u))
    torch.testing.assert_close(apply_guidance(c, u, 0.0), c)
    assert guidance_scale(0, 4, 2.0) == 0.5 and guidance_scale(3, 4, 2.0) == 2.0


class Recorder(torch.nn.Module):
    """Wraps a MAGE and records every forward's batch size and the number of masked tokens."""

    def __init__(self, mage):
        super().__init__()
        self.mage, self.config, self.fake_latent = mage, mage.config, mage.fake_latent
        self.calls = []

    def forward(self, tokens, rep):
        self.calls.append((tokens.shape[0], int((tokens == self.config.mask_token_id).sum(1)[0])))
        return self.mage(tokens, rep)


@pytest.fixture(scope="module")
def mage():
    torch.manual_seed(0)
    return MAGE(MAGE_PRESETS["tiny"]).eval()


def test_one_batched_forward_per_step_with_guidance(mage):
    rec = Recorder(mage)
    with torch.no_grad():
        tokens = maskgit_decode(rec, torch.randn(3, 256), num_iter=6, cfg=2.0, generator=torch.Generator().manual_seed(0))
    assert [b for b, _ in rec.calls] == [6] * 6  # cond + uncond in one doubled batch
    L = 64
    expected_masked = [L] + [max(1, min(rec.calls[i][1] - 1, math.floor(L * mask_ratio(i, 6)))) for i in range(5)]
    assert [m for _, m in rec.calls] == expected_masked
    assert tokens.shape == (3, L) and tokens.max() < 256 and tokens.min() >= 0


def test_no_guidance_skips_unconditional_half(mage):
    rec = Recorder(mage)
    with torch.no_grad():
        maskgit_decode(rec, torch.randn(2, 256), num_iter=3, cfg=0.0)
    assert [b for b, _ in rec.calls] == [2, 2, 2]


def test_decoding_is_seeded(mage):
    rep = torch.randn(2, 256)
    with torch.no_grad():
        a = maskgit_decode(mage, rep, num_iter=4, generator=torch.Generator().manual_seed(5))
        b = maskgit_decode(mage, rep, num_iter=4, generator=torch.Generator().manual_seed(5))
        c = maskgit_decode(mage, rep, num_iter=4, generator=torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_guided_logits_match_formula(mage):
    """Step-0 guided sampling equals sampling from l_c + s (l_c - l_u) computed by hand."""
    rep = torch.randn(2, 256)
    with torch.no_grad():
        tokens = torch.full((2, 64), mage.config.mask_token_id)
        l_c, l_u = mage(tokens, rep), mage(tokens, None)
        both = mage(torch.cat([tokens, tokens]), torch.cat([rep, mage.fake_latent.expand(2, -1)]))
    torch.testing.assert_close(both[:2], l_c, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(both[2:], l_u, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        out = maskgit_decode(mage, rep, num_iter=1, cfg=3.0, generator=torch.Generator().manual_seed(0))
    guided = apply_guidance(l_c, l_u, 3.0)
    g = torch.Generator().manual_seed(0)
    u = torch.rand(guided.shape, generator=g).clamp_(1e-20, 1.0 - 1e-7)
    expected = (guided - torch.log(-torch.log(u))).argmax(-1)
    assert (out == expected).float().mean() > 0.99




# ------------------------------------------------------------------ source-anchored decoding
def test_keep_source_tokens_masks_exactly_the_fraction():
    tokens = torch.arange(64).repeat(5, 1)
    for fraction, expected in ((1.0, 64), (0.5, 32), (0.7, 45)):
        start = keep_source_tokens(tokens, fraction, 999, generator=torch.Generator().manual_seed(0))
        masked = start == 999
        assert masked.sum(1).tolist() == [expected] * 5
        assert torch.equal(start[~masked], tokens[~masked])
    rows = keep_source_tokens(tokens, 0.5, 999, generator=torch.Generator().manual_seed(0)) == 999
    assert len({tuple(r.tolist()) for r in rows}) == 5  # positions drawn per row


def test_fully_masked_start_decodes_exactly_as_no_start(mage):
    rep = torch.randn(3, 256)
    full = torch.full((3, 64), mage.config.mask_token_id)
    for cfg in (0.0, 1.5):
        with torch.no_grad():
            a = maskgit_decode(mage, rep, num_iter=5, cfg=cfg, generator=torch.Generator().manual_seed(2))
            b = maskgit_decode(mage, rep, num_iter=5, cfg=cfg, generator=torch.Generator().manual_seed(2),
                               start_tokens=full)
        assert torch.equal(a, b)


def test_partial_start_keeps_source_and_paints_the_rest_on_schedule(mage):
    rec = Recorder(mage)
    source = torch.randint(0, 256, (2, 64), generator=torch.Generator().manual_seed(0))
    start = keep_source_tokens(source, 0.5, mage.config.mask_token_id, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = maskgit_decode(rec, torch.randn(2, 256), num_iter=4, generator=torch.Generator().manual_seed(3),
                             start_tokens=start)
    kept = start != mage.config.mask_token_id
    assert torch.equal(out[kept], source[kept])
    assert out.max() < 256
    # the cosine schedule runs over the 32 painted tokens, not the 64 of the grid
    expected = [32] + [max(1, min(rec.calls[i][1] - 1, math.floor(32 * mask_ratio(i, 4)))) for i in range(3)]
    assert [m for _, m in rec.calls] == expected
    with pytest.raises(ValueError, match="start_tokens"):
        maskgit_decode(mage, torch.randn(2, 256), num_iter=2, start_tokens=start[:, :10])
