"""``rcg-augment train``: train one stage of the RCG stack, or all of them, into a pipeline folder."""

from __future__ import annotations

import argparse
import json
import re

from ..presets import PIPELINE_PRESETS
from ..training.registry import RECIPES, STAGE_REGISTRY, STAGES, get_recipe

STAGE_CHOICES = (*STAGES, "all")

EPILOG = """\
stages (trained in this order by `all`):
""" + "".join(f"  {e.name:10s} {e.description}\n" for e in STAGE_REGISTRY.values()) + """
The output folder loads with RCGPipeline.from_pretrained(OUT). Without --init, a stage continues
the pipeline already in OUT, else starts from --preset. A killed run continues where it stopped
when started again with the same arguments (checkpoints in OUT/checkpoints/<stage>/;
--no-resume starts over). Progress is logged to OUT/log.jsonl.

examples:
  rcg-augment train all --recipe digits-tiny --out runs/digits-tiny
  rcg-augment train all --recipe digits-tiny --out runs/quick --steps-scale 0.05
  rcg-augment train mage --recipe digits-tiny --init digits-tiny --continuation 3 --out runs/c3
  rcg-augment train tokenizer --data path/to/images --out runs/mine --steps 2000 --batch-size 32
  rcg-augment train rdm --data digits --out runs/mine --set hflip=false --blr 1e-5
  accelerate launch --multi_gpu --num_processes 2 -m rcg_augment train mage --data DIR --out OUT

Several processes: `accelerate launch --multi_gpu --num_processes N -m rcg_augment train ...`
(GPUs: one process each, bf16; a CPU-only machine: N gloo CPU processes -- accelerate's own
`--cpu --num_processes N` starts a single process unless MPI is installed). --batch-size is per
process; the learning rate follows the effective batch (batch size x grad accum x processes).
"""


def parse_duration(text: str) -> float:
    """'90' (seconds), '45m', '1.5h', '30s' -> seconds."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([smh]?)\s*", str(text))
    if not m:
        raise argparse.ArgumentTypeError(f"expected a duration like 600, 45m or 1.5h, got {text!r}")
    value = float(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600}[m.group(2)]
    if value <= 0:
        raise argparse.ArgumentTypeError(f"a duration must be > 0, got {text!r}")
    return value


def _setting(text: str) -> tuple[str | None, str, object]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE or STAGE.KEY=VALUE, got {text!r}")
    key, raw = text.split("=", 1)
    stage, _, name = key.strip().rpartition(".")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return (stage or None), name, value


def add_training_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags shared by ``train`` and ``finetune``."""
    data = parser.add_argument_group("data and output")
    data.add_argument("--data", metavar="SPEC",
                      help="training images: an image folder (root/<class>/<img> or flat), a dataset folder "
                           "datasets.load_dataset reads (parquet, csv, jsonl, imagefolder splits) or save_to_disk "
                           "wrote, a Hugging Face Hub dataset id, 'digits', 'lfw-faces' or 'fashion-mnist' (default: the recipe's)")
    data.add_argument("--split", metavar="NAME", help="dataset split of --data (default: train, or the only split)")
    data.add_argument("--image-column", metavar="COL", help="dataset column of --data holding the images")
    data.add_argument("--label-column", metavar="COL", help="dataset column of --data holding the labels")
    data.add_argument("--classes", metavar="A,B", help="train on these classes of the data only (comma-separated)")
    data.add_argument("--out", required=True, metavar="DIR", help="output pipeline folder")
    data.add_argument("--recipe", metavar="NAME",
                      help=f"named recipe with data and per-stage settings: {', '.join(RECIPES)} "
                           "(other flags override it)")
    data.add_argument("--steps-scale", type=float, default=1.0, metavar="F",
                      help="multiply the recipe's step counts by F (e.g. 0.05 for a quick trial)")

    opt = parser.add_argument_group("optimisation (default: the stage's or the recipe's)")
    opt.add_argument("--steps", type=int, metavar="N", help="optimizer steps per stage (the LR schedule's length)")
    opt.add_argument("--batch-size", type=int, metavar="B", help="images per process per micro-batch")
    opt.add_argument("--grad-accum", type=int, metavar="K", help="micro-batches per optimizer step")
    opt.add_argument("--lr", type=float, help="absolute learning rate (overrides --blr)")
    opt.add_argument("--blr", type=float,
                     help="base learning rate: lr = blr * effective batch / 256 (rdm: blr * effective batch)")
    opt.add_argument("--min-lr", type=float, help="floor of the cosine decay")
    opt.add_argument("--warmup-steps", type=int, metavar="N", help="linear LR warm-up steps")
    opt.add_argument("--lr-schedule", choices=("cosine", "constant"), help="LR after warm-up")
    opt.add_argument("--weight-decay", type=float, help="AdamW weight decay")
    opt.add_argument("--max-grad-norm", type=float, help="clip the gradient norm (0: off)")
    opt.add_argument("--ema-decay", type=float,
                     help="EMA decay (rdm, mage: 0.9999; encoder: the MoCo momentum 0.99)")
    opt.add_argument("--seed", type=int, help="seed of the data order and every random draw")
    opt.add_argument("--set", dest="settings", action="append", default=[], type=_setting, metavar="[STAGE.]KEY=VALUE",
                     help="a stage option, JSON value, e.g. hflip=false, encoder.crop_scale=[0.35,1], "
                          "tokenizer.recon_loss=mse (repeatable)")

    run = parser.add_argument_group("run control")
    run.add_argument("--max-time", type=parse_duration, metavar="T",
                     help="wall-clock budget of the whole command (600, 45m, 1.5h); checkpoints and stops")
    run.add_argument("--max-steps", type=int, metavar="N", help="stop (with a checkpoint) at step N of each stage")
    run.add_argument("--checkpoint-every", type=int, metavar="N", help="checkpoint every N steps")
    run.add_argument("--log-every", type=int, metavar="N", help="log.jsonl record every N steps")
    run.add_argument("--num-workers", type=int, metavar="N", help="DataLoader workers for large on-disk data")
    run.add_argument("--mixed-precision", choices=("auto", "no", "bf16"), help="auto: bf16 on GPU, float32 on CPU")
    run.add_argument("--no-resume", action="store_true", help="discard checkpoints in OUT and start over")
    run.add_argument("--keep-checkpoints", action="store_true", help="keep a stage's checkpoints after it finishes")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")


