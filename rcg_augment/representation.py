"""RepresentationAugment: RCG augmentation in representation space, without rendering pixels.

For training a linear probe or a small head on frozen features: each representation is noised to
``noise_level`` and denoised by the RDM, giving a nearby representation of the same kind. It
skips MAGE and the VQ decoder, so it costs a few MLP passes per batch.

Example::

    from rcg_augment import RepresentationAugment

    aug = RepresentationAugment(noise_level=(0.1, 0.3), model="digits-tiny", seed=0)
    feats = aug.encode_images(images)           # (B, rep_dim), frozen encoder
    head = torch.nn.Linear(feats.shape[1], 10)
    loss = F.cross_entropy(head(aug(feats)), labels)   # aug is identity in aug.eval() mode
"""

from __future__ import annotations

import os

import torch
from torch import nn

from ._image_io import check_image_batch, model_input
from .frontend import FrontEnd, ModelHandle, RandomSource, check_noise_level
from .pipeline import RCGPipeline
from .settings import DEFAULT_NOISE_LEVEL, GenerationSettings


class RepresentationAugment(FrontEnd, nn.Module):
    """Noise and RDM-denoise representations (B, rep_dim): a feature-space augmentation.

    Like ``nn.Dropout`` it acts in training mode and is the identity after ``.eval()``.

    Args:
        noise_level: in [0, 1], or a ``(low, high)`` range sampled per row. 0 returns the input;
            1 replaces it by an unconditional RDM sample.
        model: a named model, a directory written by ``RCGPipeline.save_pretrained``, or an
            ``RCGPipeline`` (kept out of this module's parameters and ``state_dict``).
        rdm_steps, eta: DDIM steps and eta of the RDM (None: the model's defaults).
        seed: None draws from torch's global RNG; an int uses a private generator.
        device: where the model runs (default "cpu" for names and directories).

    Inputs are expected to be the pipeline's normalised representations (``pipeline.encode`` or
    :meth:`encode_images`). The output has the input's shape, dtype and device, and is an
    ordinary tensor (usable in autograd as the input of a trainable head).
    """

    def __init__(
        self, noise_level: float | tuple[float, float] = DEFAULT_NOISE_LEVEL, *, model: str | os.PathLike | RCGPipeline = "digits-tiny",
        rdm_steps: int | None = None, eta: float | None = None, seed: int | None = None,
        device: str | torch.device | None = None,
    ) -> None:
        super().__init__()
        self.noise_level = check_noise_level(noise_level)
        self._settings = GenerationSettings(rdm_steps=rdm_steps, eta=eta)
        self._model = ModelHandle(model, device)
        self._random = RandomSource(seed)

    @property
    def rep_dim(self) -> int:
        return self.pipeline.config.rdm.rep_dim

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W) or (C, H, W), uint8 or float in [0, 1], 1-4 channels -> (B, rep_dim).

        Colour is converted to the model's channels (alpha dropped); any size is resized.
        """
        if not isinstance(images, torch.Tensor):
            raise TypeError(f"`images` must be a torch.Tensor (B, C, H, W), got {type(images).__name__}")
        shape = tuple(images.shape)
        batch = images[None] if images.ndim == 3 else images
        check_image_batch(batch, "images", shape=shape)
        pipe = self.pipeline
        rep = pipe.encode(model_input(batch, pipe)[0])
        return rep.to(images.device).clone()  # an ordinary tensor, not an inference-mode one

    def forward(self, rep: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return rep
        if not isinstance(rep, torch.Tensor):
            raise TypeError(f"`rep` must be a torch.Tensor (B, rep_dim), got {type(rep).__name__}")
        pipe = self.pipeline
        rep_dim = pipe.config.rdm.rep_dim
        if rep.ndim != 2 or rep.shape[1] != rep_dim:
            raise ValueError(f"`rep` must have shape (B, {rep_dim}), got {tuple(rep.shape)}")
        if not rep.is_floating_point():
            raise TypeError(f"`rep` must be a float tensor, got dtype {rep.dtype}")
        if rep.shape[0] == 0:
            return rep.clone()
        if not torch.isfinite(rep).all():
            raise ValueError("`rep` contains NaN or infinite values")
        draw = self._random.draw(rep.shape[0], self.noise_level)
        generator = torch.Generator().manual_seed(draw["seed"])
        out = pipe.denoise_representations(rep.detach().to(pipe.device, torch.float32), draw["noise_level"],
                                           generator=generator, settings=self._settings)
        return out.to(rep.device, rep.dtype).clone()


__all__ = ["RepresentationAugment"]
