"""``rcg-augment build``: write a cache of synthetic variants (see :func:`rcg_augment.data.build_synthetic`)."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from ..settings import (
    CPU_MATMUL_BACKENDS,
    DEFAULT_CPU_MATMUL,
    DEFAULT_MAX_ATTEMPTS,
    DEFAULT_NOISE_LEVEL,
)

logger = logging.getLogger(__name__)

EPILOG = """\
examples:
  rcg-augment build --input digits --shots 5 --out cache/digits-5shot --variants 8 --noise-level 0.3
  rcg-augment build --input fashion-mnist --shots 2 --out cache/fashion --variants 4 --contact-sheet
  rcg-augment build --input labelled/ --shots 1 --pool unlabelled/ --neighbours 8 --variants 4 \
      --out cache/pooled --model digits-tiny
  rcg-augment build --input my-org/pets --split test --image-column photo --out cache/pets --variants 4 \
      --model my-org/rcg-pets@v1.0
  accelerate launch --multi_gpu --num_processes 4 -m rcg_augment build --input photos/ --out cache/photos ...
  torchrun --nproc_per_node 4 -m rcg_augment build --input photos/ --out cache/photos ...

A killed build resumes when run again with the same arguments; different arguments on the same
--out are refused (the error names what differs) unless --overwrite. Load the result with
rcg_augment.data.SyntheticDataset(OUT) or rcg_augment.data.load_synthetic(OUT).
"""


def _noise_levels(text: str) -> list[float]:
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or a comma list of numbers in [0, 1], got {text!r}") from None
    if not values or any(not 0.0 <= v <= 1.0 for v in values):
        raise argparse.ArgumentTypeError(f"noise levels must be in [0, 1], got {text!r}")
    return values


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0, got {value}")
    return value


# The bundled model for each built-in source; any other input gets FALLBACK_MODEL, checked.
DEFAULT_MODELS = {"digits": "digits-tiny", "lfw-faces": "faces-tiny", "fashion-mnist": "fashion-tiny"}
FALLBACK_MODEL = "digits-tiny"
# Python argument names in library errors -> the flags a CLI user types.
FLAG_NAMES = {"out_dir": "--out", "variants_per_image": "--variants", "noise_level": "--noise-level",
              "shots": "--shots", "batch_size": "--batch-size", "records_per_shard": "--records-per-shard",
              "quality_threshold": "--quality-threshold", "label_filter": "--label-filter",
              "max_attempts": "--max-attempts", "pool": "--pool", "neighbours": "--neighbours", "cpu_matmul": "--cpu-matmul",
              "repaint_fraction": "--repaint-fraction", "token_temperature": "--token-temperature",
              "num_iter": "--num-iter", "rdm_steps": "--rdm-steps", "cfg": "--cfg", "temperature": "--temperature",
              "overwrite": "--overwrite", "process_index": "--process-index", "num_processes": "--num-processes",
              "data_root": "--data-root", "split": "--split", "image_column": "--image-column",
              "label_column": "--label-column", "overwrite=True": "--overwrite"}


def as_flags(message: str) -> str:
    """A library error message with its `python_argument` names replaced by the CLI's flags."""
    for name, flag in FLAG_NAMES.items():
        message = message.replace(f"`{name}`", f"`{flag}`")
    return message


def _bundled_defaults(name: str) -> dict[str, float]:
    """The generation defaults saved with a bundled model (for --help), read from its config.json."""
    import json

    from ..zoo import WEIGHTS_DIR

    try:
        config = json.loads((WEIGHTS_DIR / name / "config.json").read_text())
    except (OSError, ValueError):
        return {}
    out = {}
    for key in ("cfg", "temperature", "num_iter", "rdm_steps", "repaint_fraction", "token_temperature"):
        value = config.get("defaults", {}).get(key)
        value = config.get("mage", {}).get(key) if value is None else value
        if isinstance(value, (int, float)):
            out[key] = value
    return out


