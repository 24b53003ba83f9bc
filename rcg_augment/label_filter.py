"""Label-aware filtering of variants: keep a variant only if it still looks like its class.

A variant is accepted when its re-encoded representation is nearer (cosine) to its own class's
prototype, the mean representation of that class's labelled source images, than to any other
class's. Rejected variants can be drawn again (a bounded number of times, from the same seeded
generator), which is what ``rcg-augment build --label-filter`` does; the same functions serve an
online training loop where labels are known.

Example::

    from rcg_augment import RCGPipeline
    from rcg_augment.label_filter import PrototypeFilter, reconstruct_with_labels

    pipe = RCGPipeline.from_pretrained("digits-tiny")
    filt = PrototypeFilter.from_images(pipe, x_train, y_train)        # few-shot labelled images
    out, accepted, attempts = reconstruct_with_labels(
        pipe, x_batch, y_batch, 0.3, label_filter=filt, max_attempts=4,
        generator=torch.Generator().manual_seed(0))
    x_aug = torch.where(accepted[:, None, None, None], out, x_batch)  # fall back to the source
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .settings import DEFAULT_MAX_ATTEMPTS


class PrototypeFilter:
    """Nearest-class-prototype check in the pipeline's representation space.

    Args:
        prototypes: (num_classes, rep_dim) class prototypes; row ``k`` belongs to label ``k``.
            Rows of classes without any source image are NaN and never nearest.
    """

    def __init__(self, prototypes: torch.Tensor):
        if prototypes.ndim != 2 or prototypes.shape[0] < 1:
            raise ValueError(f"`prototypes` must have shape (num_classes, rep_dim), got {tuple(prototypes.shape)}")
        self.prototypes = prototypes.float()
        self.present = ~torch.isnan(self.prototypes).any(dim=1)
        if int(self.present.sum()) < 2:
            raise ValueError("a label filter needs source images of at least 2 classes, got "
                             f"{int(self.present.sum())}")

    @classmethod
    def from_representations(cls, reps: torch.Tensor, labels: torch.Tensor,
                             num_classes: int | None = None) -> PrototypeFilter:
        """Prototypes = per-class means of ``reps`` (N, rep_dim) for integer ``labels`` (N,)."""
        labels = torch.as_tensor(labels, dtype=torch.long).to(reps.device)
        if labels.ndim != 1 or labels.shape[0] != reps.shape[0]:
            raise ValueError(f"`labels` must have shape ({reps.shape[0]},), got {tuple(labels.shape)}")
        if labels.numel() and labels.min() < 0:
            raise ValueError(f"`labels` must be class indices >= 0, got {int(labels.min())}")
        k = int(num_classes if num_classes is not None else int(labels.max()) + 1)
        sums = torch.zeros(k, reps.shape[1], dtype=torch.float64, device=reps.device)
        sums.index_add_(0, labels, reps.double())
        counts = torch.bincount(labels, minlength=k).double()[:, None]
        protos = torch.where(counts > 0, sums / counts.clamp(min=1), torch.full_like(sums, float("nan")))
        return cls(protos.float())

    @classmethod
    def from_images(cls, pipe, images: torch.Tensor, labels, num_classes: int | None = None,
                    batch_size: int = 256) -> PrototypeFilter:
        """Prototypes from labelled images (B, C, H, W) in [0, 1], encoded by ``pipe``."""
        reps = torch.cat([pipe.encode(images[i:i + batch_size]) for i in range(0, len(images), batch_size)])
        return cls.from_representations(reps, torch.as_tensor(labels), num_classes)

    @property
    def num_classes(self) -> int:
        return self.prototypes.shape[0]

    def nearest(self, reps: torch.Tensor) -> torch.Tensor:
        """The class (N,) whose prototype is nearest (cosine) to each representation."""
        protos = self.prototypes.to(reps.device)
        sim = F.normalize(reps.float(), dim=-1) @ F.normalize(torch.nan_to_num(protos), dim=-1).t()
        sim = sim.masked_fill(~self.present.to(reps.device)[None], float("-inf"))
        return sim.argmax(dim=-1)

    def accepts(self, pipe, images: torch.Tensor, labels) -> torch.Tensor:
        """(B,) bool: each image's representation is nearest to its own label's prototype."""
        return self.accepts_representations(pipe.encode(images), labels)

    def accepts_representations(self, reps: torch.Tensor, labels) -> torch.Tensor:
        """``accepts`` for images already encoded: representations (B, rep_dim)."""
        labels = torch.as_tensor(labels, dtype=torch.long)
        if labels.numel() and (labels.min() < 0 or labels.max() >= self.num_classes):
            raise ValueError(f"`labels` must be in [0, {self.num_classes}), got values in "
                             f"[{int(labels.min())}, {int(labels.max())}]")
        return (self.nearest(reps).cpu() == labels.cpu())


@torch.inference_mode()
def reconstruct_with_labels(
    pipe, images: torch.Tensor, labels, noise_level, *, label_filter: PrototypeFilter,
    max_attempts: int = DEFAULT_MAX_ATTEMPTS, generator: torch.Generator | None = None,
    quantize: bool = False, representations: torch.Tensor | None = None,
    source_tokens: torch.Tensor | None = None, **generation,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``pipe.reconstruct`` with rejected variants drawn again, up to ``max_attempts`` draws each.

    Args:
        images: (B, C, H, W) in [0, 1]; labels: (B,) class indices; noise_level: float or (B,).
        label_filter: the prototypes to check against.
        max_attempts: draws per image, >= 1 (1: filter only, no redraw).
        generator: every draw comes from it in order, so a seeded call is reproducible.
        quantize: judge the variant after rounding to 8 bits (what a uint8 cache stores).
        representations, source_tokens: the images' representations and VQ tokens when already
            computed (see ``RCGPipeline.reconstruct``): no draw encodes its sources again.
        **generation: what ``reconstruct`` takes for its generation settings: ``settings`` (a
            :class:`~rcg_augment.settings.GenerationSettings`) and keyword overrides
            (``repaint_fraction``, ``num_iter``...); each draw resolves them once.

    Returns:
        ``(variants, accepted, attempts)``: variants (B, C, H, W) (quantized if ``quantize``; the
        last draw for rows never accepted), accepted (B,) bool, attempts (B,) draws used.
    """
    out, accepted, attempts, _ = _reconstruct_with_labels(
        pipe, images, labels, noise_level, label_filter=label_filter, max_attempts=max_attempts,
        generator=generator, quantize=quantize, representations=representations, source_tokens=source_tokens,
        **generation)
    return out, accepted, attempts


