"""What every front-end shares: the torchvision and albumentations ``RCGAugment``s,
:class:`~rcg_augment.representation.RepresentationAugment`.

- argument checks (``noise_level``, ``p``, ``seed``, ``device``, generation settings);
- :class:`ModelHandle`: a model named by a zoo name or a directory, loaded lazily, once per
  process and device (the lazy model cache);
- :class:`RandomSource`: the seeded random draws of a transform, DataLoader-worker aware;
- image conversion between what users pass (PIL in any mode, numpy HWC, tensors CHW, any dtype,
  1-4 channels, any size) and the model's input, and :func:`augment_batch`, the one call into
  the pipeline;
- :class:`FrontEnd`: the ``model`` / ``seed`` / ``pipeline`` properties and ``extra_repr`` of
  the ``nn.Module`` front-ends.

A new front-end composes these; it never calls ``RCGPipeline.reconstruct`` itself.
"""

from __future__ import annotations

import logging
import numbers
import os
import threading
from typing import Any

import numpy as np
import PIL.Image
import torch
from torch.utils.data import get_worker_info

from .config import WEIGHTS_NAME
from .pipeline import RCGPipeline
from .settings import SEED_BOUND, GenerationSettings
from .zoo import resolve_model_dir

logger = logging.getLogger(__name__)

# ITU-R 601-2 luma, the weights PIL's convert("L") uses.
_LUMA = (0.299, 0.587, 0.114)


# =============================================================================== argument checks
def _as_float(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (numbers.Real, np.floating, np.integer)):
        raise TypeError(f"`{name}` must be a number, got {type(value).__name__} {value!r}")
    return float(value)


def check_noise_level(value: Any) -> float | tuple[float, float]:
    """A float in [0, 1], or a ``(low, high)`` range with 0 <= low <= high <= 1 (sampled per image)."""
    if isinstance(value, (list, tuple)):
        if len(value) != 2:
            raise ValueError(f"`noise_level` must be a float in [0, 1] or a (low, high) pair, got {value!r}")
        low, high = (_as_float(v, "noise_level") for v in value)
        if not 0.0 <= low <= high <= 1.0:
            raise ValueError(f"`noise_level` range must satisfy 0 <= low <= high <= 1, got ({low}, {high})")
        return (low, high)
    level = _as_float(value, "noise_level")
    if not 0.0 <= level <= 1.0:
        raise ValueError(f"`noise_level` must be in [0, 1], got {value}")
    return level


def check_probability(value: Any, name: str = "p") -> float:
    p = _as_float(value, name)
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"`{name}` must be in [0, 1], got {value}")
    return p


def check_seed(value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (numbers.Integral, np.integer)):
        raise TypeError(f"`seed` must be an int or None, got {type(value).__name__} {value!r}")
    if not 0 <= int(value) < 2**63:
        raise ValueError(f"`seed` must be in [0, 2**63), got {value}")
    return int(value)


def check_sampling_settings(**settings) -> dict:
    """Validate per-call generation overrides (None keeps the model's default) by
    :class:`~rcg_augment.settings.GenerationSettings`; returns every field, None where unset.

    The front-ends keep the :class:`GenerationSettings` object itself; this dict form is kept for
    callers of earlier versions. The pipeline checks the bounds that depend on the model
    (``rdm_steps`` <= its schedule length, ``repaint_fraction`` >= its MAGE's ``mask_ratio_min``)
    when it runs.
    """
    return GenerationSettings.from_kwargs(**settings).to_dict()


def check_device(value: Any) -> str | None:
    if value is None:
        return None
    try:
        return str(torch.device(value))
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"`device` must be a torch device such as 'cpu' or 'cuda:0', got {value!r}") from err


# =============================================================================== lazy model cache
_PIPELINES: dict[tuple[str, str, int], RCGPipeline] = {}
_PIPELINES_LOCK = threading.Lock()


def clear_pipeline_cache() -> None:
    """Forget every pipeline loaded by the transforms in this process (frees their memory)."""
    with _PIPELINES_LOCK:
        _PIPELINES.clear()


