"""One accelerate training loop shared by every RCG stage.

A :class:`Stage` contributes only what is particular to it: which module trains (the rest of the
pipeline is frozen and in eval mode), how a batch of images becomes a loss, whether an EMA copy
is kept (and how its decay moves), and its optimizer defaults. :func:`run_training` does the
rest: the :class:`accelerate.Accelerator` (one CPU process, or ``accelerate launch`` with many
processes/GPUs; bf16 autocast on GPU, float32 on CPU), gradient accumulation, clipping, AdamW
with linear warm-up + cosine decay and the official linear scaling rule, EMA, checkpoints that
resume exactly, ``log.jsonl`` + ``logging``, a tqdm bar, and step / wall-time budgets.

Exact resume: the data order is a pure function of (seed, micro-batch index) -- one permutation
per epoch, each process taking its slice of every global batch -- and every random draw of a
step (augmentation, noise, masks, dropout) comes from generators seeded by (seed, stage, step,
micro-batch, process). A run stopped at step k and resumed therefore reproduces the
uninterrupted run's losses (bit for bit on CPU).

Checkpoint safety: model weights and the EMA are safetensors; the optimizer and RNG files are
read by accelerate with ``torch.load(weights_only=True)``; objects registered with
``register_for_checkpointing`` (which accelerate unpickles with ``weights_only=False``) are never
used, and a checkpoint folder holding any file outside the expected set is refused.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import json
import logging
import math
import re
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ..data.sources import ImageSource, pil_to_tensor
from ..pipeline import CONFIG_NAME, RCGPipeline

logger = logging.getLogger(__name__)

LOG_NAME = "log.jsonl"
CHECKPOINTS_DIR = "checkpoints"
BASE_DIR = "base"
STATE_NAME = "trainer_state.json"
EMA_NAME = "ema.safetensors"
STAGE_STATE_NAME = "stage_state.safetensors"
DONE_NAME = "done.json"
PRELOAD_LIMIT_BYTES = 1 << 30
# Files accelerate's save_state writes for one model + one optimizer without a scheduler,
# dataloader or custom object, plus ours. Anything else in a checkpoint folder is refused.
_CHECKPOINT_FILES = re.compile(
    r"^(model(_\d+)?\.safetensors|optimizer(_\d+)?\.bin|random_states_\d+\.pkl|scaler\.pt|"
    + "|".join(re.escape(n) for n in (EMA_NAME, STAGE_STATE_NAME, STATE_NAME)) + r")$"
)
_NO_WEIGHT_DECAY = ("pos_embed", "position_embeddings", "cls_token", "fake_latent", "mask_token")


# ----------------------------------------------------------------------------- configuration
@dataclass
class TrainConfig:
    """Loop settings shared by every stage. ``None`` means "the stage's default".

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
        weight_decay, betas: AdamW settings (no decay on biases, norms and position embeddings).
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
    options (augmentation, loss settings); they override :meth:`build`, :meth:`loss` and,
    where needed, :meth:`finish`, :meth:`after_step`, :meth:`ema_decay_at`."""

    name: ClassVar[str] = "stage"
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
        return _jsonable(dataclasses.asdict(self)) if dataclasses.is_dataclass(self) else {}

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


# ----------------------------------------------------------------------------- helpers
def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def derive_seed(*parts) -> int:
    """A 63-bit seed from any parts (stable across processes and Python runs)."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def resolve_lr(stage: Stage, config: TrainConfig, effective_batch: int) -> float:
    """The absolute learning rate: ``lr`` if given, else the stage's scaling rule on ``blr``."""
    if config.lr is not None:
        return float(config.lr)
    blr = stage.default_blr if config.blr is None else config.blr
    return blr * effective_batch / (256.0 if stage.lr_scaling == "per256" else 1.0)


