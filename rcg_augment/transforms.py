"""RCGAugment: RCG reconstruction as a torchvision (v2 and v1-compatible) transform.

This module holds the transform class only. What every front-end shares (argument checks, the
lazy model cache, the seeded random source, batching) lives in :mod:`rcg_augment.frontend`, and
image conversion in :mod:`rcg_augment._image_io`. The helper names this module exported before
still resolve here, with a ``DeprecationWarning`` naming their home.

Example::

    from torchvision.transforms import v2
    from rcg_augment import RCGAugment

    train_tf = v2.Compose([
        v2.RandomHorizontalFlip(),
        RCGAugment(noise_level=(0.1, 0.4), model="digits-tiny", p=0.5),
        v2.ToImage(), v2.ToDtype(torch.float32, scale=True),
    ])
"""

from __future__ import annotations

import os
import warnings
from typing import Any

import PIL.Image
import torch
from torchvision import tv_tensors
from torchvision.transforms.v2 import Transform
from torchvision.transforms.v2._utils import is_pure_tensor

from ._image_io import check_image_batch
from .cpu_matmul import check_cpu_matmul
from .cpu_matmul import cpu_matmul as _cpu_matmul_mode
from .frontend import (
    FrontEnd,
    ModelHandle,
    RandomSource,
    augment_batch,
    augment_pil,
    check_noise_level,
    check_probability,
)
from .pipeline import RCGPipeline
from .settings import DEFAULT_CPU_MATMUL, DEFAULT_NOISE_LEVEL, GenerationSettings


