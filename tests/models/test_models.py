"""Every network builds at its tiny preset and runs a forward with the right shapes and ranges."""

from __future__ import annotations

import pytest
import torch

from rcg_augment.models import (
    ENCODER_PRESETS,
    MAGE,
    MAGE_PRESETS,
    RDM_PRESETS,
    TOKENIZER_PRESETS,
    EncoderConfig,
    MAGEConfig,
    RepresentationDenoiser,
    RepresentationEncoder,
    TokenizerConfig,
    VQTokenizer,
    normalize_representation,
)
from rcg_augment.models.encoder import sincos_2d_position_embedding
from rcg_augment.models.rdm import timestep_embedding


def test_encoder_tiny_normalised_representation():
    enc = RepresentationEncoder(ENCODER_PRESETS["tiny"]).eval()
    with torch.no_grad():
        rep = enc(torch.rand(3, 3, 45, 20))  # any input size: resized to 32
    assert rep.shape == (3, 256)
    torch.testing.assert_close(rep.mean(1), torch.zeros(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(rep.std(1), torch.ones(3), atol=1e-5, rtol=0)


def test_normalize_representation_is_per_sample_unbiased():
    x = torch.randn(4, 256) * 3 + 2
    y = normalize_representation(x)
    torch.testing.assert_close(y, (x - x.mean(1, keepdim=True)) / x.std(1, unbiased=True, keepdim=True))


def test_encoder_position_embedding_is_fixed_sincos():
    enc = RepresentationEncoder(ENCODER_PRESETS["tiny"])
    assert not enc.vit.pos_embed.requires_grad
    pe = sincos_2d_position_embedding(8, 192)
    torch.testing.assert_close(enc.vit.pos_embed.data, pe)
    assert pe.shape == (1, 65, 192) and torch.all(pe[0, 0] == 0)


def test_encoder_official_shapes():
    enc = RepresentationEncoder(ENCODER_PRESETS["rcg-b"])
    sd = enc.state_dict()
    assert sd["vit.pos_embed"].shape == (1, 197, 768)
    assert sd["head.6.weight"].shape == (256, 4096)
    assert "head.7.weight" not in sd  # the last BatchNorm has no affine parameters


def test_encoder_config_errors():
    with pytest.raises(ValueError, match="multiple of `patch_size`"):
        EncoderConfig(image_size=30, patch_size=4)
    with pytest.raises(ValueError, match="one value per channel"):
        EncoderConfig(in_channels=1)


def test_rdm_zero_initialised_output_and_shapes():
    net = RepresentationDenoiser(RDM_PRESETS["tiny"])
    out = net(torch.randn(5, 256), torch.tensor([0, 1, 10, 500, 999]))
    assert out.shape == (5, 256)
    assert torch.all(out == 0)  # zero-initialised last layer, as the official MLP
    assert net(torch.randn(2, 256), torch.tensor(3)).shape == (2, 256)


def test_rdm_official_parameter_count():
    net = RepresentationDenoiser(RDM_PRESETS["rcg-b"])
    # 130 tensors under model.diffusion_model.* in the official manifest.
    assert len(net.state_dict()) == 130


def test_timestep_embedding_closed_form():
    emb = timestep_embedding(torch.tensor([0.0, 7.0]), 8)
    freqs = torch.exp(-torch.log(torch.tensor(10000.0)) * torch.arange(4) / 4)
    torch.testing.assert_close(emb[1], torch.cat([(7 * freqs).cos(), (7 * freqs).sin()]))
    torch.testing.assert_close(emb[0], torch.cat([torch.ones(4), torch.zeros(4)]))


def test_tokenizer_tiny_round_trip_shapes():
    tok = VQTokenizer(TOKENIZER_PRESETS["tiny"]).eval()
    with torch.no_grad():
        idx = tok.encode(torch.rand(2, 3, 32, 32))
        assert idx.shape == (2, 8, 8) and idx.dtype == torch.long
        assert idx.min() >= 0 and idx.max() < 256
        img = tok.decode(idx)
        assert img.shape == (2, 3, 32, 32)
        assert torch.equal(tok.decode(idx.view(2, 64)), img)
        recon, vq_loss, indices = tok.train()(torch.rand(2, 3, 32, 32))
    assert recon.shape == (2, 3, 32, 32) and vq_loss.ndim == 0 and indices.shape == (2, 8, 8)


def test_tokenizer_straight_through_gradients_reach_encoder():
    tok = VQTokenizer(TOKENIZER_PRESETS["tiny"])
    recon, vq_loss, _ = tok(torch.rand(2, 3, 32, 32))
    ((recon - 0.5).pow(2).mean() + vq_loss).backward()
    assert tok.encoder.conv_in.weight.grad.abs().sum() > 0
    assert tok.quantize.embedding.weight.grad.abs().sum() > 0


def test_tokenizer_nearest_code_is_exact():
    tok = VQTokenizer(TOKENIZER_PRESETS["tiny"])
    codes = tok.quantize.embedding.weight.detach()
    idx = torch.randint(0, 256, (1, 8, 8))
    z = tok.quantize.lookup(idx)
    assert torch.equal(tok.quantize.nearest(z + 1e-7), idx) or (codes.unique(dim=0).shape[0] < 256)


def test_tokenizer_official_grid_and_config_errors():
    c = TOKENIZER_PRESETS["rcg-b"]
    assert c.grid_size == 16 and c.downsample_factor == 16
    with pytest.raises(ValueError, match="divisible by the downsample factor"):
        TokenizerConfig(image_size=36, ch_mult=(1, 2, 2, 2))


def test_mage_forward_shapes_and_guided_batch():
    c = MAGE_PRESETS["tiny"]
    mage = MAGE(c).eval()
    tokens = torch.randint(0, c.codebook_size, (3, c.num_tokens))
    tokens[:, ::2] = c.mask_token_id
    with torch.no_grad():
        logits = mage(tokens, torch.randn(3, 256))
        uncond = mage(tokens, None)
    assert logits.shape == (3, c.num_tokens, c.codebook_size)
    assert uncond.shape == logits.shape and not torch.allclose(uncond, logits)


def test_mage_official_shapes():
    c = MAGE_PRESETS["rcg-b"]
    assert c.vocab_size == 2025 and c.mask_token_id == 2024 and c.fake_class_id == 1100
    sd = MAGE(c).state_dict()
    assert sd["mlm_layer.bias"].shape == (1, 1, 2025)
    assert sd["decoder_pos_embed_learned"].shape == (1, 257, 768)


def test_mage_config_errors():
    with pytest.raises(ValueError, match="fake_class_id"):
        MAGEConfig(fake_class_id=5)
