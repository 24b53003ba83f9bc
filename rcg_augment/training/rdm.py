"""RDM stage: diffusion over the frozen encoder's normalised representations.

For each image: rep = encoder(image) (per-sample normalised, the encoder frozen in eval mode),
t uniform in [0, T), x_t = schedule.add_noise(rep, noise, t); the network predicts x0 and the
loss is the MSE to rep (the official x0 parameterisation). The pipeline keeps the EMA weights
(decay 0.9999 official, with LitEma's warm-up).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..pipeline import RCGPipeline
from .augment import resized_crop_flip
from .stage import Stage, StepContext


@dataclass
class RDMStage(Stage):
    """RDM options.

    Args:
        crop_scale: RandomResizedCrop area range, or None (the official recipe crops nothing
            from square images).
        hflip: random horizontal flips (official).
    """

    crop_scale: tuple[float, float] | None = None
    hflip: bool = True

    name = "rdm"
    network = "rdm"
    lr_scaling = "linear"  # official main_rdm.py: lr = blr * effective batch (no / 256)
    default_blr = 1e-6
    default_weight_decay = 0.01
    default_betas = (0.9, 0.999)
    default_warmup_fraction = 0.0
    default_lr_schedule = "constant"
    default_ema_decay = 0.9999

    def __post_init__(self) -> None:
        if self.crop_scale is not None:
            self.crop_scale = tuple(float(s) for s in self.crop_scale)

    def build(self, pipe: RCGPipeline) -> nn.Module:
        self._schedule = pipe.schedule
        pipe.rdm.requires_grad_(True)
        return pipe.rdm

    def loss(self, model: nn.Module, images: torch.Tensor, ctx: StepContext) -> tuple[torch.Tensor, dict]:
        g = ctx.generator
        x = resized_crop_flip(images, generator=g, scale=self.crop_scale, hflip=self.hflip)
        with torch.no_grad():
            rep = ctx.pipe.encoder(x).float()
        t = self._schedule.sample_timesteps(rep.shape[0], generator=g, device=rep.device)
        noise = torch.randn(rep.shape, generator=g).to(rep.device)
        x_t = self._schedule.add_noise(rep, noise, t)
        pred = model(x_t, t)
        return F.mse_loss(pred.float(), rep), {}

    def finish(self, pipe: RCGPipeline, model: nn.Module, ema: nn.Module | None) -> None:
        if ema is not None:
            pipe.rdm.load_state_dict(ema.state_dict())


__all__ = ["RDMStage"]
