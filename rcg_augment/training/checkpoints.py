"""Checkpoint files of a training run: where they live, which files one may hold, saving,
loading for an exact resume, and the hyperparameters a resume must match (stored under the key
``"settings"`` of ``trainer_state.json`` and ``done.json``, the name those files have always used).

Model weights and the EMA are safetensors; the optimizer and RNG files are read by accelerate
with ``torch.load(weights_only=True)``; objects registered with ``register_for_checkpointing``
(which accelerate unpickles with ``weights_only=False``) are never used, and a checkpoint folder
holding any file outside the expected set is refused.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

from safetensors.torch import load_file, save_file
from torch import nn

from .stage import Stage

CHECKPOINTS_DIR = "checkpoints"
BASE_DIR = "base"
STATE_NAME = "trainer_state.json"
EMA_NAME = "ema.safetensors"
STAGE_STATE_NAME = "stage_state.safetensors"
DONE_NAME = "done.json"
# Files accelerate's save_state writes for one model + one optimizer without a scheduler,
# dataloader or custom object, plus ours. Anything else in a checkpoint folder is refused.
_CHECKPOINT_FILES = re.compile(
    r"^(model(_\d+)?\.safetensors|optimizer(_\d+)?\.bin|random_states_\d+\.pkl|scaler\.pt|"
    + "|".join(re.escape(n) for n in (EMA_NAME, STAGE_STATE_NAME, STATE_NAME)) + r")$"
)


def check_checkpoint_dir(path: Path) -> None:
    """Refuse a checkpoint folder holding files a resume would read unsafely or not at all."""
    if not (path / STATE_NAME).is_file():
        raise ValueError(f"{path} is not a complete checkpoint ({STATE_NAME} is missing)")
    unexpected = sorted(p.name for p in path.iterdir() if not _CHECKPOINT_FILES.match(p.name))
    if unexpected:
        raise ValueError(
            f"checkpoint {path} holds unexpected files {unexpected}; only safetensors weights, "
            "accelerate's optimizer/RNG files (read with weights_only=True) and our JSON are loaded. "
            "Remove them, or start over with resume=False (--no-resume)"
        )
    if not any(p.name.startswith("model") and p.suffix == ".safetensors" for p in path.iterdir()):
        raise ValueError(f"checkpoint {path} has no model*.safetensors; it was not written by this trainer")


def list_checkpoints(root: Path) -> list[Path]:
    found = [p for p in root.glob("step_*") if p.is_dir() and (p / STATE_NAME).is_file()]
    return sorted(found, key=lambda p: int(p.name.split("_")[1]))


def read_state(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: unreadable trainer state ({err})") from err


def hyperparameter_changes(saved: dict, current: dict) -> list[str]:
    """``"key: saved -> current"`` for each hyperparameter that differs between two run records."""
    keys = sorted(set(saved) | set(current))
    return [f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in keys if saved.get(k) != current.get(k)]


def save_checkpoint(root: Path, step: int, *, accelerator, ema: nn.Module | None, stage: Stage,
                    hyperparameters: dict, keep: int) -> None:
    """Write ``root/step_<step>`` (accelerate's state, the EMA, the stage's state, the step and
    the run's hyperparameter record) on every process, then keep only the ``keep`` newest checkpoints."""
    path = root / f"step_{step:08d}"
    accelerator.wait_for_everyone()
    accelerator.save_state(str(path), safe_serialization=True)
    if accelerator.is_main_process:
        if ema is not None:
            save_file({k: v.detach().contiguous().cpu() for k, v in ema.state_dict().items()}, str(path / EMA_NAME))
        stage_state = stage.state_dict()
        if stage_state:
            save_file({k: v.detach().contiguous().cpu() for k, v in stage_state.items()},
                      str(path / STAGE_STATE_NAME))
        (path / STATE_NAME).write_text(json.dumps({"step": step, "settings": hyperparameters}, indent=1))
        for old in list_checkpoints(root)[: -keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def load_training_checkpoint(path: Path, *, accelerator, ema: nn.Module | None, stage: Stage, device) -> int:
    """Restore the training state :func:`save_checkpoint` wrote (model, optimizer, RNG, EMA, the
    stage's state; after ``accelerator.prepare``) for an exact resume; returns its step. (The
    authors' checkpoint files are read by :func:`rcg_augment.official.load_official_checkpoint`.)"""
    accelerator.load_state(str(path), load_kwargs={"weights_only": True})
    if ema is not None:
        ema.load_state_dict(load_file(str(path / EMA_NAME)))  # copied onto ema's device
    if (path / STAGE_STATE_NAME).is_file():
        state = load_file(str(path / STAGE_STATE_NAME))
        stage.load_state_dict({k: v.to(device) for k, v in state.items()})
    return int(read_state(path / STATE_NAME)["step"])


__all__ = ["BASE_DIR", "CHECKPOINTS_DIR", "DONE_NAME", "EMA_NAME", "STAGE_STATE_NAME", "STATE_NAME", "check_checkpoint_dir",
           "hyperparameter_changes", "list_checkpoints", "load_training_checkpoint", "read_state", "save_checkpoint"]
