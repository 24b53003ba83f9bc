"""Does a trained pipeline work? Contact sheet, label preservation, diversity, Frechet distance.

All measurements use the benchmark's held-out test images (`rcg_augment.data.splits`), which the
bundled models never trained on.

- contact sheet: held-out sources, their `reconstruct` variants at each noise level, and a row of
  unconditional `generate` samples;
- label preservation: a logistic regression on pixels, trained on the real training pool, labels
  the variants of held-out images; reported per noise level next to its accuracy on the real
  held-out images (the ceiling);
- diversity: mean pixel distance (RMS, [0, 1] scale) between variants of one source, and from
  each variant to its source, per noise level;
- fidelity decomposition: where a variant loses its class, stage by stage, on held-out images
  (tokenizer round trip, encoder nearest neighbour, MAGE rendering the image's own
  representation, full reconstruct per noise level) and MAGE's masked-token accuracy with and
  without the representation;
- Frechet distance in the model's encoder space (normalised 256-d representations) between
  generated and real held-out images, next to the distance between two disjoint real halves (the
  floor) and between reconstructions at each level and the real images.

Usage:
    python benchmarks/quality.py --model digits-tiny --data digits
    python benchmarks/quality.py --model faces-tiny --data lfw-faces --classes face
    python benchmarks/quality.py --model digits-tiny --fidelity-only   # the decomposition alone
    python benchmarks/quality.py --model digits-tiny --surface         # noise_level x repaint_fraction
    python benchmarks/quality.py --quick            # seconds: random tiny model, few images

Writes <stem>.{json,png} to --out-dir (default runs/benchmarks/ at the repository root, git-ignored).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from _common import command, load_images, pixel_judge, render_own, utc_now, versions

from rcg_augment import RCGPipeline
from rcg_augment.data import open_source
from rcg_augment.data.contact_sheet import contact_sheet
from rcg_augment.data.splits import benchmark_split

# A run writes to runs/benchmarks/ at the repository root by default (git-ignored), so it never
# overwrites a committed result; pass --out-dir benchmarks/results to replace one on purpose.
OUT_DIR = Path(__file__).resolve().parents[1] / "runs" / "benchmarks"


def to_pil(t: torch.Tensor):
    from PIL import Image

    a = (t.clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
    return Image.fromarray(a[0] if a.shape[0] == 1 else a.transpose(1, 2, 0))


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to two sets of feature rows."""
    from scipy import linalg

    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean, _ = linalg.sqrtm(cov_a @ cov_b, disp=False)
    covmean = covmean.real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * covmean))


def batched(fn, x: torch.Tensor, batch: int) -> torch.Tensor:
    return torch.cat([fn(x[i:i + batch]) for i in range(0, len(x), batch)]) if len(x) else x


@torch.inference_mode()
def masked_token_accuracy(pipe, x: torch.Tensor, *, mask_ratio: float = 0.75, seed: int = 0,
                          batch: int = 256) -> dict:
    """Held-out masked-token accuracy of MAGE with and without the representation.

    ``mask_ratio`` of each image's VQ tokens (at random, seeded) are masked; the share of them
    whose arg-max prediction is the true code, given the image's own representation
    (conditional) or the learned unconditional latent. ``stray_mass``: the mean probability
    MAGE puts (conditional, at temperature 1) on codes it rates below 1/codebook_size, i.e.
    how often a draw at token temperature 1 picks a code MAGE itself thinks unlikely.
    """
    from rcg_augment.sampling.maskgit import keep_source_tokens

    g = torch.Generator().manual_seed(seed)
    hits = {"conditional": 0, "unconditional": 0}
    total, stray = 0, 0.0
    mask_id = pipe.config.mage.mask_token_id
    for i in range(0, len(x), batch):
        xb = x[i:i + batch]
        codes = pipe.tokenizer.encode(xb).flatten(1)
        start = keep_source_tokens(codes, mask_ratio, mask_id, generator=g)
        masked = start == mask_id
        rep = pipe.encode(xb)
        for name, r in (("conditional", rep), ("unconditional", None)):
            logits = pipe.mage(start, r).float()
            hits[name] += int((logits.argmax(-1) == codes)[masked].sum())
            if name == "conditional":
                p = logits.softmax(-1)[masked]
                stray += float((p * (p < 1.0 / p.shape[-1])).sum())
        total += int(masked.sum())
    return {k: v / max(1, total) for k, v in hits.items()} | {"stray_mass": stray / max(1, total),
                                                              "mask_ratio": mask_ratio}


