"""Long build: resident memory and throughput over a cache of many variants.

Builds ``--variants-total`` variants (default 20,000) of sklearn's digits with
:func:`rcg_augment.data.build_synthetic`, sampling this process's resident memory (psutil, in a
thread, every ``--interval`` seconds) and timing every shard (from its sidecar's write time).
Prints the peak RSS, the RSS growth from the first 10% of the records to the end, and the
per-shard throughput (min/median/max); writes ``--out-json`` (default ``runs/benchmarks/longrun.json``
at the repository root, git-ignored) and a plot beside it (``longrun.png``: RSS and variants/s over
time).

The model is "digits-tiny" when it is bundled, else a random tiny 1-channel pipeline (the compute
per image is the same). Generation settings are the model's defaults unless overridden.

    OMP_NUM_THREADS=1 nice -n 19 python benchmarks/longrun.py                    # 20,000 variants
    python benchmarks/longrun.py --variants-total 500 --num-iter 1 --rdm-steps 1 # quick (CI)
"""

from __future__ import annotations

import _thread
import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

# A run writes to runs/benchmarks/ at the repository root by default (git-ignored), so it never
# overwrites a committed result; pass --out-json benchmarks/results/longrun.json to replace one on purpose.
OUT_DIR = Path(__file__).resolve().parents[1] / "runs" / "benchmarks"
MiB = 2**20


class RSSSampler(threading.Thread):
    """Samples (seconds since start, RSS bytes, shards complete) every ``interval`` seconds."""

    def __init__(self, shard_dir: Path, interval: float, budget_s: float | None = None):
        super().__init__(daemon=True)
        import psutil

        self.process = psutil.Process()
        self.shard_dir, self.interval, self.budget_s = shard_dir, interval, budget_s
        self.samples: list[tuple[float, int, int]] = []
        self.load: list[float] = []  # 1-minute load average: how busy the machine was
        self.t0 = time.time()
        self._halt = threading.Event()

    def sample(self) -> None:
        done = len(list(self.shard_dir.glob("shard-*.json"))) if self.shard_dir.is_dir() else 0
        self.samples.append((time.time() - self.t0, self.process.memory_info().rss, done))
        self.load.append(os.getloadavg()[0])

    def run(self) -> None:
        while not self._halt.is_set():
            self.sample()
            if self.budget_s is not None and time.time() - self.t0 > self.budget_s:
                _thread.interrupt_main()  # KeyboardInterrupt in the build; finished shards stay
                return
            self._halt.wait(self.interval)

    def stop(self) -> None:
        self._halt.set()
        self.join()
        self.sample()


def choose_model(name: str | None, work: Path):
    """(pipeline, description): the named/dir model, or digits-tiny if bundled, or a random tiny one."""
    import torch

    from rcg_augment import RCGPipeline
    from rcg_augment.zoo import available_models

    if name is None and "digits-tiny" in available_models():
        name = "digits-tiny"
    if name is not None:
        return RCGPipeline.from_pretrained(name), name
    torch.manual_seed(0)
    directory = work / "random-tiny"
    RCGPipeline.from_preset("tiny", in_channels=1).save_pretrained(directory)
    return RCGPipeline.from_pretrained(directory), "random tiny 1-channel pipeline (digits-tiny not bundled)"


