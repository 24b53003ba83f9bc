"""Fashion-MNIST label preservation with a real judge: a small CNN trained on the 60,000 train images.

1. The judge: a 3-block CNN trained on the train split at the model's image size (32 px, grey),
   its accuracy on the 10,000 test images reported (the ceiling). Cached under --out-dir.
2. Label preservation: ``--sources`` test images (a seeded draw), ``--variants`` reconstructions
   each at every ``--noise-levels`` level with the model's defaults; the share the judge labels as
   their source's class, beside the judge's accuracy on the same real images, and the ratio.
3. Variety: RMS pixel distance ([0, 1] scale) between two variants of one source, and from each
   variant to its source.
4. The fidelity decomposition on the same test sources, stage by stage: the VQ tokenizer's round
   trip, the encoder's 1-NN label among the 60,000 train images (cosine, encoder space), MAGE
   rendering each source's own representation (no RDM, full repaint), and reconstruct at the
   defaults (the noise-level rows).

The test split is never seen by training, tuning or defaults; this script only reads it here.
``--split train --repaint-fractions 0.7,0.85,1`` draws the sources from the train images instead
and runs every (repaint fraction, noise level) pair: the frontier a model's defaults are chosen
from without looking at the test images (no fidelity decomposition then: a train image's nearest
train image is itself).

Usage:
    python benchmarks/fashion_quality.py --model fashion-tiny
    python benchmarks/fashion_quality.py --model runs/fashion-tiny --sources 500 --noise-levels 0,0.3,0.6
    python benchmarks/fashion_quality.py --model fashion-tiny --split train --repaint-fractions 0.7,0.85,1
    python benchmarks/fashion_quality.py --model DIR --data-root DIR --quick   # seconds (the tests' check)

Writes fashion_quality_<model>.{json,md} to --out-dir (default runs/benchmarks/, git-ignored).
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from _common import machine, render_own, utc_now, versions
from torch import nn

from rcg_augment import RCGPipeline
from rcg_augment.data import open_source, pil_to_tensor
from rcg_augment.label_filter import DEFAULT_MAX_ATTEMPTS, PrototypeFilter, reconstruct_with_labels

OUT_DIR = Path(__file__).resolve().parents[1] / "runs" / "benchmarks"


class Judge(nn.Module):
    """Three conv blocks (32-64-128 channels, batch norm, max pool) and a linear head."""

    def __init__(self, num_classes: int = 10, channels: int = 1):
        super().__init__()
        layers, c = [], channels
        for width in (32, 64, 128):
            layers += [nn.Conv2d(c, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
                       nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(), nn.MaxPool2d(2)]
            c = width
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(c, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean(dim=(2, 3)))


def as_tensor(source, size: int, indices=None) -> torch.Tensor:
    order = range(len(source)) if indices is None else indices
    return torch.stack([pil_to_tensor(source.load(int(i)), size, 1) for i in order])


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, batch: int = 1000) -> torch.Tensor:
    model.eval()
    return torch.cat([model(x[i:i + batch]).argmax(1) for i in range(0, len(x), batch)])


def train_judge(x: torch.Tensor, y: torch.Tensor, *, epochs: int, seed: int, batch: int = 128) -> Judge:
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = Judge(int(y.max()) + 1)
    batch = min(batch, len(x))
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    steps = epochs * (len(x) // batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=g)
        for i in range(0, len(x) - batch + 1, batch):
            idx = order[i:i + batch]
            xb = x[idx]
            flip = torch.rand(len(idx), generator=g) < 0.5  # clothes are left-right symmetric
            xb = torch.where(flip[:, None, None, None], xb.flip(-1), xb)
            loss = F.cross_entropy(model(xb), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return model


@torch.inference_mode()
def fidelity_decomposition(pipe, judge, train, train_idx, y_train, xs, ys, settings: dict, *, seed: int,
                           batch: int) -> dict:
    """The judge's accuracy after each stage alone, on the sources ``xs`` (labels ``ys``)."""
    roundtrip = torch.cat([pipe.tokenizer.decode(pipe.tokenizer.encode(xs[i:i + batch])).clamp(0, 1)
                           for i in range(0, len(xs), batch)])
    out = {"tokenizer_round_trip": float((predict(judge, roundtrip) == ys).float().mean())}
    f_src = F.normalize(torch.cat([pipe.encode(xs[i:i + batch]) for i in range(0, len(xs), batch)]), dim=-1)
    best_sim = torch.full((len(xs),), -2.0)
    best_label = torch.zeros(len(xs), dtype=torch.long)
    chunk = 2000  # the train images a chunk at a time: never all 60,000 as tensors
    for start in range(0, len(train_idx), chunk):
        idx = train_idx[start:start + chunk]
        f_train = F.normalize(pipe.encode(as_tensor(train, pipe.image_size, idx)), dim=-1)
        sim, arg = (f_src @ f_train.t()).max(dim=1)
        better = sim > best_sim
        best_sim = torch.where(better, sim, best_sim)
        best_label = torch.where(better, y_train[start:start + chunk][arg], best_label)
    out["encoder_nearest_neighbour"] = float((best_label == ys).float().mean())
    rendered = render_own(pipe, xs, settings, generator=torch.Generator().manual_seed(seed), batch=batch)
    out["mage_from_own_representation"] = float((predict(judge, rendered.float().clamp(0, 1)) == ys).float().mean())
    return out


