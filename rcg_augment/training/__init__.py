"""Trainers for every RCG stage on one shared accelerate loop.

Nothing else in the package imports this at run time (imports flow models -> sampling ->
pipeline -> transforms/data/cli); the CLI's ``train`` and ``finetune`` import it lazily.

- :func:`train_stage`: one stage ("encoder", "tokenizer", "rdm", "mage") into a pipeline folder.
- :func:`train_all`: several stages in the official order (encoder -> tokenizer -> rdm -> mage).
- :func:`finetune`: start from a trained pipeline, a named model or the official files.
- :func:`run_recipe`: a named recipe (``digits-tiny``, ``faces-tiny``).
"""

from .api import (
    STAGE_CLASSES,
    STAGES,
    finetune,
    make_stage,
    new_pipeline,
    open_data,
    run_recipe,
    split_options,
    train_all,
    train_stage,
)
from .encoder import EncoderStage
from .loop import Stage, StepContext, TrainConfig, TrainResult, run_training
from .mage import MAGEStage
from .rdm import RDMStage
from .recipes import RECIPES, Recipe, get_recipe
from .tokenizer import TokenizerStage

__all__ = [
    "RECIPES", "STAGES", "STAGE_CLASSES", "EncoderStage", "MAGEStage", "RDMStage", "Recipe", "Stage", "StepContext",
    "TokenizerStage", "TrainConfig", "TrainResult", "finetune", "get_recipe", "make_stage", "new_pipeline",
    "open_data", "run_recipe", "run_training", "split_options", "train_all", "train_stage",
]