def summarise(samples, shards, n_records: int) -> dict:
    """Peak RSS, RSS growth from the first 10% of records to the end, per-shard throughput.

    Growth compares the median RSS over the samples taken while the first 10% of the records
    were built with the median over the last 10% of the build time: medians, because RSS swings
    by a batch's working set within every batch (the peaks are also reported).
    """
    rss = [s[1] for s in samples]
    t_start = shards[0]["t_start"]
    t10 = next(s["t_done"] for s in shards if s["records_done"] >= 0.1 * n_records)
    t_end = shards[-1]["t_done"]
    early = [r for t, r, _ in samples if t_start <= t <= t10] or [min(rss)]
    late = [r for t, r, _ in samples if t_end - 0.1 * (t_end - t_start) <= t <= t_end] or [rss[-1]]
    rates = [s["variants_per_s"] for s in shards]
    done = shards[-1]["records_done"]
    out = {
        "peak_rss_mib": max(rss) / MiB,
        "rss_first_10pct_mib": statistics.median(early) / MiB,
        "rss_last_10pct_mib": statistics.median(late) / MiB,
        "rss_growth_mib": (statistics.median(late) - statistics.median(early)) / MiB,
        "rss_peak_first_10pct_mib": max(early) / MiB,
        "rss_peak_last_10pct_mib": max(late) / MiB,
        "variants_per_s": {"min": min(rates), "median": statistics.median(rates), "max": max(rates),
                           "overall": done / (t_end - t_start)},
        "build_seconds": t_end - t_start,
    }
    # RSS trend after the first 10%: least-squares slope in MiB per 1,000 variants.
    by_shard = [0] + [s["records_done"] for s in shards]
    pts = [(by_shard[min(d, len(shards))], r) for t, r, d in samples if t10 <= t <= t_end]
    if len(pts) >= 3:
        mean_x, mean_y = statistics.fmean(x for x, _ in pts), statistics.fmean(r for _, r in pts)
        var = sum((x - mean_x) ** 2 for x, _ in pts)
        if var > 0:
            slope = sum((x - mean_x) * (r - mean_y) for x, r in pts) / var
            out["rss_slope_mib_per_1000_variants"] = slope * 1000 / MiB
    return out


