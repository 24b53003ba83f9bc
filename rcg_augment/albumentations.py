"""AlbuRCGAugment: RCG reconstruction as an albumentations 2 ``ImageOnlyTransform``.

The albumentations twin of the torchvision :class:`rcg_augment.RCGAugment` (same arguments, same
pipeline call); its own name says which library it plugs into. Its earlier name here,
``RCGAugment``, still imports (with a ``DeprecationWarning``), and pipelines saved under it still load.

Example::

    import albumentations as A
    from rcg_augment.albumentations import AlbuRCGAugment

    tf = A.Compose([A.HorizontalFlip(), AlbuRCGAugment(noise_level=(0.1, 0.4), model="digits-tiny", p=0.5)],
                   seed=0)
    out = tf(image=image)["image"]  # HWC numpy, same dtype and shape

Serialisation: ``A.to_dict`` / ``A.save`` store ``model`` as given, so it must be a named model or
a directory (an ``RCGPipeline`` object cannot be written to JSON: save it with
``pipeline.save_pretrained(dir)`` and pass ``model=dir``). ``A.from_dict`` finds this class by its
full name, ``rcg_augment.albumentations.AlbuRCGAugment``, so import this module before loading.
"""

from __future__ import annotations

import os
import warnings
from typing import Any

import numpy as np
import torch
from albumentations.core.serialization import SERIALIZABLE_REGISTRY
from albumentations.core.transforms_interface import BaseTransformInitSchema, ImageOnlyTransform
from albumentations.core.utils import format_args
from pydantic import field_validator

from ._image_io import batch_to_numpy, numpy_to_batch
from .cpu_matmul import check_cpu_matmul
from .cpu_matmul import cpu_matmul as _cpu_matmul_mode
from .frontend import ModelHandle, augment_batch, check_device, check_noise_level
from .pipeline import RCGPipeline
from .settings import DEFAULT_CPU_MATMUL, DEFAULT_NOISE_LEVEL, SEED_BOUND, GenerationSettings


class _Shown:
    """Shows a pre-formatted text verbatim in a repr."""

    def __init__(self, text: str):
        self.text = text

    def __repr__(self) -> str:
        return self.text


