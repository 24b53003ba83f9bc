"""What a training stage is, and the loop options and result of one run of it.

A :class:`Stage` contributes only what is particular to it: which module trains (the rest of the
pipeline is frozen and in eval mode), how a batch of images becomes a loss, whether an EMA copy
is kept (and how its decay moves), and its optimizer defaults. :class:`TrainConfig` holds the
loop's options, :class:`StepContext` what a stage's ``loss`` sees of a step, :class:`TrainResult`
what :func:`~rcg_augment.training.loop.run_training` did.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from ..pipeline import RCGPipeline


@dataclass
class TrainConfig:
    """Loop options shared by every stage (the run's hyperparameters, resolved by
    :func:`~rcg_augment.training.loop.resolve_hyperparameters`). ``None`` means "the stage's default".

    Args:
        steps: optimizer steps (the length of the LR schedule), >= 1.
        batch_size: images per process per micro-batch; the effective batch is
            ``batch_size * grad_accum * num_processes``.
        grad_accum: micro-batches per optimizer step.
        lr: absolute learning rate; overrides ``blr``.
        blr: base learning rate; ``lr = blr * effective_batch / 256`` (encoder, tokenizer, MAGE)
            or ``blr * effective_batch`` (RDM), the official scaling rules.
        min_lr: floor of the cosine decay.
        warmup_steps: linear warm-up steps (default: the stage's fraction of ``steps``).
        lr_schedule: ``"cosine"`` (after warm-up) or ``"constant"``.
        weight_decay, betas: AdamW hyperparameters (no decay on biases, norms and position embeddings).
        max_grad_norm: clip the global gradient norm to this; 0 disables clipping.
        ema_decay: EMA decay where the stage keeps one (RDM, MAGE: 0.9999; the encoder's
            momentum encoder: 0.99, cosine-ramped to 1). The EMA warms up as
            ``min(decay, (1 + n) / (10 + n))`` after ``n`` updates, so short runs still average.
        seed: seeds the data order and every random draw.
        checkpoint_every: save a resumable checkpoint every N steps (0: only at the end of a
            time budget); ``keep_checkpoints`` newest are kept.
        log_every: write a ``log.jsonl`` record (losses averaged over the window) every N steps.
        max_time: wall-clock budget in seconds; the loop checkpoints and stops when it is spent.
        max_steps: step budget of this call: checkpoint and stop once the run reaches this step
            (the schedule keeps its ``steps`` length; calling again resumes).
        num_workers: DataLoader workers for sources too large to hold in memory as tensors.
        mixed_precision: ``"auto"`` (bf16 on GPU, none on CPU), ``"no"`` or ``"bf16"``.
        resume: continue from the newest checkpoint in ``out_dir/checkpoints/<stage>`` (and
            skip a stage already finished there); ``False`` deletes them and starts over.
        keep_finished_checkpoints: keep the checkpoints once a stage has finished.
        progress: show a tqdm bar on the main process.
        run_name: name of this run's checkpoint folder ``checkpoints/<run_name>`` (default: the
            stage's name). A second run of a stage into the same output folder (a recipe's
            continuation phase) needs a name of its own, or it is taken for the finished first.
    """

    steps: int = 1000
    batch_size: int = 64
    grad_accum: int = 1
    lr: float | None = None
    blr: float | None = None
    min_lr: float = 0.0
    warmup_steps: int | None = None
    lr_schedule: str | None = None
    weight_decay: float | None = None
    betas: tuple[float, float] | None = None
    max_grad_norm: float | None = None
    ema_decay: float | None = None
    seed: int = 0
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    log_every: int = 10
    max_time: float | None = None
    max_steps: int | None = None
    num_workers: int = 0
    mixed_precision: str = "auto"
    resume: bool = True
    keep_finished_checkpoints: bool = False
    progress: bool = True
    run_name: str | None = None

    def __post_init__(self) -> None:
        if self.run_name is not None and (
            not self.run_name or self.run_name in (".", "..") or any(ch in self.run_name for ch in "/\\\0")
        ):
            raise ValueError(f"`run_name` must be a plain folder name, got {self.run_name!r}")
        if self.betas is not None:
            self.betas = tuple(float(b) for b in self.betas)
        checks = [
            ("steps", self.steps >= 1, ">= 1"), ("batch_size", self.batch_size >= 1, ">= 1"),
            ("grad_accum", self.grad_accum >= 1, ">= 1"),
            ("lr", self.lr is None or self.lr > 0, "> 0"), ("blr", self.blr is None or self.blr > 0, "> 0"),
            ("min_lr", self.min_lr >= 0, ">= 0"),
            ("warmup_steps", self.warmup_steps is None or self.warmup_steps >= 0, ">= 0"),
            ("lr_schedule", self.lr_schedule in (None, "cosine", "constant"), "'cosine' or 'constant'"),
            ("weight_decay", self.weight_decay is None or self.weight_decay >= 0, ">= 0"),
            ("betas", self.betas is None or (len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas)),
             "two values in [0, 1)"),
            ("max_grad_norm", self.max_grad_norm is None or self.max_grad_norm >= 0, ">= 0 (0 disables)"),
            ("ema_decay", self.ema_decay is None or 0 <= self.ema_decay < 1, "in [0, 1)"),
            ("checkpoint_every", self.checkpoint_every >= 0, ">= 0"),
            ("keep_checkpoints", self.keep_checkpoints >= 1, ">= 1"),
            ("log_every", self.log_every >= 1, ">= 1"),
            ("max_time", self.max_time is None or self.max_time > 0, "> 0 seconds"),
            ("max_steps", self.max_steps is None or self.max_steps >= 1, ">= 1"),
            ("num_workers", self.num_workers >= 0, ">= 0"),
            ("mixed_precision", self.mixed_precision in ("auto", "no", "bf16"), "'auto', 'no' or 'bf16'"),
        ]
        for name, ok, rule in checks:
            if not ok:
                raise ValueError(f"`{name}` must be {rule}, got {getattr(self, name)!r}")


@dataclass
class StepContext:
    """What a stage's ``loss`` / ``after_step`` may use besides the model and the images."""

    step: int  # index of the optimizer step being computed, 0-based
    total_steps: int
    micro: int  # micro-batch index within the step
    generator: torch.Generator  # CPU generator for this step, micro-batch and process
    accelerator: Any
    pipe: RCGPipeline
    unwrapped: nn.Module  # the stage's trainable module, without DDP/holder wrappers
    ema: nn.Module | None
    optimizer: Any
    seed: int