def choose_model(args) -> tuple[str, bool]:
    """(``--model``, or the default for ``--input``; whether the user named it)."""
    from ..zoo import available_models

    if args.model is not None:
        return args.model, True
    wanted = DEFAULT_MODELS.get(args.input)
    if wanted is not None and wanted in available_models():
        return wanted, False
    logger.warning("no --model given: using %s (trained on 8x8 grey digits); name a model trained on your kind of "
                   "images with --model", FALLBACK_MODEL)
    return FALLBACK_MODEL, False


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "build", help="write a cache of synthetic variants of an image set",
        description="Encode every input image, renoise and denoise its representation, render K new\n"
        "images per noise level, and write them as a sharded Hugging Face dataset with a manifest.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--input", required=True, metavar="SRC",
                   help='image folder (class sub-folders), a dataset folder datasets.load_dataset reads (parquet, '
                   'csv, jsonl, imagefolder splits) or save_to_disk wrote, a Hugging Face Hub dataset id, '
                   '"digits", "lfw-faces" or "fashion-mnist"')
    p.add_argument("--split", metavar="NAME", help="dataset split to read (default: train, or the only split)")
    p.add_argument("--data-root", metavar="DIR",
                   help="with --input fashion-mnist: the folder holding its four IDX files (default: "
                        "$RCG_AUGMENT_FASHION_MNIST, ./data/FashionMNIST/raw, /usr/share/datasets/fashion-mnist)")
    p.add_argument("--image-column", metavar="COL", help="dataset column holding the images (default: image/img)")
    p.add_argument("--label-column", metavar="COL",
                   help="dataset column holding the labels (default: label/labels; none: one class)")
    p.add_argument("--out", required=True, metavar="DIR", help="output cache directory (new, or a build to resume)")
    p.add_argument("--variants", required=True, type=_count, metavar="K",
                   help="variants per image and noise level (0 with --pool: retrieval only)")
    p.add_argument("--noise-level", type=_noise_levels, default=[DEFAULT_NOISE_LEVEL], metavar="X[,Y...]",
                   help="in [0, 1]: 0 keeps the image's representation, 1 ignores it; a comma list "
                   f"puts several levels in one cache (each record stores its level). Default {DEFAULT_NOISE_LEVEL:g}, "
                   "the library's recommended level")
    p.add_argument("--shots", type=_positive_int, metavar="N", help="use N images per class (drawn with --seed)")
    p.add_argument("--seed", type=int, default=0, help="seeds the few-shot draw and the generation (default 0)")
    p.add_argument("--model", metavar="NAME|DIR|ORG/NAME",
                   help="bundled model name, a save_pretrained directory, or a Hugging Face Hub model id "
                   "(org/name, org/name@revision) (default: the bundled model trained on --input's kind of "
                   f"images for the built-in sources ({', '.join(f'{k}: {v}' for k, v in DEFAULT_MODELS.items())}), "
                   f"else {FALLBACK_MODEL}, which is refused for colour images)")
    r = p.add_argument_group("retrieval from an unlabelled pool")
    r.add_argument("--pool", metavar="SRC",
                   help="unlabelled images of the same domain (any --input kind; labels ignored): each source's "
                   "--neighbours nearest pool images in the model's encoder space are written beside its "
                   "variants, labelled by the source (origin 'retrieved'). The pool's representations are cached "
                   "under $RCG_AUGMENT_CACHE/pools (default ~/.cache/rcg-augment/pools)")
    r.add_argument("--neighbours", type=_count, metavar="K",
                   help="pool images per source (default 8 with --pool)")
    p.add_argument("--batch-size", type=_positive_int, default=64, metavar="B",
                   help="images per generator call (default 64); part of the cache's identity")
    p.add_argument("--records-per-shard", type=_positive_int, metavar="R",
                   help="records per shard file, a multiple of --batch-size (default 8 batches)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda when available, "
                   "or the accelerate process's device)")
    p.add_argument("--cpu-matmul", choices=CPU_MATMUL_BACKENDS, default=DEFAULT_CPU_MATMUL,
                   help="library of the float32 linear layers on the CPU: 'default' (torch's BLAS) or 'onednn' "
                   "(1.6x faster builds on the AMD EPYC CPU measured in docs/results.md; outputs can differ from the "
                   "default's in rounding, a rare variant; part of the cache's identity)")
    shown = _bundled_defaults(FALLBACK_MODEL)

    def default(name: str) -> str:
        return f" (default: the model's; {FALLBACK_MODEL}: {shown[name]:g})" if name in shown else \
            " (default: the model's)"

    g = p.add_argument_group("generation settings (default: the model's own, saved with it)")
    g.add_argument("--cfg", type=float, help="MAGE classifier-free guidance scale (>= 0)" + default("cfg"))
    g.add_argument("--temperature", type=float, help="MAGE re-masking temperature (>= 0)" + default("temperature"))
    g.add_argument("--num-iter", type=_positive_int, help="MAGE decoding steps" + default("num_iter"))
    g.add_argument("--rdm-steps", type=_positive_int,
                   help="DDIM steps of the representation diffusion" + default("rdm_steps"))
    g.add_argument("--repaint-fraction", type=float, metavar="F",
                   help="share of each source's VQ tokens MAGE paints anew, in [0.5, 1]: 1 generates the whole "
                   "image from the representation, lower keeps the rest of the source's tokens"
                   + default("repaint_fraction"))
    g.add_argument("--token-temperature", type=float, metavar="T",
                   help="temperature of MAGE's draw of each code (> 0): 1 is the official sampling, lower keeps "
                   "variants closer to their class with less variety" + default("token_temperature"))
    p.add_argument("--quality-threshold", type=float, metavar="T",
                   help="drop variants whose representation's cosine similarity to the source's is below T")
    p.add_argument("--label-filter", action="store_true",
                   help="keep a variant only if its representation is nearest to its own class's prototype "
                   "(mean representation of the class's sources); rejected variants are drawn again")
    p.add_argument("--max-attempts", type=_positive_int, default=DEFAULT_MAX_ATTEMPTS, metavar="N",
                   help=f"draws per variant with --label-filter (default {DEFAULT_MAX_ATTEMPTS})")
    p.add_argument("--contact-sheet", action="store_true", help="also write OUT/contact_sheet.png")
    p.add_argument("--overwrite", action="store_true", help="delete an existing cache in OUT first")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    d = p.add_argument_group("distributed (set automatically under `accelerate launch`)")
    d.add_argument("--process-index", type=int, help="this process's index (0-based)")
    d.add_argument("--num-processes", type=_positive_int, help="how many processes share the build")
    p.set_defaults(handler=run)


