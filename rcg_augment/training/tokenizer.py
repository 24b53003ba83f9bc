"""Tokenizer stage: VQ reconstruction training of the tokenizer.

Loss: pixel reconstruction (L1 or MSE) + the codebook/commitment loss from
``VQTokenizer.forward``. No perceptual (LPIPS) or adversarial term: nothing is downloaded, and at
32 px the pixel loss does most of the work.

Dead codes: a codebook initialised far from the encoder's outputs, or trained on little data,
ends up using a handful of entries. Every ``restart_every`` steps (and after the first step),
codes no image chose in that window are moved onto randomly chosen encoder outputs of the
current batch (gathered over processes, drawn with a seed shared by all processes so every
replica stays identical) and their AdamW moments are reset. Usage is logged as
``codebook_usage`` (fraction of codes used in the window).

``train="decoder"`` trains the decoder alone: the encoder and the codebook stay frozen, so every
image keeps its tokens and a MAGE trained on them stays valid; only how tokens are painted back
into pixels improves (no codebook loss, no restarts).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..pipeline import RCGPipeline
from .augment import resized_crop_flip
from .data_order import derive_seed
from .stage import Stage, StepContext


@dataclass
class TokenizerStage(Stage):
    """VQ tokenizer options.

    Args:
        recon_loss: ``"l1"`` or ``"mse"``.
        crop_scale: RandomResizedCrop area range, or None (whole image).
        hflip: random horizontal flips.
        restart_every: steps between dead-code restarts (0 disables restarts).
        restart_until: fraction of training after which codes are no longer restarted (the
            decoder needs the last steps to settle on the final codebook).
        pool_per_process: encoder outputs each process contributes to the restart pool.
        train: ``"all"`` (encoder, codebook and decoder) or ``"decoder"`` (decoder alone; the
            tokens of every image unchanged, so the MAGE trained on them needs no retraining).
    """

    recon_loss: str = "l1"
    crop_scale: tuple[float, float] | None = None
    hflip: bool = True
    restart_every: int = 20
    restart_until: float = 0.9
    pool_per_process: int = 1024
    train: str = "all"

    name = "tokenizer"
    network = "tokenizer"
    lr_scaling = "per256"
    default_blr = 1e-3
    default_weight_decay = 0.0
    default_betas = (0.9, 0.99)
    default_warmup_fraction = 0.02

    def __post_init__(self) -> None:
        if self.recon_loss not in ("l1", "mse"):
            raise ValueError(f"`recon_loss` must be 'l1' or 'mse', got {self.recon_loss!r}")
        if self.crop_scale is not None:
            self.crop_scale = tuple(float(s) for s in self.crop_scale)
        if self.train not in ("all", "decoder"):
            raise ValueError(f"`train` must be 'all' or 'decoder', got {self.train!r}")
        if self.restart_every < 0:
            raise ValueError(f"`restart_every` must be >= 0, got {self.restart_every}")
        self._counts: torch.Tensor | None = None
        self._latents: torch.Tensor | None = None
        self._hook = None

    def build(self, pipe: RCGPipeline) -> nn.Module:
        tok = pipe.tokenizer
        if self.train == "decoder":
            tok.requires_grad_(False)
            tok.decoder.requires_grad_(True)
        else:
            tok.requires_grad_(True)
        self._counts = torch.zeros(tok.config.codebook_size, dtype=torch.float64)

        def keep_latents(module, args, output):
            self._latents = output.detach()

        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        if self.train == "all":  # the restart pool; a frozen codebook is never restarted
            self._hook = tok.encoder.register_forward_hook(keep_latents)
        return tok

    def loss(self, model: nn.Module, images: torch.Tensor, ctx: StepContext) -> tuple[torch.Tensor, dict]:
        x = resized_crop_flip(images, generator=ctx.generator, scale=self.crop_scale, hflip=self.hflip)
        recon, vq_loss, indices = model(x, decoder_only=self.train == "decoder")
        recon = recon.float()
        rec = F.l1_loss(recon, x) if self.recon_loss == "l1" else F.mse_loss(recon, x)
        counts = torch.bincount(indices.flatten(), minlength=self._counts.numel())
        self._counts = self._counts.to(counts.device) + counts
        return rec + vq_loss.float(), {"recon": float(rec.detach()), "vq": float(vq_loss.detach())}

    def after_step(self, ctx: StepContext) -> dict:
        done = ctx.step + 1
        if not (done == 1 or (self.restart_every and done % self.restart_every == 0)):
            return {}
        counts = self._counts
        if ctx.accelerator.num_processes > 1:
            counts = ctx.accelerator.reduce(counts.clone(), reduction="sum")
        usage = float((counts > 0).double().mean())
        restarted = 0
        if self.train == "all" and self.restart_every and done <= self.restart_until * ctx.total_steps:
            restarted = self._restart(ctx, counts == 0)
        self._counts = torch.zeros_like(self._counts)
        return {"codebook_usage": usage, "codes_restarted": restarted}

    @torch.no_grad()
    def _restart(self, ctx: StepContext, dead: torch.Tensor) -> int:
        n_dead = int(dead.sum())
        if n_dead == 0 or self._latents is None:
            return 0
        z = self._latents.float()
        flat = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])
        take = torch.randperm(flat.shape[0], generator=ctx.generator)[: self.pool_per_process]
        pool = ctx.accelerator.gather(flat[take.to(flat.device)].contiguous())
        # Same seed on every process: every replica moves the same codes to the same vectors.
        shared = torch.Generator().manual_seed(derive_seed(ctx.seed, self.name, "restart", ctx.step))
        pick = torch.randint(0, pool.shape[0], (n_dead,), generator=shared).to(pool.device)
        weight = ctx.unwrapped.quantize.embedding.weight
        rows = dead.nonzero().flatten().to(weight.device)
        weight.data[rows] = pool[pick].to(weight.dtype)
        state = getattr(ctx.optimizer, "optimizer", ctx.optimizer).state.get(weight, {})
        for key in ("exp_avg", "exp_avg_sq"):
            if key in state:
                state[key][rows] = 0
        return n_dead

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"code_counts": self._counts.detach().cpu()} if self._counts is not None else {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if "code_counts" in state:
            self._counts = state["code_counts"].double()

    def finish(self, pipe: RCGPipeline, model: nn.Module, ema: nn.Module | None) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None


__all__ = ["TokenizerStage"]
