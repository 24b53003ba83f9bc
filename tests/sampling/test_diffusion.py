"""Noise schedule against its closed form; DDIM with a dummy model in diffusers' manner."""

from __future__ import annotations

import math

import pytest
import torch

from rcg_augment.sampling import DDIMSampler, NoiseSchedule


def test_schedule_closed_form():
    s = NoiseSchedule()
    betas = torch.tensor([(math.sqrt(0.0015) + (math.sqrt(0.0195) - math.sqrt(0.0015)) * i / 999) ** 2
                          for i in range(1000)], dtype=torch.float64)
    torch.testing.assert_close(s.betas, betas)
    assert s.betas.dtype == torch.float64
    torch.testing.assert_close(s.alphas_cumprod[10], torch.prod(1 - betas[:11]))
    assert torch.all(s.alphas_cumprod[1:] < s.alphas_cumprod[:-1])


def test_add_noise_is_variance_preserving():
    s = NoiseSchedule()
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(20000, 4, generator=g)
    for t in (0, 250, 999):
        xt = s.add_noise(x0, torch.randn(20000, 4, generator=g), torch.full((20000,), t))
        assert abs(xt.var().item() - 1.0) < 0.05
        a = s.alphas_cumprod[t].item()
        corr = (xt * x0).mean().item()
        assert abs(corr - math.sqrt(a)) < 0.03


def test_ddim_timesteps_official_spacing():
    sampler = DDIMSampler(NoiseSchedule(), 250, 1.0)
    assert torch.equal(sampler.timesteps, torch.arange(0, 1000, 4) + 1)
    assert len(DDIMSampler(NoiseSchedule(), 3).timesteps) == 3
    assert DDIMSampler(NoiseSchedule(), 1000).timesteps.max() == 999


def test_sampler_argument_errors():
    # rdm_steps and eta are checked once, by the pipeline's GenerationSettings (tests/test_settings.py);
    # the noise level is the sampler's own argument
    with pytest.raises(ValueError, match="noise_level"):
        DDIMSampler(NoiseSchedule(), 10).renoise(torch.zeros(2, 3), 1.5)


def gaussian_x0_model(schedule: NoiseSchedule, mu: float, std: float):
    """E[x0 | x_t] for data x0 ~ N(mu, std^2): the exact denoiser of a Gaussian."""
    def model(x, t):
        a = schedule.alphas_cumprod[t.long()].to(x.dtype)[:, None]
        gain = a.sqrt() * std**2 / (a * std**2 + 1 - a)
        return mu + gain * (x - a.sqrt() * mu)
    return model


def test_ddim_eta0_is_deterministic_and_recovers_gaussian():
    s = NoiseSchedule()
    model = gaussian_x0_model(s, mu=2.0, std=0.5)
    sampler = DDIMSampler(s, 250, eta=0.0)  # the official step count
    z1 = sampler.sample(model, (4000, 8), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    z2 = sampler.sample(model, (4000, 8), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert torch.equal(z1, z2)
    assert abs(z1.mean().item() - 2.0) < 0.025
    assert abs(z1.std().item() - 0.5) < 0.01


def test_ddim_discretisation_error_shrinks_with_steps():
    """Few steps shrink the sample variance; the error falls monotonically as steps grow."""
    s = NoiseSchedule()
    model = gaussian_x0_model(s, 0.0, 0.5)
    errors = []
    for n in (10, 50, 250):
        z = DDIMSampler(s, n, eta=0.0).sample(model, (4000, 8), generator=torch.Generator().manual_seed(0),
                                               dtype=torch.float64)
        errors.append(abs(z.std().item() - 0.5))
    assert errors[0] > errors[1] > errors[2]


def test_ddim_eta1_recovers_gaussian():
    s = NoiseSchedule()
    sampler = DDIMSampler(s, 250, eta=1.0)
    z = sampler.sample(gaussian_x0_model(s, -1.0, 0.3), (4000, 8), generator=torch.Generator().manual_seed(1),
                       dtype=torch.float64)
    assert abs(z.mean().item() + 1.0) < 0.02
    assert abs(z.std().item() - 0.3) < 0.02


def test_renoise_levels():
    s = NoiseSchedule()
    sampler = DDIMSampler(s, 20, 1.0)
    z0 = torch.randn(3, 16)
    zt, steps = sampler.renoise(z0, torch.tensor([0.0, 0.5, 1.0]), generator=torch.Generator().manual_seed(0))
    assert steps.tolist() == [0, 10, 20]
    assert torch.equal(zt[0], z0[0])  # level 0: the representation itself
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(3, 16, generator=g)
    torch.testing.assert_close(zt[2], noise[2])  # level 1: pure noise, the image is ignored
    expected = s.add_noise(z0[1:2], noise[1:2], sampler.timesteps[9:10])
    torch.testing.assert_close(zt[1:2], expected)


def test_denoise_rows_run_their_own_step_counts():
    s = NoiseSchedule()
    sampler = DDIMSampler(s, 10, 0.0)
    calls = []

    def model(x, t):
        calls.append(t.clone())
        return torch.zeros_like(x)

    z = torch.randn(2, 4)
    out = sampler.denoise(model, z, torch.tensor([0, 4]))
    assert len(calls) == 4  # the longest row's step count
    assert torch.equal(out[0], z[0])  # 0 steps: untouched
    # x0 prediction 0 and eta 0: each step scales x by sqrt((1-a_prev)/(1-a)).
    ratio = torch.prod(((1 - sampler.alphas_prev[:4]) / (1 - sampler.alphas[:4])).sqrt())
    torch.testing.assert_close(out[1], z[1] * ratio.float())


def test_reconstruction_path_at_low_noise_stays_close():
    """With the exact denoiser, renoise+denoise at a low level stays near the start."""
    s = NoiseSchedule()
    sampler = DDIMSampler(s, 50, eta=0.0)
    model = gaussian_x0_model(s, 0.0, 1.0)
    z0 = torch.randn(500, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    zt, steps = sampler.renoise(z0, 0.1, generator=torch.Generator().manual_seed(1))
    out = sampler.denoise(model, zt, steps)
    cos = torch.nn.functional.cosine_similarity(out, z0).mean()
    assert cos > 0.9
