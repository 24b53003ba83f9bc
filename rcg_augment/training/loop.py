"""One accelerate training loop shared by every RCG stage.

A :class:`~rcg_augment.training.stage.Stage` contributes only what is particular to it (its
module, its batch -> loss, its EMA and optimizer defaults). :func:`run_training` does the rest:
the :class:`accelerate.Accelerator` (one CPU process, or ``accelerate launch`` with many
processes/GPUs; bf16 autocast on GPU, float32 on CPU), gradient accumulation, clipping, AdamW
with linear warm-up + cosine decay and the official linear scaling rule, EMA, checkpoints that
resume exactly, ``log.jsonl`` + ``logging``, a tqdm bar, and step / wall-time budgets.

The parts it is made of, one concern per module:

- :mod:`~rcg_augment.training.stage`: ``Stage``, ``TrainConfig``, ``StepContext``, ``TrainResult``;
- :mod:`~rcg_augment.training.data_order`: the data order and the seeds (exact resume: every
  draw of a step is seeded by (seed, stage, step, micro-batch, process), so a run stopped at
  step k and resumed reproduces the uninterrupted run's losses, bit for bit on CPU);
- :mod:`~rcg_augment.training.optim`: learning rate, parameter groups, EMA update;
- :mod:`~rcg_augment.training.checkpoints`: checkpoint files, save, load, the resume checks.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..data.sources import ImageSource
from ..pipeline import CONFIG_NAME, RCGPipeline
from .checkpoints import (
    BASE_DIR,
    CHECKPOINTS_DIR,
    DONE_NAME,
    STATE_NAME,
    check_checkpoint_dir,
    hyperparameter_changes,
    list_checkpoints,
    load_training_checkpoint,
    read_state,
    save_checkpoint,
)
from .data_order import BatchOrder, ImageTensors, derive_seed, image_batches
from .optim import ema_update, lr_at, param_groups, resolve_lr
from .stage import Stage, StepContext, TrainConfig, TrainResult, jsonable

logger = logging.getLogger(__name__)


LOG_NAME = "log.jsonl"


class _Holder(nn.Module):
    """Carries the stage's module so accelerate's wrappers never patch the pipeline's own modules."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)


def _mixed_precision(choice: str) -> str:
    if choice == "auto":
        cuda = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        return "bf16" if cuda else "no"
    return choice


def make_accelerator(mixed_precision: str = "auto"):
    """An Accelerator for one stage: bf16 only where a GPU supports it, float32 on CPU."""
    from accelerate import Accelerator

    precision = _mixed_precision(mixed_precision)
    try:
        # cpu=True without CUDA: accelerate then sets up multi-process CPU training (gloo) when
        # started by `accelerate launch --multi_gpu` / torchrun; otherwise it would run every
        # process as an independent single-process job.
        return Accelerator(mixed_precision=precision, cpu=not torch.cuda.is_available())
    except ValueError as err:
        raise ValueError(f"cannot start accelerate with mixed_precision={precision!r}: {err}") from err


@dataclass(frozen=True)
class Hyperparameters:
    """A run's loop hyperparameters, each resolved from the :class:`TrainConfig` and the stage's
    defaults. ``record`` is what identifies the run: a resume (or a finished stage) must have
    been written with the same record (it is stored in the checkpoints' and ``done.json``'s
    ``"settings"`` field, the name those files have always used)."""

    lr: float
    warmup: int
    schedule: str
    weight_decay: float
    betas: tuple[float, float]
    max_grad_norm: float
    ema_decay: float | None
    effective_batch: int
    image_size: int
    in_channels: int
    record: dict


