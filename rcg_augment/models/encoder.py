"""Self-supervised image encoder: a MoCo v3 ViT plus its projection head.

The encoder maps an image in [0, 1] to the 256-d representation RCG conditions on. The ViT is
timm's ``VisionTransformer``; the projection head is the 3-layer MLP MoCo v3 trains with. RCG
normalises each representation over its own dimensions (no dataset statistics), see
:func:`normalize_representation`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from functools import partial

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class EncoderConfig:
    """Shape of a MoCo v3 ViT encoder with its projection head.

    ``image_size`` is the ViT's input resolution: images are normalised with ``mean``/``std``
    and resized to it with bicubic interpolation before the patch embedding.
    """

    image_size: int = 224
    patch_size: int = 16
    in_channels: int = 3
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    proj_hidden_dim: int = 4096
    rep_dim: int = 256
    mean: tuple[float, ...] = field(default=IMAGENET_MEAN)
    std: tuple[float, ...] = field(default=IMAGENET_STD)

    def __post_init__(self) -> None:
        self.mean = tuple(float(m) for m in self.mean)
        self.std = tuple(float(s) for s in self.std)
        if self.image_size % self.patch_size:
            raise ValueError(
                f"`image_size` ({self.image_size}) must be a multiple of `patch_size` ({self.patch_size})"
            )
        if self.embed_dim % self.num_heads:
            raise ValueError(
                f"`embed_dim` ({self.embed_dim}) must be divisible by `num_heads` ({self.num_heads})"
            )
        if len(self.mean) != self.in_channels or len(self.std) != self.in_channels:
            raise ValueError(
                f"`mean`/`std` need one value per channel ({self.in_channels}), "
                f"got {len(self.mean)} and {len(self.std)}"
            )

    def to_dict(self) -> dict:
        return asdict(self)


# Keyed by the pipeline preset each belongs to (rcg_augment.presets): one name in every model.
ENCODER_PRESETS: dict[str, EncoderConfig] = {
    "rcg-b": EncoderConfig(),  # MoCo v3 ViT-B
    "rcg-l": EncoderConfig(embed_dim=1024, depth=24, num_heads=16),  # MoCo v3 ViT-L
    # CPU-trainable: 32 px, 8x8 patches of 4 px.
    "tiny": EncoderConfig(
        image_size=32, patch_size=4, embed_dim=192, depth=4, num_heads=3, proj_hidden_dim=1024
    ),
}


def sincos_2d_position_embedding(grid_size: int, dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """Fixed 2-D sin-cos position embedding of MoCo v3, with a zero row for the cls token.

    Returns a (1, 1 + grid_size**2, dim) tensor. ``dim`` must be divisible by 4.
    """
    if dim % 4:
        raise ValueError(f"sin-cos position embedding needs `dim` divisible by 4, got {dim}")
    coords = torch.arange(grid_size, dtype=torch.float32)
    grid_w, grid_h = torch.meshgrid(coords, coords, indexing="ij")
    quarter = dim // 4
    omega = 1.0 / temperature ** (torch.arange(quarter, dtype=torch.float32) / quarter)
    out_w = grid_w.flatten()[:, None] * omega[None]
    out_h = grid_h.flatten()[:, None] * omega[None]
    emb = torch.cat([out_w.sin(), out_w.cos(), out_h.sin(), out_h.cos()], dim=1)
    return torch.cat([torch.zeros(1, dim), emb], dim=0)[None]


def normalize_representation(rep: torch.Tensor) -> torch.Tensor:
    """RCG's per-sample normalisation: zero mean, unit (unbiased) std over the feature dim."""
    return (rep - rep.mean(dim=-1, keepdim=True)) / rep.std(dim=-1, keepdim=True)


