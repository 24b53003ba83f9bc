"""``rcg-augment finetune``: continue training a trained pipeline (or the official files) on new images."""

from __future__ import annotations

import argparse

from ..official import ARCH_PRESETS, OFFICIAL_SOURCES
from ..training.registry import STAGES, get_recipe
from .train import add_training_arguments, print_summary, quiet_accelerate, run_stages

EPILOG = """\
The starting point is --from (a pipeline folder, a named model such as digits-tiny, or a Hugging
Face Hub model id org/name[@revision]) or the authors' checkpoint files
(--official rdm=FILE,mage=FILE[,encoder=FILE,tokenizer=FILE]).
Stages are trained in the order encoder -> tokenizer -> rdm -> mage; fine-tuning the encoder
or the tokenizer changes what rdm and mage see, so retrain those after them.

examples:
  rcg-augment finetune --recipe faces-tiny --out runs/faces-tiny --from runs/digits-tiny
  rcg-augment finetune --from digits-tiny --data path/to/images --out runs/mine --stages rdm,mage --steps 500
  rcg-augment finetune --official rdm=rdm-mocov3vitb.pth,mage=mage-vitb.pth --arch base \\
      --data path/to/images --out runs/rcg-b-mine --stages rdm,mage --batch-size 32
"""


def _official(text: str) -> dict:
    files = {}
    for part in text.split(","):
        if "=" not in part:
            raise argparse.ArgumentTypeError(f"expected PART=FILE[,PART=FILE...], got {text!r}")
        key, value = part.split("=", 1)
        key = key.strip()
        if key not in OFFICIAL_SOURCES:
            raise argparse.ArgumentTypeError(f"unknown official part {key!r}; use {', '.join(OFFICIAL_SOURCES)}")
        files[key] = value.strip()
    return files


def handle(args: argparse.Namespace) -> int:
    quiet_accelerate(args)
    if args.from_ and args.official:
        raise ValueError("give either --from or --official, not both")
    if args.official:
        source = {**args.official, "arch": args.arch}
    else:
        source = args.from_
    if source is None and not args.recipe:
        raise ValueError("--from DIR|NAME (or --official ...) is required without --recipe")
    if args.stages:
        stages = [s.strip() for s in args.stages.split(",") if s.strip()]
        unknown = [s for s in stages if s not in STAGES]
        if unknown or not stages:
            raise ValueError(f"--stages: unknown {unknown or stages}; choose from {', '.join(STAGES)}")
    elif args.recipe:
        stages = list(get_recipe(args.recipe).stages)
    else:
        stages = ["rdm", "mage"]
    if args.recipe:
        results = run_stages(args, stages, init=source)
    else:
        if args.data is None:
            raise ValueError("--data is required without --recipe")
        from ..training import api
        from .train import collect_settings, training_data

        common, per_stage = collect_settings(args, stages)
        classes = [c.strip() for c in args.classes.split(",") if c.strip()] if args.classes else None
        results = api.finetune(source, training_data(args), args.out, stages=stages, classes=classes, per_stage=per_stage,
                               max_time=args.max_time, **common)
    print_summary(results, args.out)
    return 0 if all(r.completed for r in results.values()) else 3


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "finetune", help="fine-tune a trained pipeline (or the official RCG files) on your images",
        description="Fine-tune stages of a trained RCG pipeline on new images (default: rdm and mage) and save "
                    "the result as a pipeline folder.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--from", dest="from_", metavar="DIR|NAME",
                        help="pipeline folder, named model or Hub model id org/name[@revision] to start from "
                             "(default: the recipe's)")
    parser.add_argument("--official", type=_official, metavar="PART=FILE,...",
                        help="start from the authors' checkpoint files: rdm=FILE,mage=FILE[,encoder=FILE,tokenizer=FILE]")
    parser.add_argument("--arch", default="base", choices=list(ARCH_PRESETS), help="architecture of --official files")
    parser.add_argument("--stages", metavar="A,B", help="stages to fine-tune, comma-separated (default: rdm,mage, "
                        "or the recipe's)")
    add_training_arguments(parser)
    parser.set_defaults(handler=handle)


__all__ = ["register"]