@torch.inference_mode()
def preservation_row(pipe, judge, xs, ys, level: float, cell, label_filter, *, variants: int, batch: int,
                     seed: int, real_acc: float) -> dict:
    """Judge accuracy on ``variants`` 8-bit variants of each source, and their RMS distances. With a
    ``label_filter``: variants redrawn until accepted (at most DEFAULT_MAX_ATTEMPTS draws, as the
    build does), the never-accepted dropped,
    so the judge scores only what a filtered build would store."""
    drawn, kept_masks = [], []
    gen = torch.Generator().manual_seed(seed + 1)
    for _ in range(variants):
        outs, oks = [], []
        for i in range(0, len(xs), batch):
            xb, yb = xs[i:i + batch], ys[i:i + batch]
            levels = torch.full((len(xb),), level)
            if label_filter is None:
                out = pipe.reconstruct(xb, levels, generator=gen, settings=cell)
                ok = torch.ones(len(xb), dtype=torch.bool)
            else:
                out, ok, _ = reconstruct_with_labels(pipe, xb, yb, levels, label_filter=label_filter,
                                                     generator=gen, quantize=True, settings=cell)
            outs.append(out.float().clamp(0, 1))
            oks.append(ok)
        drawn.append((torch.cat(outs) * 255).round() / 255)
        kept_masks.append(torch.cat(oks))
    kept = torch.stack(kept_masks)  # (variants, sources)
    right = torch.stack([(predict(judge, v) == ys) for v in drawn])
    judged = float(right[kept].float().mean()) if kept.any() else float("nan")
    both = kept[0] & kept[1] if variants > 1 else None
    between = (float(((drawn[0] - drawn[1])[both] ** 2).mean(dim=(1, 2, 3)).sqrt().mean())
               if both is not None and both.any() else float("nan"))
    to_source = torch.stack([((v - xs) ** 2).mean(dim=(1, 2, 3)).sqrt() for v in drawn])
    return {"noise_level": level, "label_filter": label_filter is not None, "kept_share": float(kept.float().mean()),
            "judge_on_variants": judged, "of_real": judged / real_acc, "rms_between_variants": between,
            "rms_to_source": float(to_source[kept].mean())}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="fashion-tiny")
    ap.add_argument("--data-root", default=None, help="folder of the four Fashion-MNIST IDX files")
    ap.add_argument("--sources", type=int, default=500)
    ap.add_argument("--variants", type=int, default=2)
    ap.add_argument("--noise-levels", default="0,0.3,0.6")
    ap.add_argument("--repaint-fractions", default=None,
                    help="comma-separated repaint fractions to run (default: the model's own)")
    ap.add_argument("--token-temperatures", default=None,
                    help="comma-separated token temperatures to run (default: the model's own)")
    ap.add_argument("--cfgs", default=None, help="comma-separated guidance scales to run (default: the model's own)")
    ap.add_argument("--split", choices=("test", "train"), default="test",
                    help="where the sources come from: test (the report) or train (choosing defaults)")
    ap.add_argument("--judge-epochs", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--label-filter", type=int, default=0, metavar="N",
                    help="also measure with the label filter (what `rcg-augment build --label-filter` does): "
                         "class prototypes from N seeded train images per class, a variant redrawn up to "
                         f"{DEFAULT_MAX_ATTEMPTS} times and dropped if never accepted; 0 (default) = off")
    ap.add_argument("--quick", action="store_true", help="seconds: 2,000 train images, 1 judge epoch, 20 sources")
    ap.add_argument("--out-dir", type=Path, default=OUT_DIR)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.time()
    if args.quick:
        args.sources, args.judge_epochs = min(args.sources, 20), 1
    pipe, name = RCGPipeline.from_pretrained(args.model), Path(args.model).name
    size = pipe.image_size
    train = open_source("fashion-mnist", split="train", data_root=args.data_root)
    test = open_source("fashion-mnist", split="test", data_root=args.data_root)
    train_idx = np.arange(len(train)) if not args.quick else np.arange(min(2000, len(train)))
    args.out_dir.mkdir(parents=True, exist_ok=True)
    judge_path = args.out_dir / f"fashion_judge_{size}px_e{args.judge_epochs}_s{args.seed}{'_quick' if args.quick else ''}.pt"
    y_train = torch.as_tensor(np.asarray(train.labels)[train_idx])
    if judge_path.is_file():
        judge = Judge()
        judge.load_state_dict(torch.load(judge_path, weights_only=True))
    else:
        judge = train_judge(as_tensor(train, size, train_idx), y_train, epochs=args.judge_epochs, seed=args.seed)
        torch.save(judge.state_dict(), judge_path)
    x_test, y_test = as_tensor(test, size), torch.as_tensor(test.labels)
    judge_acc = float((predict(judge, x_test) == y_test).float().mean())
    t_judge = time.time() - t0

    rng = np.random.default_rng(args.seed)
    if args.split == "test":
        chosen = np.sort(rng.choice(len(test), size=min(args.sources, len(test)), replace=False))
        xs, ys = x_test[chosen], y_test[chosen]
    else:
        chosen = np.sort(rng.choice(train_idx, size=min(args.sources, len(train_idx)), replace=False))
        xs, ys = as_tensor(train, size, chosen), torch.as_tensor(np.asarray(train.labels)[chosen])
    real_acc = float((predict(judge, xs) == ys).float().mean())
    levels = [float(v) for v in args.noise_levels.split(",")]
    settings = pipe.resolve_settings()
    repaints = ([float(v) for v in args.repaint_fractions.split(",")] if args.repaint_fractions
                else [settings.repaint_fraction])
    token_temps = ([float(v) for v in args.token_temperatures.split(",")] if args.token_temperatures
                   else [settings.token_temperature])
    cfgs = [float(v) for v in args.cfgs.split(",")] if args.cfgs else [settings.cfg]
    label_filter, proto_idx = None, None
    if args.label_filter:
        # the build's filter: prototypes from a few labelled images per class (seeded, train split only)
        proto_rng = np.random.default_rng(args.seed + 2)
        y_pool = np.asarray(train.labels)[train_idx]
        proto_idx = np.sort(np.concatenate([proto_rng.choice(train_idx[y_pool == k], size=min(args.label_filter, int((y_pool == k).sum())), replace=False)
                                            for k in np.unique(y_pool)]))
        label_filter = PrototypeFilter.from_images(pipe, as_tensor(train, size, proto_idx),
                                                   torch.as_tensor(np.asarray(train.labels)[proto_idx]))
    rows = []
    for repaint, token_temp, cfg in itertools.product(repaints, token_temps, cfgs):
        cell = pipe.resolve_settings(settings, repaint_fraction=repaint, token_temperature=token_temp, cfg=cfg)
        for level in levels:
            for filt in ([None, label_filter] if label_filter is not None else [None]):
                rows.append(preservation_row(pipe, judge, xs, ys, level, cell, filt, variants=args.variants,
                                             batch=args.batch_size, seed=args.seed, real_acc=real_acc))
                rows[-1].update(repaint_fraction=repaint, token_temperature=token_temp, cfg=cfg)
    at_defaults = [r for r in rows if (r["repaint_fraction"], r["token_temperature"], r["cfg"])
                   == (settings.repaint_fraction, settings.token_temperature, settings.cfg) and not r["label_filter"]]
    fidelity = None
    if args.split == "test":
        fidelity = fidelity_decomposition(pipe, judge, train, train_idx, y_train, xs, ys, settings.to_dict(),
                                          seed=args.seed, batch=args.batch_size)
        fidelity["reconstruct_at_defaults"] = {f"{r['noise_level']:g}": r["judge_on_variants"] for r in at_defaults}
    report = {
        "benchmark": "fashion_quality", "model": args.model,
        "model_fingerprint": pipe.fingerprint(), "settings": settings.to_dict(),
        "judge": {"architecture": "3 conv blocks 32-64-128 + linear", "epochs": args.judge_epochs,
                  "train_images": int(len(train_idx)), "test_accuracy": judge_acc, "seconds": round(t_judge, 1)},
        "split": args.split, "sources": int(len(chosen)), "variants": args.variants, "judge_on_real_sources": real_acc,
        "label_filter": ({"prototypes_per_class": args.label_filter, "prototype_train_indices": proto_idx.tolist(),
                          "max_attempts": DEFAULT_MAX_ATTEMPTS} if args.label_filter else None),
        "rows": rows, "fidelity": fidelity, "seconds": round(time.time() - t0, 1), "when": utc_now(), "machine": machine(),
        "versions": versions(), "command": "python benchmarks/fashion_quality.py " + " ".join(argv or sys.argv[1:]),
    }
    suffix = ("_train" if args.split == "train" else "") + ("_quick" if args.quick else "")
    stem = args.out_dir / f"fashion_quality_{name}{suffix}"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [f"# Fashion-MNIST label preservation: {report['model']}", "",
             f"Judge: {report['judge']['architecture']}, {args.judge_epochs} epochs on {len(train_idx):,} train "
             f"images; test accuracy **{judge_acc:.3f}** (10,000 test images).", "",
             f"{len(chosen)} {args.split} sources x {args.variants} variants at the model's defaults "
             f"(other settings: {settings.to_dict()}); judge on the real sources {real_acc:.3f}.", "",
             "| repaint fraction | token temperature | cfg | noise level | label filter | variants kept "
             "| judge on variants | of real | RMS between variants | RMS to source |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['repaint_fraction']:g} | {r['token_temperature']:g} | {r['cfg']:g} | {r['noise_level']:g} | "
              f"{'on' if r['label_filter'] else 'off'} | {r['kept_share']:.3f} | {r['judge_on_variants']:.3f} | "
              f"{r['of_real']:.3f} | {r['rms_between_variants']:.3f} | {r['rms_to_source']:.3f} |" for r in rows]
    if args.label_filter:
        lines += ["", f"Label filter: prototypes = mean representation of {args.label_filter} seeded train images "
                  f"per class; a rejected variant is drawn again up to {DEFAULT_MAX_ATTEMPTS} times in all and dropped if never "
                  "accepted (`rcg-augment build --label-filter`); 'variants kept' is the share stored, the "
                  "judge scores only those."]
    if fidelity is not None:
        lines += ["", "Fidelity decomposition (judge accuracy on the same sources, stage by stage):", "",
                  "| stage | judge accuracy | of real |", "|---|---|---|",
                  f"| real test images | {real_acc:.3f} | 1.000 |"]
        for label, key in (("VQ tokenizer round trip", "tokenizer_round_trip"),
                           ("encoder 1-NN among the train images (its label)", "encoder_nearest_neighbour"),
                           ("MAGE from the own representation", "mage_from_own_representation")):
            lines.append(f"| {label} | {fidelity[key]:.3f} | {fidelity[key] / real_acc:.3f} |")
        lines += [f"| reconstruct at the defaults, noise {r['noise_level']:g} | {r['judge_on_variants']:.3f} | "
                  f"{r['of_real']:.3f} |" for r in at_defaults]
    lines += ["", f"Command: `{report['command']}`; {report['seconds']} s; model fingerprint "
              f"{report['model_fingerprint'][:16]}."]
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