_FLAG_TO_SETTING = {
    "steps": "steps", "batch_size": "batch_size", "grad_accum": "grad_accum", "lr": "lr", "blr": "blr",
    "min_lr": "min_lr", "warmup_steps": "warmup_steps", "lr_schedule": "lr_schedule", "weight_decay": "weight_decay",
    "max_grad_norm": "max_grad_norm", "ema_decay": "ema_decay", "seed": "seed", "max_steps": "max_steps",
    "checkpoint_every": "checkpoint_every", "log_every": "log_every", "num_workers": "num_workers",
    "mixed_precision": "mixed_precision",
}


def collect_settings(args: argparse.Namespace, stages: list[str]) -> tuple[dict, dict]:
    """(settings for every stage, per-stage settings) from the parsed flags."""
    common = {key: getattr(args, flag) for flag, key in _FLAG_TO_SETTING.items() if getattr(args, flag) is not None}
    if args.no_resume:
        common["resume"] = False
    if args.keep_checkpoints:
        common["keep_finished_checkpoints"] = True
    if args.no_progress:
        common["progress"] = False
    per_stage: dict[str, dict] = {}
    for stage, key, value in args.settings:
        if stage is None:
            common[key] = value
        elif stage not in stages:
            raise ValueError(f"--set {stage}.{key}: stage {stage!r} is not being trained ({', '.join(stages)})")
        else:
            per_stage.setdefault(stage, {})[key] = value
    return common, per_stage


def quiet_accelerate(args: argparse.Namespace) -> None:
    """accelerate logs every checkpoint file at INFO; keep that for --verbose."""
    import logging

    if not getattr(args, "verbose", False):
        logging.getLogger("accelerate").setLevel(logging.WARNING)


def print_summary(results: dict, out_dir) -> None:
    from accelerate import PartialState

    if not PartialState().is_main_process:
        return
    for name, r in results.items():
        if r.skipped:
            print(f"{name:9s} already finished in {out_dir} (skipped; --no-resume trains it again)")
            continue
        loss = f"{r.final_loss:.4f}" if r.final_loss is not None else "n/a"
        state = "done" if r.completed else "STOPPED (run the same command again to continue)"
        print(f"{name:9s} {state}: step {r.steps_done}/{r.total_steps}, final loss {loss}, {r.seconds:.0f}s")
    print(f"pipeline saved to {out_dir} (load with RCGPipeline.from_pretrained({str(out_dir)!r}))")


