"""Noise schedule and DDIM sampler for the representation diffusion model.

Both objects are stateless after construction: they hold the schedule's constants and take the
network, the inputs and a ``torch.Generator`` as arguments. The network predicts x0 (the
official parameterisation); :meth:`DDIMSampler.step` converts that to the noise estimate.

The sampler trusts its generation settings (``rdm_steps``, ``eta``): the pipeline resolves and
checks them once per call (:meth:`~rcg_augment.settings.GenerationSettings.resolve`). Called on its
own, check them first, e.g. ``GenerationSettings(rdm_steps=n, eta=e).check_bounds(num_timesteps=T)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _randn(shape, *, generator, device, dtype) -> torch.Tensor:
    return torch.randn(shape, generator=generator, device=device, dtype=dtype)


class NoiseSchedule:
    """DDPM schedule: betas = linspace(sqrt(beta_start), sqrt(beta_end), T) ** 2 (float64).

    Example::

        sched = NoiseSchedule()
        z_t = sched.add_noise(z0, torch.randn_like(z0), torch.full((len(z0),), 500))
    """

    def __init__(self, num_timesteps: int = 1000, beta_start: float = 0.0015, beta_end: float = 0.0195):
        if num_timesteps < 1:
            raise ValueError(f"`num_timesteps` must be >= 1, got {num_timesteps}")
        if not 0.0 < beta_start <= beta_end < 1.0:
            raise ValueError(f"need 0 < beta_start <= beta_end < 1, got {beta_start}, {beta_end}")
        self.num_timesteps = num_timesteps
        self.betas = torch.linspace(math.sqrt(beta_start), math.sqrt(beta_end), num_timesteps, dtype=torch.float64) ** 2
        self.alphas_cumprod = torch.cumprod(1.0 - self.betas, dim=0)

    @classmethod
    def from_config(cls, config) -> NoiseSchedule:
        return cls(config.num_timesteps, config.beta_start, config.beta_end)

    def _gather(self, values: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        out = values.to(like.device)[t.to(like.device).long()].to(like.dtype)
        return out.view(-1, *([1] * (like.ndim - 1)))

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """q(x_t | x0): sqrt(a_t) x0 + sqrt(1 - a_t) noise, with a_t = alphas_cumprod[t]."""
        a = self._gather(self.alphas_cumprod, t, x0)
        return a.sqrt() * x0 + (1.0 - a).sqrt() * noise

    def sample_timesteps(self, n: int, *, generator: torch.Generator | None = None, device="cpu") -> torch.Tensor:
        """Uniform training timesteps in [0, T)."""
        return torch.randint(0, self.num_timesteps, (n,), generator=generator).to(device)


class DDIMSampler:
    """DDIM over ``rdm_steps`` uniformly spaced timesteps (1, 1 + c, 1 + 2c, ... with c = T // rdm_steps).

    ``eta`` = 0 is the deterministic sampler; ``eta`` = 1 (the official RDM setting) adds the
    DDPM-like posterior noise. Preconditions, not checked here (the caller validated them by
    :class:`~rcg_augment.settings.GenerationSettings`, the one home of their bounds):
    1 <= ``rdm_steps`` <= ``schedule.num_timesteps``, ``eta`` >= 0.
    """

    def __init__(self, schedule: NoiseSchedule, rdm_steps: int = 250, eta: float = 1.0):
        T = schedule.num_timesteps
        self.schedule = schedule
        self.rdm_steps = rdm_steps
        self.eta = eta
        c = T // rdm_steps
        # The official spacing is range(0, T, c) + 1; exactly rdm_steps of them, kept inside [1, T-1].
        self.timesteps = (torch.arange(rdm_steps) * c + 1).clamp(max=T - 1)
        ac = schedule.alphas_cumprod
        self.alphas = ac[self.timesteps]
        self.alphas_prev = torch.cat([ac[:1], ac[self.timesteps[:-1]]])
        self.sigmas = eta * ((1 - self.alphas_prev) / (1 - self.alphas) * (1 - self.alphas / self.alphas_prev)).sqrt()

    def _at(self, values: torch.Tensor, index: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return values.to(like.device)[index].to(like.dtype).view(-1, *([1] * (like.ndim - 1)))

    def step(self, x0_pred: torch.Tensor, index: torch.Tensor, x_t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """One DDIM update from step ``index`` (into ``self.timesteps``) to the previous one."""
        a = self._at(self.alphas, index, x_t)
        a_prev = self._at(self.alphas_prev, index, x_t)
        sigma = self._at(self.sigmas, index, x_t)
        eps = (x_t - a.sqrt() * x0_pred) / (1 - a).sqrt()
        direction = (1 - a_prev - sigma**2).clamp(min=0).sqrt() * eps
        return a_prev.sqrt() * x0_pred + direction + sigma * noise

    def steps_for(self, noise_level: torch.Tensor) -> torch.Tensor:
        """How many of the ``rdm_steps`` DDIM steps a noise level in [0, 1] runs (rounded)."""
        return torch.round(noise_level.double() * self.rdm_steps).long()

    def renoise(
        self, z0: torch.Tensor, noise_level: float | torch.Tensor, *, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Noise clean representations to a fraction of the schedule.

        Returns ``(z_t, steps)``: ``steps`` (B,) is how many DDIM steps bring each row back to
        t = 0. Level 0 returns z0 itself (0 steps); level 1 returns pure Gaussian noise (all
        steps: the image is ignored); in between, z0 is noised to the timestep of that step.
        """
        level = torch.as_tensor(noise_level, dtype=torch.float64).flatten()
        if level.numel() == 1:
            level = level.expand(z0.shape[0])
        if level.numel() != z0.shape[0]:
            raise ValueError(f"`noise_level` needs 1 or {z0.shape[0]} values, got {level.numel()}")
        if not torch.all((level >= 0) & (level <= 1)):
            raise ValueError(f"`noise_level` must be in [0, 1], got {level.tolist()}")
        steps = self.steps_for(level)
        noise = _randn(z0.shape, generator=generator, device=z0.device, dtype=z0.dtype)
        start = (steps - 1).clamp(min=0)
        z_t = self.schedule.add_noise(z0, noise, self.timesteps[start])
        pure = (steps == self.rdm_steps).to(z0.device)[:, None]
        keep = (steps == 0).to(z0.device)[:, None]
        z_t = torch.where(pure, noise, torch.where(keep, z0, z_t))
        return z_t, steps.to(z0.device)

    def denoise(
        self, model: Denoiser, z_t: torch.Tensor, steps: torch.Tensor, *, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Run each row's remaining ``steps`` DDIM steps (rows with 0 steps pass through)."""
        steps = steps.to(z_t.device)
        total = int(steps.max().item()) if steps.numel() else 0  # one sync, before the loop
        z = z_t
        for i in reversed(range(total)):
            index = torch.full((z.shape[0],), i, dtype=torch.long, device=z.device)
            t = self.timesteps.to(z.device)[index]
            x0 = model(z, t)
            noise = (
                _randn(z.shape, generator=generator, device=z.device, dtype=z.dtype)
                if self.eta > 0 else torch.zeros_like(z)
            )
            z_next = self.step(x0, index, z, noise)
            z = torch.where((i < steps)[:, None], z_next, z)
        return z

    def sample(
        self, model: Denoiser, shape: tuple[int, ...], *, generator: torch.Generator | None = None,
        device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
    ) -> torch.Tensor:
        """Unconditional samples: pure noise through all ``rdm_steps`` steps."""
        z = _randn(shape, generator=generator, device=device, dtype=dtype)
        steps = torch.full((shape[0],), self.rdm_steps, dtype=torch.long, device=device)
        return self.denoise(model, z, steps, generator=generator)


__all__ = ["DDIMSampler", "NoiseSchedule"]
