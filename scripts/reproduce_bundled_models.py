"""Reproduce the bundled `digits-tiny` and `faces-tiny` weights, with the exact settings they were trained with.

Both train only on the benchmark pool (`rcg_augment.data.splits`): the few-shot benchmark's test
images are never seen. Measured on 2 CPU cores (idle box): digits-tiny 1,330 s for the four stages
plus 949 s for the MAGE continuation; faces-tiny (its recipe, `rcg-augment finetune --recipe
faces-tiny`) 1,812 s measured with one thread beside two other jobs (sized for about 12 minutes
idle; not measured idle). Output folders load with
`RCGPipeline.from_pretrained`; copy config.json and model.safetensors into
`rcg_augment/weights/<name>/` to bundle them.

The recipes in `rcg_augment.training.recipes` have since been retuned (higher MAGE learning rate,
more steps); this script pins the settings of the weights that ship today.

Usage:
    python scripts/reproduce_bundled_models.py --out runs/bundled
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rcg_augment.data import open_source
from rcg_augment.data.splits import benchmark_split, indices_sha256
from rcg_augment.training import finetune, run_recipe, train_all

COMMON = {"batch_size": 64, "log_every": 25, "checkpoint_every": 250}
DIGITS = {  # the first digits-tiny recipe at steps_scale 0.4
    "encoder": {"steps": 480, "blr": 1e-3, "crop_scale": (0.35, 1.0), "max_grad_norm": 1.0},
    "tokenizer": {"steps": 600, "blr": 2e-3, "recon_loss": "l1", "max_grad_norm": 1.0},
    "rdm": {"steps": 1200, "blr": 1e-5, "lr_schedule": "cosine", "warmup_steps": 40, "ema_decay": 0.999},
    "mage": {"steps": 1000, "blr": 1.5e-3, "ema_decay": 0.999, "crop_scale": (0.8, 1.0)},
}
DIGITS_MAGE_MORE = {"steps": 1000, "blr": 3e-3, "ema_decay": 0.999, "crop_scale": (0.8, 1.0), "hflip": False,
                    "batch_size": 64, "seed": 1, "warmup_steps": 50, "log_every": 25, "checkpoint_every": 250}


def stamp(out: Path, note: str, test) -> None:
    cfg = json.loads((out / "config.json").read_text())
    cfg["metadata"].update({"trained_on": note, "excluded_test_indices_sha256": indices_sha256(test)})
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/bundled")
    out = Path(ap.parse_args().out)

    digits = open_source("digits")
    pool, test = benchmark_split(digits)
    first = out / "digits-tiny-stage1"
    per = {k: {**COMMON, "seed": 0, "hflip": False, **v} for k, v in DIGITS.items()}
    train_all(digits.subset(pool), first, preset="tiny", in_channels=1, per_stage=per)
    final = out / "digits-tiny"
    finetune(str(first), digits.subset(pool), final, stages=("mage",), per_stage={"mage": DIGITS_MAGE_MORE})
    stamp(final, f"digits pool: {len(pool)} images; benchmark test split held out", test)

    # faces-tiny is the faces-tiny recipe run from the digits-tiny above (the recipe holds the
    # benchmark test split out by itself and records it in the training record)
    run_recipe("faces-tiny", out / "faces-tiny", init=str(final))
    faces_src = open_source("lfw-faces")
    fpool, ftest = benchmark_split(faces_src)
    faces = [i for i in fpool if faces_src.classes[faces_src.labels[i]] == "face"]
    stamp(out / "faces-tiny", f"lfw-faces benchmark pool faces: {len(faces)} images; the {len(ftest)} benchmark "
          "test images held out", ftest)

if __name__ == "__main__":
    main()
