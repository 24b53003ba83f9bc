"""GenerationSettings: validation, resolution against a model, and the repaint_fraction knob end to end."""

from __future__ import annotations

import pytest
import torch

from rcg_augment import GenerationSettings, RCGAugment, RCGPipeline
from rcg_augment.pipeline import SamplingDefaults


@pytest.fixture(scope="module")
def pipe():
    torch.manual_seed(0)
    return RCGPipeline.from_preset("tiny", in_channels=1)


@pytest.mark.parametrize("kwargs, error, match", [
    ({"cfg": -1}, ValueError, "`cfg` must be >= 0"),
    ({"temperature": float("nan")}, ValueError, "`temperature` must be finite"),
    ({"num_iter": 0}, ValueError, "`num_iter` must be >= 1"),
    ({"num_iter": 2.5}, TypeError, "`num_iter` must be an int"),
    ({"rdm_steps": True}, TypeError, "`rdm_steps` must be an int"),
    ({"eta": "1"}, TypeError, "`eta` must be a number"),
    ({"repaint_fraction": 0.0}, ValueError, r"`repaint_fraction` must be in \(0, 1\]"),
    ({"repaint_fraction": 1.5}, ValueError, "repaint_fraction"),
    ({"token_temperature": 0.0}, ValueError, "`token_temperature` must be > 0"),
])
def test_invalid_values_name_the_setting(kwargs, error, match):
    with pytest.raises(error, match=match):
        GenerationSettings(**kwargs)


def test_resolve_fills_from_the_model(pipe):
    s = GenerationSettings().resolve(pipe.config)
    m, r = pipe.config.mage, pipe.config.rdm
    assert s == GenerationSettings(cfg=0.0, temperature=m.temperature, num_iter=m.num_iter,
                                   rdm_steps=r.sampling_steps, eta=r.eta, repaint_fraction=1.0,
                                   token_temperature=1.0)
    assert GenerationSettings(num_iter=3).resolve(pipe.config).num_iter == 3
    with pytest.raises(ValueError, match=r"`rdm_steps` must be in \[1, 1000\]"):
        GenerationSettings(rdm_steps=1001).resolve(pipe.config)
    with pytest.raises(ValueError, match=r"`repaint_fraction` must be in \[0.5, 1\] for this model"):
        GenerationSettings(repaint_fraction=0.4).resolve(pipe.config)


def test_model_defaults_come_before_the_network_configs():
    torch.manual_seed(0)
    p = RCGPipeline.from_preset("tiny", in_channels=1, defaults=SamplingDefaults(num_iter=3, repaint_fraction=0.6))
    s = p.resolve_settings()
    assert (s.num_iter, s.repaint_fraction) == (3, 0.6)
    assert p.resolve_settings(repaint_fraction=0.9).repaint_fraction == 0.9
    with pytest.raises(TypeError, match="unknown generation settings"):
        p.resolve_settings(steps=3)


FAST = {"num_iter": 2, "rdm_steps": 2}


def test_repaint_fraction_one_is_the_full_generation(pipe):
    x = torch.rand(3, 1, 20, 20, generator=torch.Generator().manual_seed(0))
    a = pipe.reconstruct(x, 0.3, generator=torch.Generator().manual_seed(1), **FAST)
    b = pipe.reconstruct(x, 0.3, generator=torch.Generator().manual_seed(1), repaint_fraction=1.0, **FAST)
    assert torch.equal(a, b)