def _distributed(args):
    """(process_index, num_processes, device, barrier) from the flags or from accelerate's launcher."""
    if args.process_index is not None or args.num_processes is not None:
        n = args.num_processes or 1
        return (args.process_index or 0), n, None, None
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # accelerate launch, torchrun
        import torch
        from accelerate import PartialState

        # without a GPU, accelerate only forms a (gloo) process group when told to use the CPU
        state = PartialState(cpu=not torch.cuda.is_available() or args.device == "cpu")
        if state.num_processes > 1:
            return state.process_index, state.num_processes, state.device, state.wait_for_everyone
        return 0, 1, state.device, None
    return 0, 1, None, None


def run(args) -> int:
    import torch

    from ..data import build_synthetic, cache_contact_sheet, open_source

    source = args.input
    if any(v is not None for v in (args.split, args.image_column, args.label_column, args.data_root)):
        source = open_source(args.input, split=args.split, image_column=args.image_column,
                             label_column=args.label_column, data_root=args.data_root)
    if args.pool is None and args.neighbours:
        raise ValueError("--neighbours needs --pool (the unlabelled images to retrieve from)")
    if args.variants == 0 and args.pool is None:
        raise ValueError("--variants must be >= 1 without --pool (--variants 0 --pool SRC is retrieval only)")
    model, named = choose_model(args)
    process_index, num_processes, dist_device, barrier = _distributed(args)
    if args.device != "auto":
        device = args.device
    elif dist_device is not None:
        device = dist_device
    else:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        summary = build_synthetic(
            source, args.out, variants_per_image=args.variants, noise_level=args.noise_level,
            pipeline=model, batch_size=args.batch_size, seed=args.seed, cfg=args.cfg,
            temperature=args.temperature, num_iter=args.num_iter, rdm_steps=args.rdm_steps,
            repaint_fraction=args.repaint_fraction, token_temperature=args.token_temperature, shots=args.shots, quality_threshold=args.quality_threshold,
            label_filter=args.label_filter, max_attempts=args.max_attempts, pool=args.pool,
            neighbours=neighbours_of(args) if args.pool is not None else 0, refuse_channel_mismatch=not named,
            overwrite=args.overwrite, cpu_matmul=args.cpu_matmul,
            progress=not args.no_progress,
            process_index=process_index, num_processes=num_processes, records_per_shard=args.records_per_shard,
            device=device, barrier=barrier,
        )
    except ValueError as err:
        raise ValueError(as_flags(str(err))) from err
    except OSError as err:  # disk full, read-only file system, ...: one line, not a traceback
        if isinstance(err, (FileNotFoundError, FileExistsError, PermissionError)):
            raise  # the top-level handler prints these
        print(f"rcg-augment build: error: {err}", file=sys.stderr)
        return 1
    if process_index != 0 and summary.complete:
        return 0
    sheet = None
    if args.contact_sheet and summary.complete:
        sheet = cache_contact_sheet(summary.out_dir, source)
    _print_summary(args, summary, sheet, num_processes)
    return 0


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def neighbours_of(args) -> int:
    return 8 if args.neighbours is None else args.neighbours


