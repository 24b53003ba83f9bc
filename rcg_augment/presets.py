"""Named pipeline presets: one registry from a name to the :class:`PipelineConfig` it builds.

``RCGPipeline.from_preset(name)``, ``train --preset`` (its choices), ``new_pipeline`` and the
official-file loader (``arch`` -> preset) all read :data:`PIPELINE_PRESETS`. The per-model preset
dicts (``ENCODER_PRESETS`` ... ``MAGE_PRESETS``) use the same names: the parts of pipeline preset
``"rcg-b"`` are ``ENCODER_PRESETS["rcg-b"]``, ``RDM_PRESETS["rcg-b"]`` and so on.

Add a preset with one function here (or in your own code, before it is used)::

    @register_preset("tiny-deep", "tiny with a 6-block MAGE")
    def tiny_deep() -> PipelineConfig:
        config = preset_parts("tiny")
        config.mage = dataclasses.replace(config.mage, depth=6)
        return config
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

from .config import NETWORKS, PipelineConfig
from .models.encoder import ENCODER_PRESETS
from .models.mage import MAGE_PRESETS
from .models.rdm import RDM_PRESETS
from .models.tokenizer import TOKENIZER_PRESETS

SECTIONS = (*NETWORKS, "defaults", "metadata")


@dataclass(frozen=True)
class Preset:
    """A named architecture: ``build()`` returns a new :class:`PipelineConfig` each call."""

    name: str
    description: str
    build: Callable[[], PipelineConfig]


PIPELINE_PRESETS: dict[str, Preset] = {}


def register_preset(name: str, description: str) -> Callable[[Callable[[], PipelineConfig]], Callable]:
    """Decorator: register a function returning a :class:`PipelineConfig` as preset ``name``."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"a preset name must be a non-empty string, got {name!r}")

    def register(build: Callable[[], PipelineConfig]) -> Callable[[], PipelineConfig]:
        if name in PIPELINE_PRESETS:
            raise ValueError(f"preset {name!r} is registered already; choose another name")
        PIPELINE_PRESETS[name] = Preset(name, description, build)
        return build

    return register


def preset_parts(name: str) -> PipelineConfig:
    """A config from the per-model presets registered under ``name`` in every model file."""
    return PipelineConfig(ENCODER_PRESETS[name], RDM_PRESETS[name], TOKENIZER_PRESETS[name], MAGE_PRESETS[name])


@register_preset("tiny", "32 px, 8x8 tokens of 256 codes, 10.0 M parameters: trains on a CPU (the bundled models)")
def tiny() -> PipelineConfig:
    return preset_parts("tiny")


@register_preset("rcg-b", "the official RCG at 256 px: MoCo v3 ViT-B encoder, MAGE ViT-B, MaskGIT VQGAN")
def rcg_b() -> PipelineConfig:
    return preset_parts("rcg-b")


@register_preset("rcg-l", "the official RCG at 256 px: MoCo v3 ViT-L encoder, MAGE ViT-L, MaskGIT VQGAN")
def rcg_l() -> PipelineConfig:
    return preset_parts("rcg-l")


def preset_config(name: str, *, in_channels: int | None = None, **sections) -> PipelineConfig:
    """A new, validated config of preset ``name`` (``metadata["preset"]`` records the name).

    ``in_channels`` sets the encoder's and tokenizer's channels (the encoder's normalisation is
    averaged over channels); ``sections`` replace whole sections, e.g. ``mage=MAGEConfig(...)``.
    """
    if name not in PIPELINE_PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {list(PIPELINE_PRESETS)}")
    config = PIPELINE_PRESETS[name].build()
    config.metadata = {**config.metadata, "preset": name}
    for key, value in sections.items():
        if key not in SECTIONS:
            raise TypeError(f"from_preset() got an unexpected override {key!r}; expected in_channels or one of "
                            f"{list(SECTIONS)}")
        setattr(config, key, value)
    if in_channels is not None:
        mean = (sum(config.encoder.mean) / len(config.encoder.mean),) * in_channels
        std = (sum(config.encoder.std) / len(config.encoder.std),) * in_channels
        config.encoder = dataclasses.replace(config.encoder, in_channels=in_channels, mean=mean, std=std)
        config.tokenizer = dataclasses.replace(config.tokenizer, in_channels=in_channels)
    return PipelineConfig.from_dict(config.to_dict(), source=f"preset {name!r}")


__all__ = ["PIPELINE_PRESETS", "Preset", "SECTIONS", "preset_config", "preset_parts", "register_preset"]
