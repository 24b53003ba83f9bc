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
from pathlib import Path

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
    list_checkpoints,
    load_checkpoint,
    read_state,
    save_checkpoint,
    settings_mismatch,
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


def run_training(
    stage: Stage, pipe: RCGPipeline, source: ImageSource, out_dir: str | Path, config: TrainConfig, *,
    metadata: dict | None = None,
) -> TrainResult:
    """Train ``stage``'s module of ``pipe`` on ``source``; write the pipeline to ``out_dir``.

    ``pipe`` is trained in place (and returned in the result); the output folder then holds
    ``config.json`` + ``model.safetensors`` (loadable with ``RCGPipeline.from_pretrained``),
    ``log.jsonl`` and ``checkpoints/<stage>/``. ``metadata`` is added to the training record
    kept in the pipeline's ``config.metadata["training"]``.
    """
    out_dir = Path(out_dir)
    accelerator = make_accelerator(config.mixed_precision)
    main = accelerator.is_main_process
    device = accelerator.device
    nproc, rank = accelerator.num_processes, accelerator.process_index
    ckpt_root = out_dir / CHECKPOINTS_DIR / (config.run_name or stage.name)
    t_start = time.monotonic()

    effective_batch = config.batch_size * config.grad_accum * nproc
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
    settings = jsonable({
        "stage": stage.name, "options": stage.options(), "steps": config.steps, "batch_size": config.batch_size,
        "grad_accum": config.grad_accum, "num_processes": nproc, "lr": lr, "min_lr": config.min_lr,
        "warmup_steps": warmup, "lr_schedule": schedule, "weight_decay": weight_decay, "betas": betas,
        "max_grad_norm": max_grad_norm, "ema_decay": ema_decay, "seed": config.seed,
        "num_images": len(source), "image_size": size, "in_channels": channels,
    })

    # ---- resume bookkeeping (every process reads the same files)
    done_path = ckpt_root / DONE_NAME
    if not config.resume:
        accelerator.wait_for_everyone()
        if main and ckpt_root.exists():
            shutil.rmtree(ckpt_root)
        accelerator.wait_for_everyone()
    elif done_path.is_file():
        done = read_state(done_path)
        diff = settings_mismatch(done.get("settings", {}), settings)
        if diff:
            raise ValueError(
                f"{out_dir}: stage '{stage.name}' already finished there with other settings ({'; '.join(diff)}); "
                "use another output folder, or resume=False (--no-resume) to train it again"
            )
        if not (out_dir / CONFIG_NAME).is_file():
            raise ValueError(f"{out_dir}: {done_path} says '{stage.name}' finished but the pipeline is missing; "
                             "use resume=False (--no-resume) to train it again")
        logger.info("stage %s already finished in %s; skipping (resume=False trains it again)", stage.name, out_dir)
        return TrainResult(stage.name, out_dir, RCGPipeline.from_pretrained(out_dir), config.steps, config.steps,
                           completed=True, skipped=True)
    latest = list_checkpoints(ckpt_root)[-1] if config.resume and ckpt_root.is_dir() and list_checkpoints(ckpt_root) else None
    start_step = 0
    if latest is not None:
        saved = read_state(latest / STATE_NAME)
        diff = settings_mismatch(saved.get("settings", {}), settings)
        if diff:
            raise ValueError(
                f"cannot resume {latest}: it was written with other settings ({'; '.join(diff)}); use the same "
                "settings, another output folder, or resume=False (--no-resume) to start over"
            )
        check_checkpoint_dir(latest)
        pipe = RCGPipeline.from_pretrained(ckpt_root / BASE_DIR)  # the exact starting point
    else:
        if main:
            pipe.save_pretrained(ckpt_root / BASE_DIR)
        accelerator.wait_for_everyone()

    # ---- modules: everything frozen and in eval mode except the stage's module
    flags = {n: p.requires_grad for n, p in pipe.named_parameters()}
    pipe.to(device)
    pipe.eval()
    pipe.requires_grad_(False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(config.seed, stage.name, "init"))
        inner = stage.build(pipe).to(device)
    inner.train()
    holder = _Holder(inner)
    ema = None
    if ema_decay is not None:
        ema = copy.deepcopy(stage.ema_source(inner)).requires_grad_(False).float()
        ema.train(stage.ema_train_mode)
    optimizer = torch.optim.AdamW(param_groups(holder, weight_decay), lr=lr, betas=betas)
    model, optimizer = accelerator.prepare(holder, optimizer)
    trainable = [p for p in holder.parameters() if p.requires_grad]

    if latest is not None:
        start_step = load_checkpoint(latest, accelerator=accelerator, ema=ema, stage=stage, device=device)
        logger.info("resuming stage %s from %s (step %d of %d)", stage.name, latest, start_step, config.steps)

    order = BatchOrder(len(source), config.batch_size, nproc, rank, config.seed)
    data = ImageTensors(source, size, channels)
    batches = image_batches(data, order, start_step * config.grad_accum, config.num_workers,
                       show=main and config.progress)

    if main:
        out_dir.mkdir(parents=True, exist_ok=True)
        logger.info(
            "training %s: %d steps, effective batch %d (%d x %d accum x %d proc), lr %.3g, %d images of %dpx, "
            "device %s, precision %s", stage.name, config.steps, effective_batch, config.batch_size,
            config.grad_accum, nproc, lr, len(source), size, device, accelerator.mixed_precision)
    log_path = out_dir / LOG_NAME

    def write_log(record: dict) -> None:
        if main:
            with log_path.open("a") as f:
                f.write(json.dumps(record) + "\n")

    write_log({"event": "resume" if latest is not None else "start", "stage": stage.name, "step": start_step,
               "settings": settings, "time": time.time()})

    def checkpoint(step: int) -> None:
        save_checkpoint(ckpt_root, step, accelerator=accelerator, ema=ema, stage=stage, settings=settings,
                        keep=config.keep_checkpoints)

    from tqdm.auto import tqdm

    interactive = sys.stderr.isatty()
    # Redirected to a file, a bar redrawn 10x a second floods it: redraw every 30 s there, and log
    # each record as a line instead.
    bar = tqdm(total=config.steps, initial=start_step, desc=f"train {stage.name}", unit="step",
               disable=not (main and config.progress), dynamic_ncols=True,
               mininterval=0.1 if interactive else 30.0)
    log_lines = not (config.progress and interactive)
    history: list[dict] = []
    window: dict[str, float] = {}
    counts: dict[str, float] = {}

    def add(key: str, value: float, weight: float = 1.0) -> None:
        window[key] = window.get(key, 0.0) + value
        counts[key] = counts.get(key, 0.0) + weight
    window_steps, window_t0 = 0, time.monotonic()
    step = start_step
    stopped_early = False
    last_saved = start_step if latest is not None else -1
    fork_devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=fork_devices):
        while step < config.steps:
            if config.max_steps is not None and step >= config.max_steps:
                stopped_early = True  # resumed at the budget already: nothing to do
                break
            current_lr = lr_at(step, lr=lr, steps=config.steps, warmup=warmup, schedule=schedule,
                               min_lr=config.min_lr)
            for group in optimizer.param_groups:
                group["lr"] = current_lr
            ctx = None
            for micro in range(config.grad_accum):
                images = next(batches).to(device, non_blocking=True)
                generator = torch.Generator().manual_seed(derive_seed(config.seed, stage.name, step, micro, rank))
                # Dropout and other global-RNG draws: seeded per step so a resumed run matches.
                torch.manual_seed(derive_seed(config.seed, stage.name, "global", step, micro, rank))
                ctx = StepContext(step, config.steps, micro, generator, accelerator, pipe, inner, ema, optimizer,
                                  config.seed)
                last = micro == config.grad_accum - 1
                with contextlib.nullcontext() if last else accelerator.no_sync(model):
                    with accelerator.autocast():
                        loss, metrics = stage.loss(model, images, ctx)
                    accelerator.backward(loss / config.grad_accum)
                add("loss", float(loss.detach()) / config.grad_accum, 1 / config.grad_accum)
                for k, v in metrics.items():
                    add(k, float(v) / config.grad_accum, 1 / config.grad_accum)
            grad_norm = accelerator.clip_grad_norm_(trainable, max_grad_norm if max_grad_norm > 0 else float("inf"))
            grad_norm = float(grad_norm)
            if not math.isfinite(grad_norm):
                raise RuntimeError(
                    f"stage {stage.name}: the gradient became non-finite at step {step} (loss {float(loss):.4g}); "
                    f"lower the learning rate (now {current_lr:.3g}; --blr/--lr) or clip (--max-grad-norm)"
                )
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if ema is not None:
                decay = stage.ema_decay_at(ema_decay, step + 1, config.steps)
                ema_update(ema, stage.ema_source(inner), decay, copy_buffers=not stage.ema_train_mode)
            for k, v in stage.after_step(ctx).items():
                add(k, float(v))
            add("grad_norm", grad_norm)
            step += 1
            window_steps += 1
            bar.update(1)

            if step % config.log_every == 0 or step == config.steps:
                keys = sorted(window)
                # each metric averaged over the steps that reported it (some report only now and then)
                values = torch.tensor([window[k] / counts[k] for k in keys], device=device, dtype=torch.float64)
                if nproc > 1:
                    values = accelerator.reduce(values, reduction="mean")
                elapsed = time.monotonic() - window_t0
                record = {"stage": stage.name, "step": step, "lr": current_lr,
                          "epoch": round(order.epoch_of(step * config.grad_accum), 4),
                          "images_per_s": round(window_steps * effective_batch / max(elapsed, 1e-9), 2),
                          "s_per_step": round(elapsed / window_steps, 4),
                          **{k: float(v) for k, v in zip(keys, values.tolist(), strict=True)}}
                history.append(record)
                write_log(record)
                bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{current_lr:.2e}")
                if main:
                    logger.log(logging.INFO if log_lines else logging.DEBUG,
                               "%s step %d/%d: loss %.4f, lr %.3g, %.1f images/s", stage.name, step, config.steps,
                               record["loss"], current_lr, record["images_per_s"])
                window.clear()
                counts.clear()
                window_steps, window_t0 = 0, time.monotonic()

            if config.checkpoint_every and step % config.checkpoint_every == 0 and step < config.steps:
                checkpoint(step)
                last_saved = step
            if step < config.steps and (config.max_time is not None or config.max_steps is not None):
                over_time = config.max_time is not None and time.monotonic() - t_start > config.max_time
                if nproc > 1 and config.max_time is not None:  # processes must agree on stopping
                    flag = accelerator.reduce(torch.tensor(float(over_time), device=device), reduction="sum")
                    over_time = float(flag) > 0
                over_steps = config.max_steps is not None and step >= config.max_steps
                if over_time or over_steps:
                    stopped_early = True
                    logger.warning("stage %s: %s budget spent at step %d of %d; checkpointing (run again to "
                                   "continue)", stage.name, "wall-time" if over_time else "step", step, config.steps)
                    if last_saved != step:
                        checkpoint(step)
                    break
    bar.close()

    # ---- write the pipeline
    stage.finish(pipe, inner, ema)
    for n, p in pipe.named_parameters():
        p.requires_grad_(flags.get(n, True))
    pipe.eval()
    completed = not stopped_early
    seconds = time.monotonic() - t_start
    record = {"stage": stage.name, "steps": step, "total_steps": config.steps, "completed": completed,
              "effective_batch": effective_batch, "lr": lr, "seed": config.seed, "data": source.name,
              # the stage's options (crops, flips, MAGE's training options such as rep_crop)
              "options": settings["options"],
              "num_images": len(source), "final_loss": history[-1]["loss"] if history else None,
              # CPU kernels split their sums by thread count: the same seed on another thread
              # count (or torch build) gives other bytes, so a reproduction needs both
              "torch_threads": torch.get_num_threads(), "torch": torch.__version__, "device": str(device),
              **({"run_name": config.run_name} if config.run_name else {}), **(metadata or {})}
    accelerator.wait_for_everyone()
    if main:
        records = list(pipe.config.metadata.get("training", [])) + [jsonable(record)]
        pipe.save_pretrained(out_dir, metadata={"training": records})
        write_log({"event": "end", "stage": stage.name, "step": step, "completed": completed,
                   "seconds": round(seconds, 2), "time": time.time()})
        if completed:
            done_path.parent.mkdir(parents=True, exist_ok=True)
            done_path.write_text(json.dumps({"step": step, "settings": settings}, indent=1))
            if not config.keep_finished_checkpoints:
                for path in [*list_checkpoints(ckpt_root), ckpt_root / BASE_DIR]:
                    shutil.rmtree(path, ignore_errors=True)
        logger.info("stage %s: %s at step %d/%d in %.1fs; pipeline written to %s", stage.name,
                    "finished" if completed else "stopped", step, config.steps, seconds, out_dir)
    accelerator.wait_for_everyone()
    accelerator.free_memory()
    return TrainResult(stage.name, out_dir, pipe, step, config.steps, completed, resumed_from=start_step if latest
                       else None, seconds=seconds, history=history)


# Also the names this module exported before its parts moved out (imports of them keep working).
__all__ = [
    "BatchOrder", "ImageTensors", "StepContext", "Stage", "TrainConfig", "TrainResult", "check_checkpoint_dir",
    "derive_seed", "ema_update", "lr_at", "make_accelerator", "resolve_lr", "run_training",
]
