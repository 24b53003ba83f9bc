"""Batched, seeded image augmentations for the trainers.

Every function takes a (B, C, H, W) float batch in [0, 1] and a CPU ``torch.Generator``; the
parameters are drawn per sample on the CPU (so a seed gives the same result on any device) and
applied to the whole batch at once on the batch's device.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _uniform(n: int, low: float, high: float, generator: torch.Generator) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, generator=generator, dtype=torch.float64)


def _bernoulli(n: int, p: float, generator: torch.Generator) -> torch.Tensor:
    return torch.rand(n, generator=generator) < p


def resized_crop_flip(
    images: torch.Tensor, *, generator: torch.Generator, scale: tuple[float, float] | None = None,
    ratio: tuple[float, float] = (3 / 4, 4 / 3), hflip: bool = False, size: int | None = None,
) -> torch.Tensor:
    """RandomResizedCrop (area fraction in ``scale``, aspect in ``ratio``) and/or a random
    horizontal flip (p = 0.5), as one bilinear resampling per sample.

    ``scale=None`` keeps the whole image (flip only); ``size`` is the output side (default: input's).
    """
    b, c, h, w = images.shape
    size = size or h
    if scale is None and not hflip and size == h == w:
        return images
    if scale is not None:
        area = _uniform(b, scale[0], scale[1], generator)
        log_ratio = _uniform(b, math.log(ratio[0]), math.log(ratio[1]), generator)
        aspect = log_ratio.exp()
        # Crop width/height as fractions of the side (the image is treated as square in [-1, 1]).
        cw = (area * aspect).sqrt().clamp(max=1.0)
        ch = (area / aspect).sqrt().clamp(max=1.0)
        cx = _uniform(b, -1.0, 1.0, generator) * (1 - cw)
        cy = _uniform(b, -1.0, 1.0, generator) * (1 - ch)
    else:
        cw = ch = torch.ones(b, dtype=torch.float64)
        cx = cy = torch.zeros(b, dtype=torch.float64)
    sign = torch.ones(b, dtype=torch.float64)
    if hflip:
        sign = torch.where(_bernoulli(b, 0.5, generator), -1.0, 1.0).double()
    theta = torch.zeros(b, 2, 3, dtype=torch.float64)
    theta[:, 0, 0] = cw * sign
    theta[:, 0, 2] = cx
    theta[:, 1, 1] = ch
    theta[:, 1, 2] = cy
    theta = theta.to(images.device, images.dtype)
    grid = F.affine_grid(theta, [b, c, size, size], align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


def _gray(images: torch.Tensor) -> torch.Tensor:
    if images.shape[1] == 3:
        weights = images.new_tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
        return (images * weights).sum(1, keepdim=True)
    return images.mean(1, keepdim=True)


def color_jitter(
    images: torch.Tensor, *, generator: torch.Generator, p: float = 0.8, brightness: float = 0.4,
    contrast: float = 0.4, saturation: float = 0.2,
) -> torch.Tensor:
    """Brightness, contrast and (RGB only) saturation jitter with probability ``p`` per sample.

    Hue jitter is left out (it needs an HSV round trip and matters little at these sizes).
    """
    b = images.shape[0]
    apply = _bernoulli(b, p, generator).to(images.device).view(b, 1, 1, 1)
    factors = [_uniform(b, 1 - s, 1 + s, generator).to(images.device, images.dtype).view(b, 1, 1, 1)
               for s in (brightness, contrast, saturation)]
    out = (images * factors[0]).clamp(0, 1)
    mean = _gray(out).mean(dim=(2, 3), keepdim=True)
    out = ((out - mean) * factors[1] + mean).clamp(0, 1)
    if images.shape[1] == 3:
        gray = _gray(out)
        out = ((out - gray) * factors[2] + gray).clamp(0, 1)
    return torch.where(apply, out, images)


def random_grayscale(images: torch.Tensor, *, generator: torch.Generator, p: float = 0.2) -> torch.Tensor:
    """RGB -> gray (kept 3 channels) with probability ``p``; single-channel batches pass through."""
    b = images.shape[0]
    apply = _bernoulli(b, p, generator)  # drawn either way so the random stream is channel-independent
    if images.shape[1] != 3:
        return images
    return torch.where(apply.to(images.device).view(b, 1, 1, 1), _gray(images).expand_as(images), images)


def gaussian_blur(
    images: torch.Tensor, *, generator: torch.Generator, p: float, sigma: tuple[float, float]
) -> torch.Tensor:
    """Separable Gaussian blur with a per-sample sigma in ``sigma`` (pixels), probability ``p``."""
    b, c, h, w = images.shape
    apply = _bernoulli(b, p, generator)
    sig = _uniform(b, sigma[0], sigma[1], generator)
    radius = max(1, math.ceil(3 * sigma[1]))
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-0.5 * (offsets[None] / sig[:, None]) ** 2)
    kernel = kernel / kernel.sum(1, keepdim=True)  # (B, K)
    kernel = kernel.to(images.device, images.dtype).repeat_interleave(c, dim=0)  # (B*C, K)
    x = images.reshape(1, b * c, h, w)
    x = F.pad(x, (radius, radius, radius, radius), mode="replicate")
    x = F.conv2d(x, kernel.view(b * c, 1, 1, -1), groups=b * c)
    x = F.conv2d(x, kernel.view(b * c, 1, -1, 1), groups=b * c)
    return torch.where(apply.to(images.device).view(b, 1, 1, 1), x.view(b, c, h, w), images)


def random_solarize(images: torch.Tensor, *, generator: torch.Generator, p: float) -> torch.Tensor:
    """Invert pixels >= 0.5 with probability ``p`` per sample."""
    b = images.shape[0]
    apply = _bernoulli(b, p, generator).to(images.device).view(b, 1, 1, 1)
    return torch.where(apply & (images >= 0.5), 1.0 - images, images)


__all__ = ["color_jitter", "gaussian_blur", "random_grayscale", "random_solarize", "resized_crop_flip"]