def _reconstruct_with_labels(pipe, images, labels, noise_level, *, label_filter, max_attempts, generator, quantize,
                             representations=None, source_tokens=None, **generation):
    """``reconstruct_with_labels`` that also returns the kept variants' representations (B, rep_dim),
    the ones the filter judged, so a caller that needs them (the build's quality filter) does not
    encode the variants again."""
    if int(max_attempts) != max_attempts or max_attempts < 1:
        raise ValueError(f"`max_attempts` must be an integer >= 1, got {max_attempts}")
    labels = torch.as_tensor(labels, dtype=torch.long).cpu()
    n = images.shape[0]
    if labels.shape != (n,):
        raise ValueError(f"`labels` must have shape ({n},), got {tuple(labels.shape)}")
    levels = noise_level if isinstance(noise_level, torch.Tensor) else torch.full((n,), float(noise_level))
    out = images.new_zeros(images.shape, dtype=torch.float32)
    accepted = torch.zeros(n, dtype=torch.bool)
    attempts = torch.zeros(n, dtype=torch.long)
    reps = None
    todo = torch.arange(n)
    for _ in range(int(max_attempts)):
        if todo.numel() == 0:
            break
        dev_idx = todo.to(images.device)
        known = {}
        if representations is not None:
            known["representations"] = representations[todo.to(representations.device)]
        if source_tokens is not None:
            known["source_tokens"] = source_tokens[todo.to(source_tokens.device)]
        variant = pipe.reconstruct(images[dev_idx], levels[todo.to(levels.device)], generator=generator,
                                   **known, **generation)
        if quantize:
            variant = (variant.float().clamp(0, 1) * 255).round() / 255
        rep = pipe.encode(variant)
        ok = label_filter.accepts_representations(rep, labels[todo])
        out[dev_idx] = variant.to(out.dtype)
        if reps is None:
            reps = rep.new_zeros(n, rep.shape[1])
        reps[todo.to(reps.device)] = rep
        attempts[todo] += 1
        accepted[todo[ok]] = True
        todo = todo[~ok]
    return out, accepted, attempts, reps


__all__ = ["DEFAULT_MAX_ATTEMPTS", "PrototypeFilter", "reconstruct_with_labels"]