def training_data(args: argparse.Namespace):
    """``--data`` as given, or opened with ``--split``/``--image-column``/``--label-column``."""
    options = {"split": args.split, "image_column": args.image_column, "label_column": args.label_column}
    if all(v is None for v in options.values()):
        return args.data
    if args.data is None:
        raise ValueError("--split, --image-column and --label-column apply to --data; give --data too")
    from ..data import open_source

    return open_source(args.data, **options)


def run_stages(args: argparse.Namespace, stages: list[str], *, init) -> dict:
    """Train ``stages`` as the flags say (a recipe, or --data with explicit settings)."""
    from ..training import api

    common, per_stage = collect_settings(args, stages)
    data = training_data(args)
    classes = [c.strip() for c in args.classes.split(",") if c.strip()] if args.classes else None
    if args.recipe:
        if classes:
            raise ValueError("--classes cannot be combined with --recipe (the recipe names its data); drop one")
        return api.run_recipe(args.recipe, args.out, data=data, init=init, stages=stages,
                              steps_scale=args.steps_scale, per_stage=per_stage, max_time=args.max_time,
                              reinit=stages if getattr(args, "reinit", False) else (),
                              from_continuation=getattr(args, "continuation", None),
                              continuations=not getattr(args, "no_continuations", False), **common)
    if getattr(args, "continuation", None) is not None:
        raise ValueError("--continuation names a run of a recipe; add --recipe")
    if getattr(args, "no_continuations", False):
        raise ValueError("--no-continuations applies to a recipe; add --recipe")
    if data is None:
        raise ValueError("--data is required without --recipe (an image folder, a dataset folder, a Hub dataset "
                         "id, 'digits' or 'lfw-faces')")
    if args.steps_scale != 1.0:
        raise ValueError("--steps-scale scales a recipe's step counts; use --steps without --recipe")
    extra = {"preset": args.preset, "in_channels": args.in_channels} if hasattr(args, "preset") else {}
    return api.train_all(data, args.out, stages=stages, init=init, classes=classes, per_stage=per_stage,
                         max_time=args.max_time, reinit=stages if getattr(args, "reinit", False) else (),
                         **extra, **common)


def handle(args: argparse.Namespace) -> int:
    quiet_accelerate(args)
    if args.stage == "all":
        stages = list(get_recipe(args.recipe).stages) if args.recipe else list(STAGES)
    else:
        stages = [args.stage]
    if args.reinit and args.init is None:
        raise ValueError("--reinit needs --init (the pipeline whose other networks are kept)")
    results = run_stages(args, stages, init=args.init)
    print_summary(results, args.out)
    return 0 if all(r.completed for r in results.values()) else 3


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "train", help="train a stage (or all stages) of the RCG stack on your images",
        description="Train the encoder (MoCo v3), the VQ tokenizer, the representation diffusion model and/or "
                    "MAGE on an image folder, a Hugging Face dataset or a built-in source, with Hugging Face "
                    "accelerate (CPU, one GPU, or many via `accelerate launch`).",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("stage", choices=STAGE_CHOICES, help="what to train: one stage, or all four in order")
    parser.add_argument("--init", metavar="DIR|NAME",
                        help="start from this pipeline folder, named model or Hub model id org/name[@revision] "
                             "(default: OUT's pipeline, else --preset)")
    parser.add_argument("--reinit", action="store_true",
                        help="with --init: start the trained stages' networks afresh (the recipe's architecture "
                        "overrides applied) and keep --init's other networks, e.g. retrain MAGE on a trained "
                        "encoder and tokenizer")
    parser.add_argument("--continuation", type=int, metavar="K",
                        help="with --recipe: run the recipe's continuations from the K-th on, starting from --init "
                             "(a model that finished the runs before it, e.g. the bundled digits-tiny)")
    parser.add_argument("--no-continuations", action="store_true",
                        help="with --recipe: train the recipe's stages and stop before its continuation phases")
    parser.add_argument("--preset", default="tiny", choices=list(PIPELINE_PRESETS),
                        help="architecture for a new pipeline (default tiny): " + "; ".join(
                            f"{p.name}: {p.description}" for p in PIPELINE_PRESETS.values()))
    parser.add_argument("--in-channels", type=int, choices=(1, 3),
                        help="channels of a new pipeline (default: inferred from the data)")
    add_training_arguments(parser)
    parser.set_defaults(handler=handle)


__all__ = ["add_training_arguments", "parse_duration", "register", "training_data"]
