"""Copy a trained pipeline folder into ``rcg_augment/weights/<name>/`` as a bundled model.

The weights are re-saved unchanged; the config gains the model's identity metadata (name,
source, what it was trained on, the held-out fingerprint from its training records, license) and,
with ``--default KEY=VALUE``, sampling defaults chosen by measurement (recorded with
``--defaults-chosen-by``).

Usage:
    python scripts/bundle_model.py runs/faces faces-tiny --source "rcg-augment finetune --recipe faces-tiny" \
        --trained-on "lfw-faces benchmark pool: 140 images" --license "MIT ...; LFW images: see the LFW terms" \
        --default repaint_fraction=0.7 --defaults-chosen-by "benchmarks/quality.py ..."
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import torch

from rcg_augment import RCGPipeline

WEIGHTS = Path(__file__).resolve().parents[1] / "rcg_augment" / "weights"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folder")
    ap.add_argument("name")
    ap.add_argument("--source", required=True)
    ap.add_argument("--trained-on", required=True)
    ap.add_argument("--license", required=True)
    ap.add_argument("--default", action="append", default=[], metavar="KEY=VALUE",
                    help="a sampling default (JSON value), e.g. repaint_fraction=0.7")
    ap.add_argument("--defaults-chosen-by", default=None)
    ap.add_argument("--into", type=Path, default=None,
                    help="the folder that receives <name>/ (default rcg_augment/weights, the package's bundled models)")
    ap.add_argument("--float16", action="store_true",
                    help="store the floating-point weights as float16 (half the bytes); they load as float32")
    args = ap.parse_args()
    pipe = RCGPipeline.from_pretrained(args.folder)
    meta = pipe.config.metadata
    # The held-out split of the data the model was last trained on (a fine-tuned model's records
    # start with its base model's, whose split belongs to other data).
    records = meta.get("training", [])
    last_data = records[-1].get("data") if records else None
    held_out = {r.get("excluded_test_indices_sha256") for r in records if r.get("data") == last_data} - {None}
    if len(held_out) > 1:
        raise SystemExit(f"the training records name several held-out splits: {sorted(held_out)}")
    meta.update({"name": args.name, "source": args.source, "trained_on": args.trained_on, "license": args.license})
    if held_out:
        meta["excluded_test_indices_sha256"] = held_out.pop()
    for item in args.default:
        key, _, value = item.partition("=")
        if not hasattr(pipe.config.defaults, key):
            raise SystemExit(f"unknown sampling default {key!r}")
        pipe.config.defaults = dataclasses.replace(pipe.config.defaults, **{key: json.loads(value)})
    if args.defaults_chosen_by:
        meta["defaults_chosen_by"] = args.defaults_chosen_by
    pipe.resolve_settings()  # the defaults must be valid for this model
    # The training machine's folders stay out of the card: "/abs/path/runs/x" -> "runs/x".
    machine_prefix = str(Path(args.folder).resolve().parent) + "/"
    pipe.config.metadata = _scrub(pipe.config.metadata, machine_prefix, "runs/")
    pipe.config.metadata.pop("weights_storage", None)  # the older key; save_pretrained records weights_dtype
    out = pipe.save_pretrained((args.into or WEIGHTS) / args.name, dtype=torch.float16 if args.float16 else torch.float32)
    print(f"bundled {args.folder} as {out}")


def _scrub(value, prefix: str, replacement: str):
    if isinstance(value, str):
        return value.replace(prefix, replacement)
    if isinstance(value, dict):
        return {k: _scrub(v, prefix, replacement) for k, v in value.items()}
    if isinstance(value, list):
        return [_scrub(v, prefix, replacement) for v in value]
    return value


if __name__ == "__main__":
    main()
