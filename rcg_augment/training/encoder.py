"""Encoder stage: MoCo v3 self-supervised pre-training of the ViT + projector.

Two augmented views of each image go through the encoder and MoCo's predictor (queries) and
through a momentum copy of the encoder (keys); the InfoNCE loss at temperature 0.2, scaled by
2T, is symmetrised over the two views. The momentum copy is the loop's EMA, its decay moving
from 0.99 to 1 on a cosine. The patch projection is frozen (MoCo v3's stop-grad conv1). The
pipeline keeps the trained encoder (not the momentum copy), as RCG uses the base encoder.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..models.encoder import RepresentationEncoder, build_moco_predictor
from ..pipeline import RCGPipeline
from .augment import (
    color_jitter,
    gaussian_blur,
    random_grayscale,
    random_solarize,
    resized_crop_flip,
)
from .stage import Stage, StepContext


class MoCoModel(nn.Module):
    """Base encoder + predictor; ``forward(x1, x2)`` returns the two views' queries."""

    def __init__(self, encoder: RepresentationEncoder, predictor: nn.Module):
        super().__init__()
        self.encoder = encoder
        self.predictor = predictor

    def forward(self, x1: torch.Tensor, x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # Each view is its own forward, so BatchNorm statistics are per view (as in MoCo v3).
        return self.predictor(self.encoder.features(x1)), self.predictor(self.encoder.features(x2))


def contrastive_loss(q: torch.Tensor, k: torch.Tensor, temperature: float, accelerator) -> torch.Tensor:
    """InfoNCE of queries against the keys of every process (positives on the diagonal), x 2T."""
    q = F.normalize(q.float(), dim=1)
    k = F.normalize(k.float(), dim=1)
    keys = accelerator.gather(k.contiguous())  # keys carry no gradient; one process: unchanged
    logits = q @ keys.t() / temperature
    labels = torch.arange(q.shape[0], device=q.device) + q.shape[0] * accelerator.process_index
    return F.cross_entropy(logits, labels) * (2 * temperature)


@dataclass
class EncoderStage(Stage):
    """MoCo v3 options.

    Args:
        temperature: InfoNCE temperature (0.2 official).
        crop_scale: RandomResizedCrop area range (0.08-1 official; raise it for tiny digits).
        hflip: random horizontal flips (official; turn off for digits/text).
        color: colour jitter (p 0.8), grayscale (p 0.2), blur (p 1.0 / 0.1) and solarize
            (p 0 / 0.2) on the two views, as MoCo v3's asymmetric recipe; blur sigma is scaled
            from 224 px to the encoder's resolution.
    """

    temperature: float = 0.2
    crop_scale: tuple[float, float] = (0.08, 1.0)
    hflip: bool = True
    color: bool = True

    name = "encoder"
    network = "encoder"
    lr_scaling = "per256"
    default_blr = 1.5e-4
    default_weight_decay = 0.1
    default_betas = (0.9, 0.999)
    default_warmup_fraction = 40 / 300
    default_ema_decay = 0.99  # the momentum, cosine-ramped to 1
    ema_train_mode = True  # the momentum encoder's BatchNorms use batch statistics, as in MoCo v3

    def __post_init__(self) -> None:
        self.crop_scale = tuple(float(s) for s in self.crop_scale)
        if not 0 < self.temperature:
            raise ValueError(f"`temperature` must be > 0, got {self.temperature}")
        if not (len(self.crop_scale) == 2 and 0 < self.crop_scale[0] <= self.crop_scale[1] <= 1):
            raise ValueError(f"`crop_scale` must be (low, high) with 0 < low <= high <= 1, got {self.crop_scale}")

    def image_size(self, pipe: RCGPipeline) -> int:
        return pipe.config.encoder.image_size

    def build(self, pipe: RCGPipeline) -> nn.Module:
        enc = pipe.encoder
        enc.requires_grad_(True)
        enc.vit.pos_embed.requires_grad_(False)  # fixed sin-cos
        enc.vit.patch_embed.proj.requires_grad_(False)  # stop-grad conv1
        c = pipe.config.encoder
        return MoCoModel(enc, build_moco_predictor(c.rep_dim, c.proj_hidden_dim))

    def ema_source(self, model: nn.Module) -> nn.Module:
        return model.encoder

    def ema_decay_at(self, base: float, step: int, total: int) -> float:
        return 1.0 - 0.5 * (1.0 + math.cos(math.pi * min(step, total) / total)) * (1.0 - base)

    def _view(self, images: torch.Tensor, generator: torch.Generator, size: int, first: bool) -> torch.Tensor:
        x = resized_crop_flip(images, generator=generator, scale=self.crop_scale, hflip=self.hflip, size=size)
        if self.color:
            x = color_jitter(x, generator=generator, p=0.8)
            x = random_grayscale(x, generator=generator, p=0.2)
            sigma = (0.1 * size / 224, 2.0 * size / 224)
            x = gaussian_blur(x, generator=generator, p=1.0 if first else 0.1, sigma=sigma)
            x = random_solarize(x, generator=generator, p=0.0 if first else 0.2)
        return x

    def loss(self, model: nn.Module, images: torch.Tensor, ctx: StepContext) -> tuple[torch.Tensor, dict]:
        size = images.shape[-1]
        x1 = self._view(images, ctx.generator, size, first=True)
        x2 = self._view(images, ctx.generator, size, first=False)
        q1, q2 = model(x1, x2)
        with torch.no_grad():
            k1, k2 = ctx.ema.features(x1), ctx.ema.features(x2)
        loss = (contrastive_loss(q1, k2, self.temperature, ctx.accelerator)
                + contrastive_loss(q2, k1, self.temperature, ctx.accelerator))
        return loss, {}


__all__ = ["EncoderStage", "MoCoModel", "contrastive_loss"]