def lr_at(step: int, *, lr: float, steps: int, warmup: int, schedule: str, min_lr: float = 0.0) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay to ``min_lr`` (or constant)."""
    if step < warmup:
        return lr * (step + 1) / warmup
    if schedule == "constant" or steps <= warmup:
        return lr
    progress = (step - warmup) / max(1, steps - warmup)
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


class BatchOrder:
    """Which images each process reads for each micro-batch, as a pure function of the seed.

    The stream is one seeded permutation per epoch, concatenated; global micro-batch ``b`` is
    positions ``[b * G, (b + 1) * G)`` of it (G = batch_size * num_processes, so a batch may
    span two epochs and datasets smaller than a batch still work), and process ``r`` takes
    slice ``r`` of it.
    """

    def __init__(self, num_items: int, batch_size: int, num_processes: int, process_index: int, seed: int):
        if num_items < 1:
            raise ValueError("the training data is empty")
        self.n, self.batch_size, self.seed = num_items, batch_size, seed
        self.num_processes, self.process_index = num_processes, process_index
        self._cache: dict[int, torch.Tensor] = {}

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.num_processes

    def permutation(self, epoch: int) -> torch.Tensor:
        if epoch not in self._cache:
            if len(self._cache) > 4:
                self._cache.clear()
            g = torch.Generator().manual_seed(derive_seed(self.seed, "data-order", epoch))
            self._cache[epoch] = torch.randperm(self.n, generator=g)
        return self._cache[epoch]

    def epoch_of(self, batch: int) -> float:
        return batch * self.global_batch / self.n

    def indices(self, batch: int) -> list[int]:
        start = batch * self.global_batch + self.process_index * self.batch_size
        out: list[torch.Tensor] = []
        pos, need = start, self.batch_size
        while need:
            epoch, offset = divmod(pos, self.n)
            take = min(self.n - offset, need)
            out.append(self.permutation(epoch)[offset: offset + take])
            pos, need = pos + take, need - take
        return torch.cat(out).tolist()

    def __call__(self, start: int) -> Iterator[list[int]]:
        batch = start
        while True:
            yield self.indices(batch)
            batch += 1


class _BatchSampler:
    """Infinite batch sampler over a :class:`BatchOrder`, for a DataLoader with workers."""

    def __init__(self, order: BatchOrder, start: int):
        self.order, self.start = order, start

    def __iter__(self):
        return self.order(self.start)


class ImageTensors(Dataset):
    """An :class:`ImageSource` as (C, size, size) float tensors in [0, 1]."""

    def __init__(self, source: ImageSource, size: int, channels: int):
        self.source, self.size, self.channels = source, size, channels

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> torch.Tensor:
        return pil_to_tensor(self.source.load(index), self.size, self.channels)


def _batches(data: ImageTensors, order: BatchOrder, start: int, num_workers: int, show: bool) -> Iterator[torch.Tensor]:
    nbytes = len(data) * data.channels * data.size**2 * 4
    if nbytes <= PRELOAD_LIMIT_BYTES:
        from tqdm.auto import tqdm

        images = torch.stack([data[i] for i in tqdm(range(len(data)), desc="loading images", disable=not show,
                                                    leave=False)])
        return (images[idx] for idx in order(start))
    loader = DataLoader(data, batch_sampler=_BatchSampler(order, start), num_workers=num_workers,
                        collate_fn=torch.stack, persistent_workers=num_workers > 0)
    return iter(loader)


class _Holder(nn.Module):
    """Carries the stage's module so accelerate's wrappers never patch the pipeline's own modules."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        skip = p.ndim <= 1 or name.endswith(".bias") or any(k in name for k in _NO_WEIGHT_DECAY)
        (no_decay if skip else decay).append(p)
    if not decay and not no_decay:
        raise ValueError("the stage's module has no trainable parameters")
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, decay: float, *, copy_buffers: bool) -> None:
    """``ema = decay * ema + (1 - decay) * model`` for parameters; buffers copied if asked."""
    params = dict(model.named_parameters())
    for name, e in ema.named_parameters():
        e.lerp_(params[name].detach().to(e.dtype), 1.0 - decay)
    if copy_buffers:
        buffers = dict(model.named_buffers())
        for name, b in ema.named_buffers():
            b.copy_(buffers[name])


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


def _checkpoints(root: Path) -> list[Path]:
    found = [p for p in root.glob("step_*") if p.is_dir() and (p / STATE_NAME).is_file()]
    return sorted(found, key=lambda p: int(p.name.split("_")[1]))


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: unreadable trainer state ({err})") from err


def _settings_mismatch(saved: dict, current: dict) -> list[str]:
    keys = sorted(set(saved) | set(current))
    return [f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in keys if saved.get(k) != current.get(k)]