class Stage:
    """Base class of a training stage. Subclasses are dataclasses whose fields are the stage's
    options (augmentation, loss options); they override :meth:`build`, :meth:`loss` and,
    where needed, :meth:`finish`, :meth:`after_step`, :meth:`ema_decay_at`."""

    name: ClassVar[str] = "stage"
    network: ClassVar[str | None] = None  # the pipeline network it trains (None: the one named `name`)
    lr_scaling: ClassVar[str] = "per256"  # "per256": blr * batch / 256; "linear": blr * batch
    default_blr: ClassVar[float] = 1.5e-4
    default_weight_decay: ClassVar[float] = 0.05
    default_betas: ClassVar[tuple[float, float]] = (0.9, 0.999)
    default_warmup_fraction: ClassVar[float] = 0.05
    default_lr_schedule: ClassVar[str] = "cosine"
    default_max_grad_norm: ClassVar[float] = 0.0
    default_ema_decay: ClassVar[float | None] = None  # None: the stage keeps no EMA
    ema_train_mode: ClassVar[bool] = False  # the EMA copy runs forward in train mode (MoCo)

    def options(self) -> dict:
        return jsonable(dataclasses.asdict(self)) if dataclasses.is_dataclass(self) else {}

    def image_size(self, pipe: RCGPipeline) -> int:
        """Side of the square images the stage reads (the pipeline's pixel resolution)."""
        return pipe.image_size

    def build(self, pipe: RCGPipeline) -> nn.Module:
        """The trainable module (parameters that train have ``requires_grad=True``). Its
        ``forward`` must do all the differentiable work so DDP can synchronise gradients."""
        raise NotImplementedError

    def ema_source(self, model: nn.Module) -> nn.Module:
        """The part of ``build()``'s module the EMA tracks."""
        return model

    def ema_decay_at(self, base: float, step: int, total: int) -> float:
        """Decay of the EMA update after ``step`` optimizer steps (LitEma's warm-up)."""
        return min(base, (1 + step) / (10 + step))

    def loss(self, model: nn.Module, images: torch.Tensor, ctx: StepContext) -> tuple[torch.Tensor, dict]:
        """Images (B, C, S, S) in [0, 1] on the device -> (scalar loss, {name: float metric})."""
        raise NotImplementedError

    def after_step(self, ctx: StepContext) -> dict:
        """Called after each optimizer step (and EMA update) on every process; returns metrics."""
        return {}

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors a stage keeps across steps (saved in checkpoints)."""
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        pass

    def finish(self, pipe: RCGPipeline, model: nn.Module, ema: nn.Module | None) -> None:
        """Write the trained weights (the EMA where the stage keeps one) into ``pipe``."""


@dataclass
class TrainResult:
    """What :func:`run_training` did."""

    stage: str
    out_dir: Path
    pipeline: RCGPipeline
    steps_done: int
    total_steps: int
    completed: bool
    skipped: bool = False  # already finished in out_dir (resume)
    resumed_from: int | None = None
    seconds: float = 0.0
    history: list[dict] = field(default_factory=list)  # this run's log records

    @property
    def final_loss(self) -> float | None:
        losses = [r["loss"] for r in self.history if "loss" in r]
        return losses[-1] if losses else None


def jsonable(value):
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


__all__ = ["Stage", "StepContext", "TrainConfig", "TrainResult", "jsonable"]