def projection_head(in_dim: int, hidden_dim: int, out_dim: int) -> nn.Sequential:
    """MoCo v3's 3-layer projector; the last BatchNorm has no affine parameters."""
    return nn.Sequential(
        nn.Linear(in_dim, hidden_dim, bias=False),
        nn.BatchNorm1d(hidden_dim),
        nn.ReLU(inplace=True),
        nn.Linear(hidden_dim, hidden_dim, bias=False),
        nn.BatchNorm1d(hidden_dim),
        nn.ReLU(inplace=True),
        nn.Linear(hidden_dim, out_dim, bias=False),
        nn.BatchNorm1d(out_dim, affine=False),
    )


# Rows the projection head runs on at least (in eval mode): from 16 rows on, this CPU's GEMM gives
# each row the same result whatever the row count (measured: 1-15 rows differ by ~1e-6 from 64).
HEAD_MIN_ROWS = 16


class RepresentationEncoder(nn.Module):
    """MoCo v3 ViT + projection head -> normalised representation.

    Example::

        enc = RepresentationEncoder(ENCODER_PRESETS["tiny"]).eval()
        rep = enc(torch.rand(4, 3, 32, 32))  # (4, 256), each row mean 0 / std 1
    """

    def __init__(self, config: EncoderConfig):
        super().__init__()
        self.config = config
        c = config
        self.vit = VisionTransformer(
            img_size=c.image_size,
            patch_size=c.patch_size,
            in_chans=c.in_channels,
            num_classes=0,
            global_pool="token",
            embed_dim=c.embed_dim,
            depth=c.depth,
            num_heads=c.num_heads,
            mlp_ratio=c.mlp_ratio,
            qkv_bias=True,
            norm_layer=partial(nn.LayerNorm, eps=1e-6),
        )
        # MoCo v3 uses a fixed (untrained) sin-cos position embedding.
        grid = c.image_size // c.patch_size
        self.vit.pos_embed.data.copy_(sincos_2d_position_embedding(grid, c.embed_dim))
        self.vit.pos_embed.requires_grad_(False)
        self.head = projection_head(c.embed_dim, c.proj_hidden_dim, c.rep_dim)
        self.register_buffer("mean", torch.tensor(c.mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(c.std).view(1, -1, 1, 1), persistent=False)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """[0, 1] images of any size -> normalised ViT input at ``config.image_size``."""
        x = (images - self.mean.to(images.dtype)) / self.std.to(images.dtype)
        size = self.config.image_size
        if x.shape[-2:] != (size, size):
            x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False)
        return x

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Projection-head output before RCG's normalisation, (B, rep_dim)."""
        # timm >= 0.6 returns every token from forward_features; the ViT with num_classes=0 and
        # global_pool="token" returns the normalised cls token, which is what MoCo v3 projects.
        cls = self.vit(self.preprocess(images))
        n = cls.shape[0]
        if self.training or n >= HEAD_MIN_ROWS:
            return self.head(cls)
        # CPU GEMM kernels take another path (another summation order) for a matrix of few rows, so
        # a source's representation would depend on how many images share its call. The ViT's
        # token rows are many even for one image; the head's rows are one per image, so they are
        # padded to HEAD_MIN_ROWS (eval mode: BatchNorm uses running statistics, rows stay independent).
        padded = torch.cat([cls, cls.new_zeros(HEAD_MIN_ROWS - n, cls.shape[1])])
        return self.head(padded)[:n]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return normalize_representation(self.features(images))


def build_moco_predictor(rep_dim: int = 256, hidden_dim: int = 4096) -> nn.Sequential:
    """MoCo v3's predictor (2 layers, with a last affine-free BatchNorm as the official file holds)."""
    return nn.Sequential(
        nn.Linear(rep_dim, hidden_dim, bias=False),
        nn.BatchNorm1d(hidden_dim),
        nn.ReLU(inplace=True),
        nn.Linear(hidden_dim, rep_dim, bias=False),
        nn.BatchNorm1d(rep_dim, affine=False),
    )


__all__ = [
    "ENCODER_PRESETS",
    "EncoderConfig",
    "RepresentationEncoder",
    "build_moco_predictor",
    "normalize_representation",
    "sincos_2d_position_embedding",
]
