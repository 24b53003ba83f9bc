"""Speed against quality: label preservation and images/s over `num_iter`, `rdm_steps` and `cfg`.

The augmentation's cost is dominated by MAGE's `num_iter` decoding passes (each a full forward,
doubled when `cfg > 0`) and, to a lesser degree, the RDM's DDIM steps. This script measures, for
a grid of settings, what each one costs (images/s of `reconstruct` at one batch size) and what it
keeps (label preservation: a logistic regression on pixels, trained on the real benchmark pool,
labels the variants of held-out images; and the RMS distance between variants, a diversity
measure). The defaults of a bundled model are picked from this curve.

Usage:
    python benchmarks/speed_quality.py --model digits-tiny            # ~5 min on 2 CPU cores
    python benchmarks/speed_quality.py --quick                        # seconds: random tiny model

Writes speed_quality_<model>.{json,md,png} to --out-dir (default runs/benchmarks/ at the repository
root, git-ignored).
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
from _common import command, load_images, machine, pixel_judge, utc_now, versions

from rcg_augment import RCGPipeline
from rcg_augment.data import open_source
from rcg_augment.data.splits import benchmark_split

# A run writes to runs/benchmarks/ at the repository root by default (git-ignored), so it never
# overwrites a committed result; pass --out-dir benchmarks/results to replace one on purpose.
OUT_DIR = Path(__file__).resolve().parents[1] / "runs" / "benchmarks"


def parse_ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def parse_floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v.strip()]


def measure(pipe, x, y, clf, *, noise_level, variants, batch_size, seed, **settings) -> dict:
    """Reconstruct every source ``variants`` times; return images/s, label preservation, diversity."""
    g = torch.Generator().manual_seed(seed)
    reps = x.repeat_interleave(variants, 0)
    outs = []
    with torch.inference_mode():
        pipe.reconstruct(reps[:batch_size], noise_level, generator=torch.Generator().manual_seed(0), **settings)
        t0 = time.perf_counter()
        for i in range(0, len(reps), batch_size):
            outs.append(pipe.reconstruct(reps[i:i + batch_size], noise_level, generator=g, **settings))
        seconds = time.perf_counter() - t0
    out = torch.cat(outs)
    row = {"images_per_s": len(reps) / seconds, "seconds": seconds}
    if clf is not None:
        pred = clf.predict(out.flatten(1).numpy()).reshape(len(x), variants)
        row["label_preservation"] = float((pred == y[:, None]).mean())
    v = out.view(len(x), variants, -1)
    d = (v[:, :, None] - v[:, None]).pow(2).mean(-1).sqrt()
    row["rms_between_variants"] = float(d.sum((1, 2)).mean() / max(1, variants * (variants - 1)))
    return row


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    cfgs = sorted({r["cfg"] for r in rows})
    for ax, key, label in ((axes[0], "num_iter", "MAGE num_iter"), (axes[1], "rdm_steps", "RDM DDIM steps")):
        other = "rdm_steps" if key == "num_iter" else "num_iter"
        for cfg in cfgs:
            sub = [r for r in rows if r["cfg"] == cfg]
            for val in sorted({r[other] for r in sub}):
                line = sorted((r for r in sub if r[other] == val), key=lambda r: r[key])
                if len(line) < 2 or "label_preservation" not in line[0]:
                    continue
                ax.plot([r["images_per_s"] for r in line], [r["label_preservation"] for r in line], "o-",
                        label=f"{other}={val}, cfg={cfg:g}")
                for r in line:
                    ax.annotate(str(r[key]), (r["images_per_s"], r["label_preservation"]), fontsize=7,
                                textcoords="offset points", xytext=(3, 3))
        ax.set_xlabel("images/s (reconstruct, CPU)")
        ax.set_ylabel("label preservation")
        ax.set_title(f"varying {label} (numbers on points)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="pipeline dir or named model (default: random tiny, --quick only)")
    ap.add_argument("--data", default="digits")
    ap.add_argument("--noise-level", type=float, default=0.3)
    ap.add_argument("--num-iter", default="1,2,4,8,12", help="comma list")
    ap.add_argument("--rdm-steps", default="5,10,25,50", help="comma list")
    ap.add_argument("--cfg", default="0", help="comma list of guidance scales")
    ap.add_argument("--sources", type=int, default=200, help="held-out sources")
    ap.add_argument("--variants", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--name", default=None, help="result file stem (default speed_quality_<model>)")
    ap.add_argument("--out-dir", default=str(OUT_DIR),
                    help="folder for the JSON, MD and PNG (default: runs/benchmarks/ at the repository root)")
    args = ap.parse_args(argv)
    if args.quick:
        args.num_iter, args.rdm_steps, args.sources, args.variants, args.batch_size = "1,2", "2,5", 8, 2, 8
    if args.model is None and not args.quick:
        ap.error("--model is required outside --quick")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    pipe = RCGPipeline.from_pretrained(args.model) if args.model else RCGPipeline.from_preset("tiny", in_channels=1)
    pipe.eval()
    size, ch = pipe.image_size, pipe.in_channels

    source = open_source(args.data)
    pool_idx, test_idx = benchmark_split(source)
    rng = np.random.default_rng(args.seed)
    chosen = np.sort(rng.choice(test_idx, size=min(args.sources, len(test_idx)), replace=False))
    x = load_images(source, chosen, size, ch)
    y = np.array([source.labels[int(i)] for i in chosen])
    clf = None
    if len(source.classes) > 1:
        clf = pixel_judge(load_images(source, pool_idx, size, ch), np.array([source.labels[i] for i in pool_idx]))
        real_acc = float((clf.predict(x.flatten(1).numpy()) == y).mean())

    rows = []
    t_start = time.time()
    grid = list(itertools.product(parse_floats(args.cfg), parse_ints(args.num_iter), parse_ints(args.rdm_steps)))
    for i, (cfg, num_iter, rdm_steps) in enumerate(grid):
        resolved = pipe.resolve_settings(cfg=cfg, num_iter=num_iter, rdm_steps=rdm_steps).to_dict()
        row = {"cfg": cfg, "num_iter": num_iter, "rdm_steps": rdm_steps, "settings": resolved}
        row.update(measure(pipe, x, y, clf, noise_level=args.noise_level, variants=args.variants,
                           batch_size=args.batch_size, seed=args.seed, **resolved))
        rows.append(row)
        lp = f"{row['label_preservation']:.3f}" if "label_preservation" in row else "n/a"
        print(f"[{i + 1}/{len(grid)}] cfg {cfg:g} num_iter {num_iter:2d} rdm_steps {rdm_steps:3d}: "
              f"{row['images_per_s']:7.1f} img/s, label preservation {lp}, "
              f"RMS between variants {row['rms_between_variants']:.3f}", flush=True)

    name = "quick" if args.quick else Path(str(args.model)).name
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / (args.name or f"speed_quality_{name}")
    result = {
        "date": utc_now(), "machine": machine(),
        "model": args.model or "random tiny", "data": args.data, "noise_level": args.noise_level,
        "sources": len(x), "variants": args.variants, "batch_size": args.batch_size,
        "pixel_classifier_real_accuracy": real_acc if clf is not None else None,
        "rows": rows, "seconds": time.time() - t_start,
        "versions": versions(), "command": command("speed_quality.py", argv),
    }
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"Speed vs quality of `{result['model']}` on {args.data} held-out images "
             f"({len(x)} sources x {args.variants} variants, noise level {args.noise_level}, batch {args.batch_size}, "
             f"{torch.get_num_threads()} threads, {result['date'][:10]})", ""]
    if clf is not None:
        lines.append(f"Pixel classifier accuracy on the real sources: {real_acc:.3f}")
        lines.append("")
    lines += ["| cfg | num_iter | rdm_steps | images/s | label preservation | RMS between variants |",
              "|---|---|---|---|---|---|"]
    for r in rows:
        lp = f"{r['label_preservation']:.3f}" if "label_preservation" in r else "n/a"
        lines.append(f"| {r['cfg']:g} | {r['num_iter']} | {r['rdm_steps']} | {r['images_per_s']:.1f} | {lp} | "
                     f"{r['rms_between_variants']:.3f} |")
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    plot(rows, stem.with_suffix(".png"), lines[0].replace("`", ""))
    print("\n".join(lines))
    print(f"\n{stem}.{{json,md,png}} ({result['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
