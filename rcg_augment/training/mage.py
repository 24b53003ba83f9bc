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


def deepen_mage(mage: MAGE, depth: int | None = None, decoder_depth: int | None = None) -> MAGE:
    """A deeper copy of ``mage`` that computes exactly the same logits (and is no longer tied to it).

    Each new block goes right after an existing one (spread evenly, so 4 -> 8 follows every block
    with one new block) as a copy of it with its two residual output projections (attention
    ``proj`` and MLP ``fc2``) zeroed: a new block passes its input through unchanged until training
    moves those projections. ``depth`` / ``decoder_depth`` are the encoder and decoder block counts
    wanted (None: keep); asking for fewer blocks than the model has is an error.
    """
    c = mage.config
    new_depth = {}
    for field, want in (("depth", depth), ("decoder_depth", decoder_depth)):
        have = getattr(c, field)
        if want is not None and (isinstance(want, bool) or not isinstance(want, int) or want < have):
            raise ValueError(f"`{field}` must be an int >= the model's {have} blocks (blocks are only added), "
                             f"got {want!r}")
        new_depth[field] = have if want is None else want
    like = next(mage.parameters())
    grown = MAGE(dataclasses.replace(c, **new_depth)).to(device=like.device, dtype=like.dtype)
    kept = {k: v for k, v in mage.state_dict().items() if not k.startswith(("blocks.", "decoder_blocks."))}
    grown.load_state_dict(kept, strict=False)
    for field, name in (("depth", "blocks"), ("decoder_depth", "decoder_blocks")):
        old, new, total = getattr(mage, name), getattr(grown, name), new_depth[field]
        slot = 0
        for i, block in enumerate(old):
            for copy in range(round((i + 1) * total / len(old)) - round(i * total / len(old))):
                new[slot].load_state_dict(block.state_dict())
                if copy:  # an added block: the identity until trained
                    for proj in (new[slot].attn.proj, new[slot].mlp.fc2):
                        nn.init.zeros_(proj.weight)
                        nn.init.zeros_(proj.bias)
                slot += 1
    return grown


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
        rep_drop_prob: how often a training example's representation is replaced by the learned
            ``fake_latent`` (what guidance's unconditional logits learn from), in [0, 1); None
            trains with the model's ``mage.rep_drop_prob`` (0.1 in every preset, as the official
            training). A value rewrites that config field, like ``label_smoothing``.
        rep_crop: ``"shared"`` (the official training) takes the representation from the very crop
            whose tokens MAGE learns to predict; ``"independent"`` takes it from a second random
            crop of the same image (same ``crop_scale`` and ``hflip``), so one representation
            stands for several framings of its image and MAGE learns to vary them (without crops
            or flips the two are the same). On the tiny digits model this moved the
            fidelity/variety curve outwards (docs/training.md, "Stage options").
        depth, decoder_depth: grow MAGE to this many encoder / decoder blocks before training
            (:func:`deepen_mage`: the added blocks start as the identity, so training continues
            from exactly the model it was given); None keeps the model's. The saved config
            records the new depth. A resumed run grows the same starting model the same way.
    """

    crop_scale: tuple[float, float] | None = None
    hflip: bool = False
    label_smoothing: float | None = None
    dropout: float | None = None
    rep_drop_prob: float | None = None
    rep_crop: str = "shared"
    depth: int | None = None
    decoder_depth: int | None = None

    # Options that rewrite a MAGE config field for the run: a number in [0, 1), None = the model's.
    _CONFIG_OPTIONS = ("label_smoothing", "dropout", "rep_drop_prob")
    # Options that add blocks to the network: a positive int, None = the model's.
    _GROW_OPTIONS = ("depth", "decoder_depth")

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
        if self.rep_crop not in ("shared", "independent"):
            raise ValueError(f"`rep_crop` must be 'shared' or 'independent', got {self.rep_crop!r}")
        for name in self._GROW_OPTIONS:
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ValueError(f"`{name}` must be a positive int or None, got {v!r}")

    def options(self) -> dict:
        # Unset, the option is left out of the run's record, so runs recorded before it existed
        # still resume and still count as finished.
        out = super().options()
        for name in self._CONFIG_OPTIONS + self._GROW_OPTIONS:
            if getattr(self, name) is None:
                out.pop(name, None)
        if self.rep_crop == "shared":
            out.pop("rep_crop", None)
        return out

    def build(self, pipe: RCGPipeline) -> nn.Module:
        if self.depth is not None or self.decoder_depth is not None:
            pipe.mage = deepen_mage(pipe.mage, self.depth, self.decoder_depth)
            pipe.config.mage = pipe.mage.config
        changes = {name: getattr(self, name) for name in self._CONFIG_OPTIONS if getattr(self, name) is not None}
        if self.dropout is not None:
            changes["attn_dropout"] = self.dropout
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
        x_rep = x
        if self.rep_crop == "independent":
            x_rep = resized_crop_flip(images, generator=ctx.generator, scale=self.crop_scale, hflip=self.hflip)
        with torch.no_grad():
            rep = ctx.pipe.encoder(x_rep).float()
            tokens = ctx.pipe.tokenizer.encode(x).flatten(1)
        return model(tokens, rep, generator=ctx.generator).float(), {}

    def finish(self, pipe: RCGPipeline, model: nn.Module, ema: nn.Module | None) -> None:
        if ema is not None:
            pipe.mage.load_state_dict(ema.state_dict())


__all__ = ["MAGELoss", "MAGEStage", "deepen_mage", "mage_training_loss", "sample_masks", "truncated_normal"]
