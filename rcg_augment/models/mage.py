"""MAGE: a masked generative ViT over VQ tokens, conditioned on a representation.

The network maps (partially masked token grid, representation) to logits over the codebook for
every grid position. Parallel iterative decoding lives in :mod:`rcg_augment.sampling.maskgit`;
the masked-token training objective (mask sampling, loss) is in :mod:`rcg_augment.training.mage`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from functools import partial

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Block
from torch import nn


@dataclass
class MAGEConfig:
    """Shape of the MAGE transformer and its training/sampling constants.

    The vocabulary is ``codebook_size`` image codes, then ``num_class_slots`` class slots (unused
    by RCG but part of the official weights), then one mask token. ``fake_class_id`` is the token
    that sits at position 0 of every sequence; its embedding is replaced by the projected
    representation.
    """

    num_tokens: int = 256
    codebook_size: int = 1024
    num_class_slots: int = 1000
    fake_class_id: int = 1100
    rep_dim: int = 256
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    decoder_embed_dim: int = 768
    decoder_depth: int = 8
    decoder_num_heads: int = 16
    mlp_ratio: float = 4.0
    dropout: float = 0.1
    attn_dropout: float = 0.1
    label_smoothing: float = 0.1
    mask_ratio_min: float = 0.5
    mask_ratio_max: float = 1.0
    mask_ratio_mu: float = 0.75
    mask_ratio_std: float = 0.25
    rep_drop_prob: float = 0.1
    # Sampling defaults (ImageNet values: temperature 6.0 for MAGE-B, 11.0 for MAGE-L).
    num_iter: int = 20
    temperature: float = 6.0

    def __post_init__(self) -> None:
        if not self.codebook_size <= self.fake_class_id < self.codebook_size + self.num_class_slots:
            raise ValueError(
                f"`fake_class_id` must be a class slot in [{self.codebook_size}, "
                f"{self.codebook_size + self.num_class_slots}), got {self.fake_class_id}"
            )
        for name in ("embed_dim", "decoder_embed_dim"):
            heads = self.num_heads if name == "embed_dim" else self.decoder_num_heads
            if getattr(self, name) % heads:
                raise ValueError(f"`{name}` ({getattr(self, name)}) must be divisible by its head count ({heads})")
        if not 0.0 < self.mask_ratio_min <= self.mask_ratio_max <= 1.0:
            raise ValueError("mask ratios must satisfy 0 < mask_ratio_min <= mask_ratio_max <= 1")

    @property
    def vocab_size(self) -> int:
        return self.codebook_size + self.num_class_slots + 1

    @property
    def mask_token_id(self) -> int:
        return self.vocab_size - 1

    def to_dict(self) -> dict:
        return asdict(self)


# Keyed by the pipeline preset each belongs to (rcg_augment.presets): one name in every model.
MAGE_PRESETS: dict[str, MAGEConfig] = {
    "rcg-b": MAGEConfig(),  # MAGE ViT-B
    "rcg-l": MAGEConfig(  # MAGE ViT-L
        embed_dim=1024, depth=24, num_heads=16, decoder_embed_dim=1024, decoder_depth=8,
        decoder_num_heads=16, temperature=11.0,
    ),
    # 8x8 tokens, 256 codes, one class slot (the fake class).
    "tiny": MAGEConfig(
        num_tokens=64, codebook_size=256, num_class_slots=1, fake_class_id=256, embed_dim=192, depth=4,
        num_heads=3, decoder_embed_dim=192, decoder_depth=2, decoder_num_heads=3, num_iter=8,
        temperature=4.5,
    ),
}


class TokenEmbedding(nn.Module):
    """Word + learned position embeddings, LayerNorm and dropout (BERT-style)."""

    def __init__(self, vocab_size: int, seq_len: int, dim: int, dropout: float):
        super().__init__()
        self.word_embeddings = nn.Embedding(vocab_size, dim)
        self.position_embeddings = nn.Embedding(seq_len, dim)
        self.LayerNorm = nn.LayerNorm(dim, eps=1e-6)
        self.dropout = nn.Dropout(dropout)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.word_embeddings(ids) + self.position_embeddings.weight[: ids.shape[1]][None]
        return self.dropout(self.LayerNorm(x))


class MLMHead(nn.Module):
    """Linear-GELU-LayerNorm, then logits against the (tied, detached) word embeddings."""

    def __init__(self, in_dim: int, word_dim: int, vocab_size: int):
        super().__init__()
        self.fc = nn.Linear(in_dim, word_dim)
        self.ln = nn.LayerNorm(word_dim)
        self.bias = nn.Parameter(torch.zeros(1, 1, vocab_size))

    def forward(self, x: torch.Tensor, word_embeddings: torch.Tensor) -> torch.Tensor:
        h = self.ln(F.gelu(self.fc(x)))
        # F.linear, not h @ w.t(): the same BLAS call, and rcg_augment.cpu_matmul can route it
        return F.linear(h, word_embeddings.detach()) + self.bias


class MAGE(nn.Module):
    """Representation-conditioned masked generative transformer.

    ``forward(tokens, rep)`` takes a (B, L) grid of code indices where masked positions hold
    ``config.mask_token_id`` and a (B, rep_dim) representation, and returns (B, L, codebook_size)
    logits. Pass ``rep=None`` for the unconditional branch (the learned ``fake_latent``).
    """

    def __init__(self, config: MAGEConfig):
        super().__init__()
        self.config = config
        c = config
        norm = partial(nn.LayerNorm, eps=1e-6)
        self.token_emb = TokenEmbedding(c.vocab_size, c.num_tokens + 1, c.embed_dim, c.dropout)
        self.latent_prior_proj = nn.Linear(c.rep_dim, c.embed_dim)
        self.fake_latent = nn.Parameter(torch.zeros(1, c.rep_dim))
        self.blocks = nn.ModuleList(
            Block(c.embed_dim, c.num_heads, c.mlp_ratio, qkv_bias=True, proj_drop=c.dropout,
                  attn_drop=c.attn_dropout, norm_layer=norm)
            for _ in range(c.depth)
        )
        self.norm = norm(c.embed_dim)
        self.decoder_embed = nn.Linear(c.embed_dim, c.decoder_embed_dim)
        self.decoder_pos_embed_learned = nn.Parameter(torch.zeros(1, c.num_tokens + 1, c.decoder_embed_dim))
        self.decoder_blocks = nn.ModuleList(
            Block(c.decoder_embed_dim, c.decoder_num_heads, c.mlp_ratio, qkv_bias=True, proj_drop=c.dropout,
                  attn_drop=c.attn_dropout, norm_layer=norm)
            for _ in range(c.decoder_depth)
        )
        self.decoder_norm = norm(c.decoder_embed_dim)
        self.mlm_layer = MLMHead(c.decoder_embed_dim, c.embed_dim, c.vocab_size)
        self._init_weights()

    def _init_weights(self) -> None:
        for p in (self.token_emb.word_embeddings.weight, self.token_emb.position_embeddings.weight,
                  self.decoder_pos_embed_learned, self.fake_latent):
            nn.init.trunc_normal_(p, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(
        self, tokens: torch.Tensor, rep: torch.Tensor | None, drop_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Logits (B, L, codebook_size).

        ``drop_mask`` (B, L) bool marks positions removed from the encoder input (training only);
        every row must drop the same number of positions.
        """
        c = self.config
        bsz, length = tokens.shape
        if rep is None:
            rep = self.fake_latent.expand(bsz, -1)
        ids = torch.cat([tokens.new_full((bsz, 1), c.fake_class_id), tokens], dim=1)
        x = self.token_emb(ids)
        # Position 0 carries the condition: its embedding is the projected representation.
        x = torch.cat([self.latent_prior_proj(rep.to(x.dtype))[:, None], x[:, 1:]], dim=1)
        if drop_mask is not None:
            keep = ~drop_mask
            x = torch.cat([x[:, :1], x[:, 1:][keep].view(bsz, -1, x.shape[-1])], dim=1)
        for blk in self.blocks:
            x = blk(x)
        h = self.decoder_embed(self.norm(x))

        # Dropped and masked positions are filled with the position-0 (condition) decoder token.
        cls = h[:, :1]
        if drop_mask is not None:
            grid = cls.expand(bsz, length, h.shape[-1]).clone()
            grid[keep] = h[:, 1:].reshape(-1, h.shape[-1])
        else:
            grid = h[:, 1:]
        masked = (tokens == c.mask_token_id)[..., None]
        grid = torch.where(masked, cls, grid)
        h = torch.cat([cls, grid], dim=1) + self.decoder_pos_embed_learned
        for blk in self.decoder_blocks:
            h = blk(h)
        logits = self.mlm_layer(self.decoder_norm(h), self.token_emb.word_embeddings.weight)
        return logits[:, 1:, : c.codebook_size]


__all__ = ["MAGE", "MAGEConfig", "MAGE_PRESETS"]
