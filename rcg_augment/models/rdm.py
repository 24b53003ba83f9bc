"""Representation diffusion model (RDM): a residual MLP that denoises representations.

The network predicts the clean representation x0 from a noisy one and its timestep. It knows
nothing about the noise schedule; :mod:`rcg_augment.sampling.diffusion` owns that.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn


@dataclass
class RDMConfig:
    """Shape of the residual-MLP denoiser and of its diffusion schedule.

    ``num_timesteps``, ``beta_start`` and ``beta_end`` define the training schedule
    (betas = linspace(sqrt(beta_start), sqrt(beta_end), T) ** 2); ``sampling_steps`` and ``eta``
    are the DDIM defaults.
    """

    rep_dim: int = 256
    hidden_dim: int = 1536
    num_blocks: int = 12
    time_embed_dim: int = 256
    dropout: float = 0.0
    num_timesteps: int = 1000
    beta_start: float = 0.0015
    beta_end: float = 0.0195
    sampling_steps: int = 250
    eta: float = 1.0

    def __post_init__(self) -> None:
        if self.hidden_dim % 2:
            raise ValueError(f"`hidden_dim` must be even (sinusoidal embedding), got {self.hidden_dim}")
        if not 1 <= self.sampling_steps <= self.num_timesteps:
            raise ValueError(
                f"`sampling_steps` must be in [1, {self.num_timesteps}], got {self.sampling_steps}"
            )

    def to_dict(self) -> dict:
        return asdict(self)


# Keyed by the pipeline preset each belongs to (rcg_augment.presets): one name in every model.
RDM_PRESETS: dict[str, RDMConfig] = {
    # Official ViT-B and ViT-L RDMs share one MLP (the representation is 256-d in both).
    "rcg-b": RDMConfig(),
    "rcg-l": RDMConfig(),
    "tiny": RDMConfig(hidden_dim=512, num_blocks=4, sampling_steps=50),
}


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps: [cos | sin], (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([args.cos(), args.sin()], dim=-1)


class ResidualBlock(nn.Module):
    """LayerNorm-SiLU-Linear, plus the time embedding, then LayerNorm-SiLU-Dropout-Linear(zero init)."""

    def __init__(self, width: int, time_embed_dim: int, dropout: float):
        super().__init__()
        self.in_layers = nn.Sequential(nn.LayerNorm(width), nn.SiLU(), nn.Linear(width, width))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(time_embed_dim, width))
        self.out_layers = nn.Sequential(
            nn.LayerNorm(width), nn.SiLU(), nn.Dropout(dropout), nn.Linear(width, width)
        )
        nn.init.zeros_(self.out_layers[3].weight)
        nn.init.zeros_(self.out_layers[3].bias)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.in_layers(x) + self.emb_layers(emb)
        return x + self.out_layers(h)


class RepresentationDenoiser(nn.Module):
    """Residual MLP predicting x0 from (x_t, t).

    Example::

        net = RepresentationDenoiser(RDM_PRESETS["tiny"])
        x0_hat = net(torch.randn(8, 256), torch.full((8,), 500))
    """

    def __init__(self, config: RDMConfig):
        super().__init__()
        self.config = config
        c = config
        self.time_embed = nn.Sequential(
            nn.Linear(c.hidden_dim, c.time_embed_dim), nn.SiLU(), nn.Linear(c.time_embed_dim, c.time_embed_dim)
        )
        self.input_proj = nn.Linear(c.rep_dim, c.hidden_dim)
        self.res_blocks = nn.ModuleList(
            ResidualBlock(c.hidden_dim, c.time_embed_dim, c.dropout) for _ in range(c.num_blocks)
        )
        self.out = nn.Sequential(nn.LayerNorm(c.hidden_dim, eps=1e-6), nn.SiLU(), nn.Linear(c.hidden_dim, c.rep_dim))
        nn.init.zeros_(self.out[2].weight)
        nn.init.zeros_(self.out[2].bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        emb = self.time_embed(timestep_embedding(t, self.config.hidden_dim).to(x.dtype))
        h = self.input_proj(x)
        for block in self.res_blocks:
            h = block(h, emb)
        return self.out(h)


__all__ = ["RDMConfig", "RDM_PRESETS", "RepresentationDenoiser", "timestep_embedding"]
