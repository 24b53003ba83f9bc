"""MAGE stage: masked-token training of the pixel generator on frozen tokenizer + encoder.

For each image: tokens = tokenizer.encode(image), rep = encoder(image) (both frozen, eval
mode); loss = :func:`mage_training_loss`, which draws the official mask-ratio distribution
(:func:`sample_masks`) and replaces the representation by the learned ``fake_latent`` with
probability ``rep_drop_prob`` (for classifier-free guidance). AdamW betas (0.9, 0.95), weight
decay 0.05, gradient clipping 3.0, warm-up 10 of 200 epochs; the pipeline keeps the EMA weights.
The network itself (:class:`~rcg_augment.models.mage.MAGE`) only runs forward.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..models.mage import MAGE, MAGEConfig
from ..pipeline import RCGPipeline
from .augment import resized_crop_flip
from .stage import Stage, StepContext


def truncated_normal(
    n: int, mu: float, std: float, low: float, high: float, *, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Samples from N(mu, std) truncated to [low, high] by inverting the CDF (seeded, no scipy)."""
    normal = torch.distributions.Normal(torch.tensor(mu, dtype=torch.float64), torch.tensor(std, dtype=torch.float64))
    lo, hi = normal.cdf(torch.tensor(low, dtype=torch.float64)), normal.cdf(torch.tensor(high, dtype=torch.float64))
    u = lo + (hi - lo) * torch.rand(n, generator=generator, dtype=torch.float64)
    return normal.icdf(u).clamp(low, high).float()


def sample_masks(
    config: MAGEConfig, bsz: int, *, generator: torch.Generator | None = None, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Training masks (masked, dropped), each (B, L) bool, with the official ratio distribution.

    One mask rate per batch from the truncated normal; ceil(L * mask_ratio_min) positions are
    dropped from the encoder and ceil(L * rate) are masked (the dropped ones among them).
    """
    c = config
    length = c.num_tokens
    rate = truncated_normal(
        1, c.mask_ratio_mu, c.mask_ratio_std, c.mask_ratio_min, c.mask_ratio_max, generator=generator
    ).item()
    num_dropped = math.ceil(length * c.mask_ratio_min)
    num_masked = max(math.ceil(length * rate), num_dropped)
    ranks = torch.rand(bsz, length, generator=generator).argsort(dim=1).argsort(dim=1).to(device)
    return ranks < num_masked, ranks < num_dropped


def mage_training_loss(
    mage: MAGE, tokens: torch.Tensor, rep: torch.Tensor, *, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Masked-token loss: label-smoothed cross-entropy over masked positions.

    ``tokens`` (B, L) are clean code indices; ``rep`` (B, rep_dim) the normalised
    representations. The representation is replaced by ``fake_latent`` with probability
    ``rep_drop_prob`` so the same network gives the unconditional logits for guidance.
    """
    c = mage.config
    bsz = tokens.shape[0]
    masked, dropped = sample_masks(c, bsz, generator=generator, device=tokens.device)
    inputs = tokens.masked_fill(masked, c.mask_token_id)
    drop_rep = (torch.rand(bsz, generator=generator) < c.rep_drop_prob).to(tokens.device)[:, None]
    rep = torch.where(drop_rep, mage.fake_latent.to(rep.dtype).expand_as(rep), rep)
    logits = mage(inputs, rep, drop_mask=dropped)
    ce = F.cross_entropy(
        logits.reshape(-1, c.codebook_size).float(), tokens.reshape(-1),
        label_smoothing=c.label_smoothing, reduction="none",
    ).view_as(tokens)
    weights = masked.float()
    return (ce * weights).sum() / weights.sum()


class MAGELoss(nn.Module):
    """``forward(tokens, rep, generator)`` = :func:`mage_training_loss` (so DDP sees a forward)."""

    def __init__(self, mage: MAGE):
        super().__init__()
        self.mage = mage

    def forward(self, tokens: torch.Tensor, rep: torch.Tensor, generator: torch.Generator | None = None):
        return mage_training_loss(self.mage, tokens, rep, generator=generator)


@dataclass
class MAGEStage(Stage):
    """MAGE options.

    Args:
        crop_scale: RandomResizedCrop area range, or None (official default: no augmentation).
        hflip: random horizontal flips (off by default, as the official default).
        label_smoothing: label smoothing of the masked-token cross-entropy, in [0, 1); None
            trains with the model's ``mage.label_smoothing`` (0.1 in every preset, as the official
            training). A value rewrites that config field, so the saved model records what its
            weights were last trained with and a later fine-tune keeps it.
        dropout: dropout of every MAGE layer (embeddings, attention, MLPs), in [0, 1); None trains
            with the model's ``mage.dropout`` / ``mage.attn_dropout`` (0.1 in every preset, as the
            official training). A value rewrites both config fields, like ``label_smoothing``.
            Dropout acts only in training: the same weights sample identically either way.
    """

    crop_scale: tuple[float, float] | None = None
    hflip: bool = False
    label_smoothing: float | None = None
    dropout: float | None = None

    # Options that rewrite a MAGE config field for the run: a number in [0, 1), None = the model's.
    _CONFIG_OPTIONS = ("label_smoothing", "dropout")

    name = "mage"
    network = "mage"
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
        for name in self._CONFIG_OPTIONS:
            v = getattr(self, name)
            if v is None:
                continue
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= v < 1.0:
                raise ValueError(f"`{name}` must be a number in [0, 1) or None, got {v!r}")
            setattr(self, name, float(v))

    def options(self) -> dict:
        # Unset, the option is left out of the run's record, so runs recorded before it existed
        # still resume and still count as finished.
        out = super().options()
        for name in self._CONFIG_OPTIONS:
            if getattr(self, name) is None:
                out.pop(name, None)
        return out

    def build(self, pipe: RCGPipeline) -> nn.Module:
        changes = {}
        if self.label_smoothing is not None:
            changes["label_smoothing"] = self.label_smoothing
        if self.dropout is not None:
            changes.update(dropout=self.dropout, attn_dropout=self.dropout)
            for module in pipe.mage.modules():
                if isinstance(module, nn.Dropout):  # embeddings, attention (fused: reads .p), MLPs
                    module.p = self.dropout
        if changes:
            # A new config object (a preset's may be shared), set on the pipeline and its MAGE.
            config = dataclasses.replace(pipe.mage.config, **changes)
            pipe.config.mage = config
            pipe.mage.config = config
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


__all__ = ["MAGELoss", "MAGEStage", "mage_training_loss", "sample_masks", "truncated_normal"]
