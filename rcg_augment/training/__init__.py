"""Trainers for every RCG stage on one shared accelerate loop.

Nothing else in the package imports the trainers at run time (imports flow models -> sampling ->
pipeline -> transforms/data/cli); the CLI's ``train`` and ``finetune`` import them when they run.
The names below load on first access, so ``rcg_augment.training.registry`` (stage and recipe
names, no torch or accelerate) can be read on its own, as the CLI's parser does.

- :func:`train_stage`: one stage ("encoder", "tokenizer", "rdm", "mage") into a pipeline folder.
- :func:`train_all`: several stages in the official order (encoder -> tokenizer -> rdm -> mage).
- :func:`finetune`: start from a trained pipeline, a named model or the official files.
- :func:`run_recipe`: a named recipe (``digits-tiny``, ``faces-tiny``).
"""

from __future__ import annotations

import importlib

# name -> the submodule that defines it
_EXPORTS = {
    **dict.fromkeys(("STAGE_CLASSES", "finetune", "make_stage", "new_pipeline", "open_data", "run_recipe",
                     "split_options", "train_all", "train_stage"), "api"),
    **dict.fromkeys(("STAGES", "STAGE_REGISTRY", "stage_class"), "registry"),
    **dict.fromkeys(("RECIPES", "Recipe", "get_recipe"), "recipes"),
    **dict.fromkeys(("Stage", "StepContext", "TrainConfig", "TrainResult"), "stage"),
    "run_training": "loop",
    "EncoderStage": "encoder", "MAGEStage": "mage", "RDMStage": "rdm", "TokenizerStage": "tokenizer",
}


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


__all__ = sorted(_EXPORTS)