def resolve_hyperparameters(stage: Stage, pipe: RCGPipeline, source: ImageSource, config: TrainConfig,
                            num_processes: int) -> Hyperparameters:
    """The loop's hyperparameters for ``stage`` (``None`` in ``config``: the stage's default)."""
    effective_batch = config.batch_size * config.grad_accum * num_processes
    lr = resolve_lr(stage, config, effective_batch)
    warmup = (round(stage.default_warmup_fraction * config.steps) if config.warmup_steps is None
              else min(config.warmup_steps, config.steps))
    schedule = config.lr_schedule or stage.default_lr_schedule
    weight_decay = stage.default_weight_decay if config.weight_decay is None else config.weight_decay
    betas = tuple(stage.default_betas if config.betas is None else config.betas)
    max_grad_norm = stage.default_max_grad_norm if config.max_grad_norm is None else config.max_grad_norm
    ema_decay = stage.default_ema_decay if config.ema_decay is None else config.ema_decay
    if stage.default_ema_decay is None:
        ema_decay = None
    size, channels = stage.image_size(pipe), pipe.in_channels
    record = jsonable({
        "stage": stage.name, "options": stage.options(), "steps": config.steps, "batch_size": config.batch_size,
        "grad_accum": config.grad_accum, "num_processes": num_processes, "lr": lr, "min_lr": config.min_lr,
        "warmup_steps": warmup, "lr_schedule": schedule, "weight_decay": weight_decay, "betas": betas,
        "max_grad_norm": max_grad_norm, "ema_decay": ema_decay, "seed": config.seed,
        "num_images": len(source), "image_size": size, "in_channels": channels,
    })
    return Hyperparameters(lr, warmup, schedule, weight_decay, betas, max_grad_norm, ema_decay, effective_batch,
                           size, channels, record)


@dataclass
class _Run:
    """What the phases of one :func:`run_training` call share."""

    stage: Stage
    config: TrainConfig
    out_dir: Path
    accelerator: Any
    hp: Hyperparameters
    t_start: float

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def ckpt_root(self) -> Path:
        return self.out_dir / CHECKPOINTS_DIR / (self.config.run_name or self.stage.name)

    @property
    def done_path(self) -> Path:
        return self.ckpt_root / DONE_NAME

    def write_log(self, record: dict) -> None:
        if self.main:
            with (self.out_dir / LOG_NAME).open("a") as f:
                f.write(json.dumps(record) + "\n")


def _earlier_pieces_seconds(log_path: Path, stage: str) -> float:
    """Seconds of the earlier pieces of the run now finishing: the log's ``end`` events of ``stage``
    since its last ``start`` (from step 0) or completed run, and for a piece killed without one (no ``end`` event) the time at
    its last ``checkpoint`` event (the steps after it were trained again by the next piece)."""
    total = 0.0
    if not log_path.is_file():
        return total
    open_piece = None  # seconds at the last checkpoint of a piece that has not ended (None: no piece open)
    for line in log_path.read_text().splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if event.get("stage") != stage:
            continue
        kind = event.get("event")
        if kind == "start":  # from step 0: nothing before it is part of this run
            total, open_piece = 0.0, 0.0
        elif kind == "resume":
            total += open_piece or 0.0  # the piece before it was killed
            open_piece = 0.0
        elif kind == "checkpoint" and open_piece is not None:
            open_piece = float(event.get("seconds") or 0.0)
        elif kind == "end":
            open_piece = None
            total = 0.0 if event.get("completed") else total + float(event.get("seconds") or 0.0)
    return total


@dataclass
class _Modules:
    """The trainable side of a run, after ``accelerator.prepare``."""

    inner: nn.Module  # the stage's module, unwrapped
    model: nn.Module  # the prepared holder the loss sees
    ema: nn.Module | None
    optimizer: torch.optim.Optimizer
    trainable: list[nn.Parameter]
    requires_grad: dict[str, bool]  # the pipeline's flags before training, restored at the end


