"""Parallel iterative decoding for MAGE (MaskGIT-style) with classifier-free guidance.

Each of ``num_iter`` steps predicts every masked token at once, samples them, and re-masks the
least confident ones following a cosine schedule. With guidance, the conditional and
unconditional logits come from ONE forward over a doubled batch and are combined as
``l_c + s_i * (l_c - l_u)`` with ``s_i = cfg * (i + 1) / num_iter``.

These functions trust their generation settings (``num_iter``, ``temperature``, ``cfg``,
``token_temperature``, ``repaint_fraction``): the pipeline resolves and checks them once per call
(:meth:`~rcg_augment.settings.GenerationSettings.resolve`). Called on their own, check them first,
e.g. ``GenerationSettings(num_iter=n, cfg=s)`` raises for values out of range.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def mask_ratio(step: int, num_iter: int) -> float:
    """Fraction of tokens left masked after step ``step`` (0-based): cos(pi/2 * (step+1)/num_iter)."""
    return math.cos(math.pi / 2.0 * (step + 1) / num_iter)


def guidance_scale(step: int, num_iter: int, cfg: float) -> float:
    """Guidance grows linearly over the steps: cfg * (step + 1) / num_iter."""
    return cfg * (step + 1) / num_iter


def apply_guidance(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance: l_g = l_c + scale * (l_c - l_u)."""
    return cond + scale * (cond - uncond)


def gumbel_noise(shape, *, generator, device) -> torch.Tensor:
    u = torch.rand(shape, generator=generator, device=device).clamp_(1e-20, 1.0 - 1e-7)
    return -torch.log(-torch.log(u))


def keep_source_tokens(
    tokens: torch.Tensor, repaint_fraction: float, mask_token_id: int, *, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Mask round(L * repaint_fraction) positions of each row of ``tokens`` (B, L), chosen uniformly
    at random per row; the rest keep the source's codes. The start grid of source-anchored decoding.
    ``repaint_fraction`` in (0, 1] (not checked here; see the module's docstring)."""
    bsz, length = tokens.shape
    num_masked = max(1, round(length * repaint_fraction))
    ranks = torch.rand(bsz, length, generator=generator, device=tokens.device).argsort(-1).argsort(-1)
    return tokens.masked_fill(ranks < num_masked, mask_token_id)


def maskgit_decode(
    model,
    rep: torch.Tensor,
    *,
    num_iter: int = 20,
    temperature: float = 6.0,
    cfg: float = 0.0,
    generator: torch.Generator | None = None,
    start_tokens: torch.Tensor | None = None,
    token_temperature: float = 1.0,
) -> torch.Tensor:
    """Generate a (B, L) grid of code indices conditioned on representations ``rep`` (B, rep_dim).

    Args:
        model: a :class:`~rcg_augment.models.mage.MAGE` (any callable with its forward signature
            and ``config``).
        num_iter: decoding steps, >= 1.
        temperature: the re-masking ("choice") temperature, >= 0: Gumbel noise of this scale,
            annealed linearly to 0, is added to the log-confidence that picks what to re-mask.
            Codes themselves are sampled at ``token_temperature``.
        cfg: guidance scale, >= 0; 0 skips the unconditional branch.
        generator: for reproducible sampling; must live on ``rep``'s device.
        start_tokens: (B, L) grid to start from, ``mask_token_id`` where MAGE paints (see
            :func:`keep_source_tokens`); None starts fully masked. The cosine schedule runs over
            each row's masked count, so a fully masked start decodes exactly as None does.
        token_temperature: > 0; the (guided) logits are divided by it before each code is drawn
            and before the confidences that pick what to re-mask; 1 (the official sampling)
            leaves them as they are.

    The settings are not checked here (see the module's docstring).
    """
    c = model.config
    bsz, length, device = rep.shape[0], c.num_tokens, rep.device
    guided = cfg > 0
    if start_tokens is None:
        tokens = torch.full((bsz, length), c.mask_token_id, dtype=torch.long, device=device)
        to_paint = None  # every row paints all `length` tokens
    else:
        if tuple(start_tokens.shape) != (bsz, length):
            raise ValueError(f"`start_tokens` must have shape {(bsz, length)}, got {tuple(start_tokens.shape)}")
        tokens = start_tokens.to(device=device, dtype=torch.long)
        to_paint = (tokens == c.mask_token_id).sum(dim=-1, keepdim=True).double()
    if guided:
        rep_in = torch.cat([rep, model.fake_latent.to(rep.dtype).expand(bsz, -1)])
    else:
        rep_in = rep
    for step in range(num_iter):
        unknown = tokens == c.mask_token_id
        logits = model(torch.cat([tokens, tokens]) if guided else tokens, rep_in).float()
        if guided:
            cond, uncond = logits.chunk(2)
            logits = apply_guidance(cond, uncond, guidance_scale(step, num_iter, cfg))
        if token_temperature != 1.0:
            logits = logits / token_temperature
        # Categorical sampling by the Gumbel-max trick (seeded).
        sampled = (logits + gumbel_noise(logits.shape, generator=generator, device=device)).argmax(-1)
        sampled = torch.where(unknown, sampled, tokens)
        if step == num_iter - 1:
            return sampled
        ratio = (step + 1) / num_iter
        num_unknown = unknown.sum(dim=-1, keepdim=True)
        if to_paint is None:
            scheduled = torch.full_like(num_unknown, math.floor(length * mask_ratio(step, num_iter)))
        else:  # float64 as Python's floats, so a full start gives the same integers as above
            scheduled = (to_paint * mask_ratio(step, num_iter)).floor().long()
        mask_len = torch.clamp(torch.minimum(num_unknown - 1, scheduled), min=1)
        confidence = F.log_softmax(logits, dim=-1).gather(-1, sampled[..., None]).squeeze(-1)
        anneal = temperature * (1.0 - ratio)
        if anneal > 0:
            confidence = confidence + anneal * gumbel_noise(confidence.shape, generator=generator, device=device)
        confidence = confidence.masked_fill(~unknown, float("inf"))
        # Re-mask exactly mask_len of the least confident newly sampled tokens per row.
        ranks = confidence.argsort(dim=-1).argsort(dim=-1)
        tokens = torch.where(ranks < mask_len, torch.full_like(sampled, c.mask_token_id), sampled)
    return tokens  # unreachable: the loop returns at its last step


__all__ = ["apply_guidance", "guidance_scale", "keep_source_tokens", "mask_ratio", "maskgit_decode"]
