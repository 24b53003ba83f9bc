"""What a saved pipeline is: the four model configs, the sampling defaults and provenance
metadata (``config.json``), read and checked in one place. The named presets that build one
are in :mod:`rcg_augment.presets`.

Nothing here builds a network: :class:`~rcg_augment.pipeline.RCGPipeline` builds the modules a
:class:`PipelineConfig` describes, and :mod:`rcg_augment.official` converts the authors' files
to a config and a state dict without importing the pipeline.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from .models.encoder import EncoderConfig
from .models.mage import MAGEConfig
from .models.rdm import RDMConfig
from .models.tokenizer import TokenizerConfig
from .settings import ADDED_LATER, GenerationSettings

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
FORMAT_VERSION = 1
MAX_TIMESTEPS = 100_000  # official RDM: 1000


# The config sections that are networks, named as RCGPipeline's modules.
NETWORKS = ("encoder", "rdm", "tokenizer", "mage")


class ConfigError(ValueError):
    """A pipeline config (JSON or arguments) that does not describe a valid pipeline."""


@dataclass(frozen=True)
class SamplingDefaults(GenerationSettings):
    """A model's default generation settings, saved in its ``config.json``: the fields of
    :class:`~rcg_augment.settings.GenerationSettings` (so a new setting is a model default too),
    validated the same way; every one can be overridden per call. None falls back to the MAGE /
    RDM configs (``temperature``, ``num_iter``; ``rdm_steps`` from ``rdm.sampling_steps``,
    ``eta``) or to 1.0 (``repaint_fraction``, the official full repaint; ``token_temperature``, the
    official sampling)."""

    cfg: float | None = 0.0


@dataclass
class PipelineConfig:
    """The four model configs plus sampling defaults and provenance metadata."""

    encoder: EncoderConfig
    rdm: RDMConfig
    tokenizer: TokenizerConfig
    mage: MAGEConfig
    defaults: SamplingDefaults = field(default_factory=SamplingDefaults)
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        e, r, t, m = self.encoder, self.rdm, self.tokenizer, self.mage
        problems = []
        if not e.rep_dim == r.rep_dim == m.rep_dim:
            problems.append(f"rep_dim differs: encoder {e.rep_dim}, rdm {r.rep_dim}, mage {m.rep_dim}")
        if t.grid_size**2 != m.num_tokens:
            problems.append(f"tokenizer grid {t.grid_size}x{t.grid_size} != mage num_tokens {m.num_tokens}")
        if t.codebook_size != m.codebook_size:
            problems.append(f"codebook_size differs: tokenizer {t.codebook_size}, mage {m.codebook_size}")
        if e.in_channels != t.in_channels:
            problems.append(f"in_channels differs: encoder {e.in_channels}, tokenizer {t.in_channels}")
        if not isinstance(r.num_timesteps, int) or not 1 <= r.num_timesteps <= MAX_TIMESTEPS:
            # the schedule is built eagerly (float64, not in the weights): bound its memory
            problems.append(f"rdm num_timesteps must be an integer in [1, {MAX_TIMESTEPS}], got {r.num_timesteps!r}")
        if problems:
            raise ConfigError("inconsistent pipeline config: " + "; ".join(problems))

    def to_dict(self) -> dict:
        return {
            "format_version": FORMAT_VERSION,
            "encoder": dataclasses.asdict(self.encoder),
            "rdm": dataclasses.asdict(self.rdm),
            "tokenizer": dataclasses.asdict(self.tokenizer),
            "mage": dataclasses.asdict(self.mage),
            "defaults": dataclasses.asdict(self.defaults),
            "metadata": dict(self.metadata),
        }

    @classmethod
    def from_dict(cls, data: dict, *, source: str = "config") -> PipelineConfig:
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: expected a JSON object, got {type(data).__name__}")
        version = data.get("format_version", FORMAT_VERSION)
        if version != FORMAT_VERSION:
            raise ConfigError(f"{source}: format_version {version} is not supported (expected {FORMAT_VERSION})")
        sections = {"encoder": EncoderConfig, "rdm": RDMConfig, "tokenizer": TokenizerConfig,
                    "mage": MAGEConfig, "defaults": SamplingDefaults}
        allowed = set(sections) | {"metadata", "format_version"}
        unknown = sorted(set(data) - allowed)
        if unknown:
            raise ConfigError(f"{source}: unknown top-level fields {unknown}; expected {sorted(allowed)}")
        built = {}
        for name, klass in sections.items():
            if name not in data:
                if name == "defaults":
                    built[name] = SamplingDefaults()
                    continue
                raise ConfigError(f"{source}: missing section '{name}'")
            built[name] = _dataclass_from_dict(klass, data[name], f"{source}: section '{name}'")
        meta = data.get("metadata", {})
        if not isinstance(meta, dict):
            raise ConfigError(f"{source}: 'metadata' must be an object")
        try:
            return cls(**built, metadata=meta)
        except ConfigError as err:
            raise ConfigError(f"{source}: {err}") from err


def _dataclass_from_dict(klass, values, where: str):
    if not isinstance(values, dict):
        raise ConfigError(f"{where}: expected an object, got {type(values).__name__}")
    names = {f.name for f in dataclasses.fields(klass)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(f"{where}: unknown fields {unknown}; {klass.__name__} has {sorted(names)}")
    required = {f.name for f in dataclasses.fields(klass)
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
    missing = sorted(required - set(values))
    if missing:
        raise ConfigError(f"{where}: missing fields {missing}")
    try:
        return klass(**values)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{where}: {err}") from err


# Config fields added after models and caches existed: a model's fingerprint hashes them as if
# absent while they hold this default, so a cache built before the field existed still matches.
FIELDS_ADDED_LATER = {"defaults": dict.fromkeys(ADDED_LATER)}


__all__ = ["CONFIG_NAME", "ConfigError", "FIELDS_ADDED_LATER", "FORMAT_VERSION", "MAX_TIMESTEPS", "NETWORKS", "PipelineConfig",
           "SamplingDefaults", "WEIGHTS_NAME"]
