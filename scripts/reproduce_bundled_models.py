"""Reproduce the bundled `digits-tiny` and `faces-tiny` weights: their two recipes, in order.

Equivalent to

    rcg-augment train all --recipe digits-tiny --out runs/bundled/digits-tiny
    rcg-augment finetune --recipe faces-tiny --from runs/bundled/digits-tiny --out runs/bundled/faces-tiny

Both train only on the benchmark pool (`rcg_augment.data.splits`): the few-shot benchmark's test
images are never seen, and each model's metadata records their fingerprint. `faces-tiny` starts
from the `digits-tiny` trained here (the bundled one was fine-tuned from the bundled
`digits-tiny`). Measured times are in docs/training.md ("Bundled models") and each model card. Output folders load with
`RCGPipeline.from_pretrained`; copy config.json and model.safetensors into
`rcg_augment/weights/<name>/` to bundle them.

Usage:
    python scripts/reproduce_bundled_models.py --out runs/bundled
"""

from __future__ import annotations

import argparse
from pathlib import Path

from rcg_augment.training import run_recipe


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/bundled")
    out = Path(ap.parse_args().out)
    run_recipe("digits-tiny", out / "digits-tiny")
    run_recipe("faces-tiny", out / "faces-tiny", init=str(out / "digits-tiny"))


if __name__ == "__main__":
    main()
