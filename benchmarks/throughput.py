"""Augmentation throughput: time per stage, images/s, FLOPs, and the fraction of matmul peak.

For each model and batch size this measures, with random inputs:
  encoder forward, one RDM (DDIM) step, one MAGE decoding iteration (cond + uncond in one batched
  forward when cfg > 0), and the VQ decode; then composes the time of one `reconstruct` at the
  model's default settings (rdm_steps x step + num_iter x iteration + encoder + decode). For the
  tiny model the full `reconstruct` is also timed end to end to check that composition.
FLOPs come from torch.utils.flop_counter (matmuls, convolutions, attention); the machine's dense
matmul peak is measured in the same run with a large float32 (CPU) or bf16 (GPU) matmul, on the CPU
through both of torch's float32 matmul libraries (its BLAS and oneDNN), the faster one counting.

Usage:
    python benchmarks/throughput.py                 # tiny at batch 1/8/64, rcg-b at batch 1/8
    python benchmarks/throughput.py --quick         # seconds: tiny only, batch 1/8
    python benchmarks/throughput.py --device cuda   # bf16 autocast on GPU

On CPU it also measures `rcg-augment build` at the defaults on digits-tiny and fashion-tiny (20
images per class, 4 variants each) on 1 and 2 threads with each CPU matmul library
(`--cpu-matmul`): variants/s, FLOPs per variant by stage and the achieved rate as a share of the
matmul peak at that thread count; and training throughput per
stage (images/s) of the fashion-tiny recipe on the Fashion-MNIST train images, from two runs of
each stage that differ by --train-steps steps (so start-up, data loading and the final save cancel).

Writes throughput.json to --out (default runs/benchmarks/ at the repository root, git-ignored).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from _common import machine, utc_now, versions
from torch.utils.flop_counter import FlopCounterMode

from rcg_augment import RCGPipeline
from rcg_augment.cpu_matmul import CPU_MATMUL_BACKENDS, onednn_linear_available
from rcg_augment.sampling.maskgit import maskgit_decode

# A run writes to runs/benchmarks/ at the repository root by default (git-ignored), so it never
# overwrites a committed result; pass --out benchmarks/results/throughput.json to replace one on purpose.
OUT_DIR = Path(__file__).resolve().parents[1] / "runs" / "benchmarks"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, repeats: int) -> float:
    """Best (minimum) seconds of ``repeats`` calls after one warm-up call: the least disturbed run."""
    fn()
    sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return min(times)


def flops_of(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def matmul_peaks(device: torch.device, n: int = 4096, repeats: int = 5) -> dict[str, float]:
    """Dense matmul FLOP/s per library: on CPU float32 through torch's BLAS (``a @ b``, MKL in the
    x86-64 wheels) and through oneDNN (``rcg_augment.cpu_matmul``'s kernel) where this torch has it;
    on GPU bf16 (the dtypes the pipeline runs in)."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    peaks = {"default": 2 * n**3 / timed(lambda: a @ b, device, repeats)}
    if device.type == "cpu" and onednn_linear_available():
        with torch.inference_mode():
            w = b.t().contiguous()  # a linear layer's weight: out x in
            peaks["onednn"] = 2 * n**3 / timed(
                lambda: torch.ops.mkldnn._linear_pointwise(a, w, None, "none", [], ""), device, repeats)
    return peaks


def matmul_peak(device: torch.device, n: int = 4096, repeats: int = 5) -> float:
    """The machine's matmul peak: the fastest library's rate (see :func:`matmul_peaks`)."""
    return max(matmul_peaks(device, n, repeats).values())


def stage_fns(pipe: RCGPipeline, batch: int, cfg: float, temperature: float):
    device = pipe.device
    g = torch.Generator(device=device).manual_seed(0)
    images = torch.rand(batch, pipe.in_channels, pipe.image_size, pipe.image_size, device=device)
    rep = torch.randn(batch, pipe.config.rdm.rep_dim, device=device)
    grid = pipe.config.tokenizer.grid_size
    tokens = torch.randint(0, pipe.config.mage.codebook_size, (batch, grid, grid), device=device)
    sampler = pipe.sampler()  # the model's default rdm_steps and eta
    t_mid = sampler.timesteps[len(sampler.timesteps) // 2].to(device).expand(batch)

    def encoder():
        return pipe.encode(images)

    @torch.inference_mode()
    def rdm_step():
        with pipe._autocast():
            return pipe.rdm(rep, t_mid)

    @torch.inference_mode()
    def mage_iter():
        with pipe._autocast():
            return maskgit_decode(pipe.mage, rep, num_iter=1, temperature=temperature, cfg=cfg, generator=g)

    @torch.inference_mode()
    def decode():
        with pipe._autocast():
            return pipe.tokenizer.decode(tokens)

    return {"encoder": encoder, "rdm_step": rdm_step, "mage_iter": mage_iter, "decode": decode}, images


def bench_model(name: str, pipe: RCGPipeline, batches: list[int], *, repeats: int, end_to_end: bool,
                cfg: float) -> list[dict]:
    # Inference only; the flop counter's module hooks also need parameters without grad here.
    pipe.requires_grad_(False)
    s = pipe.resolve_settings(cfg=cfg).to_dict()
    params = {part: sum(p.numel() for p in getattr(pipe, part).parameters())
              for part in ("encoder", "rdm", "tokenizer", "mage")}
    rows = []
    for batch in batches:
        fns, images = stage_fns(pipe, batch, s["cfg"], s["temperature"])
        t = {k: timed(fn, pipe.device, repeats) for k, fn in fns.items()}
        fl = {k: flops_of(fn) for k, fn in fns.items()}
        per_batch = {
            "encoder": t["encoder"], "rdm": s["rdm_steps"] * t["rdm_step"],
            "mage": s["num_iter"] * t["mage_iter"], "decode": t["decode"],
        }
        total = sum(per_batch.values())
        flops_per_image = (fl["encoder"] + s["rdm_steps"] * fl["rdm_step"] + s["num_iter"] * fl["mage_iter"]
                           + fl["decode"]) / batch
        row = {
            "model": name, "batch": batch, "settings": s, "params": params,
            "stage_seconds_per_batch": per_batch, "step_seconds": {"rdm_step": t["rdm_step"], "mage_iter": t["mage_iter"]},
            "seconds_per_batch": total, "images_per_s": batch / total, "gflops_per_image": flops_per_image / 1e9,
            "achieved_gflops_s": flops_per_image * batch / total / 1e9,
        }
        if end_to_end:
            def e2e_call(images=images):
                g = torch.Generator(device=pipe.device).manual_seed(0)
                return pipe.reconstruct(images, 0.5, generator=g, cfg=cfg)

            e2e = timed(e2e_call, pipe.device, max(1, repeats // 2))
            # noise_level 0.5 runs half the RDM steps: compare with the matching composition.
            composed = total - per_batch["rdm"] / 2
            row["end_to_end_seconds_noise0.5"] = e2e
            row["composed_seconds_noise0.5"] = composed
        rows.append(row)
        print(f"  {name} batch {batch}: {row['images_per_s']:.2f} img/s", file=sys.stderr, flush=True)
    return rows


# The build's stages, as FlopCounterMode names the pipeline's top-level modules.
BUILD_STAGES = {"RepresentationEncoder": "encoder", "RepresentationDenoiser": "rdm", "MAGE": "mage",
                "Encoder": "vq_encode", "Decoder": "vq_decode"}


def bench_build(model: str, *, threads: list[int], shots: int, variants: int, repeats: int,
                backends: list[str] | None = None) -> list[dict]:
    """``rcg-augment build`` at the model's defaults on ``shots`` images per class of the model's own
    dataset: variants/s (the build's generation rate and the wall rate, shard writing included) per
    thread count and CPU matmul library (``cpu_matmul``), FLOPs per variant by stage (counted over one
    whole build) and the achieved rate as a share of the fastest library's matmul peak. A row of a
    non-default library also counts the records whose PNG bytes equal the default build's."""
    import tempfile

    from rcg_augment.data import build_synthetic, load_synthetic
    from rcg_augment.settings import DEFAULT_NOISE_LEVEL

    if backends is None:
        backends = [b for b in CPU_MATMUL_BACKENDS if b == "default" or onednn_linear_available()]
    source = {"digits-tiny": "digits", "faces-tiny": "lfw-faces", "fashion-tiny": "fashion-mnist"}[model]
    pipe = RCGPipeline.from_pretrained(model)
    pipe.requires_grad_(False)
    kwargs = dict(pipeline=pipe, variants_per_image=variants, noise_level=DEFAULT_NOISE_LEVEL, shots=shots,
                  progress=False)

    def png_bytes(out_dir: Path) -> list[bytes]:
        import datasets

        ds = load_synthetic(out_dir).cast_column("image", datasets.Image(decode=False))
        return [r["bytes"] for r in ds["image"]]

    with tempfile.TemporaryDirectory() as tmp:
        # FLOPs are the same work whichever library multiplies; the counter sees only aten's kernels.
        with FlopCounterMode(display=False) as counter:
            counted = build_synthetic(source, Path(tmp) / "flops", **kwargs)
        by_module = counter.get_flop_counts()
        flops = {stage: sum(by_module.get(module, {}).values()) / counted.records
                 for module, stage in BUILD_STAGES.items()}
        total = sum(by_module["Global"].values()) / counted.records
        flops["other"] = total - sum(flops.values())
        reference = png_bytes(Path(tmp) / "flops")
        rows = []
        for n in threads:
            torch.set_num_threads(n)
            peaks = matmul_peaks(torch.device("cpu"))
            peak = max(peaks.values())
            for backend in backends:
                best = None
                for r in range(repeats):
                    out = Path(tmp) / f"t{n}-{backend}-{r}"
                    t0 = time.perf_counter()
                    summary = build_synthetic(source, out, cpu_matmul=backend, **kwargs)
                    wall = time.perf_counter() - t0
                    if best is None or summary.variants_per_second > best[0].variants_per_second:
                        best = (summary, wall, out)
                summary, wall, out = best
                same = sum(a == b for a, b in zip(png_bytes(out), reference, strict=True))
                rows.append({
                    "model": model, "source": source, "shots": shots, "variants_per_image": variants, "threads": n,
                    "cpu_matmul": backend, "records": summary.records, "settings": pipe.resolve_settings().to_dict(),
                    "variants_per_s": summary.variants_per_second, "wall_variants_per_s": summary.records / wall,
                    "records_identical_to_default": same,
                    "gflops_per_variant": {k: v / 1e9 for k, v in flops.items()},
                    "gflops_per_variant_total": total / 1e9,
                    "achieved_gflops_s": total * summary.variants_per_second / 1e9,
                    "matmul_peak_gflops_s": peak / 1e9,
                    "matmul_peaks_gflops_s": {k: v / 1e9 for k, v in peaks.items()},
                    "share_of_peak": total * summary.variants_per_second / peak,
                })
                print(f"  build {model}, {n} thread(s), cpu_matmul {backend}: {summary.variants_per_second:.1f} "
                      f"variants/s, {same} of {summary.records} records identical to the default's",
                      file=sys.stderr, flush=True)
    return rows


def bench_training(recipe_name: str, *, threads: list[int], steps: int, warmup: int = 2) -> list[dict]:
    """Training throughput of each stage of a recipe, at its own settings (batch, options, init):
    seconds per optimizer step from two runs of ``warmup`` and ``warmup + steps`` steps (the
    difference cancels start-up and the final save), images/s, and what the recipe's full step
    count then takes."""
    import tempfile

    from rcg_augment.training.api import open_data, train_stage
    from rcg_augment.training.recipes import get_recipe

    recipe = get_recipe(recipe_name)
    source = open_data(recipe.data, list(recipe.classes) if recipe.classes else None)
    rows = []
    for n in threads:
        torch.set_num_threads(n)
        for stage in recipe.stages:
            settings = {**recipe.common, **recipe.per_stage.get(stage, {})}
            full_steps = settings["steps"]
            # a short run: no intermediate checkpoints, no warm-up longer than the run, no bar
            settings.update(checkpoint_every=0, log_every=max(warmup + steps, 1), progress=False)
            if settings.get("warmup_steps"):
                settings["warmup_steps"] = 0
            seconds = {}
            for k in (warmup, warmup + steps):
                with tempfile.TemporaryDirectory() as tmp:
                    t0 = time.perf_counter()
                    train_stage(stage, source, tmp, init=recipe.init, preset=recipe.preset,
                                in_channels=recipe.in_channels, pipeline_overrides=recipe.pipeline or None,
                                **{**settings, "steps": k})
                    seconds[k] = time.perf_counter() - t0
            per_step = max(seconds[warmup + steps] - seconds[warmup], 1e-9) / steps
            batch = settings["batch_size"] * settings.get("grad_accum", 1)
            rows.append({"recipe": recipe_name, "stage": stage, "threads": n, "batch_size": batch,
                         "measured_steps": steps, "seconds_per_step": per_step, "images_per_s": batch / per_step,
                         "recipe_steps": full_steps, "recipe_minutes": full_steps * per_step / 60,
                         "data": recipe.data, "images": len(source)})
            print(f"  train {recipe_name} {stage}, {n} thread(s): {batch / per_step:.1f} images/s", file=sys.stderr,
                  flush=True)
    return rows


def training_table(rows: list[dict]) -> str:
    lines = ["| recipe | stage | threads | batch | s / step | images/s | recipe steps | recipe time (min) |",
             "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['recipe']} | {r['stage']} | {r['threads']} | {r['batch_size']} | {r['seconds_per_step']:.3f} | "
              f"{r['images_per_s']:.1f} | {r['recipe_steps']:,} | {r['recipe_minutes']:.1f} |" for r in rows]
    return "\n".join(lines)


def build_table(rows: list[dict]) -> str:
    stages = list(BUILD_STAGES.values()) + ["other"]
    lines = ["| model | threads | cpu_matmul | variants | variants/s (generation) | variants/s (wall) | "
             "records identical to the default's | " + " | ".join(f"{s} MFLOP" for s in stages)
             + " | GFLOP/variant | achieved GFLOP/s | matmul peak GFLOP/s (default / oneDNN) | share of the peak |",
             "|" + "---|" * (12 + len(stages) - 1)]
    for r in rows:
        f = r["gflops_per_variant"]
        peaks = " / ".join(f"{v:.0f}" for v in r.get("matmul_peaks_gflops_s", {"": r["matmul_peak_gflops_s"]}).values())
        lines.append(f"| {r['model']} | {r['threads']} | {r.get('cpu_matmul', 'default')} | {r['records']} "
                     f"| {r['variants_per_s']:.1f} | {r['wall_variants_per_s']:.1f} "
                     f"| {r.get('records_identical_to_default', r['records'])} | "
                     + " | ".join(f"{1e3 * f[s]:.0f}" for s in stages)
                     + f" | {r['gflops_per_variant_total']:.3f} | {r['achieved_gflops_s']:.1f} "
                     f"| {peaks} | {100 * r['share_of_peak']:.0f}% |")
    return "\n".join(lines)


def table(rows: list[dict], peak: float) -> str:
    head = ("| model | batch | encoder s | RDM s (steps) | MAGE s (iters) | decode s | s/batch | images/s "
            "| GFLOP/image | achieved GFLOP/s | % of matmul peak |")
    lines = [head, "|" + "---|" * 11]
    for r in rows:
        st, s = r["stage_seconds_per_batch"], r["settings"]
        lines.append(
            f"| {r['model']} | {r['batch']} | {st['encoder']:.3f} | {st['rdm']:.3f} ({s['rdm_steps']}) "
            f"| {st['mage']:.3f} ({s['num_iter']}) | {st['decode']:.3f} | {r['seconds_per_batch']:.3f} "
            f"| {r['images_per_s']:.2f} | {r['gflops_per_image']:.2f} | {r['achieved_gflops_s']:.1f} "
            f"| {100 * r['achieved_gflops_s'] * 1e9 / peak:.1f}% |"
        )
    return "\n".join(lines)


def measure_training(args) -> list[dict]:
    """The training rows the command line asks for (none with --train-recipe none)."""
    recipe = args.train_recipe or ("digits-tiny" if args.quick else "fashion-tiny")
    if recipe == "none":
        return []
    threads = [int(t) for t in (args.threads or ("1" if args.quick else "1,2")).split(",")]
    before = torch.get_num_threads()
    rows = bench_training(recipe, threads=threads, steps=args.train_steps or (2 if args.quick else 20))
    torch.set_num_threads(before)
    return rows


def training_only(args, device: torch.device) -> int:
    rows = measure_training(args)
    out = Path(args.out) if args.out else OUT_DIR / ("throughput_quick.json" if args.quick else "throughput.json")
    result = json.loads(out.read_text()) if out.is_file() else {"date": utc_now(), "machine": machine(device),
                                                                 "versions": versions()}
    result.update(training=rows, training_date=utc_now(), training_machine=machine(device))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(training_table(rows))
    print(f"JSON: {out}")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny model, batch 1 and 8, few repeats (seconds)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (bf16 autocast on cuda)")
    ap.add_argument("--model", default=None, help="a saved pipeline dir or named model to use as the small model "
                    "(default: a random `tiny` preset; compute does not depend on the weights)")
    ap.add_argument("--cfg", type=float, default=None, help="guidance scale (default: the model's default)")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--build-models", default=None,
                    help="bundled models whose `build` at the defaults is measured, comma-separated "
                         "(default digits-tiny,fashion-tiny; quick: digits-tiny; 'none' to skip)")
    ap.add_argument("--build-shots", type=int, default=None,
                    help="images per class the measured builds use (default 20; quick 1), 4 variants each")
    ap.add_argument("--cpu-matmul", default=None,
                    help="CPU matmul libraries the builds are measured with, comma-separated (default: "
                         "default,onednn where this torch has oneDNN)")
    ap.add_argument("--build-only", action="store_true",
                    help="measure the builds only (no per-stage model rows, no training rows)")
    ap.add_argument("--threads", default=None, help="thread counts of the build measurement (default 1,2; quick 1)")
    ap.add_argument("--train-recipe", default=None,
                    help="recipe whose training throughput per stage is measured (default fashion-tiny; quick: "
                         "digits-tiny; 'none' to skip)")
    ap.add_argument("--train-steps", type=int, default=None,
                    help="optimizer steps timed per stage (default 20; quick 2)")
    ap.add_argument("--training-only", action="store_true",
                    help="measure the training throughput only; an existing --out JSON keeps its other results "
                         "and gets its 'training' rows replaced")
    ap.add_argument("--out", default=None, help="JSON path (default runs/benchmarks/throughput[_quick].json at the repository root)")
    args = ap.parse_args(argv)

    device = torch.device(args.device)
    torch.manual_seed(0)
    if args.training_only:
        return training_only(args, device)
    repeats = args.repeats or (2 if args.quick else 5)
    peaks = matmul_peaks(device)
    peak = max(peaks.values())
    print("matmul peak on " + str(device) + ": " + ", ".join(f"{k} {v / 1e9:.1f} GFLOP/s" for k, v in peaks.items()),
          file=sys.stderr)

    rows = []
    if not args.build_only:
        small = RCGPipeline.from_pretrained(args.model) if args.model else RCGPipeline.from_preset("tiny")
        small_name = args.model or "tiny (random)"
        rows = bench_model(small_name, small.to(device), [1, 8] if args.quick else [1, 8, 64], repeats=repeats,
                           end_to_end=True, cfg=args.cfg)
    if not args.quick and not args.build_only:
        big = RCGPipeline.from_preset("rcg-b").to(device)
        rows += bench_model("rcg-b (ViT-B shapes, 256 px)", big, [1, 8], repeats=max(1, repeats // 2),
                            end_to_end=False, cfg=args.cfg)

    build_models = args.build_models or ("digits-tiny" if args.quick else "digits-tiny,fashion-tiny")
    build_rows = []
    if build_models != "none" and device.type == "cpu":
        threads = [int(t) for t in (args.threads or ("1" if args.quick else "1,2")).split(",")]
        before = torch.get_num_threads()
        for model in build_models.split(","):
            build_rows += bench_build(model, threads=threads, shots=args.build_shots or (1 if args.quick else 20),
                                      variants=4, repeats=1 if args.quick else 2,
                                      backends=args.cpu_matmul.split(",") if args.cpu_matmul else None)
        torch.set_num_threads(before)
    train_rows = measure_training(args) if device.type == "cpu" and not args.build_only else []

    result = {
        "date": utc_now(), "machine": machine(device), "versions": versions(),
        "matmul_peak_gflops_s": peak / 1e9,
        "matmul_peaks_gflops_s": {k: v / 1e9 for k, v in peaks.items()},
        "rows": rows,
        "build": build_rows,
        "training": train_rows,
    }
    out = Path(args.out) if args.out else OUT_DIR / ("throughput_quick.json" if args.quick else "throughput.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nThroughput on {device} ({torch.get_num_threads()} threads), matmul peak {peak / 1e9:.1f} GFLOP/s, "
          f"{result['date']}\n")
    if rows:
        print(table(rows, peak))
    for r in rows:
        if "end_to_end_seconds_noise0.5" in r:
            print(f"\n{r['model']} batch {r['batch']}: end-to-end reconstruct {r['end_to_end_seconds_noise0.5']:.3f} s "
                  f"vs composed {r['composed_seconds_noise0.5']:.3f} s")
    print("\nparams: " + ", ".join(f"{r['model']}: " + ", ".join(f"{k} {v / 1e6:.1f}M" for k, v in r["params"].items())
                                     for r in rows if r["batch"] == 1))
    if build_rows:
        print("\nrcg-augment build at the model's defaults (4 variants per image; FLOPs per variant by stage, "
              "counted with torch.utils.flop_counter over one build; share of the float32 matmul peak measured "
              "at the same thread count):\n")
        print(build_table(build_rows))
    if train_rows:
        print("\nTraining throughput per stage (the recipe's own settings; seconds per step from two runs that "
              "differ only in their step count):\n")
        print(training_table(train_rows))
    print(f"JSON: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
