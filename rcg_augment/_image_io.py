"""Image conversion for the front-ends: between what users pass (PIL in any mode, numpy HWC,
tensors CHW; uint8, uint16 or float; 1-4 channels, any size) and the model's input batch.

Plumbing apart from the transform classes (as torchvision keeps ``transforms.v2._utils`` apart
from its transforms): nothing here knows a model, a seed or a transform. The pipeline call itself
(:func:`~rcg_augment.frontend.augment_batch`) and the transform classes compose these.
"""

from __future__ import annotations

import numpy as np
import PIL.Image
import torch

# ITU-R 601-2 luma, the weights PIL's convert("L") uses.
_LUMA = (0.299, 0.587, 0.114)


# =============================================================================== tensor batches
_FLOAT_TOLERANCE = 1e-3


def check_image_batch(images: torch.Tensor, name: str = "image", shape: tuple | None = None) -> None:
    """Raise one clear error unless ``images`` is (B, C, H, W), C in 1..4, uint8 or float in [0, 1].

    ``shape``: the shape to name in errors (the caller's, before adding a batch dimension).
    """
    shown = tuple(images.shape) if shape is None else tuple(shape)
    if images.ndim != 4:
        raise ValueError(f"`{name}` must have shape (C, H, W) or (B, C, H, W), got {shown}")
    b, c, h, w = images.shape
    if c not in (1, 2, 3, 4):
        raise ValueError(
            f"`{name}` must have 1 (L), 2 (LA), 3 (RGB) or 4 (RGBA) channels first (C, H, W), got shape "
            f"{shown}; for channels-last data use x.permute(2, 0, 1) or v2.ToImage()"
        )
    if min(b, h, w) == 0:
        raise ValueError(f"`{name}` is empty: shape {shown}")
    if images.dtype == torch.uint8:
        return
    if not images.is_floating_point():
        raise TypeError(f"`{name}` must be uint8 or floating point in [0, 1], got dtype {images.dtype}")
    if not torch.isfinite(images).all():
        raise ValueError(f"`{name}` contains NaN or infinite values")
    lo, hi = images.min().item(), images.max().item()
    if lo < -_FLOAT_TOLERANCE or hi > 1 + _FLOAT_TOLERANCE:
        raise ValueError(
            f"float `{name}` values must be in [0, 1], got [{lo:.4g}, {hi:.4g}]; apply RCGAugment before "
            "Normalize, or pass uint8 images"
        )


def to_model_channels(color: torch.Tensor, channels: int) -> torch.Tensor:
    """(B, 1|3, H, W) -> (B, channels, H, W): luminance for RGB -> L, repetition for L -> RGB."""
    if color.shape[1] == channels:
        return color
    if channels == 1:
        weights = color.new_tensor(_LUMA).view(1, 3, 1, 1)
        return (color * weights).sum(1, keepdim=True)
    return color.expand(-1, channels, -1, -1)


def from_model_channels(images: torch.Tensor, channels: int) -> torch.Tensor:
    """Inverse of :func:`to_model_channels`: back to the input's 1 or 3 colour channels."""
    return to_model_channels(images, channels)


def model_input(images: torch.Tensor, pipe) -> tuple[torch.Tensor, int]:
    """A checked batch (B, C, H, W), C in 1..4, uint8 or float in [0, 1] -> the input of ``pipe``
    (anything with ``in_channels`` and ``device``, e.g. an ``RCGPipeline``: float in [0, 1], the
    model's channels, on its device) and the input's colour channel count
    (1 or 3; a 2nd/4th channel is alpha and is left out)."""
    color_c = 1 if images.shape[1] in (1, 2) else 3
    color = images[:, :color_c]
    color = color.float() / 255.0 if color.dtype == torch.uint8 else color.float().clamp(0, 1)
    return to_model_channels(color, pipe.in_channels).to(pipe.device), color_c



# =============================================================================== numpy arrays
def numpy_to_batch(batch: np.ndarray, *, shape: tuple | None = None) -> tuple[torch.Tensor, dict]:
    """(N, H, W) or (N, H, W, C) uint8 / uint16 / float array -> (N, C, H, W) tensor + how to undo.

    Errors speak of the channels-last layout the caller used; ``shape`` is the shape to name in them
    (the caller's, before a batch dimension was added).
    """
    a = np.asarray(batch)
    shown = tuple(a.shape) if shape is None else tuple(shape)
    info = {"dtype": a.dtype, "squeeze": a.ndim == 3}
    if a.ndim == 3:
        a = a[..., None]
    if a.ndim != 4:
        raise ValueError(f"`image` must have shape (H, W) or (H, W, C), got {shown}")
    if a.shape[-1] not in (1, 2, 3, 4):
        raise ValueError(f"`image` must have 1 (L), 2 (LA), 3 (RGB) or 4 (RGBA) channels last (H, W, C), got shape "
                         f"{shown}")
    if min(a.shape) == 0:
        raise ValueError(f"`image` is empty: shape {shown}")
    if a.dtype == np.uint16:
        a = a.astype(np.float32) / 65535.0
    elif a.dtype != np.uint8 and not np.issubdtype(a.dtype, np.floating):
        raise TypeError(f"`image` must be uint8, uint16 or floating point in [0, 1], got dtype {a.dtype}")
    elif a.dtype == np.float16:
        a = a.astype(np.float32)  # torch ops on half are slow and lossy on CPU
    return torch.from_numpy(np.require(a, requirements=["C", "W"])).permute(0, 3, 1, 2), info


def batch_to_numpy(t: torch.Tensor, info: dict) -> np.ndarray:
    a = t.permute(0, 2, 3, 1).cpu().numpy()
    if info["squeeze"]:
        a = a[..., 0]
    if info["dtype"] == np.uint16:
        a = np.round(np.clip(a, 0, 1) * 65535.0).astype(np.uint16)
    return np.ascontiguousarray(a.astype(info["dtype"], copy=False))



# =============================================================================== PIL images
# PIL modes handled by converting to a "work" mode and back.
_PIL_NATIVE = ("L", "LA", "RGB", "RGBA", "I;16")
_PIL_VIA = {"1": "L", "La": "LA", "PA": "RGBA", "RGBa": "RGBA", "RGBX": "RGB", "CMYK": "RGB", "YCbCr": "RGB",
            "HSV": "RGB", "LAB": "RGB"}
PIL_MODES = (*_PIL_NATIVE, "P", *_PIL_VIA)


def pil_work_mode(img: PIL.Image.Image) -> str:
    if img.mode in _PIL_NATIVE:
        return img.mode
    if img.mode == "P":
        return "RGBA" if "transparency" in img.info else "RGB"
    if img.mode in _PIL_VIA:
        return _PIL_VIA[img.mode]
    raise TypeError(
        f"PIL images in mode {img.mode!r} are not supported; convert first, e.g. img.convert('RGB') "
        f"(supported modes: {', '.join(PIL_MODES)})"
    )


def pil_restore(img: PIL.Image.Image, mode: str) -> PIL.Image.Image:
    if img.mode == mode:
        return img
    if mode == "1":
        return img.convert("1", dither=PIL.Image.Dither.NONE)
    if mode == "P":
        method = PIL.Image.Quantize.FASTOCTREE if img.mode == "RGBA" else PIL.Image.Quantize.MEDIANCUT
        return img.quantize(256, method=method, dither=PIL.Image.Dither.NONE)
    return img.convert(mode)


__all__ = ["PIL_MODES", "batch_to_numpy", "check_image_batch", "from_model_channels", "model_input", "numpy_to_batch",
           "pil_restore", "pil_work_mode", "to_model_channels"]