# ----------------------------------------------------------------------------- the loop
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
    settings = _jsonable({
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
        done = _read_json(done_path)
        diff = _settings_mismatch(done.get("settings", {}), settings)
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
    latest = _checkpoints(ckpt_root)[-1] if config.resume and ckpt_root.is_dir() and _checkpoints(ckpt_root) else None
    start_step = 0
    if latest is not None:
        saved = _read_json(latest / STATE_NAME)
        diff = _settings_mismatch(saved.get("settings", {}), settings)
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
    optimizer = torch.optim.AdamW(_param_groups(holder, weight_decay), lr=lr, betas=betas)
    model, optimizer = accelerator.prepare(holder, optimizer)
    trainable = [p for p in holder.parameters() if p.requires_grad]

    if latest is not None:
        accelerator.load_state(str(latest), load_kwargs={"weights_only": True})
        if ema is not None:
            ema.load_state_dict(load_file(str(latest / EMA_NAME)))  # copied onto ema's device
        if (latest / STAGE_STATE_NAME).is_file():
            state = load_file(str(latest / STAGE_STATE_NAME))
            stage.load_state_dict({k: v.to(device) for k, v in state.items()})
        start_step = int(_read_json(latest / STATE_NAME)["step"])
        logger.info("resuming stage %s from %s (step %d of %d)", stage.name, latest, start_step, config.steps)

    order = BatchOrder(len(source), config.batch_size, nproc, rank, config.seed)
    data = ImageTensors(source, size, channels)
    batches = _batches(data, order, start_step * config.grad_accum, config.num_workers,
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

    def save_checkpoint(step: int) -> None:
        path = ckpt_root / f"step_{step:08d}"
        accelerator.wait_for_everyone()
        accelerator.save_state(str(path), safe_serialization=True)
        if main:
            if ema is not None:
                save_file({k: v.detach().contiguous().cpu() for k, v in ema.state_dict().items()}, str(path / EMA_NAME))
            stage_state = stage.state_dict()
            if stage_state:
                save_file({k: v.detach().contiguous().cpu() for k, v in stage_state.items()},
                          str(path / STAGE_STATE_NAME))
            (path / STATE_NAME).write_text(json.dumps({"step": step, "settings": settings}, indent=1))
            for old in _checkpoints(ckpt_root)[: -config.keep_checkpoints]:
                shutil.rmtree(old, ignore_errors=True)
        accelerator.wait_for_everyone()

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
                save_checkpoint(step)
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
                        save_checkpoint(step)
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
              "num_images": len(source), "final_loss": history[-1]["loss"] if history else None,
              # CPU kernels split their sums by thread count: the same seed on another thread
              # count (or torch build) gives other bytes, so a reproduction needs both
              "torch_threads": torch.get_num_threads(), "torch": torch.__version__, "device": str(device),
              **({"run_name": config.run_name} if config.run_name else {}), **(metadata or {})}
    accelerator.wait_for_everyone()
    if main:
        records = list(pipe.config.metadata.get("training", [])) + [_jsonable(record)]
        pipe.save_pretrained(out_dir, metadata={"training": records})
        write_log({"event": "end", "stage": stage.name, "step": step, "completed": completed,
                   "seconds": round(seconds, 2), "time": time.time()})
        if completed:
            done_path.parent.mkdir(parents=True, exist_ok=True)
            done_path.write_text(json.dumps({"step": step, "settings": settings}, indent=1))
            if not config.keep_finished_checkpoints:
                for path in [*_checkpoints(ckpt_root), ckpt_root / BASE_DIR]:
                    shutil.rmtree(path, ignore_errors=True)
        logger.info("stage %s: %s at step %d/%d in %.1fs; pipeline written to %s", stage.name,
                    "finished" if completed else "stopped", step, config.steps, seconds, out_dir)
    accelerator.wait_for_everyone()
    accelerator.free_memory()
    return TrainResult(stage.name, out_dir, pipe, step, config.steps, completed, resumed_from=start_step if latest
                       else None, seconds=seconds, history=history)


__all__ = [
    "BatchOrder", "ImageTensors", "StepContext", "Stage", "TrainConfig", "TrainResult", "check_checkpoint_dir",
    "derive_seed", "ema_update", "lr_at", "make_accelerator", "resolve_lr", "run_training",
]