# =============================================================================== torchvision transform
class RCGAugment(FrontEnd, Transform):
    """Replace each image by an RCG reconstruction with the same semantics (torchvision v2 transform).

    The image is encoded to a representation, noised to ``noise_level`` and denoised by the RDM,
    and MAGE renders new pixels, at the model's resolution; the result is resized back. Works in
    ``transforms.v2.Compose`` and in v1 ``transforms.Compose``, on the main process or in
    ``DataLoader`` workers.

    Inputs: PIL images (modes L, LA, RGB, RGBA, 1, P, I;16, ...), ``tv_tensors.Image`` and plain
    tensors (C, H, W) or batched (B, C, H, W) with 1-4 channels, uint8 or float in [0, 1]. A batch
    is reconstructed in one pipeline call, with a noise level and an apply decision per image.
    Output: same type, size, mode/channels, dtype and device. Colour is converted to the model's
    channels and back (RGB -> L by luminance for a 1-channel model, L -> RGB by repetition for a
    3-channel one); an alpha channel is kept untouched. Other inputs (labels, boxes, masks)
    pass through.

    Args:
        noise_level: in [0, 1], or a ``(low, high)`` range sampled uniformly per image. 0 keeps
            the image's representation (variety comes from pixel sampling only); 1 ignores the
            image (an unconditional sample).
        model: a named model (``"digits-tiny"``; see :func:`rcg_augment.zoo.available_models`),
            a directory written by ``RCGPipeline.save_pretrained``, or an ``RCGPipeline``. Names
            and directories load lazily, once per process and device, so the transform pickles
            small; a pipeline object is pickled with the transform.
        p: probability of transforming each image.
        cfg, temperature, num_iter, rdm_steps: generation overrides (None: the model's defaults):
            MAGE guidance scale (>= 0), sampling temperature (>= 0), decoding steps (>= 1), DDIM
            steps of the RDM (>= 1).
        repaint_fraction: share of the image's VQ tokens MAGE paints anew, in [0.5, 1] (None: the
            model's default). 1 is the official full generation; lower keeps a random part of
            the source's tokens, so variants stay closer to it (see ``GenerationSettings``).
        token_temperature: temperature of MAGE's draw of each code, > 0 (None: the model's
            default). 1 is the official sampling; lower keeps variants closer to their
            representation's class, with less variety.
        device: where the model runs (default "cpu" for names/directories, the pipeline's own
            device for an object, which is moved if ``device`` is given). Inputs on other devices
            are moved there and back. CUDA cannot be used in forked DataLoader workers: on a GPU,
            apply the transform to collated batches in the training loop instead.
        seed: None draws from torch's global RNG (seed it with ``torch.manual_seed``; DataLoader
            workers are seeded per worker); an int uses a private generator (same seed, same
            sequence of outputs).
        cpu_matmul: the library of the CPU's float32 linear layers: ``"default"`` (torch's BLAS) or
            ``"onednn"`` (faster on some CPUs, e.g. AMD EPYC; outputs differ from the default's in
            rounding, see :mod:`rcg_augment.cpu_matmul`). Applies in DataLoader workers too.

    Example::

        aug = RCGAugment(noise_level=(0.2, 0.5), model="digits-tiny", p=0.5, seed=0)
        out = aug(pil_image)               # same size and mode
        out = aug(torch.rand(32, 1, 8, 8))  # one batch, per-image noise levels
    """

    _transformed_types = (PIL.Image.Image, tv_tensors.Image, is_pure_tensor)

    def __init__(
        self, noise_level: float | tuple[float, float] = DEFAULT_NOISE_LEVEL, *, model: str | os.PathLike | RCGPipeline = "digits-tiny",
        p: float = 1.0, cfg: float | None = None, temperature: float | None = None, num_iter: int | None = None,
        rdm_steps: int | None = None, repaint_fraction: float | None = None, token_temperature: float | None = None,
        device: str | torch.device | None = None, seed: int | None = None, cpu_matmul: str = DEFAULT_CPU_MATMUL,
    ) -> None:
        super().__init__()
        self.cpu_matmul = check_cpu_matmul(cpu_matmul)
        self.noise_level = check_noise_level(noise_level)
        self.p = check_probability(p)
        self._settings = GenerationSettings(cfg=cfg, temperature=temperature, num_iter=num_iter, rdm_steps=rdm_steps,
                                            repaint_fraction=repaint_fraction, token_temperature=token_temperature)
        self._model = ModelHandle(model, device)
        self._random = RandomSource(seed)

    def _repr_options(self) -> list[str]:
        return [f"p={self.p}"] + ([f"cpu_matmul={self.cpu_matmul!r}"] if self.cpu_matmul != DEFAULT_CPU_MATMUL else [])

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        # One draw per image; several inputs in one sample share them (torchvision's convention).
        n = max((x.shape[0] if isinstance(x, torch.Tensor) and x.ndim == 4 else 1 for x in flat_inputs), default=1)
        return self._random.draw(n, self.noise_level, self.p)

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        with _cpu_matmul_mode(self.cpu_matmul):
            return self._transform(inpt, params)

    def _transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        if isinstance(inpt, PIL.Image.Image):
            return augment_pil(self._model, inpt, params["noise_level"], params["apply"], params["seed"],
                               self._settings)
        if not isinstance(inpt, torch.Tensor):  # pragma: no cover - filtered by _transformed_types
            return inpt
        x = inpt.as_subclass(torch.Tensor)
        if x.ndim not in (3, 4):
            raise ValueError(f"`image` must have shape (C, H, W) or (B, C, H, W), got {tuple(x.shape)}")
        batched = x.ndim == 4
        xb = x if batched else x[None]
        check_image_batch(xb, shape=tuple(x.shape))
        n = xb.shape[0]
        if params["apply"].shape[0] < n:  # pragma: no cover - make_params sizes for the largest input
            raise ValueError(f"internal: {params['apply'].shape[0]} draws for a batch of {n}")
        out = augment_batch(self._model, xb, params["noise_level"][:n], params["apply"][:n],
                            params["seed"], self._settings)
        out = out if batched else out[0]
        return tv_tensors.wrap(out, like=inpt) if isinstance(inpt, tv_tensors.TVTensor) else out


# Helpers this module exported before they moved to rcg_augment.frontend (and ._image_io), other
# than those it imports itself (ModelHandle, RandomSource, augment_batch, ...).
_MOVED = ("PIL_MODES", "batch_to_numpy", "check_sampling_settings", "check_seed", "clear_pipeline_cache",
          "from_model_channels", "numpy_to_batch", "to_model_channels")

def __getattr__(name: str):
    if name in _MOVED:
        warnings.warn(f"rcg_augment.transforms.{name} moved: import it from rcg_augment.frontend",
                      DeprecationWarning, stacklevel=2)
        from . import frontend

        return getattr(frontend, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["RCGAugment"]