class ModelHandle:
    """A model named by a zoo name or a directory, loaded on first use, once per process.

    Loaded pipelines live in a module-level cache keyed by the resolved directory, the weights'
    modification time and the device, so every transform (and every DataLoader worker's copy of
    it) that names the same model shares one pipeline, and pickling a handle carries only the
    name. A handle made from an :class:`RCGPipeline` object holds (and pickles) that object.
    """

    def __init__(self, model: str | os.PathLike | RCGPipeline, device: str | None = None):
        self.device = check_device(device)
        if isinstance(model, RCGPipeline):
            self.pipeline: RCGPipeline | None = model
            self.spec: str | None = None
        elif isinstance(model, (str, os.PathLike)):
            resolve_model_dir(model)  # fail now, with the zoo's error, if it names nothing
            self.pipeline, self.spec = None, os.fspath(model)
        else:
            raise TypeError(
                "`model` must be a named model (e.g. 'digits-tiny'), a directory written by "
                f"RCGPipeline.save_pretrained, or an RCGPipeline; got {type(model).__name__}"
            )

    @property
    def serialisable(self) -> bool:
        return self.spec is not None

    def describe(self) -> str:
        if self.spec is not None:
            return repr(self.spec)
        cfg = self.pipeline.config
        preset = cfg.metadata.get("preset", "custom")
        return f"<RCGPipeline preset={preset} in_channels={self.pipeline.in_channels} image_size={self.pipeline.image_size}>"

    def get(self) -> RCGPipeline:
        if self.pipeline is not None:
            if self.device is not None and self.pipeline.device != torch.device(self.device):
                self.pipeline.to(self.device)
            return self.pipeline
        directory = resolve_model_dir(self.spec).resolve()
        weights = directory / WEIGHTS_NAME
        mtime = weights.stat().st_mtime_ns if weights.is_file() else 0
        device = self.device or "cpu"
        key = (str(directory), device, mtime)
        with _PIPELINES_LOCK:
            pipe = _PIPELINES.get(key)
            if pipe is None:
                logger.info("loading RCG pipeline %s on %s", directory, device)
                pipe = RCGPipeline.from_pretrained(directory, device=device)
                pipe.eval()
                _PIPELINES[key] = pipe
        return pipe


# =============================================================================== randomness
class RandomSource:
    """Where a transform's random draws come from.

    ``seed=None``: torch's global RNG (so ``torch.manual_seed`` and the DataLoader's per-worker
    seeding make runs reproducible). With a ``seed``: a private ``torch.Generator``; inside a
    DataLoader worker it is re-seeded from ``(seed, worker seed)`` so workers and epochs differ
    while a seeded DataLoader still reproduces them.
    """

    def __init__(self, seed: int | None):
        self.seed = check_seed(seed)
        self._generator: torch.Generator | None = None
        self._key: Any = None

    def __getstate__(self) -> dict:
        # A copy restarts its stream from `seed` (torch.Generator state is process-local).
        return {"seed": self.seed, "_generator": None, "_key": None}

    def generator(self) -> torch.Generator | None:
        if self.seed is None:
            return None
        info = get_worker_info()
        key = None if info is None else int(info.seed)
        if self._generator is None or key != self._key:
            seed = self.seed
            if key is not None:
                seed = int(np.random.SeedSequence([self.seed, key]).generate_state(1, np.uint64)[0]) % 2**63
            self._generator = torch.Generator().manual_seed(seed)
            self._key = key
        return self._generator

    def draw(self, n: int, noise_level: float | tuple[float, float], p: float = 1.0) -> dict:
        """Per-image apply flags and noise levels (n,), and one seed for the pipeline's generator."""
        gen = self.generator()
        apply = torch.rand(n, generator=gen, dtype=torch.float64) < p
        if isinstance(noise_level, tuple):
            low, high = noise_level
            levels = low + (high - low) * torch.rand(n, generator=gen, dtype=torch.float64)
        else:
            levels = torch.full((n,), float(noise_level), dtype=torch.float64)
        seed = int(torch.randint(0, SEED_BOUND, (1,), generator=gen).item())
        return {"apply": apply, "noise_level": levels, "seed": seed}


# =============================================================================== pixel conversion
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


def model_input(images: torch.Tensor, pipe: RCGPipeline) -> tuple[torch.Tensor, int]:
    """A checked batch (B, C, H, W), C in 1..4, uint8 or float in [0, 1] -> the model's input
    (float in [0, 1], the model's channels, on its device) and the input's colour channel count
    (1 or 3; a 2nd/4th channel is alpha and is left out)."""
    color_c = 1 if images.shape[1] in (1, 2) else 3
    color = images[:, :color_c]
    color = color.float() / 255.0 if color.dtype == torch.uint8 else color.float().clamp(0, 1)
    return to_model_channels(color, pipe.in_channels).to(pipe.device), color_c