def test_anchored_reconstruct_is_seeded_and_keeps_source_tokens(pipe):
    x = torch.rand(3, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    run = lambda seed, f: pipe.reconstruct(x, 0.3, generator=torch.Generator().manual_seed(seed),  # noqa: E731
                                           repaint_fraction=f, **FAST)
    assert torch.equal(run(1, 0.5), run(1, 0.5))
    assert not torch.equal(run(1, 0.5), run(2, 0.5))
    assert not torch.equal(run(1, 0.5), run(1, 1.0))
    # MAGE starts from the source's own codes with exactly half of them masked
    import rcg_augment.pipeline as pipeline_module

    seen = []
    real_decode = pipeline_module.maskgit_decode

    def spy(*args, start_tokens=None, **kw):
        seen.append(start_tokens)
        return real_decode(*args, start_tokens=start_tokens, **kw)

    pipeline_module.maskgit_decode = spy
    try:
        run(1, 0.5)
        run(1, 1.0)
    finally:
        pipeline_module.maskgit_decode = real_decode
    with torch.inference_mode():
        src_codes = pipe.tokenizer.encode(x).flatten(1)
    masked = seen[0] == pipe.config.mage.mask_token_id
    assert masked.sum(1).tolist() == [32, 32, 32]
    assert torch.equal(seen[0][~masked], src_codes[~masked])
    assert seen[1] is None
    with pytest.raises(ValueError, match="repaint_fraction"):
        pipe.reconstruct(x, 0.3, repaint_fraction=0.3)


def test_token_temperature_one_is_the_official_sampling_and_lower_sharpens_it(pipe):
    x = torch.rand(3, 1, 20, 20, generator=torch.Generator().manual_seed(0))

    def run(seed, **kw):
        return pipe.reconstruct(x, 0.3, generator=torch.Generator().manual_seed(seed), **FAST, **kw)

    torch.testing.assert_close(run(1, token_temperature=1.0), run(1), rtol=0, atol=0)
    assert not torch.equal(run(1, token_temperature=0.5), run(1))
    # near 0 every code is the arg-max and, without re-masking noise, rendering is deterministic:
    # two seeds give the same image from the same representation
    rep = pipe.encode(x)
    a, b = (pipe.render(rep, generator=torch.Generator().manual_seed(s), temperature=0.0, token_temperature=1e-4,
                        num_iter=2) for s in (1, 2))
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    c, d = (pipe.render(rep, generator=torch.Generator().manual_seed(s), temperature=0.0, num_iter=2) for s in (1, 2))
    assert not torch.equal(c, d)


def test_transforms_pass_the_knob(pipe):
    aug = RCGAugment(0.3, model=pipe, seed=0, repaint_fraction=0.5, token_temperature=0.8, **FAST)
    assert "repaint_fraction=0.5" in repr(aug)
    x = torch.rand(2, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    calls = []
    real = pipe.reconstruct

    def spy(images, noise_level, **kw):
        calls.append(kw)
        return real(images, noise_level, **kw)

    pipe.reconstruct = spy
    try:
        aug(x)
    finally:
        del pipe.reconstruct
    passed = calls[0]["settings"]  # the transform's GenerationSettings, resolved by reconstruct
    assert calls and passed.repaint_fraction == 0.5 and passed.token_temperature == 0.8
    with pytest.raises(ValueError, match="repaint_fraction"):
        RCGAugment(0.3, model=pipe, repaint_fraction=2.0)
    from rcg_augment.albumentations import AlbuRCGAugment

    assert AlbuRCGAugment(0.3, model=pipe, repaint_fraction=0.6).repaint_fraction == 0.6
    assert AlbuRCGAugment(0.3, model=pipe, token_temperature=0.7)._settings.token_temperature == 0.7


# ------------------------------------------------------------------ one validation per call
@pytest.fixture
def count_validations(monkeypatch):
    """``counts = count_validations()``: from then on every range check (a GenerationSettings
    built) and every model-bound check is counted."""
    def install() -> dict:
        counts = {"ranges": 0, "bounds": 0}
        ranges, bounds = GenerationSettings.__post_init__, GenerationSettings.check_bounds

        def counted_ranges(self):
            counts["ranges"] += 1
            return ranges(self)

        def counted_bounds(self, **kw):
            counts["bounds"] += 1
            return bounds(self, **kw)

        monkeypatch.setattr(GenerationSettings, "__post_init__", counted_ranges)
        monkeypatch.setattr(GenerationSettings, "check_bounds", counted_bounds)
        return counts

    return install


@pytest.mark.parametrize("call", ["reconstruct", "reconstruct_anchored", "reconstruct_settings", "render",
                                  "generate", "interpolate", "denoise_representations", "sampler"])
def test_each_call_validates_its_settings_once(pipe, count_validations, call):
    x = torch.rand(2, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    rep = pipe.encode(x)
    given = GenerationSettings(num_iter=2, rdm_steps=2, repaint_fraction=0.5)  # built before counting
    g = torch.Generator().manual_seed(0)
    calls = {
        "reconstruct": lambda: pipe.reconstruct(x, 0.3, generator=g, **FAST),
        "reconstruct_anchored": lambda: pipe.reconstruct(x, 0.3, generator=g, repaint_fraction=0.5, **FAST),
        "reconstruct_settings": lambda: pipe.reconstruct(x, 0.3, generator=g, settings=given, cfg=1.0),
        "render": lambda: pipe.render(rep, generator=g, source=x, settings=given),
        "generate": lambda: pipe.generate(2, generator=g, cfg=1.0, **FAST),
        "interpolate": lambda: pipe.interpolate(x, x.flip(0), [0.0, 0.5, 1.0], generator=g, num_iter=2),
        "denoise_representations": lambda: pipe.denoise_representations(rep, 0.5, generator=g, rdm_steps=2),
        "sampler": lambda: pipe.sampler(rdm_steps=2),
    }
    counts = count_validations()
    calls[call]()
    assert counts == {"ranges": 1, "bounds": 1}


def test_settings_object_and_overrides_resolve_as_keywords(pipe):
    x = torch.rand(2, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    given = GenerationSettings(num_iter=2, rdm_steps=3, token_temperature=0.5)
    a = pipe.reconstruct(x, 0.3, generator=torch.Generator().manual_seed(1), settings=given, rdm_steps=2)
    b = pipe.reconstruct(x, 0.3, generator=torch.Generator().manual_seed(1), num_iter=2, rdm_steps=2,
                         token_temperature=0.5)
    assert torch.equal(a, b)  # a keyword overrides the object's field
    assert pipe.resolve_settings(given, rdm_steps=None).rdm_steps == 3  # None: not given
    with pytest.raises(TypeError, match="`settings` must be a GenerationSettings"):
        pipe.reconstruct(x, settings={"num_iter": 2})


def test_the_samplers_trust_their_settings(count_validations, pipe):
    from rcg_augment.sampling import DDIMSampler, keep_source_tokens, maskgit_decode

    counts = count_validations()
    with torch.inference_mode():
        DDIMSampler(pipe.schedule, 4, 1.0)
        maskgit_decode(pipe.mage, torch.randn(1, 256), num_iter=2, cfg=1.0)
        keep_source_tokens(torch.zeros(1, 16, dtype=torch.long), 0.5, 99)
    assert counts == {"ranges": 0, "bounds": 0}
