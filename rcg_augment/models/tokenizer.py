"""VQ tokenizer: the VQGAN that MAGE reads and writes tokens with.

The layout follows MaskGIT's tokenizer (which RCG's MAGE uses, converted from JAX): convolutions
without bias inside residual blocks, average-pool downsampling, nearest-neighbour upsampling
followed by a 3x3 convolution, no attention layers and no quant/post-quant convolutions.
Images are in [0, 1] on both sides.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class TokenizerConfig:
    """Shape of the VQGAN. Tokens form a grid of ``image_size / 2**(len(ch_mult)-1)`` per side."""

    image_size: int = 256
    in_channels: int = 3
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    z_channels: int = 256
    codebook_size: int = 1024
    norm_groups: int = 32
    commitment_cost: float = 0.25

    def __post_init__(self) -> None:
        self.ch_mult = tuple(int(m) for m in self.ch_mult)
        if self.image_size % self.downsample_factor:
            raise ValueError(
                f"`image_size` ({self.image_size}) must be divisible by the downsample factor "
                f"{self.downsample_factor} (2 ** (len(ch_mult) - 1))"
            )
        for m in self.ch_mult:
            if (self.ch * m) % self.norm_groups:
                raise ValueError(
                    f"channels {self.ch * m} (ch * ch_mult) must be divisible by `norm_groups` ({self.norm_groups})"
                )

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    @property
    def grid_size(self) -> int:
        return self.image_size // self.downsample_factor

    def to_dict(self) -> dict:
        return asdict(self)


# Keyed by the pipeline preset each belongs to (rcg_augment.presets): one name in every model.
TOKENIZER_PRESETS: dict[str, TokenizerConfig] = {
    # Both official pipelines use the one MaskGIT VQGAN (vqgan_jax_strongaug.ckpt).
    "rcg-b": TokenizerConfig(),
    "rcg-l": TokenizerConfig(),
    # 32 px -> 8x8 tokens of a 256-entry codebook.
    "tiny": TokenizerConfig(
        image_size=32, ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, z_channels=32, codebook_size=256, norm_groups=8
    ),
}


class ResBlock(nn.Module):
    """GroupNorm-swish-conv twice. When the width changes, the 1x1 shortcut is applied to the
    block's *output* (the MaskGIT tokenizer's layout, which the official weights depend on)."""

    def __init__(self, in_ch: int, out_ch: int, groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_ch, eps=1e-6)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1, bias=False)
        self.norm2 = nn.GroupNorm(groups, out_ch, eps=1e-6)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=False)
        self.nin_shortcut = nn.Conv2d(out_ch, out_ch, 1, bias=False) if in_ch != out_ch else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        if self.nin_shortcut is not None:
            return h + self.nin_shortcut(h)
        return x + h


class Upsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Level(nn.Module):
    def __init__(self, blocks: list[nn.Module], upsample: nn.Module | None = None):
        super().__init__()
        self.block = nn.ModuleList(blocks)
        if upsample is not None:
            self.upsample = upsample


class _Mid(nn.Module):
    def __init__(self, ch: int, groups: int):
        super().__init__()
        self.block_1 = ResBlock(ch, ch, groups)
        self.block_2 = ResBlock(ch, ch, groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.block_1(x))


class Encoder(nn.Module):
    def __init__(self, c: TokenizerConfig):
        super().__init__()
        self.conv_in = nn.Conv2d(c.in_channels, c.ch, 3, padding=1, bias=False)
        self.down = nn.ModuleList()
        in_ch = c.ch
        for mult in c.ch_mult:
            out_ch = c.ch * mult
            blocks = []
            for _ in range(c.num_res_blocks):
                blocks.append(ResBlock(in_ch, out_ch, c.norm_groups))
                in_ch = out_ch
            self.down.append(_Level(blocks))
        self.mid = _Mid(in_ch, c.norm_groups)
        self.norm_out = nn.GroupNorm(c.norm_groups, in_ch, eps=1e-6)
        self.conv_out = nn.Conv2d(in_ch, c.z_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for i, level in enumerate(self.down):
            for block in level.block:
                h = block(h)
            if i < len(self.down) - 1:
                h = F.avg_pool2d(h, 2)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, c: TokenizerConfig):
        super().__init__()
        ch = c.ch * c.ch_mult[-1]
        self.conv_in = nn.Conv2d(c.z_channels, ch, 3, padding=1)
        self.mid = _Mid(ch, c.norm_groups)
        levels: list[_Level] = []
        # Built from the coarsest level down; stored finest-first so index i is resolution level i.
        for i in reversed(range(len(c.ch_mult))):
            out_ch = c.ch * c.ch_mult[i]
            blocks = []
            for _ in range(c.num_res_blocks):
                blocks.append(ResBlock(ch, out_ch, c.norm_groups))
                ch = out_ch
            levels.insert(0, _Level(blocks, Upsample(ch) if i > 0 else None))
        self.up = nn.ModuleList(levels)
        self.norm_out = nn.GroupNorm(c.norm_groups, ch, eps=1e-6)
        self.conv_out = nn.Conv2d(ch, c.in_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            for block in level.block:
                h = block(h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class VectorQuantizer(nn.Module):
    def __init__(self, codebook_size: int, dim: int):
        super().__init__()
        self.embedding = nn.Embedding(codebook_size, dim)
        nn.init.uniform_(self.embedding.weight, -1.0 / codebook_size, 1.0 / codebook_size)

    def nearest(self, z: torch.Tensor) -> torch.Tensor:
        """(B, D, H, W) latents -> (B, H, W) codebook indices (L2 nearest)."""
        flat = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])
        codes = self.embedding.weight
        dist = flat.pow(2).sum(1, keepdim=True) - 2 * flat @ codes.t() + codes.pow(2).sum(1)[None]
        return dist.argmin(1).view(z.shape[0], z.shape[2], z.shape[3])

    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        """(B, H, W) indices -> (B, D, H, W) codebook vectors."""
        return self.embedding(indices).permute(0, 3, 1, 2).contiguous()


class VQTokenizer(nn.Module):
    """VQGAN encoder/decoder with a codebook.

    Example::

        tok = VQTokenizer(TOKENIZER_PRESETS["tiny"]).eval()
        idx = tok.encode(torch.rand(2, 3, 32, 32))   # (2, 8, 8) int64
        img = tok.decode(idx)                         # (2, 3, 32, 32)
    """

    def __init__(self, config: TokenizerConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quantize = VectorQuantizer(config.codebook_size, config.z_channels)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """[0, 1] images at ``config.image_size`` -> (B, grid, grid) token indices."""
        return self.quantize.nearest(self.encoder(images))

    def decode(self, indices: torch.Tensor) -> torch.Tensor:
        """(B, grid, grid) or (B, grid*grid) indices -> images (unclamped, nominally [0, 1])."""
        if indices.ndim == 2:
            g = self.config.grid_size
            indices = indices.view(indices.shape[0], g, g)
        return self.decoder(self.quantize.lookup(indices))

    def forward(self, images: torch.Tensor, decoder_only: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Training forward: (reconstruction, vq loss, indices) with a straight-through estimator.

        ``decoder_only``: the tokens computed without gradients and the decoder run on their
        codebook vectors (vq loss 0): training the decoder alone leaves every image's tokens as they were.
        """
        if decoder_only:
            with torch.no_grad():
                indices = self.encode(images)
                z_q = self.quantize.lookup(indices)
            return self.decoder(z_q), z_q.new_zeros(()), indices
        z = self.encoder(images)
        indices = self.quantize.nearest(z)
        z_q = self.quantize.lookup(indices)
        codebook_loss = F.mse_loss(z_q, z.detach())
        commitment_loss = F.mse_loss(z, z_q.detach())
        vq_loss = codebook_loss + self.config.commitment_cost * commitment_loss
        z_st = z + (z_q - z).detach()
        return self.decoder(z_st), vq_loss, indices


__all__ = ["TOKENIZER_PRESETS", "TokenizerConfig", "VQTokenizer"]
