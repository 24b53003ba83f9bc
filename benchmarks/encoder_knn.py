"""How well an encoder's representation keeps Fashion-MNIST classes apart: nearest-neighbour labels.

For each ``--models`` pipeline: encode ``--test`` test images (a seeded draw) and the train images
(all 60,000 unless ``--train`` is smaller), and report the share of test images whose nearest
train image (cosine, representation space) has the same class (1-NN), and the majority class of
the 20 nearest (20-NN, similarity-weighted). Beside them: the same on raw pixels (cosine on the
flattened 32 px images), a baseline that costs nothing to train. No generator is run: this is the
encoder's share of the fidelity decomposition in ``fashion_quality.py``, cheap enough to check an
encoder after (or during) its training.

``--encoder-weights FILE`` (one model only) swaps in the encoder of a training checkpoint first:
its ``model.safetensors`` (the MoCo model: keys ``module.encoder.*`` or ``encoder.*``) or
``ema.safetensors`` (the momentum encoder, which is what a finished encoder stage keeps).

Usage:
    python benchmarks/encoder_knn.py --models fashion-tiny runs/fashion-enc
    python benchmarks/encoder_knn.py --models runs/x --encoder-weights runs/x/checkpoints/encoder/step_00002000/ema.safetensors
    python benchmarks/encoder_knn.py --models DIR --data-root DIR --quick   # seconds (the tests' check)

Writes encoder_knn.{json,md} to --out-dir (default runs/benchmarks/, git-ignored).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from _common import machine, utc_now, versions
from fashion_quality import as_tensor
from safetensors.torch import load_file

from rcg_augment import RCGPipeline
from rcg_augment.data import open_source

OUT_DIR = Path(__file__).resolve().parents[1] / "runs" / "benchmarks"
K = 20


def encoder_state_from_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """The encoder's tensors from a training checkpoint file (see the module's docstring)."""
    state = load_file(str(path))
    for prefix in ("module.encoder.", "encoder."):
        found = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        if found:
            return found
    return state


def load_images(source, indices, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The images at ``indices`` as fashion_quality.py reads them, and their labels."""
    return as_tensor(source, size, indices), torch.as_tensor(np.asarray(source.labels)[np.asarray(indices)])


@torch.inference_mode()
def neighbour_accuracy(f_test: torch.Tensor, f_train: torch.Tensor, y_test: torch.Tensor, y_train: torch.Tensor,
                       *, k: int = K, chunk: int = 5000) -> dict[str, float]:
    """1-NN and similarity-weighted k-NN label accuracy; features are L2-normalised here."""
    f_test, f_train = F.normalize(f_test.float(), dim=-1), F.normalize(f_train.float(), dim=-1)
    k = min(k, len(f_train))
    best_sim = torch.full((len(f_test), k), -2.0)
    best_idx = torch.zeros(len(f_test), k, dtype=torch.long)
    for start in range(0, len(f_train), chunk):  # the train features a chunk at a time
        sim = f_test @ f_train[start:start + chunk].t()
        sim_all = torch.cat([best_sim, sim], dim=1)
        idx_all = torch.cat([best_idx, torch.arange(start, start + sim.shape[1]).expand(len(f_test), -1)], dim=1)
        best_sim, pos = sim_all.topk(k, dim=1)
        best_idx = idx_all.gather(1, pos)
    labels = y_train[best_idx]
    classes = int(max(y_train.max(), y_test.max())) + 1
    votes = torch.zeros(len(f_test), classes).scatter_add_(1, labels, best_sim.clamp(min=0) + 1e-6)
    return {"nn1": float((labels[:, 0] == y_test).float().mean()),
            f"nn{k}": float((votes.argmax(1) == y_test).float().mean())}


@torch.inference_mode()
def encode(pipe: RCGPipeline, x: torch.Tensor, batch: int = 500) -> torch.Tensor:
    return torch.cat([pipe.encode(x[i:i + batch]) for i in range(0, len(x), batch)])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", required=True, help="pipeline folders or named models")
    p.add_argument("--encoder-weights", type=Path, help="with one model: a training checkpoint's encoder file")
    p.add_argument("--test", type=int, default=1000, help="test images (a seeded draw)")
    p.add_argument("--train", type=int, default=60000, help="train images searched (a seeded draw)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--data-root", help="folder holding the four Fashion-MNIST IDX files")
    p.add_argument("--quick", action="store_true", help="20 test images, 60 train (a smoke run)")
    p.add_argument("--out-dir", type=Path, default=OUT_DIR)
    args = p.parse_args(argv)
    if args.encoder_weights is not None and len(args.models) != 1:
        p.error("--encoder-weights needs exactly one --models entry")
    if args.quick:
        args.test, args.train = 20, 60
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    train = open_source("fashion-mnist", split="train", data_root=args.data_root)
    test = open_source("fashion-mnist", split="test", data_root=args.data_root)
    g = torch.Generator().manual_seed(args.seed)
    test_idx = torch.randperm(len(test), generator=g)[:min(args.test, len(test))]
    train_idx = torch.randperm(len(train), generator=g)[:min(args.train, len(train))]

    rows, pixels, size = [], None, None
    for name in args.models:
        pipe = RCGPipeline.from_pretrained(name)
        label = name
        if args.encoder_weights is not None:
            pipe.encoder.load_state_dict(encoder_state_from_checkpoint(args.encoder_weights), strict=True)
            label = f"{name} + {args.encoder_weights}"
        pipe.encoder.eval()
        if size != pipe.image_size:  # every model here is 32 px; load again only if one is not
            size = pipe.image_size
            x_test, y_test = load_images(test, test_idx, size)
            x_train, y_train = load_images(train, train_idx, size)
            pixels = neighbour_accuracy(x_test.flatten(1), x_train.flatten(1), y_test, y_train)
        acc = neighbour_accuracy(encode(pipe, x_test), encode(pipe, x_train), y_test, y_train)
        rows.append({"model": label, "image_size": size, **acc, "pixels": pixels})
        print(f"{label}: 1-NN {acc['nn1']:.3f}, {K}-NN {acc[f'nn{K}']:.3f} (pixels {pixels['nn1']:.3f} / "
              f"{pixels[f'nn{K}']:.3f})", flush=True)

    seconds = time.perf_counter() - started
    command = "python benchmarks/encoder_knn.py " + " ".join(argv if argv is not None else sys.argv[1:])
    report = {"date": utc_now(), "machine": machine(), "versions": versions(), "command": command,
              "test_images": len(test_idx), "train_images": len(train_idx), "seed": args.seed, "k": K,
              "seconds": seconds, "rows": rows}
    args.out_dir.mkdir(parents=True, exist_ok=True)
    stem = "encoder_knn" + ("_quick" if args.quick else "")
    (args.out_dir / f"{stem}.json").write_text(json.dumps(report, indent=1) + "\n")
    lines = ["# Fashion-MNIST: nearest-neighbour labels in the encoder's representation", "",
             f"{len(test_idx)} test images against {len(train_idx)} train images (seed {args.seed}); cosine "
             f"similarity; {K}-NN votes weighted by similarity.", "",
             f"| model | 1-NN | {K}-NN | pixels 1-NN | pixels {K}-NN |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['nn1']:.3f} | {r[f'nn{K}']:.3f} | {r['pixels']['nn1']:.3f} | "
                     f"{r['pixels'][f'nn{K}']:.3f} |")
    lines += ["", f"Command: `{command}`; {seconds:.1f} s."]
    (args.out_dir / f"{stem}.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
