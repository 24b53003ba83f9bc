"""RepresentationAugment: feature-space augmentation with the RDM only."""

from __future__ import annotations

import pickle

import pytest
import torch
from torch import nn

from rcg_augment import RepresentationAugment


@pytest.fixture(scope="module")
def reps(gray_dir):
    aug = RepresentationAugment(model=gray_dir)
    return aug.encode_images(torch.rand(6, 1, 8, 8, generator=torch.Generator().manual_seed(0)))


def test_shape_dtype_and_change(gray_dir, reps):
    aug = RepresentationAugment(0.5, model=gray_dir, rdm_steps=4, seed=0)
    out = aug(reps)
    assert out.shape == reps.shape == (6, 256) and out.dtype == reps.dtype
    assert not torch.allclose(out, reps)
    assert aug(reps.double()).dtype == torch.float64


def test_noise_level_zero_is_identity_and_one_ignores_the_input(gray_dir, reps):
    assert torch.equal(RepresentationAugment(0.0, model=gray_dir, rdm_steps=4, seed=0)(reps), reps)
    a = RepresentationAugment(1.0, model=gray_dir, rdm_steps=4, seed=0)(reps)
    b = RepresentationAugment(1.0, model=gray_dir, rdm_steps=4, seed=0)(torch.randn_like(reps))
    assert torch.allclose(a, b)


def test_seeded_and_global_randomness(gray_dir, reps):
    def run(seed):
        return RepresentationAugment((0.2, 0.8), model=gray_dir, rdm_steps=4, seed=seed)(reps)

    assert torch.equal(run(0), run(0)) and not torch.equal(run(0), run(1))
    aug = RepresentationAugment((0.2, 0.8), model=gray_dir, rdm_steps=4)
    torch.manual_seed(3)
    a = aug(reps)
    torch.manual_seed(3)
    assert torch.equal(aug(reps), a)


def test_per_row_noise_levels(gray_dir, reps, monkeypatch):
    aug = RepresentationAugment((0.1, 0.6), model=gray_dir, rdm_steps=4, seed=0)
    pipe = aug.pipeline
    seen = []
    real = pipe.denoise_representations

    def spy(rep, noise_level, **kwargs):
        seen.append(torch.as_tensor(noise_level).clone())
        return real(rep, noise_level, **kwargs)

    monkeypatch.setattr(pipe, "denoise_representations", spy)
    aug(reps)
    assert len(seen) == 1 and seen[0].shape == (6,)
    assert seen[0].min() >= 0.1 and seen[0].max() <= 0.6 and seen[0].unique().numel() == 6


def test_eval_mode_is_identity_and_head_trains(gray_dir, reps):
    aug = RepresentationAugment(0.3, model=gray_dir, rdm_steps=4, seed=0)
    head = nn.Linear(256, 3)
    model = nn.Sequential(aug, head)
    assert list(model.state_dict()) == ["1.weight", "1.bias"]  # the RCG model is not a submodule
    loss = nn.functional.cross_entropy(model(reps), torch.tensor([0, 1, 2, 0, 1, 2]))
    loss.backward()
    assert head.weight.grad is not None and not reps.requires_grad
    model.eval()
    assert aug(reps) is reps


def test_encode_images_accepts_uint8_rgb_and_single_images(gray_dir):
    aug = RepresentationAugment(model=gray_dir)
    rgb = torch.randint(0, 256, (2, 4, 10, 10), dtype=torch.uint8)
    feats = aug.encode_images(rgb)
    assert feats.shape == (2, 256) and not feats.is_inference()
    assert aug.encode_images(rgb[0]).shape == (1, 256)
    with pytest.raises(ValueError, match=r"`images` must have shape"):
        aug.encode_images(torch.rand(10, 10))


@pytest.mark.parametrize(("rep", "error", "message"), [
    (torch.randn(4, 10), ValueError, r"`rep` must have shape \(B, 256\), got \(4, 10\)"),
    (torch.randn(256), ValueError, "`rep` must have shape"),
    (torch.ones(2, 256, dtype=torch.long), TypeError, "float tensor"),
    (torch.full((2, 256), float("nan")), ValueError, "NaN"),
])
def test_bad_representations(gray_dir, rep, error, message):
    with pytest.raises(error, match=message):
        RepresentationAugment(model=gray_dir)(rep)


def test_invalid_arguments(gray_dir):
    with pytest.raises(ValueError, match=r"`noise_level` must be in \[0, 1\], got 1.5"):
        RepresentationAugment(1.5, model=gray_dir)
    with pytest.raises(ValueError, match="`eta` must be >= 0"):
        RepresentationAugment(model=gray_dir, eta=-1)
    with pytest.raises(ValueError, match=r"`rdm_steps` must be in \[1, 1000\]"):
        RepresentationAugment(model=gray_dir, rdm_steps=5000)(torch.randn(2, 256))


def test_pickle_and_repr(gray_dir, reps):
    aug = RepresentationAugment((0.1, 0.3), model=gray_dir, rdm_steps=4, seed=2)
    blob = pickle.dumps(aug)
    assert len(blob) < 20_000
    assert torch.equal(pickle.loads(blob)(reps), RepresentationAugment((0.1, 0.3), model=gray_dir, rdm_steps=4,
                                                                        seed=2)(reps))
    assert repr(aug) == f"RepresentationAugment(noise_level=(0.1, 0.3), model={gray_dir!r}, rdm_steps=4, seed=2)"