class _Window:
    """Metrics summed over the steps since the last log record, each with its own weight (some
    metrics report only now and then)."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.weights: dict[str, float] = {}
        self.steps, self.t0 = 0, time.monotonic()

    def add(self, key: str, value: float, weight: float = 1.0) -> None:
        self.sums[key] = self.sums.get(key, 0.0) + value
        self.weights[key] = self.weights.get(key, 0.0) + weight

    def means(self) -> tuple[list[str], list[float]]:
        keys = sorted(self.sums)
        return keys, [self.sums[k] / self.weights[k] for k in keys]

    def reset(self) -> None:
        self.sums.clear()
        self.weights.clear()
        self.steps, self.t0 = 0, time.monotonic()


# ----------------------------------------------------------------------------- phase: resume
def _finished_result(run: _Run) -> TrainResult | None:
    """With ``resume``: the result of a stage already finished in ``out_dir`` with the same
    hyperparameters (None if it has not finished); without: delete the old checkpoints."""
    accelerator, stage, out_dir = run.accelerator, run.stage, run.out_dir
    if not run.config.resume:
        accelerator.wait_for_everyone()
        if run.main and run.ckpt_root.exists():
            shutil.rmtree(run.ckpt_root)
        accelerator.wait_for_everyone()
        return None
    if not run.done_path.is_file():
        return None
    done = read_state(run.done_path)
    diff = hyperparameter_changes(done.get("settings", {}), run.hp.record)
    if diff:
        raise ValueError(
            f"{out_dir}: stage '{stage.name}' already finished there with other settings ({'; '.join(diff)}); "
            "use another output folder, or resume=False (--no-resume) to train it again"
        )
    if not (out_dir / CONFIG_NAME).is_file():
        raise ValueError(f"{out_dir}: {run.done_path} says '{stage.name}' finished but the pipeline is missing; "
                         "use resume=False (--no-resume) to train it again")
    logger.info("stage %s already finished in %s; skipping (resume=False trains it again)", stage.name, out_dir)
    return TrainResult(stage.name, out_dir, RCGPipeline.from_pretrained(out_dir), run.config.steps, run.config.steps,
                       completed=True, skipped=True)


def _starting_point(run: _Run, pipe: RCGPipeline) -> tuple[RCGPipeline, Path | None]:
    """The pipeline to train and the checkpoint to resume from (None: a fresh start, whose
    starting pipeline is saved beside the checkpoints so a resume starts from it exactly)."""
    root = run.ckpt_root
    checkpoints = list_checkpoints(root) if run.config.resume and root.is_dir() else []
    if not checkpoints:
        if run.main:
            pipe.save_pretrained(root / BASE_DIR)
        run.accelerator.wait_for_everyone()
        return pipe, None
    latest = checkpoints[-1]
    saved = read_state(latest / STATE_NAME)
    diff = hyperparameter_changes(saved.get("settings", {}), run.hp.record)
    if diff:
        raise ValueError(
            f"cannot resume {latest}: it was written with other settings ({'; '.join(diff)}); use the same "
            "settings, another output folder, or resume=False (--no-resume) to start over"
        )
    check_checkpoint_dir(latest)
    return RCGPipeline.from_pretrained(root / BASE_DIR), latest  # the exact starting point


# ----------------------------------------------------------------------------- phase: set-up
def _prepare_modules(run: _Run, pipe: RCGPipeline) -> _Modules:
    """Everything frozen and in eval mode except the stage's module; its EMA and optimizer,
    prepared by accelerate."""
    stage, hp, device = run.stage, run.hp, run.device
    flags = {n: p.requires_grad for n, p in pipe.named_parameters()}
    pipe.to(device)
    pipe.eval()
    pipe.requires_grad_(False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(run.config.seed, stage.name, "init"))
        inner = stage.build(pipe).to(device)
    inner.train()
    holder = _Holder(inner)
    ema = None
    if hp.ema_decay is not None:
        ema = copy.deepcopy(stage.ema_source(inner)).requires_grad_(False).float()
        ema.train(stage.ema_train_mode)
    optimizer = torch.optim.AdamW(param_groups(holder, hp.weight_decay), lr=hp.lr, betas=hp.betas)
    model, optimizer = run.accelerator.prepare(holder, optimizer)
    trainable = [p for p in holder.parameters() if p.requires_grad]
    return _Modules(inner, model, ema, optimizer, trainable, flags)


# ----------------------------------------------------------------------------- phase: the step loop
def _train_step(run: _Run, pipe: RCGPipeline, m: _Modules, batches, step: int, window: _Window) -> float:
    """One optimizer step (``grad_accum`` micro-batches, clipping, EMA); returns its learning rate."""
    stage, config, accelerator, hp = run.stage, run.config, run.accelerator, run.hp
    rank = accelerator.process_index
    current_lr = lr_at(step, lr=hp.lr, steps=config.steps, warmup=hp.warmup, schedule=hp.schedule,
                       min_lr=config.min_lr)
    for group in m.optimizer.param_groups:
        group["lr"] = current_lr
    ctx = None
    for micro in range(config.grad_accum):
        images = next(batches).to(run.device, non_blocking=True)
        generator = torch.Generator().manual_seed(derive_seed(config.seed, stage.name, step, micro, rank))
        # Dropout and other global-RNG draws: seeded per step so a resumed run matches.
        torch.manual_seed(derive_seed(config.seed, stage.name, "global", step, micro, rank))
        ctx = StepContext(step, config.steps, micro, generator, accelerator, pipe, m.inner, m.ema, m.optimizer,
                          config.seed)
        last = micro == config.grad_accum - 1
        with contextlib.nullcontext() if last else accelerator.no_sync(m.model):
            with accelerator.autocast():
                loss, metrics = stage.loss(m.model, images, ctx)
            accelerator.backward(loss / config.grad_accum)
        window.add("loss", float(loss.detach()) / config.grad_accum, 1 / config.grad_accum)
        for k, v in metrics.items():
            window.add(k, float(v) / config.grad_accum, 1 / config.grad_accum)
    grad_norm = accelerator.clip_grad_norm_(m.trainable, hp.max_grad_norm if hp.max_grad_norm > 0 else float("inf"))
    grad_norm = float(grad_norm)
    if not math.isfinite(grad_norm):
        raise RuntimeError(
            f"stage {stage.name}: the gradient became non-finite at step {step} (loss {float(loss):.4g}); "
            f"lower the learning rate (now {current_lr:.3g}; --blr/--lr) or clip (--max-grad-norm)"
        )
    m.optimizer.step()
    m.optimizer.zero_grad(set_to_none=True)
    if m.ema is not None:
        decay = stage.ema_decay_at(hp.ema_decay, step + 1, config.steps)
        ema_update(m.ema, stage.ema_source(m.inner), decay, copy_buffers=not stage.ema_train_mode)
    for k, v in stage.after_step(ctx).items():
        window.add(k, float(v))
    window.add("grad_norm", grad_norm)
    window.steps += 1
    return current_lr


def _log_window(run: _Run, window: _Window, step: int, current_lr: float, order: BatchOrder, *,
                log_lines: bool) -> dict:
    """The log record of the steps since the last one (averaged across processes), written and logged."""
    config, accelerator = run.config, run.accelerator
    keys, means = window.means()
    values = torch.tensor(means, device=run.device, dtype=torch.float64)
    if accelerator.num_processes > 1:
        values = accelerator.reduce(values, reduction="mean")
    elapsed = time.monotonic() - window.t0
    record = {"stage": run.stage.name, "step": step, "lr": current_lr,
              "epoch": round(order.epoch_of(step * config.grad_accum), 4),
              "images_per_s": round(window.steps * run.hp.effective_batch / max(elapsed, 1e-9), 2),
              "s_per_step": round(elapsed / window.steps, 4),
              **{k: float(v) for k, v in zip(keys, values.tolist(), strict=True)}}
    run.write_log(record)
    if run.main:
        logger.log(logging.INFO if log_lines else logging.DEBUG,
                   "%s step %d/%d: loss %.4f, lr %.3g, %.1f images/s", run.stage.name, step, config.steps,
                   record["loss"], current_lr, record["images_per_s"])
    window.reset()
    return record


def _budget_spent(run: _Run, step: int) -> str | None:
    """"wall-time" or "step" when this call's budget is spent before the run's end (every
    process agrees), else None."""
    config, accelerator = run.config, run.accelerator
    if step >= config.steps or (config.max_time is None and config.max_steps is None):
        return None
    over_time = config.max_time is not None and time.monotonic() - run.t_start > config.max_time
    if accelerator.num_processes > 1 and config.max_time is not None:  # processes must agree on stopping
        flag = accelerator.reduce(torch.tensor(float(over_time), device=run.device), reduction="sum")
        over_time = float(flag) > 0
    over_steps = config.max_steps is not None and step >= config.max_steps
    if over_time or over_steps:
        return "wall-time" if over_time else "step"
    return None


def _train_steps(run: _Run, pipe: RCGPipeline, m: _Modules, source: ImageSource, start_step: int,
                 resumed: bool) -> tuple[int, bool, list[dict]]:
    """Steps ``start_step`` .. the end or the budget, with logs and checkpoints; returns (the step
    reached, whether a budget stopped it, the log records)."""
    stage, config, accelerator = run.stage, run.config, run.accelerator
    order = BatchOrder(len(source), config.batch_size, accelerator.num_processes, accelerator.process_index,
                       config.seed)
    data = ImageTensors(source, run.hp.image_size, run.hp.in_channels)
    batches = image_batches(data, order, start_step * config.grad_accum, config.num_workers,
                            show=run.main and config.progress)

    if run.main:
        run.out_dir.mkdir(parents=True, exist_ok=True)
        logger.info(
            "training %s: %d steps, effective batch %d (%d x %d accum x %d proc), lr %.3g, %d images of %dpx, "
            "device %s, precision %s", stage.name, config.steps, run.hp.effective_batch, config.batch_size,
            config.grad_accum, accelerator.num_processes, run.hp.lr, len(source), run.hp.image_size, run.device,
            accelerator.mixed_precision)
    run.write_log({"event": "resume" if resumed else "start", "stage": stage.name, "step": start_step,
                   "settings": run.hp.record, "time": time.time()})

    def checkpoint(step: int) -> None:
        save_checkpoint(run.ckpt_root, step, accelerator=accelerator, ema=m.ema, stage=stage,
                        hyperparameters=run.hp.record, keep=config.keep_checkpoints)
        # the piece's time so far: what a later piece counts if this one is killed
        run.write_log({"event": "checkpoint", "stage": stage.name, "step": step,
                       "seconds": round(time.monotonic() - run.t_start, 2), "time": time.time()})

    from tqdm.auto import tqdm

    interactive = sys.stderr.isatty()
    # Redirected to a file, a bar redrawn 10x a second floods it: redraw every 30 s there, and log
    # each record as a line instead.
    bar = tqdm(total=config.steps, initial=start_step, desc=f"train {stage.name}", unit="step",
               disable=not (run.main and config.progress), dynamic_ncols=True,
               mininterval=0.1 if interactive else 30.0)
    log_lines = not (config.progress and interactive)
    history: list[dict] = []
    window = _Window()
    step = start_step
    stopped_early = False
    last_saved = start_step if resumed else -1
    fork_devices = [run.device.index or 0] if run.device.type == "cuda" else []
    with torch.random.fork_rng(devices=fork_devices):
        while step < config.steps:
            if config.max_steps is not None and step >= config.max_steps:
                stopped_early = True  # resumed at the budget already: nothing to do
                break
            current_lr = _train_step(run, pipe, m, batches, step, window)
            step += 1
            bar.update(1)
            if step % config.log_every == 0 or step == config.steps:
                history.append(_log_window(run, window, step, current_lr, order, log_lines=log_lines))
                bar.set_postfix(loss=f"{history[-1]['loss']:.4f}", lr=f"{current_lr:.2e}")
            if config.checkpoint_every and step % config.checkpoint_every == 0 and step < config.steps:
                checkpoint(step)
                last_saved = step
            spent = _budget_spent(run, step)
            if spent:
                stopped_early = True
                logger.warning("stage %s: %s budget spent at step %d of %d; checkpointing (run again to "
                               "continue)", stage.name, spent, step, config.steps)
                if last_saved != step:
                    checkpoint(step)
                break
    bar.close()
    return step, stopped_early, history


# ----------------------------------------------------------------------------- phase: finish
def _finish(run: _Run, pipe: RCGPipeline, m: _Modules, source: ImageSource, step: int, completed: bool,
            history: list[dict], metadata: dict | None) -> float:
    """The trained module back into the pipeline, written to ``out_dir`` with its training record;
    a finished stage marked done (its checkpoints removed unless kept). Returns the seconds spent."""
    stage, config, accelerator = run.stage, run.config, run.accelerator
    stage.finish(pipe, m.inner, m.ema)
    for n, p in pipe.named_parameters():
        p.requires_grad_(m.requires_grad.get(n, True))
    pipe.eval()
    seconds = time.monotonic() - run.t_start
    wall = round(seconds + _earlier_pieces_seconds(run.out_dir / LOG_NAME, stage.name), 1)
    record = {"stage": stage.name, "steps": step, "total_steps": config.steps, "completed": completed,
              "effective_batch": run.hp.effective_batch, "lr": run.hp.lr, "seed": config.seed, "data": source.name,
              # the stage's options (crops, flips, MAGE's training options such as rep_crop)
              "options": run.hp.record["options"],
              "num_images": len(source), "final_loss": history[-1]["loss"] if history else None,
              # CPU kernels split their sums by thread count: the same seed on another thread
              # count (or torch build) gives other bytes, so a reproduction needs both
              "torch_threads": torch.get_num_threads(), "torch": torch.__version__, "device": str(run.device),
              "seconds": wall,  # this piece and the stopped pieces it resumed
              **({"run_name": config.run_name} if config.run_name else {}), **(metadata or {})}
    accelerator.wait_for_everyone()
    if run.main:
        records = list(pipe.config.metadata.get("training", [])) + [jsonable(record)]
        pipe.save_pretrained(run.out_dir, metadata={"training": records})
        run.write_log({"event": "end", "stage": stage.name, "step": step, "completed": completed,
                       "seconds": round(seconds, 2), "time": time.time()})
        if completed:
            run.done_path.parent.mkdir(parents=True, exist_ok=True)
            run.done_path.write_text(json.dumps({"step": step, "settings": run.hp.record}, indent=1))
            if not config.keep_finished_checkpoints:
                for path in [*list_checkpoints(run.ckpt_root), run.ckpt_root / BASE_DIR]:
                    shutil.rmtree(path, ignore_errors=True)
        logger.info("stage %s: %s at step %d/%d in %.1fs; pipeline written to %s", stage.name,
                    "finished" if completed else "stopped", step, config.steps, seconds, run.out_dir)
    accelerator.wait_for_everyone()
    accelerator.free_memory()
    return seconds


def run_training(
    stage: Stage, pipe: RCGPipeline, source: ImageSource, out_dir: str | Path, config: TrainConfig, *,
    metadata: dict | None = None,
) -> TrainResult:
    """Train ``stage``'s module of ``pipe`` on ``source``; write the pipeline to ``out_dir``.

    ``pipe`` is trained in place (and returned in the result); the output folder then holds
    ``config.json`` + ``model.safetensors`` (loadable with ``RCGPipeline.from_pretrained``),
    ``log.jsonl`` and ``checkpoints/<stage>/``. ``metadata`` is added to the training record
    kept in the pipeline's ``config.metadata["training"]``.

    The phases: set-up (accelerator, hyperparameters), resume (a finished stage is skipped; the
    newest checkpoint, if any, is where the run continues), the modules, the step loop (logs,
    checkpoints, budgets), and finish (the pipeline written, the stage marked done).
    """
    accelerator = make_accelerator(config.mixed_precision)
    t_start = time.monotonic()
    hp = resolve_hyperparameters(stage, pipe, source, config, accelerator.num_processes)
    run = _Run(stage, config, Path(out_dir), accelerator, hp, t_start)

    finished = _finished_result(run)
    if finished is not None:
        return finished
    pipe, latest = _starting_point(run, pipe)
    modules = _prepare_modules(run, pipe)
    start_step = 0
    if latest is not None:
        start_step = load_training_checkpoint(latest, accelerator=accelerator, ema=modules.ema, stage=stage,
                                              device=run.device)
        logger.info("resuming stage %s from %s (step %d of %d)", stage.name, latest, start_step, config.steps)

    step, stopped_early, history = _train_steps(run, pipe, modules, source, start_step, resumed=latest is not None)
    completed = not stopped_early
    seconds = _finish(run, pipe, modules, source, step, completed, history, metadata)
    return TrainResult(stage.name, run.out_dir, pipe, step, config.steps, completed,
                       resumed_from=start_step if latest else None, seconds=seconds, history=history)


# Also the names this module exported before its parts moved out (imports of them keep working).
__all__ = [
    "BatchOrder", "Hyperparameters", "ImageTensors", "StepContext", "Stage", "TrainConfig", "TrainResult",
    "check_checkpoint_dir", "derive_seed", "ema_update", "lr_at", "make_accelerator", "resolve_hyperparameters",
    "resolve_lr", "run_training",
]