def _print_summary(args, s, sheet, num_processes) -> None:
    levels = args.noise_level
    out = sys.stdout
    state = "done" if s.complete else f"process {args.process_index or 0} of {num_processes} done; waiting for the others"
    print(f"rcg-augment build: {state}", file=out)
    print(f"  output         {s.out_dir}" + (f"  (load: rcg_augment.data.SyntheticDataset({str(s.out_dir)!r}))"
                                              if s.complete else ""), file=out)
    parts = []
    if args.variants:
        parts.append(f"{_plural(args.variants, 'variant')} x {_plural(len(levels), 'noise level')} "
                     f"({', '.join(f'{v:g}' for v in levels)})")
    if args.pool is not None:
        parts.append(f"{_plural(neighbours_of(args), 'neighbour')} from --pool")
    what = " + ".join(parts) if len(parts) == 1 else f"({' + '.join(parts)})"
    print(f"  records        {s.records} = {_plural(s.sources_used, 'source')} x {what}"
          + (f" - {s.dropped} dropped" if s.dropped else "")
          + (f"; {s.retrieved} retrieved, {s.records - s.retrieved} generated" if args.pool is not None else ""),
          file=out)
    shots = f" (--shots {args.shots}, --seed {args.seed})" if args.shots else ""
    print(f"  sources used   {s.sources_used} of {s.sources_total}{shots}; classes: {len(s.classes)}", file=out)
    short = {c: n for c, n in s.sources_per_class.items() if args.shots and n < args.shots}
    if short:
        print(f"  short classes  fewer than --shots {args.shots} images, all used: "
              + ", ".join(f"{c} {n}" for c, n in short.items()), file=out)
    if args.quality_threshold is not None:
        print(f"  quality filter cosine >= {args.quality_threshold:g}: dropped {s.dropped}", file=out)
    if s.label_filter is not None:
        gen = sum(v["generated"] for v in s.label_filter.values())
        acc = sum(v["accepted"] for v in s.label_filter.values())
        rates = ", ".join(f"{c} {r:.0%}" for c, r in s.acceptance_by_class().items())
        print(f"  label filter   {acc} of {gen} draws accepted ({acc / max(1, gen):.0%}; --max-attempts "
              f"{args.max_attempts}); per class: {rates}", file=out)
    print(f"  skipped files  {len(s.skipped)}", file=out)
    for path, reason in s.skipped[:10]:
        print(f"                 {path}: {reason}", file=out)
    if len(s.skipped) > 10:
        print(f"                 ... and {len(s.skipped) - 10} more (see the manifest's skipped_sources)", file=out)
    resumed = f"; {s.shards_resumed} shards were already complete" if s.shards_resumed else ""
    print(f"  time           {s.seconds:.1f} s, {s.records_written} written this run at "
          f"{s.variants_per_second:.1f} variants/s{resumed}", file=out)
    print(f"  shards         {len(s.shards)}" + (f", manifest {s.manifest_path}" if s.manifest_path else ""), file=out)
    if sheet is not None:
        print(f"  contact sheet  {sheet} (up to 10 of the {s.sources_used} sources: the first of each class, then "
              "by index)", file=out)
