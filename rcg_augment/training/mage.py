"""MAGE stage: masked-token training of the pixel generator on frozen tokenizer + encoder.

For each image: tokens = tokenizer.encode(image), rep = encoder(image) (both frozen, eval
mode); loss = ``MAGE.training_loss(tokens, rep)``, which draws the official mask-ratio
distribution and replaces the representation by the learned ``fake_latent`` with probability
``rep_drop_prob`` (for classifier-free guidance). AdamW betas (0.9, 0.95), weight decay 0.05,
gradient clipping 3.0, warm-up 10 of 200 epochs; the pipeline keeps the EMA weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..models.mage import MAGE
from ..pipeline import RCGPipeline
from .augment import resized_crop_flip
from .loop import Stage, StepContext


class MAGELoss(nn.Module):
    """``forward(tokens, rep, generator)`` = ``mage.training_loss`` (so DDP sees a forward)."""

    def __init__(self, mage: MAGE):
        super().__init__()
        self.mage = mage

    def forward(self, tokens: torch.Tensor, rep: torch.Tensor, generator: torch.Generator | None = None):
        return self.mage.training_loss(tokens, rep, generator=generator)


@dataclass
class MAGEStage(Stage):
    """MAGE options.

    Args:
        crop_scale: RandomResizedCrop area range, or None (official default: no augmentation).
        hflip: random horizontal flips (off by default, as the official default).
    """

    crop_scale: tuple[float, float] | None = None
    hflip: bool = False

    name = "mage"
    lr_scaling = "per256"
    default_blr = 1.5e-4
    default_weight_decay = 0.05
    default_betas = (0.9, 0.95)
    default_warmup_fraction = 10 / 200
    default_max_grad_norm = 3.0
    default_ema_decay = 0.9999

    def __post_init__(self) -> None:
        if self.crop_scale is not None:
            self.crop_scale = tuple(float(s) for s in self.crop_scale)

    def build(self, pipe: RCGPipeline) -> nn.Module:
        pipe.mage.requires_grad_(True)
        return MAGELoss(pipe.mage)

    def ema_source(self, model: nn.Module) -> nn.Module:
        return model.mage

    def loss(self, model: nn.Module, images: torch.Tensor, ctx: StepContext) -> tuple[torch.Tensor, dict]:
        x = resized_crop_flip(images, generator=ctx.generator, scale=self.crop_scale, hflip=self.hflip)
        with torch.no_grad():
            rep = ctx.pipe.encoder(x).float()
            tokens = ctx.pipe.tokenizer.encode(x).flatten(1)
        return model(tokens, rep, generator=ctx.generator).float(), {}

    def finish(self, pipe: RCGPipeline, model: nn.Module, ema: nn.Module | None) -> None:
        if ema is not None:
            pipe.mage.load_state_dict(ema.state_dict())


__all__ = ["MAGELoss", "MAGEStage"]
