"""Generation settings: one validated object for every knob of a ``reconstruct`` / ``generate`` call.

Every front-end (the pipeline, both RCG transforms, ``RepresentationAugment``, the cache builder,
the CLI, the benchmarks) takes these settings by the same names and validates them here. ``None``
means "the model's default": :meth:`GenerationSettings.resolve` fills it from the model's config
(``config.defaults`` first, then the MAGE / RDM configs) and checks the bounds that depend on the
model.

One validation per call: each ``RCGPipeline`` method (``reconstruct``, ``render``, ``generate``,
``interpolate``, ``denoise_representations``) resolves its settings once, at the top, with
``RCGPipeline.resolve_settings``; what that returns is trusted below it: the samplers in
:mod:`rcg_augment.sampling` do not check their arguments again.

Example::

    from rcg_augment import GenerationSettings, RCGPipeline

    pipe = RCGPipeline.from_pretrained("digits-tiny")
    s = GenerationSettings(num_iter=8, repaint_fraction=0.7)
    print(pipe.resolve_settings(s))        # every field filled in and checked against the model
    out = pipe.reconstruct(images, 0.3, settings=s)
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass
from typing import Any

import numpy as np

# The recommended `noise_level` wherever a caller gives none (reconstruct, the transforms, the
# CLI's `build --noise-level`): variants stay in class while still differing (docs/results.md,
# "Fidelity against variety").
DEFAULT_NOISE_LEVEL = 0.3
# The value a cache or a call records when the source is fully repainted (the official decoding).
FULL_REPAINT = 1.0
# MAGE's codes sampled from its logits as they are (the official decoding).
OFFICIAL_TOKEN_TEMPERATURE = 1.0
# Seeds drawn for a call's torch.Generator (a transform's per-call seed, a generator moved to
# another device) are in [0, SEED_BOUND).
SEED_BOUND = 2**62
# Settings added after models and caches existed, each with the value that reproduces what was
# done before it: a model's fingerprint and a synthetic cache's identity leave such a setting out
# while it holds that value (None in a model's saved defaults), so models and caches made before
# it keep their identity.
ADDED_LATER: dict[str, Any] = {"repaint_fraction": FULL_REPAINT, "token_temperature": OFFICIAL_TOKEN_TEMPERATURE}
# Draws per variant when the label filter re-draws rejected variants (rcg_augment.label_filter).
DEFAULT_MAX_ATTEMPTS = 4
# Libraries that can compute the CPU's float32 linear layers (rcg_augment.cpu_matmul).
CPU_MATMUL_BACKENDS = ("default", "onednn")
DEFAULT_CPU_MATMUL = "default"


def _float(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (numbers.Real, np.floating, np.integer)):
        raise TypeError(f"`{name}` must be a number or None, got {type(value).__name__} {value!r}")
    out = float(value)
    if not math.isfinite(out):
        raise ValueError(f"`{name}` must be finite, got {value}")
    return out


def _int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (numbers.Integral, np.integer)):
        raise TypeError(f"`{name}` must be an int >= 1 or None, got {type(value).__name__} {value!r}")
    return int(value)


# Per field: the type conversion, the model-independent range, and how errors state it.
_CHECKS = {
    "cfg": (_float, lambda v: v >= 0, ">= 0"),
    "temperature": (_float, lambda v: v >= 0, ">= 0"),
    "num_iter": (_int, lambda v: v >= 1, ">= 1"),
    "rdm_steps": (_int, lambda v: v >= 1, ">= 1"),
    "eta": (_float, lambda v: v >= 0, ">= 0"),
    "repaint_fraction": (_float, lambda v: 0.0 < v <= 1.0,
                         "in (0, 1] (at least the model's mask_ratio_min, 0.5 for the bundled models)"),
    "token_temperature": (_float, lambda v: v > 0, "> 0"),
}


@dataclass(frozen=True)
class GenerationSettings:
    """How variants are generated; every field may be None (= the model's default).

    Args:
        cfg: MAGE classifier-free guidance scale, >= 0; 0 skips the unconditional branch.
        temperature: MAGE's re-masking ("choice") temperature, >= 0.
        num_iter: MAGE decoding steps, >= 1.
        rdm_steps: DDIM steps of the representation diffusion model, in [1, num_timesteps]
            (the model's default is its config's ``rdm.sampling_steps``: the name ``config.json``
            has always stored it under).
        eta: DDIM eta, >= 0 (0: deterministic, 1: DDPM-like).
        repaint_fraction: share of the source's token map that MAGE paints anew, in
            [mask_ratio_min, 1] (0.5 for every bundled and official model: MAGE never saw less
            than half of a grid masked in training). 1 repaints everything (the official
            decoding); 0.5 keeps a random half of the source's VQ tokens and paints the rest
            from the representation, so the variant stays closer to the source. It acts on
            ``reconstruct`` only (``generate`` has no source).
        token_temperature: temperature of the categorical draw of each code from MAGE's logits,
            > 0. 1 is the official sampling; below 1 the likelier codes win more often, so a
            variant follows its representation (its class) more closely and differs less from
            another variant of the same source; above 1, the reverse.
    """

    cfg: float | None = None
    temperature: float | None = None
    num_iter: int | None = None
    rdm_steps: int | None = None
    eta: float | None = None
    repaint_fraction: float | None = None
    token_temperature: float | None = None

    def __post_init__(self) -> None:
        for name, (convert, ok, allowed) in _CHECKS.items():
            value = getattr(self, name)
            if value is None:
                continue
            v = convert(value, name)
            if not ok(v):
                raise ValueError(f"`{name}` must be {allowed}, got {value}")
            object.__setattr__(self, name, v)

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def from_kwargs(cls, **values) -> GenerationSettings:
        """Settings from keyword arguments (None: the model's default); an unknown name is a
        ``TypeError`` naming the known ones."""
        unknown = sorted(set(values) - set(cls.names()))
        if unknown:
            raise TypeError(f"unknown generation settings {unknown}; expected {list(cls.names())}")
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def overrides(self) -> dict[str, Any]:
        """The fields that are set (not None), as keyword arguments for the pipeline's methods."""
        return {k: v for k, v in self.to_dict().items() if v is not None}

    def replace(self, **changes) -> GenerationSettings:
        return dataclasses.replace(self, **changes)

    def resolve(self, config, **overrides) -> GenerationSettings:
        """Every field filled and checked against a :class:`~rcg_augment.pipeline.PipelineConfig`:
        a value of ``overrides`` (None: not given) first, then this object's, then the model's
        default. Checks the ranges and the bounds that depend on the model (``rdm_steps`` <= the
        schedule length, ``repaint_fraction`` >= MAGE's ``mask_ratio_min``) in one pass: one
        object is built and checked, whatever the number of overrides. An unknown override name
        is a ``TypeError`` naming the known ones."""
        overrides = {k: v for k, v in overrides.items() if v is not None}
        unknown = sorted(set(overrides) - set(self.names()))
        if unknown:
            raise TypeError(f"unknown generation settings {unknown}; expected {list(self.names())}")
        d = config.defaults
        model_defaults = {
            "cfg": 0.0, "temperature": config.mage.temperature, "num_iter": config.mage.num_iter,
            "rdm_steps": config.rdm.sampling_steps, "eta": config.rdm.eta, "repaint_fraction": FULL_REPAINT,
            "token_temperature": OFFICIAL_TOKEN_TEMPERATURE,
        }
        values = {}
        for name, fallback in model_defaults.items():
            choices = (overrides.get(name), getattr(self, name), getattr(d, name, None), fallback)
            values[name] = next(v for v in choices if v is not None)
        return GenerationSettings(**values).check_bounds(num_timesteps=config.rdm.num_timesteps,
                                                         mask_ratio_min=config.mage.mask_ratio_min)

    def check_bounds(self, *, num_timesteps: int | None = None, mask_ratio_min: float | None = None
                     ) -> GenerationSettings:
        """``self``, after checking the bounds that depend on a model: ``rdm_steps`` <= the
        schedule's ``num_timesteps``, ``repaint_fraction`` >= MAGE's ``mask_ratio_min`` (each
        where given and set). :meth:`resolve` calls it; the checks live here alone."""
        if num_timesteps is not None and self.rdm_steps is not None and self.rdm_steps > num_timesteps:
            raise ValueError(f"`rdm_steps` must be in [1, {num_timesteps}], got {self.rdm_steps}")
        low = mask_ratio_min
        if low is not None and self.repaint_fraction is not None and self.repaint_fraction < low:
            raise ValueError(f"`repaint_fraction` must be in [{low}, 1] for this model (MAGE trained with at least "
                             f"{low:.0%} of the tokens masked), got {self.repaint_fraction}")
        return self


# No field set: what a call without a ``settings`` object resolves from.
UNSET = GenerationSettings()


__all__ = ["ADDED_LATER", "DEFAULT_MAX_ATTEMPTS", "DEFAULT_NOISE_LEVEL", "FULL_REPAINT", "OFFICIAL_TOKEN_TEMPERATURE", "SEED_BOUND", "UNSET", "GenerationSettings"]
