"""Fidelity against variety, over generation settings and seeds.

Three numbers decide whether variants are useful, and the generation settings trade them against
each other:

- ``own``: label preservation of MAGE rendering each held-out image's own representation (noise
  0, no RDM, full repaint): how well MAGE follows a representation;
- ``preservation``: label preservation of ``reconstruct`` at ``--noise-level`` (default 0.3),
  ``--variants`` per held-out image;
- ``rms_between``: RMS pixel distance ([0, 1] scale) between two variants of one source (are
  they copies?); ``rms_to_source`` as well.

Labels come from the same judge as ``quality.py``: a logistic regression on pixels trained on the
benchmark's real training pool. Each setting runs over every held-out image once per seed;
the table gives the mean over seeds and its standard error (the spread between seeds, over
sqrt(seeds)), so settings are compared by more than one draw. ``images/s`` is the measured
``reconstruct`` throughput of the run (guidance doubles MAGE's batch).

Usage:
    python benchmarks/frontier.py --model digits-tiny --seeds 0,1,2 \\
        --settings defaults "cfg=2,token_temperature=1.3" "token_temperature=0.5"
    python benchmarks/frontier.py --quick            # seconds: random tiny model, few images
    python benchmarks/frontier.py --compare runs/benchmarks/frontier_a.json=before runs/benchmarks/frontier_b.json=after \
        --where repaint_fraction=1,cfg=0 --name frontier_before-vs-after   # no model: plot earlier runs

``--compare`` draws earlier runs' rows (those whose resolved settings match ``--where``) as
curves of own-representation fidelity against variety, one curve per ``FILE[+FILE...]=LABEL``, to
show whether a change moved the curve or only slid along it.

A setting is ``defaults`` (the model's own) or comma-separated ``name=value`` pairs of
:class:`rcg_augment.GenerationSettings` fields on top of the model's defaults.
Writes frontier_<model>.{json,md,png} (``--name`` changes the stem) to ``--out-dir``, by default
runs/benchmarks/ at the repository root (git-ignored).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from _common import command, load_images, machine, pixel_judge, render_own, utc_now, versions

from rcg_augment import GenerationSettings, RCGPipeline
from rcg_augment.data import open_source
from rcg_augment.data.splits import benchmark_split

# A run writes to runs/benchmarks/ at the repository root by default (git-ignored), so it never
# overwrites a committed result; pass --out-dir benchmarks/results to replace one on purpose.
OUT_DIR = Path(__file__).resolve().parents[1] / "runs" / "benchmarks"
METRICS = ("own", "preservation", "rms_between", "rms_to_source", "images_per_s")


def parse_setting(text: str) -> dict:
    """``"defaults"`` -> {}; ``"cfg=2,token_temperature=1.3"`` -> {"cfg": 2, "token_temperature": 1.3},
    checked by :class:`GenerationSettings` (an unknown name or a bad value is an error)."""
    text = text.strip()
    if text in ("", "defaults"):
        return {}
    out = {}
    for item in text.split(","):
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"setting {item!r} in {text!r} is not name=value")
        try:
            number = json.loads(value)
        except json.JSONDecodeError:
            number = None
        if isinstance(number, bool) or not isinstance(number, (int, float)):
            raise ValueError(f"value of {key.strip()!r} in {text!r} is not a number: {value!r}")
        out[key.strip()] = number
    GenerationSettings.from_kwargs(**out)
    return out


def label(overrides: dict) -> str:
    return ", ".join(f"{k} {v:g}" for k, v in overrides.items()) or "defaults"


def run_one(pipe, clf, x, y, overrides: dict, *, noise_level: float, variants: int, seed: int,
            batch_size: int) -> dict:
    """The four numbers of one setting at one seed, over every image of ``x``."""
    s = pipe.resolve_settings(**overrides)
    predict = lambda imgs: clf.predict(pipe._resize(imgs, tuple(x.shape[-2:])).flatten(1).numpy())  # noqa: E731
    rendered = render_own(pipe, x, s.to_dict(), generator=torch.Generator().manual_seed(seed), batch=batch_size)
    with torch.inference_mode():
        g = torch.Generator().manual_seed(seed)
        reps = x.repeat_interleave(variants, 0)
        t0 = time.perf_counter()
        out = torch.cat([pipe.reconstruct(reps[i:i + batch_size], noise_level, generator=g, **s.overrides())
                         for i in range(0, len(reps), batch_size)])
        seconds = time.perf_counter() - t0
    pred = predict(out).reshape(len(x), variants)
    v = pipe._resize(out, tuple(x.shape[-2:])).view(len(x), variants, -1)
    pairs = (v[:, :, None] - v[:, None]).pow(2).mean(-1).sqrt()
    return {
        "own": float((predict(rendered) == y).mean()),
        "preservation": float((pred == y[:, None]).mean()),
        "rms_between": float(pairs.sum((1, 2)).mean() / (variants * (variants - 1))),
        "rms_to_source": float((v - x.view(len(x), 1, -1)).pow(2).mean(-1).sqrt().mean()),
        "images_per_s": len(reps) / seconds,
    }


def summarise(per_seed: list[dict]) -> dict:
    """Mean and standard error over seeds of each metric (se 0 with one seed)."""
    out = {}
    for key in METRICS:
        vals = np.array([r[key] for r in per_seed], dtype=float)
        se = float(vals.std(ddof=1) / np.sqrt(len(vals))) if len(vals) > 1 else 0.0
        out[key] = {"mean": float(vals.mean()), "se": se}
    return out


def plot(rows: list[dict], targets: tuple[float, float, float], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 5))
    own = [r["summary"]["own"]["mean"] for r in rows]
    for r in rows:
        m = r["summary"]
        ax.errorbar(m["rms_between"]["mean"], m["preservation"]["mean"], xerr=m["rms_between"]["se"],
                    yerr=m["preservation"]["se"], fmt="none", ecolor="0.6", zorder=1)
    sc = ax.scatter([r["summary"]["rms_between"]["mean"] for r in rows],
                    [r["summary"]["preservation"]["mean"] for r in rows], c=own, cmap="viridis", s=60, zorder=2)
    for r in rows:
        ax.annotate(r["label"], (r["summary"]["rms_between"]["mean"], r["summary"]["preservation"]["mean"]),
                    fontsize=7, xytext=(4, 4), textcoords="offset points")
    own_t, pres_t, rms_t = targets
    ax.axhline(pres_t, ls="--", c="k", lw=0.8)
    ax.axvline(rms_t, ls="--", c="k", lw=0.8)
    ax.margins(x=0.2)
    ax.set_xlabel("RMS between two variants of one source (variety)")
    ax.set_ylabel("label preservation")
    fig.colorbar(sc, ax=ax, label=f"MAGE from own representation (goal {own_t:g})")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def select_rows(result: dict, where: dict) -> list[dict]:
    """The rows of a frontier result whose resolved settings match every ``where`` item."""
    return [r for r in result["rows"] if all(r["settings"].get(k) == v for k, v in where.items())]


def compare_plot(curves: list[tuple[str, list[dict]]], targets: tuple[float, float, float], path: Path,
                 title: str) -> None:
    """One curve per run: own-representation fidelity against variety, each point labelled with its
    token temperature."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 5))
    for name, rows in curves:
        rows = sorted(rows, key=lambda r: r["summary"]["rms_between"]["mean"])
        xs = [r["summary"]["rms_between"]["mean"] for r in rows]
        ys = [r["summary"]["own"]["mean"] for r in rows]
        line = ax.errorbar(xs, ys, xerr=[r["summary"]["rms_between"]["se"] for r in rows],
                           yerr=[r["summary"]["own"]["se"] for r in rows], marker="o", ms=5, capsize=2, label=name)
        for r, x, y in zip(rows, xs, ys, strict=True):
            # the knob that slides a point along its curve
            ax.annotate(f"T {r['settings']['token_temperature']:g}", (x, y), fontsize=7, xytext=(4, 4),
                        textcoords="offset points", color=line[0].get_color())
    own_t, _, rms_t = targets
    ax.axhline(own_t, ls="--", c="k", lw=0.8)
    ax.axvline(rms_t, ls="--", c="k", lw=0.8)
    ax.margins(x=0.15, y=0.15)
    ax.set_xlabel("RMS between two variants of one source (variety)")
    ax.set_ylabel("MAGE from the image's own representation: label preservation")
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def compare(ap: argparse.ArgumentParser, args) -> int:
    try:
        where = parse_setting(args.where) if args.where else {}
        targets = tuple(float(v) for v in args.targets.split(","))
    except (TypeError, ValueError) as err:
        ap.error(str(err))
    if len(targets) != 3:
        ap.error("--targets needs three numbers")
    curves, lines = [], []
    for item in args.compare:
        files, _, name = item.partition("=")
        name = name or Path(files).stem
        rows = []
        for file in files.split("+"):  # one curve may join several runs' rows
            try:
                result = json.loads(Path(file).read_text())
            except (OSError, ValueError) as err:
                ap.error(f"--compare {file}: {err}")
            found = select_rows(result, where)
            if not found:
                ap.error(f"--compare {file}: no row matches --where {args.where!r}")
            rows += found
            lines += [f"| {name} | {r['label']} | {','.join(map(str, result['seeds']))} | "
                      f"{r['summary']['own']['mean']:.3f} ± {r['summary']['own']['se']:.3f} | "
                      f"{r['summary']['preservation']['mean']:.3f} | {r['summary']['rms_between']['mean']:.3f} |"
                      for r in found]
        curves.append((name, rows))
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = args.name or "frontier_compare"
    compare_plot(curves, targets, out_dir / f"{stem}.png",
                 f"own representation against variety ({args.where or 'all rows'})")
    table = "\n".join(["| run | settings | seeds | own | preservation | RMS between |",
                        "|---|---|---|---|---|---|", *lines]) + "\n"
    (out_dir / f"{stem}.md").write_text(table)
    print(table)
    print(f"plot: {out_dir / f'{stem}.png'}")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="pipeline dir or named model (default: random tiny, --quick only)")
    ap.add_argument("--data", default="digits", help="a labelled source: digits | lfw-faces | a folder")
    ap.add_argument("--settings", nargs="+", default=["defaults"],
                    help='each "defaults" or "name=value,..." (GenerationSettings fields)')
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--noise-level", type=float, default=0.3)
    ap.add_argument("--variants", type=int, default=2, help="variants per held-out image, >= 2")
    ap.add_argument("--sources", type=int, default=None, help="use only the first N held-out images (default: all)")
    ap.add_argument("--targets", default="0.93,0.90,0.15",
                    help="goals drawn on the plot and checked in the table: own, preservation, RMS between")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--name", default=None)
    ap.add_argument("--out-dir", default=str(OUT_DIR),
                    help="folder for the JSON, MD and PNG (default: runs/benchmarks/ at the repository root)")
    ap.add_argument("--compare", nargs="+", metavar="FILE[=LABEL]", default=None,
                    help="plot earlier runs' JSON files against each other instead of running a model")
    ap.add_argument("--where", default=None, metavar="KEY=VALUE,...",
                    help="with --compare: only rows whose resolved settings have these values")
    args = ap.parse_args(argv)
    if args.compare:
        return compare(ap, args)
    if args.quick:
        args.sources = args.sources or 24
        if args.seeds == ap.get_default("seeds"):
            args.seeds = "0,1"
        if args.settings == ["defaults"]:
            args.settings = ["num_iter=2,rdm_steps=3", "num_iter=2,rdm_steps=3,cfg=1,token_temperature=1.3"]
    if args.model is None and not args.quick:
        ap.error("--model is required outside --quick")
    if args.variants < 2:
        ap.error("--variants must be >= 2 (variety is the distance between variants)")
    if args.sources is not None and args.sources < 1:
        ap.error("--sources must be >= 1")
    if not 0.0 <= args.noise_level <= 1.0:
        ap.error("--noise-level must be in [0, 1]")
    if args.batch_size < 1:
        ap.error("--batch-size must be >= 1")
    try:
        settings = [parse_setting(s) for s in args.settings]
        seeds = [int(v) for v in args.seeds.split(",") if v.strip()]
        targets = tuple(float(v) for v in args.targets.split(","))
    except (TypeError, ValueError) as err:
        ap.error(str(err))
    if len(targets) != 3 or not seeds:
        ap.error("--targets needs three numbers and --seeds at least one seed")

    t_start = time.time()
    torch.manual_seed(0)
    pipe = RCGPipeline.from_pretrained(args.model) if args.model else RCGPipeline.from_preset("tiny", in_channels=1)
    for s in settings:
        try:
            pipe.resolve_settings(**s)
        except (TypeError, ValueError) as err:
            ap.error(f"setting {label(s)!r}: {err}")
    source = open_source(args.data)
    pool_idx, test_idx = benchmark_split(source)
    held_out = len(test_idx)
    if args.sources:
        test_idx = test_idx[:args.sources]
    if args.quick:
        pool_idx = pool_idx[::4]
    size, ch = pipe.image_size, pipe.in_channels
    x_pool, y_pool = load_images(source, pool_idx, size, ch), np.array([source.labels[i] for i in pool_idx])
    x, y = load_images(source, test_idx, size, ch), np.array([source.labels[i] for i in test_idx])
    if len(set(y_pool.tolist())) < 2:
        ap.error("--data must have at least two classes (the judge is a classifier)")
    clf = pixel_judge(x_pool, y_pool)
    real = float((clf.predict(x.flatten(1).numpy()) == y).mean())

    rows = []
    for s in settings:
        per_seed = []
        for seed in seeds:
            r = run_one(pipe, clf, x, y, s, noise_level=args.noise_level, variants=args.variants, seed=seed,
                        batch_size=args.batch_size)
            per_seed.append({"seed": seed, **r})
            print(f"{label(s)} seed {seed}: {r}", file=sys.stderr, flush=True)
        rows.append({"label": label(s), "overrides": s, "settings": pipe.resolve_settings(**s).to_dict(),
                     "per_seed": per_seed, "summary": summarise(per_seed)})

    own_t, pres_t, rms_t = targets
    stem = args.name or ("frontier_quick" if args.quick else f"frontier_{Path(str(args.model)).name}")
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    result = {"date": utc_now(), "model": args.model or "random tiny", "data": args.data,
              "held_out_images": len(x), "variants_per_image": args.variants, "noise_level": args.noise_level,
              "seeds": seeds, "judge_on_real_held_out": real,
              "targets": {"own": own_t, "preservation": pres_t, "rms_between": rms_t},
              "rows": rows, "seconds": time.time() - t_start, "machine": machine(), "versions": versions(),
              "command": command("frontier.py", argv)}
    (out_dir / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    fmt = lambda m: f"{m['mean']:.3f} ± {m['se']:.3f}"  # noqa: E731
    which = f"all {len(x)}" if len(x) == held_out else f"the first {len(x)}"
    lines = [f"{result['model']} on {args.data}: {which} held-out images, noise level {args.noise_level:g}, "
             f"{args.variants} variants each, seeds {seeds} (mean ± standard error over seeds: the spread of "
             f"the draws on these same images; comparing with other images or another judge adds about "
             f"{np.sqrt(0.9 * 0.1 / len(x)):.3f} for a rate near 0.9); the judge scores {real:.3f} on the real images.", "",
             f"| settings | own (goal {own_t:g}) | preservation (goal {pres_t:g}) | RMS between (goal {rms_t:g}) "
             "| RMS to source | images/s | goals met |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        m = r["summary"]
        met = [m["own"]["mean"] >= own_t, m["preservation"]["mean"] >= pres_t, m["rms_between"]["mean"] >= rms_t]
        lines.append(f"| {r['label']} | {fmt(m['own'])} | {fmt(m['preservation'])} | {fmt(m['rms_between'])} | "
                     f"{fmt(m['rms_to_source'])} | {m['images_per_s']['mean']:.0f} | {sum(met)}/3 |")
    table = "\n".join(lines) + "\n"
    (out_dir / f"{stem}.md").write_text(table)
    plot(rows, targets, out_dir / f"{stem}.png",
         f"{result['model']}: noise {args.noise_level:g}, {len(x)} held-out images x {args.variants}, seeds {seeds}")
    print(table)
    print(f"JSON: {out_dir / f'{stem}.json'}  ({result['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
