"""What every front-end shares: :class:`~rcg_augment.transforms.RCGAugment` (torchvision),
:class:`~rcg_augment.albumentations.AlbuRCGAugment`,
:class:`~rcg_augment.representation.RepresentationAugment`.

- argument checks (``noise_level``, ``p``, ``seed``, ``device``, generation settings);
- :class:`ModelHandle`: a model named by a zoo name or a directory, loaded lazily, once per
  process and device (the lazy model cache);
- :class:`RandomSource`: the seeded random draws of a transform, DataLoader-worker aware;
- batching: :func:`augment_batch`, the one call into the pipeline, and :func:`augment_pil`;
- :class:`FrontEnd`: the ``model`` / ``seed`` / ``pipeline`` properties and ``extra_repr`` of
  the ``nn.Module`` front-ends.

Image conversion (PIL, numpy, tensors, channels) is in :mod:`rcg_augment._image_io`; its names are
re-exported here. A new front-end composes these; it never calls ``RCGPipeline.reconstruct`` itself.
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

from ._image_io import (
    PIL_MODES,
    batch_to_numpy,
    check_image_batch,
    from_model_channels,
    model_input,
    numpy_to_batch,
    pil_restore,
    pil_work_mode,
    to_model_channels,
)
from .config import WEIGHTS_NAME
from .pipeline import RCGPipeline
from .settings import SEED_BOUND, GenerationSettings
from .zoo import resolve_model_dir

logger = logging.getLogger(__name__)


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
        config = self.pipeline.config
        preset = config.metadata.get("preset", "custom")
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


# =============================================================================== batching: the one pipeline call
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


def augment_pil(model: ModelHandle | RCGPipeline, img: PIL.Image.Image, noise_level: torch.Tensor, apply: torch.Tensor, seed: int,
                settings: GenerationSettings) -> PIL.Image.Image:
    """One PIL image -> a PIL image of the same size and mode."""
    work = pil_work_mode(img)
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
    return pil_restore(result, img.mode)


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


# With the image conversion names re-exported from ._image_io (imports of them from here keep working).
__all__ = ["PIL_MODES", "FrontEnd", "ModelHandle", "RandomSource", "augment_batch", "augment_pil", "batch_to_numpy",
           "check_device", "check_image_batch", "check_noise_level", "check_probability", "check_sampling_settings",
           "check_seed", "clear_pipeline_cache", "from_model_channels", "model_input", "numpy_to_batch",
           "pil_restore", "pil_work_mode", "to_model_channels"]