class AlbuRCGAugment(ImageOnlyTransform):
    """Replace each image by an RCG reconstruction with the same semantics.

    Targets: image, images (one pipeline call for the whole batch), volume.
    Image types: HWC (or HW) numpy, uint8, uint16 or float in [0, 1], 1-4 channels (a 2nd/4th
    channel is alpha and is kept untouched); the output has the input's shape and dtype.

    Args:
        noise_level: in [0, 1], or a ``(low, high)`` range sampled per image. 0 keeps the image's
            representation, 1 ignores the image (an unconditional sample).
        model: a named model (``"digits-tiny"``), a directory written by
            ``RCGPipeline.save_pretrained``, or an ``RCGPipeline`` (not serialisable by
            ``A.to_dict``). Names and directories load lazily, once per process and device.
        cfg, temperature, num_iter, rdm_steps, repaint_fraction, token_temperature: generation overrides (None: the
            model's defaults); see :class:`rcg_augment.RCGAugment` (the torchvision transform).
        device: where the model runs ("cpu" by default for names and directories).
        cpu_matmul: the library of the CPU's float32 linear layers, ``"default"`` or ``"onednn"``
            (see :class:`rcg_augment.RCGAugment` and :mod:`rcg_augment.cpu_matmul`).
        p: probability of applying the transform.

    Randomness comes from ``self.random_generator`` / ``self.py_random``, which
    ``A.Compose(seed=...)`` seeds, so a seeded Compose reproduces its outputs.
    """

    class InitSchema(BaseTransformInitSchema):
        noise_level: Any
        model: Any
        cfg: float | None
        temperature: float | None
        num_iter: int | None
        rdm_steps: int | None
        repaint_fraction: float | None
        token_temperature: float | None
        device: str | None
        cpu_matmul: str

        @field_validator("noise_level", mode="before")
        @classmethod
        def _noise_level(cls, value: Any) -> float | tuple[float, float]:
            try:
                return check_noise_level(value)
            except TypeError as err:  # pydantic reports ValueErrors as validation errors
                raise ValueError(str(err)) from err

        @field_validator("model", mode="before")
        @classmethod
        def _model(cls, value: Any) -> str | RCGPipeline:
            if isinstance(value, RCGPipeline):
                return value
            if isinstance(value, (str, os.PathLike)):
                return os.fspath(value)
            raise ValueError(
                "`model` must be a named model (e.g. 'digits-tiny'), a directory written by "
                f"RCGPipeline.save_pretrained, or an RCGPipeline; got {type(value).__name__}"
            )

        @field_validator("cfg", "temperature", "num_iter", "rdm_steps", "repaint_fraction", "token_temperature",
                         mode="before")
        @classmethod
        def _settings(cls, value: Any, info) -> Any:
            try:
                return getattr(GenerationSettings(**{info.field_name: value}), info.field_name)
            except TypeError as err:
                raise ValueError(str(err)) from err

        @field_validator("device", mode="before")
        @classmethod
        def _device(cls, value: Any) -> str | None:
            return check_device(value)

        @field_validator("cpu_matmul", mode="before")
        @classmethod
        def _cpu_matmul(cls, value: Any) -> str:
            return check_cpu_matmul(value)

    def __init__(
        self, noise_level: float | tuple[float, float] = DEFAULT_NOISE_LEVEL, *, model: str | os.PathLike | RCGPipeline = "digits-tiny",
        cfg: float | None = None, temperature: float | None = None, num_iter: int | None = None,
        rdm_steps: int | None = None, repaint_fraction: float | None = None, token_temperature: float | None = None,
        device: str | None = None, cpu_matmul: str = DEFAULT_CPU_MATMUL, p: float = 1.0,
    ) -> None:
        super().__init__(p=p)
        self.noise_level = noise_level
        self.model = model
        self.cfg, self.temperature, self.num_iter, self.rdm_steps = cfg, temperature, num_iter, rdm_steps
        self.repaint_fraction, self.token_temperature = repaint_fraction, token_temperature
        self.device = device
        self.cpu_matmul = cpu_matmul
        # Outside the pydantic schema: the zoo's FileNotFoundError for a missing model must
        # surface as it is (albumentations turns other exceptions in a schema into warnings).
        self._model = ModelHandle(model, device)

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("noise_level", "model", "cfg", "temperature", "num_iter", "rdm_steps", "repaint_fraction",
                "token_temperature", "device", "cpu_matmul")

    def to_dict_private(self) -> dict[str, Any]:
        if not self._model.serialisable:
            raise ValueError(
                "AlbuRCGAugment with an RCGPipeline object cannot be serialised: save it with "
                "`pipeline.save_pretrained(dir)` and pass `model=dir` (or a named model)"
            )
        state = super().to_dict_private()
        if isinstance(state.get("noise_level"), tuple):
            state["noise_level"] = list(state["noise_level"])
        return state

    def __repr__(self) -> str:
        state = self.get_base_init_args() | self.get_transform_init_args()
        state["model"] = _Shown(self._model.describe())
        return f"{type(self).__name__}({format_args(state)})"

    @property
    def _settings(self) -> GenerationSettings:
        return GenerationSettings(cfg=self.cfg, temperature=self.temperature, num_iter=self.num_iter,
                                  rdm_steps=self.rdm_steps, repaint_fraction=self.repaint_fraction,
                                  token_temperature=self.token_temperature)

    def get_params_dependent_on_data(self, params: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
        n = 1
        for key in ("images", "volume"):
            if key in data and data[key] is not None:
                n = max(1, len(data[key]))
                break
        if isinstance(self.noise_level, tuple):
            levels = self.random_generator.uniform(self.noise_level[0], self.noise_level[1], size=n)
        else:
            levels = np.full(n, float(self.noise_level))
        return {"noise_levels": levels, "seed": int(self.random_generator.integers(0, SEED_BOUND))}

    def _run(self, batch: np.ndarray, noise_levels: np.ndarray, seed: int, shape: tuple | None = None) -> np.ndarray:
        tensor, info = numpy_to_batch(batch, shape=shape)
        levels = torch.from_numpy(np.resize(np.asarray(noise_levels, dtype=np.float64), len(tensor)))
        apply = torch.ones(len(tensor), dtype=torch.bool)
        with _cpu_matmul_mode(self.cpu_matmul):
            out = augment_batch(self._model, tensor, levels, apply, seed, self._settings)
        return batch_to_numpy(out, info)

    def apply(self, img: np.ndarray, noise_levels: np.ndarray, seed: int, **params: Any) -> np.ndarray:
        if not isinstance(img, np.ndarray) or img.ndim not in (2, 3):
            shape = getattr(img, "shape", None)
            raise ValueError(f"`image` must be a numpy array (H, W) or (H, W, C), got {type(img).__name__} {shape}")
        return self._run(img[None], noise_levels[:1], seed, shape=img.shape)[0]

    def apply_to_images(self, images: np.ndarray, noise_levels: np.ndarray, seed: int, **params: Any) -> np.ndarray:
        images = np.asarray(images)
        if images.ndim not in (3, 4):
            raise ValueError(f"`images` must have shape (N, H, W) or (N, H, W, C), got {images.shape}")
        return self._run(images, noise_levels, seed)


# Pipelines saved (A.save / A.to_dict) before the rename name the class by its old full name.
_OLD_NAME = "RCGAugment"
SERIALIZABLE_REGISTRY.setdefault(f"{__name__}.{_OLD_NAME}", AlbuRCGAugment)


def __getattr__(name: str):
    if name == _OLD_NAME:
        warnings.warn("rcg_augment.albumentations.RCGAugment is now AlbuRCGAugment (the torchvision transform "
                      "keeps the name rcg_augment.RCGAugment)", DeprecationWarning, stacklevel=2)
        return AlbuRCGAugment
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["AlbuRCGAugment"]