def plot(samples, shards, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    ax1.plot([t / 60 for t, _, _ in samples], [r / MiB for _, r, _ in samples], lw=1)
    ax1.set_ylabel("RSS (MiB)")
    ax1.set_title(title, fontsize=9)
    ax1.grid(alpha=0.3)
    xs, ys = [], []
    for s in shards:
        xs += [s["t_start"] / 60, s["t_done"] / 60]
        ys += [s["variants_per_s"]] * 2
    ax2.plot(xs, ys, lw=1)
    ax2.set_ylabel("variants/s (per shard)")
    ax2.set_xlabel("minutes")
    ax2.set_ylim(bottom=0)
    ax2.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants-total", type=int, default=20_000, help="records to build (default 20,000)")
    p.add_argument("--model", help="named model or directory (default: digits-tiny if bundled, else random tiny)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--records-per-shard", type=int, help="default: 8 batches")
    p.add_argument("--num-iter", type=int, help="MAGE steps (default: the model's)")
    p.add_argument("--rdm-steps", type=int, help="DDIM steps (default: the model's)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    p.add_argument("--interval", type=float, default=1.0, help="seconds between RSS samples (default 1)")
    p.add_argument("--max-minutes", type=float,
                   help="stop the build after this long and report the shards done (the cache is resumable)")
    p.add_argument("--work-dir", type=Path, help="where the cache goes (default: a temp dir, deleted)")
    p.add_argument("--out-json", type=Path, default=OUT_DIR / "longrun.json",
                   help="JSON path; the plot is written beside it (default: runs/benchmarks/longrun.json)")
    p.add_argument("--plot", type=Path, help="default: the JSON path with .png")
    args = p.parse_args(argv)

    import torch
    from _common import command, machine, utc_now, versions

    from rcg_augment.data import build_synthetic, open_source

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="rcg-longrun-") as tmp:
        work = args.work_dir or Path(tmp)
        pipe, model_desc = choose_model(args.model, work)
        digits = open_source("digits")
        # n sources x K variants >= the total asked for, as close as the 1,797 digits allow
        K = -(-args.variants_total // len(digits))
        n_src = -(-args.variants_total // K)
        source = digits.subset(range(n_src))
        n_records = n_src * K
        out = work / "cache"
        rps = args.records_per_shard or 8 * args.batch_size
        sampler = RSSSampler(out / "shards", args.interval, budget_s=60 * args.max_minutes if args.max_minutes else None)
        sampler.start()
        try:
            summary = build_synthetic(source, out, variants_per_image=K, noise_level=0.3, pipeline=pipe,
                                      batch_size=args.batch_size, records_per_shard=rps, num_iter=args.num_iter,
                                      rdm_steps=args.rdm_steps, progress=False)
        except KeyboardInterrupt:  # the time budget ran out (or Ctrl-C): report what is done
            summary = None
        sampler.stop()
        plan = json.loads((out / "plan.json").read_text())
        t_plan = (out / "plan.json").stat().st_mtime - sampler.t0
        shards, prev, done = [], t_plan, 0
        for meta_path in sorted((out / "shards").glob("shard-*.json")):
            meta = json.loads(meta_path.read_text())
            t_done = meta_path.stat().st_mtime - sampler.t0
            n = meta["record_range"][1] - meta["record_range"][0]
            done += n
            shards.append({"shard": meta["shard"], "records": n, "records_done": done, "t_start": prev,
                           "t_done": t_done, "variants_per_s": n / max(t_done - prev, 1e-9)})
            prev = t_done
    stopped_early = summary is None
    if not shards or (not stopped_early and (not summary.complete or done != n_records)):
        print(f"build incomplete: {done} of {n_records} records", file=sys.stderr)
        return 1
    result = {
        "date": utc_now(), "command": command("longrun.py", argv), "versions": versions(), "machine": machine(),
        "model": model_desc,
        "stopped_early": stopped_early,
        "variants_done": done,
        "build": {"variants_total": n_records, "sources": n_src, "variants_per_image": K, "noise_level": 0.3,
                  "batch_size": args.batch_size, "records_per_shard": rps, "shards": len(shards),
                  "num_iter": plan["generation"]["num_iter"], "rdm_steps": plan["generation"]["rdm_steps"],
                  "cfg": plan["generation"]["cfg"]},
        "summary": summarise(sampler.samples, shards, done),
        "shards": shards,
        "load_average_1min": {"min": min(sampler.load), "median": statistics.median(sampler.load),
                              "max": max(sampler.load)},
        "cpu_seconds": sum(os.times()[:2]),
        "samples": [{"t": round(t, 2), "rss_mib": round(r / MiB, 2), "shards_done": d, "load_1min": ld}
                    for (t, r, d), ld in zip(sampler.samples, sampler.load, strict=True)],
    }
    args.out_json.parent.mkdir(parents=True, exist_ok=True)
    args.out_json.write_text(json.dumps(result, indent=1) + "\n")
    png = args.plot or args.out_json.with_suffix(".png")
    s = result["summary"]
    plot(sampler.samples, shards, png, f"{done} variants, {model_desc[:40]}, "
         f"num_iter={result['build']['num_iter']} rdm_steps={result['build']['rdm_steps']}")
    v = s["variants_per_s"]
    if stopped_early:
        print(f"longrun: STOPPED after --max-minutes {args.max_minutes:g}: {done} of {n_records} variants built")
    print(f"longrun: {done} variants ({n_src} sources x {K} planned) in {len(shards)} shards, "
          f"{s['build_seconds']:.0f} s of build; model: {model_desc}")
    print(f"  peak RSS          {s['peak_rss_mib']:.0f} MiB")
    print(f"  RSS growth        {s['rss_growth_mib']:+.1f} MiB (median over the first 10% of records "
          f"{s['rss_first_10pct_mib']:.0f} MiB -> median over the last 10% {s['rss_last_10pct_mib']:.0f} MiB; "
          f"peaks {s['rss_peak_first_10pct_mib']:.0f} -> {s['rss_peak_last_10pct_mib']:.0f} MiB)"
          + (f"; slope {s['rss_slope_mib_per_1000_variants']:+.2f} MiB per 1,000 variants"
             if "rss_slope_mib_per_1000_variants" in s else ""))
    print(f"  throughput        min {v['min']:.1f} / median {v['median']:.1f} / max {v['max']:.1f} variants/s per shard "
          f"(overall {v['overall']:.1f})")
    la = result["load_average_1min"]
    print(f"  machine           load average {la['min']:.1f}-{la['max']:.1f} (median {la['median']:.1f}) on "
          f"{os.cpu_count()} cores; this process used {result['cpu_seconds']:.0f} s of CPU")
    print(f"  wrote {args.out_json} and {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