def augment_batch(
    model: ModelHandle | RCGPipeline, images: torch.Tensor, noise_level: torch.Tensor, apply: torch.Tensor,
    seed: int, settings: GenerationSettings,
) -> torch.Tensor:
    """Reconstruct the rows of ``images`` where ``apply`` is set, in one pipeline call.

    ``images``: (B, C, H, W), C in 1..4 (a 2nd/4th channel is alpha and is kept untouched), uint8
    or float in [0, 1]. ``noise_level``, ``apply``: (B,). ``seed`` seeds the pipeline's generator.
    Returns a new tensor of the same shape, dtype and device. A handle's model is loaded only if
    some row applies.
    """
    check_image_batch(images)
    idx = torch.nonzero(apply.to("cpu"), as_tuple=False).flatten()
    out = images.clone()
    if idx.numel() == 0:
        return out
    pipe = model.get() if isinstance(model, ModelHandle) else model
    model_in, color_c = model_input(images[idx.to(images.device)], pipe)
    generator = torch.Generator().manual_seed(seed)
    recon = pipe.reconstruct(model_in, noise_level.to("cpu", torch.float64)[idx], generator=generator,
                             settings=settings)
    recon = from_model_channels(recon.to(images.device), color_c)
    if images.dtype == torch.uint8:
        recon = (recon * 255.0).round().clamp(0, 255).to(torch.uint8)
    else:
        recon = recon.to(images.dtype)
    out[idx.to(images.device), :color_c] = recon
    return out


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


# PIL modes handled by converting to a "work" mode and back.
_PIL_NATIVE = ("L", "LA", "RGB", "RGBA", "I;16")
_PIL_VIA = {"1": "L", "La": "LA", "PA": "RGBA", "RGBa": "RGBA", "RGBX": "RGB", "CMYK": "RGB", "YCbCr": "RGB",
            "HSV": "RGB", "LAB": "RGB"}
PIL_MODES = (*_PIL_NATIVE, "P", *_PIL_VIA)


def _pil_work_mode(img: PIL.Image.Image) -> str:
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


def _pil_restore(img: PIL.Image.Image, mode: str) -> PIL.Image.Image:
    if img.mode == mode:
        return img
    if mode == "1":
        return img.convert("1", dither=PIL.Image.Dither.NONE)
    if mode == "P":
        method = PIL.Image.Quantize.FASTOCTREE if img.mode == "RGBA" else PIL.Image.Quantize.MEDIANCUT
        return img.quantize(256, method=method, dither=PIL.Image.Dither.NONE)
    return img.convert(mode)


def augment_pil(model: ModelHandle | RCGPipeline, img: PIL.Image.Image, noise_level: torch.Tensor, apply: torch.Tensor, seed: int,
                settings: GenerationSettings) -> PIL.Image.Image:
    """One PIL image -> a PIL image of the same size and mode."""
    work = _pil_work_mode(img)
    if img.width == 0 or img.height == 0:
        raise ValueError(f"`image` is empty: PIL size {img.size}")
    if not bool(apply[0]):
        return img.copy()
    src = img if img.mode == work else img.convert(work)
    batch, info = numpy_to_batch(np.asarray(src)[None])
    out = augment_batch(model, batch, noise_level[:1], apply[:1], seed, settings)
    result = PIL.Image.fromarray(batch_to_numpy(out, info)[0])  # infers L/LA/RGB/RGBA/I;16
    if result.mode != work:  # pragma: no cover - fromarray's inference matches the work modes
        result = result.convert(work)
    return _pil_restore(result, img.mode)


# =============================================================================== shared front-end parts
class FrontEnd:
    """The read-only views and ``repr`` shared by the ``nn.Module`` front-ends.

    A subclass sets ``noise_level``, ``_model`` (a :class:`ModelHandle`), ``_random`` (a
    :class:`RandomSource`) and ``_settings`` (its generation overrides, a
    :class:`GenerationSettings`) in ``__init__``; they are private so ``nn.Module`` does not
    register a pipeline object as a submodule.
    """

    _model: ModelHandle
    _random: RandomSource
    _settings: GenerationSettings

    @property
    def model(self) -> str | RCGPipeline:
        """The model as given: a named model or directory, or the ``RCGPipeline`` object."""
        return self._model.spec if self._model.spec is not None else self._model.pipeline

    @property
    def seed(self) -> int | None:
        return self._random.seed

    @property
    def pipeline(self) -> RCGPipeline:
        """The loaded pipeline (loads it now if needed)."""
        return self._model.get()

    def _repr_options(self) -> list[str]:
        """Front-end options shown after ``noise_level`` and ``model`` (e.g. ``p``)."""
        return []

    def extra_repr(self) -> str:
        parts = [f"noise_level={self.noise_level}", f"model={self._model.describe()}", *self._repr_options()]
        parts += [f"{k}={v}" for k, v in self._settings.overrides().items()]
        if self._model.device is not None:
            parts.append(f"device={self._model.device!r}")
        if self.seed is not None:
            parts.append(f"seed={self.seed}")
        return ", ".join(parts)


__all__ = ["PIL_MODES", "FrontEnd", "ModelHandle", "RandomSource", "augment_batch", "augment_pil", "batch_to_numpy",
           "check_device", "check_image_batch", "check_noise_level", "check_probability", "check_sampling_settings",
           "check_seed", "clear_pipeline_cache", "from_model_channels", "model_input", "numpy_to_batch",
           "to_model_channels"]