@torch.inference_mode()
def fidelity_decomposition(pipe, clf, x_pool, y_pool, x_test, y_test, settings: dict, *, seed: int,
                           batch: int) -> dict:
    """Label preservation stage by stage on held-out images, judged by the pixel oracle ``clf``.

    - ``oracle_on_real``: the oracle on the real held-out images (the ceiling);
    - ``tokenizer_round_trip``: decode(encode(x)) — what the VQ tokenizer alone keeps;
    - ``encoder_nearest_neighbour``: the class of the nearest pool image in representation space;
    - ``mage_from_own_representation``: MAGE renders the image's own representation (noise 0,
      no RDM), at ``settings`` with ``repaint_fraction`` 1 (full generation);
    - ``masked_token_accuracy``: see :func:`masked_token_accuracy`.
    """
    predict = lambda imgs: clf.predict(imgs.flatten(1).numpy())  # noqa: E731
    out = {"oracle_on_real": float((predict(x_test) == y_test).mean())}
    size = (pipe.image_size, pipe.image_size)
    roundtrip = batched(lambda b: pipe.tokenizer.decode(pipe.tokenizer.encode(pipe._resize(b, size))).clamp(0, 1),
                        x_test, batch)
    out["tokenizer_round_trip"] = float((predict(pipe._resize(roundtrip, tuple(x_test.shape[-2:]))) == y_test).mean())
    f_pool = torch.nn.functional.normalize(batched(pipe.encode, x_pool, batch), dim=-1)
    f_test = torch.nn.functional.normalize(batched(pipe.encode, x_test, batch), dim=-1)
    nearest = (f_test @ f_pool.t()).argmax(-1).numpy()
    out["encoder_nearest_neighbour"] = float((y_pool[nearest] == y_test).mean())
    g = torch.Generator().manual_seed(seed)
    rendered = render_own(pipe, x_test, settings, generator=g, batch=batch)
    out["mage_from_own_representation"] = float((predict(pipe._resize(rendered, tuple(x_test.shape[-2:])))
                                                 == y_test).mean())
    out["masked_token_accuracy"] = masked_token_accuracy(pipe, x_test, seed=seed, batch=batch)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="pipeline dir or named model (default: random tiny, --quick only)")
    ap.add_argument("--data", default="digits", help="digits | lfw-faces | a folder")
    ap.add_argument("--classes", default=None, help="comma list of class names to keep (e.g. face)")
    ap.add_argument("--noise-levels", default="0,0.3,0.6,1")
    ap.add_argument("--variants", type=int, default=4, help="variants per held-out source and level")
    ap.add_argument("--sources", type=int, default=200, help="held-out sources used for preservation/diversity")
    ap.add_argument("--generate", type=int, default=500, help="unconditional samples for the Frechet distance")
    ap.add_argument("--sheet-rows", type=int, default=10)
    ap.add_argument("--num-iter", type=int, default=None)
    ap.add_argument("--rdm-steps", type=int, default=None)
    ap.add_argument("--cfg", type=float, default=None)
    ap.add_argument("--temperature", type=float, default=None, help="MAGE re-masking temperature (default: the model's)")
    ap.add_argument("--token-temperature", type=float, default=None,
                    help="temperature of MAGE's draw of each code, > 0 (default: the model's; 1 is the official)")
    ap.add_argument("--repaint-fraction", type=float, default=None,
                    help="share of the source's tokens MAGE repaints, in [0.5, 1] (default: the model's)")
    ap.add_argument("--surface", action="store_true",
                    help="preservation / RMS to source / RMS between variants over noise levels x --repaint-fractions")
    ap.add_argument("--repaint-fractions", default="0.5,0.6,0.7,0.8,0.9,1.0")
    ap.add_argument("--label-filter", action="store_true",
                    help="with --fidelity-only: also reconstruct through the label filter (prototypes from the "
                    "training pool, --max-attempts draws) and report preservation of the kept variants and acceptance")
    ap.add_argument("--max-attempts", type=int, default=4)
    ap.add_argument("--fidelity-only", action="store_true",
                    help="only the fidelity decomposition on ALL held-out images (no sheet, no FD)")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--name", default=None, help="result file stem (default quality_<model>)")
    ap.add_argument("--out-dir", default=str(OUT_DIR),
                    help="folder for the JSON and PNG (default: runs/benchmarks/ at the repository root)")
    args = ap.parse_args(argv)
    if args.quick:
        args.sources, args.variants, args.generate, args.sheet_rows = 12, 2, 24, 4
        args.num_iter, args.rdm_steps = args.num_iter or 2, args.rdm_steps or 3
    if args.model is None and not args.quick:
        ap.error("--model is required outside --quick")

    t0 = time.time()
    torch.manual_seed(args.seed)
    pipe = (RCGPipeline.from_pretrained(args.model) if args.model
            else RCGPipeline.from_preset("tiny", in_channels=1))
    size, ch = pipe.image_size, pipe.in_channels
    source = open_source(args.data)
    pool_idx, test_idx = benchmark_split(source)
    if args.classes:
        keep = {source.classes.index(c) for c in args.classes.split(",")}
        test_idx = [i for i in test_idx if source.labels[i] in keep]

    def tensors(indices):
        return load_images(source, indices, size, ch)

    if args.quick:  # seconds, not minutes: a strided subset of both splits
        pool_idx, test_idx = pool_idx[::4], test_idx[::8]
    x_pool, y_pool = tensors(pool_idx), np.array([source.labels[i] for i in pool_idx])
    x_test, y_test = tensors(test_idx), np.array([source.labels[i] for i in test_idx])
    settings = dict(num_iter=args.num_iter, rdm_steps=args.rdm_steps, cfg=args.cfg, temperature=args.temperature,
                    repaint_fraction=args.repaint_fraction, token_temperature=args.token_temperature)
    levels = [float(v) for v in args.noise_levels.split(",")]
    rng = np.random.default_rng(args.seed)
    chosen = np.sort(rng.choice(len(x_test), size=min(args.sources, len(x_test)), replace=False))
    src = x_test[chosen]

    # Label preservation: a pixel classifier trained on the real pool.
    multi_class = len(set(y_pool.tolist())) > 1
    clf = None
    if multi_class:
        clf = pixel_judge(x_pool, y_pool)
        real_acc = float((clf.predict(x_test.flatten(1).numpy()) == y_test).mean())
    if args.surface:
        if clf is None:
            ap.error("--surface needs a labelled dataset with >= 2 classes")
        return anchoring_surface(args, argv, pipe, clf, src, y_test[chosen], levels, settings, t0)
    fidelity = None
    if clf is not None:
        fidelity = fidelity_decomposition(pipe, clf, x_pool, y_pool, x_test, y_test,
                                          pipe.resolve_settings(**settings).to_dict(), seed=args.seed,
                                          batch=args.batch_size)
        print(f"fidelity: {fidelity}", file=sys.stderr, flush=True)
    if args.fidelity_only:
        if fidelity is None:
            ap.error("--fidelity-only needs a labelled dataset with >= 2 classes")
        # Full reconstruct per level on every held-out image (one variant each).
        g = torch.Generator().manual_seed(args.seed)
        fidelity["reconstruct"] = {}
        for level in levels:
            out = batched(lambda b, lv=level: pipe.reconstruct(b, lv, generator=g, **settings), x_test,
                          args.batch_size)
            fidelity["reconstruct"][str(level)] = float((clf.predict(out.flatten(1).numpy()) == y_test).mean())
        if args.label_filter:
            from rcg_augment import PrototypeFilter, reconstruct_with_labels

            filt = PrototypeFilter.from_images(pipe, x_pool, torch.as_tensor(y_pool), batch_size=args.batch_size)
            fidelity["label_filter"] = {"prototypes": "class means over the training pool",
                                        "max_attempts": args.max_attempts}
            for level in levels:
                outs, oks, tries = [], [], []
                for i in range(0, len(x_test), args.batch_size):
                    o, ok, n = reconstruct_with_labels(
                        pipe, x_test[i:i + args.batch_size], torch.as_tensor(y_test[i:i + args.batch_size]), level,
                        label_filter=filt, max_attempts=args.max_attempts, generator=g, **settings)
                    outs.append(o), oks.append(ok), tries.append(n)
                out, ok, n = torch.cat(outs), torch.cat(oks).numpy(), torch.cat(tries)
                kept = clf.predict(out[torch.from_numpy(ok)].flatten(1).numpy()) == y_test[ok]
                fidelity["label_filter"][str(level)] = {
                    "preservation_of_kept": float(kept.mean()) if len(kept) else float("nan"),
                    "kept_fraction": float(ok.mean()), "acceptance_per_draw": float(ok.sum() / n.sum()),
                    "draws_per_image": float(n.float().mean())}
        stem = args.name or f"fidelity_{Path(str(args.model or 'quick')).name}"
        out_dir = Path(args.out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        result = {"date": utc_now(), "model": args.model or "random tiny",
                  "data": args.data, "held_out_test_images": len(test_idx),
                  "settings": pipe.resolve_settings(**settings).to_dict(), "fidelity": fidelity,
                  "seconds": time.time() - t0, "command": command("quality.py", argv)}
        (out_dir / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
        print_fidelity(fidelity)
        print(f"\nJSON: {out_dir / f'{stem}.json'}  ({result['seconds']:.0f} s)")
        return 0
    g = torch.Generator().manual_seed(args.seed)
    per_level = {}
    variants_by_level = {}
    for level in levels:
        reps = src.repeat_interleave(args.variants, 0)
        out = batched(lambda b, lv=level: pipe.reconstruct(b, lv, generator=g, **settings), reps, args.batch_size)
        variants_by_level[level] = out
        v = out.view(len(src), args.variants, -1)
        row = {}
        if clf is not None:
            pred = clf.predict(out.flatten(1).numpy()).reshape(len(src), args.variants)
            row["label_preservation"] = float((pred == y_test[chosen][:, None]).mean())
        diffs = (v[:, :, None] - v[:, None]).pow(2).mean(-1).sqrt()
        n = args.variants
        row["diversity_rms_between_variants"] = float(diffs.sum((1, 2)).mean() / max(1, n * (n - 1)))
        row["rms_to_source"] = float((v - src.view(len(src), 1, -1)).pow(2).mean(-1).sqrt().mean())
        per_level[str(level)] = row
        print(f"noise {level}: {row}", file=sys.stderr, flush=True)

    # Frechet distances in the encoder's (normalised) representation space.
    enc = lambda x: batched(pipe.encode, x, args.batch_size).numpy()  # noqa: E731
    no_source = {k: v for k, v in settings.items() if k != "repaint_fraction"}  # generate() has no source
    gen = batched(lambda b: pipe.generate(len(b), generator=g, **no_source),
                  torch.zeros(args.generate, 1), args.batch_size)
    f_test = enc(x_test)
    half = len(f_test) // 2
    perm = rng.permutation(len(f_test))
    fd = {
        "real_half_vs_half (floor)": frechet_distance(f_test[perm[:half]], f_test[perm[half:]]),
        "generated_vs_real": frechet_distance(enc(gen), f_test),
    }
    for level, out in variants_by_level.items():
        fd[f"reconstruct_{level}_vs_real"] = frechet_distance(enc(out), f_test)

    # Contact sheet: held-out sources, variants at each level, then a generate row.
    rows = min(args.sheet_rows, len(src))
    sheet_sources = [to_pil(src[i]) for i in range(rows)] + [to_pil(gen[0])]
    sheet_variants = [[to_pil(variants_by_level[lv][i * args.variants]) for lv in levels] for i in range(rows)]
    sheet_variants.append([to_pil(gen[j]) for j in range(1, 1 + len(levels))])
    labels = [f"{source.classes[y_test[chosen][i]]}" for i in range(rows)] + ["generate"]
    stem = args.name or ("quality_quick" if args.quick else f"quality_{Path(str(args.model)).name}")
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    sheet = contact_sheet(sheet_sources, sheet_variants, out_dir / f"{stem}.png", row_labels=labels)

    result = {
        "date": utc_now(), "model": args.model or "random tiny",
        "model_metadata": {k: v for k, v in pipe.config.metadata.items() if k != "official"},
        "data": args.data, "classes": args.classes, "held_out_test_images": len(test_idx),
        "sources": len(src), "variants_per_source": args.variants,
        "settings": pipe.resolve_settings(**settings).to_dict(),
        "pixel_classifier_real_test_accuracy": real_acc if clf is not None else None,
        "fidelity": fidelity,
        "per_noise_level": per_level, "frechet_distance_encoder_space": fd, "contact_sheet": str(sheet),
        "seconds": time.time() - t0, "versions": versions(),
        "command": command("quality.py", argv),
    }
    (out_dir / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")

    print(f"\nQuality of {result['model']} on {args.data} held-out images ({len(src)} sources x {args.variants} "
          f"variants), settings {result['settings']}\n")
    if clf is not None:
        print(f"pixel classifier accuracy on real held-out images: {real_acc:.3f}\n")
    print("| noise level | label preservation | RMS between variants | RMS to source |")
    print("|---|---|---|---|")
    for level, row in per_level.items():
        lp = f"{row['label_preservation']:.3f}" if "label_preservation" in row else "n/a"
        print(f"| {level} | {lp} | {row['diversity_rms_between_variants']:.3f} | {row['rms_to_source']:.3f} |")
    if fidelity is not None:
        print_fidelity(fidelity)
    print("\n| Frechet distance (encoder space) | value |\n|---|---|")
    for k, v in fd.items():
        print(f"| {k} | {v:.2f} |")
    print(f"\ncontact sheet: {sheet}\nJSON: {out_dir / f'{stem}.json'}  ({result['seconds']:.0f} s)")
    return 0


def anchoring_surface(args, argv, pipe, clf, src, labels, levels, settings, t0) -> int:
    """Label preservation, RMS to the source and RMS between two variants of one source over
    noise_level x repaint_fraction; JSON + a three-panel heat map."""
    fractions = [float(v) for v in args.repaint_fractions.split(",")]
    n = max(2, args.variants)
    reps = src.repeat_interleave(n, 0)
    grid = {}
    for level in levels:
        for frac in fractions:
            g = torch.Generator().manual_seed(args.seed)
            kw = dict(settings, repaint_fraction=frac)
            out = batched(lambda b, lv=level, k=kw, gen=g: pipe.reconstruct(b, lv, generator=gen, **k), reps, args.batch_size)
            v = out.view(len(src), n, -1)
            pred = clf.predict(out.flatten(1).numpy()).reshape(len(src), n)
            diffs = (v[:, :, None] - v[:, None]).pow(2).mean(-1).sqrt()
            grid[f"{level}|{frac}"] = {
                "noise_level": level, "repaint_fraction": frac,
                "label_preservation": float((pred == labels[:, None]).mean()),
                "rms_to_source": float((v - src.view(len(src), 1, -1)).pow(2).mean(-1).sqrt().mean()),
                "rms_between_variants": float(diffs.sum((1, 2)).mean() / (n * (n - 1))),
            }
            print(f"surface {level} x {frac}: {grid[f'{level}|{frac}']}", file=sys.stderr, flush=True)
    stem = args.name or f"anchoring_{Path(str(args.model or 'quick')).name}"
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = (("label_preservation", "label preservation"), ("rms_to_source", "RMS to source"),
               ("rms_between_variants", "RMS between 2 variants"))
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for ax, (key, title) in zip(axes, metrics, strict=False):
        m = np.array([[grid[f"{lv}|{fr}"][key] for fr in fractions] for lv in levels])
        im = ax.imshow(m, cmap="viridis", aspect="auto", origin="lower")
        ax.set_xticks(range(len(fractions)), [f"{f:g}" for f in fractions])
        ax.set_yticks(range(len(levels)), [f"{lv:g}" for lv in levels])
        ax.set_xlabel("repaint_fraction")
        ax.set_ylabel("noise_level")
        ax.set_title(title)
        for i in range(len(levels)):
            for j in range(len(fractions)):
                ax.text(j, i, f"{m[i, j]:.2f}", ha="center", va="center", color="w", fontsize=8)
        fig.colorbar(im, ax=ax, fraction=0.046)
    fig.suptitle(f"{args.model}: {len(src)} held-out sources x {n} variants, settings "
                 f"{ {k: v for k, v in settings.items() if v is not None} }", fontsize=9)
    fig.tight_layout()
    fig.savefig(out_dir / f"{stem}.png", dpi=110)
    result = {"date": utc_now(), "model": args.model or "random tiny",
              "data": args.data, "sources": len(src), "variants_per_source": n,
              "settings": pipe.resolve_settings(**{k: v for k, v in settings.items() if k != "repaint_fraction"})
              .to_dict(), "surface": list(grid.values()), "seconds": time.time() - t0,
              "command": command("quality.py", argv)}
    (out_dir / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    print("| noise_level | repaint_fraction | label preservation | RMS to source | RMS between variants |")
    print("|---|---|---|---|---|")
    for row in grid.values():
        print(f"| {row['noise_level']:g} | {row['repaint_fraction']:g} | {row['label_preservation']:.3f} | "
              f"{row['rms_to_source']:.3f} | {row['rms_between_variants']:.3f} |")
    print(f"\nplot: {out_dir / f'{stem}.png'}\nJSON: {out_dir / f'{stem}.json'}  ({result['seconds']:.0f} s)")
    return 0


def print_fidelity(f: dict) -> None:
    print("\n| stage (held-out images) | label preservation |\n|---|---|")
    rows = [("real images (oracle ceiling)", f["oracle_on_real"]), ("VQ tokenizer round trip", f["tokenizer_round_trip"]),
            ("encoder, nearest pool neighbour", f["encoder_nearest_neighbour"]),
            ("MAGE from the image's own representation", f["mage_from_own_representation"])]
    rows += [(f"full reconstruct, noise {lv}", v) for lv, v in f.get("reconstruct", {}).items()]
    lf = f.get("label_filter", {})
    rows += [(f"with the label filter, noise {lv} (kept {v['kept_fraction']:.0%}, acceptance per draw "
              f"{v['acceptance_per_draw']:.0%})", v["preservation_of_kept"])
             for lv, v in lf.items() if isinstance(v, dict)]
    for name, v in rows:
        print(f"| {name} | {v:.3f} |")
    m = f["masked_token_accuracy"]
    print(f"\nMAGE masked-token accuracy ({m['mask_ratio']:.0%} masked): with representation "
          f"{m['conditional']:.3f}, without {m['unconditional']:.3f}; probability on codes it rates below "
          f"1/codebook (stray codes at token temperature 1): {m['stray_mass']:.3f}")


if __name__ == "__main__":
    sys.exit(main())
