"""The names the trainers offer, readable without importing them (no torch, no accelerate).

``rcg-augment train`` builds its parser from these (stage choices, the help's stage list, the
recipe names) while ``rcg-augment build`` runs: the package rule is that nothing outside
``training/`` imports the trainers at run time, and this module imports none of them.

- :data:`STAGE_REGISTRY`: every stage, in training order, with a one-line description and where
  its :class:`~rcg_augment.training.stage.Stage` subclass lives (imported on first use by
  :func:`stage_class`). Add a stage: write ``training/<name>.py`` with the subclass, add an
  entry here.
- :data:`RECIPES`: the named training recipes (defined in :mod:`rcg_augment.training.recipes`).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

from .recipes import RECIPES, get_recipe


@dataclass(frozen=True)
class StageEntry:
    """A training stage: its name, what it trains (one line for ``--help``) and its class as
    ``"module:Class"`` within :mod:`rcg_augment.training`."""

    name: str
    description: str
    target: str


# Training order: the RDM needs the encoder; MAGE needs the encoder and the tokenizer.
STAGE_REGISTRY: dict[str, StageEntry] = {e.name: e for e in (
    StageEntry("encoder", "MoCo v3 self-supervised pre-training of the ViT encoder + projector",
               "encoder:EncoderStage"),
    StageEntry("tokenizer", "VQ tokenizer: pixel reconstruction + codebook/commitment loss (dead codes restarted)",
               "tokenizer:TokenizerStage"),
    StageEntry("rdm", "representation diffusion model on the frozen encoder's representations (EMA kept)",
               "rdm:RDMStage"),
    StageEntry("mage", "masked generative transformer on frozen tokenizer tokens + encoder reps (EMA kept)",
               "mage:MAGEStage"),
)}
STAGES: tuple[str, ...] = tuple(STAGE_REGISTRY)


def stage_class(name: str) -> type:
    """The :class:`~rcg_augment.training.stage.Stage` subclass of stage ``name`` (imports it)."""
    if name not in STAGE_REGISTRY:
        raise ValueError(f"unknown stage {name!r}; choose one of {list(STAGES)}")
    module, _, attr = STAGE_REGISTRY[name].target.partition(":")
    return getattr(importlib.import_module(f"{__package__}.{module}"), attr)


__all__ = ["RECIPES", "STAGES", "STAGE_REGISTRY", "StageEntry", "get_recipe", "stage_class"]
