"""SIGKILL trials for the synthetic-cache builder: kill a build at random moments, resume it,
and check every record against an uninterrupted build.

Each trial starts a fresh build in a subprocess, kills it with SIGKILL at a random moment
between interpreter start-up and the end of the work, reruns the same command to completion,
and compares the record hashes, the shard files and the manifest with a reference build. A
trial survives when all of them match and no temp file or lock is left behind.

    python benchmarks/killtrials.py --kills 20            # ~5-10 min on 2 busy cores
    python benchmarks/killtrials.py --kills 20 --chain    # kill, resume, kill, ... on one directory

The pytest form is tests/data/test_build.py::test_resume_after_sigkill_matches_uninterrupted
(3 chained kills; RCG_BUILD_KILLS=20 for more). Writes ``--out-json`` (default
``runs/benchmarks/killtrials.json`` at the repository root, git-ignored).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

# A run writes to runs/benchmarks/ at the repository root by default (git-ignored), so it never
# overwrites a committed result; pass --out-json benchmarks/results/killtrials.json to replace one on purpose.
OUT_DIR = Path(__file__).resolve().parents[1] / "runs" / "benchmarks"

WORKER = textwrap.dedent("""
    import json, sys
    from rcg_augment.data import build_synthetic
    source, out, pipe, kwargs = json.loads(sys.argv[1])
    s = build_synthetic(source, out, pipeline=pipe, progress=False, **kwargs)
    print(json.dumps({"complete": s.complete, "records": s.records, "written": s.records_written,
                      "resumed": s.shards_resumed}))
""")
KWARGS = dict(variants_per_image=8, noise_level=[0.3, 0.8], batch_size=2, records_per_shard=4, num_iter=2,
              rdm_steps=2)


def spawn(folder: Path, out: Path, model: Path) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-c", WORKER, json.dumps([str(folder), str(out), str(model), KWARGS])],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen) -> dict:
    out, err = proc.communicate(timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(f"build failed (exit {proc.returncode}):\n{err[-3000:]}")
    return json.loads(out.strip().splitlines()[-1])


def record_hashes(out_dir: Path) -> list[str]:
    from rcg_augment.data.datasets import record_hashes as hashes

    return hashes(out_dir, verify=True)


def shard_files(out_dir: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted((out_dir / "shards").iterdir())}


def manifest_shards(out_dir: Path) -> list:
    return json.loads((out_dir / "manifest.json").read_text())["shards"]


def done_shards(out_dir: Path) -> int:
    return len(list((out_dir / "shards").glob("*.json"))) if (out_dir / "shards").is_dir() else 0


def state_at_kill(out_dir: Path) -> str:
    if not (out_dir / "plan.json").exists():
        return "before plan.json"
    if (out_dir / "manifest.json").exists():
        return "after manifest.json"
    done = len(list((out_dir / "shards").glob("*.json"))) if (out_dir / "shards").is_dir() else 0
    temps = len(list(out_dir.rglob("*.tmp.*")))
    return f"{done} shards done" + (f", {temps} temp file(s)" if temps else "")


def make_inputs(work: Path) -> tuple[Path, Path]:
    import numpy as np
    import torch
    from PIL import Image

    from rcg_augment import RCGPipeline

    torch.manual_seed(0)
    model = work / "model"
    RCGPipeline.from_preset("tiny", in_channels=1).save_pretrained(model)
    folder = work / "images"
    rng = np.random.default_rng(0)
    for c in ("cat", "dog"):
        (folder / c).mkdir(parents=True)
        for i in range(6):
            Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)).save(folder / c / f"{i}.png")
    return folder, model


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kills", type=int, default=20, help="SIGKILLs that land during a build (default 20)")
    p.add_argument("--seed", type=int, default=0, help="seeds the kill moments")
    p.add_argument("--chain", action="store_true",
                   help="kill repeatedly on one directory, verify once at the end (default: one kill per trial)")
    p.add_argument("--out-json", type=Path, default=OUT_DIR / "killtrials.json",
                   help="JSON path (default: runs/benchmarks/killtrials.json at the repository root)")
    args = p.parse_args(argv)

    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory(prefix="rcg-killtrials-") as tmp:
        work = Path(tmp)
        folder, model = make_inputs(work)
        ref = work / "ref"
        t0 = time.monotonic()
        proc = spawn(folder, ref, model)
        while proc.poll() is None and not (ref / "plan.json").exists():
            time.sleep(0.01)
        startup = time.monotonic() - t0
        n_records = finish(proc)["records"]
        work_s = time.monotonic() - t0 - startup
        expected, expected_files, expected_manifest = record_hashes(ref), shard_files(ref), manifest_shards(ref)
        print(f"reference: {n_records} records in {len(expected_files) // 2} shards; start-up {startup:.1f} s, "
              f"work {work_s:.1f} s", flush=True)

        trials, kills, attempts = [], 0, 0
        out, chain = work / "chain", []  # chain: the kills on ``out`` not verified yet

        def close_chain(kills_on_it: list[dict], result: dict) -> None:
            for t in kills_on_it:
                t.update(result)
            print(f"  {out.name}: {len(kills_on_it)} kills, then completed: "
                  f"{'identical to the reference' if result['survived'] else 'FAILED ' + result['why']}", flush=True)
        while kills < args.kills and attempts < 4 * args.kills:
            attempts += 1
            if not args.chain:
                out = work / f"trial-{attempts:03d}"
            proc = spawn(folder, out, model)
            t_spawn = time.monotonic()
            if args.chain:
                # a resumed run: kill after it has written at least one new shard, at a random point
                # of the next shard's time, so every kill lands mid-work (never in start-up)
                before = done_shards(out)
                while proc.poll() is None and done_shards(out) == before:
                    time.sleep(0.005)
                time.sleep(rng.uniform(0.0, 2.0 * work_s / max(1, len(expected_files) // 2)))
            else:
                # a fresh run: 1 kill in 5 during start-up (before or while the plan is written),
                # the rest uniformly over the time it spends generating and writing shards
                t_kill = (rng.uniform(0.5 * startup, startup) if rng.random() < 0.2
                          else rng.uniform(startup, startup + work_s))
                time.sleep(max(0.0, t_kill - (time.monotonic() - t_spawn)))
            delay = time.monotonic() - t_spawn
            if proc.poll() is not None:  # finished first: no kill landed, draw again
                proc.communicate()
                if args.chain and (out / "manifest.json").exists():  # the chain completed: check it, start anew
                    close_chain(chain, verify(folder, out, model, expected, expected_files, expected_manifest))
                    chain, out = [], work / f"chain-{attempts:03d}"
                continue
            proc.send_signal(signal.SIGKILL)
            proc.communicate()
            kills += 1
            trial = {"kill": kills, "delay_s": round(delay, 2), "state_at_kill": state_at_kill(out)}
            if not args.chain:
                trial.update(verify(folder, out, model, expected, expected_files, expected_manifest))
                print(f"kill {kills:2d} at {delay:5.1f} s ({trial['state_at_kill']}): "
                      f"{'survived' if trial['survived'] else 'FAILED ' + trial['why']}", flush=True)
            else:
                print(f"kill {kills:2d} at {delay:5.1f} s ({trial['state_at_kill']}) in {out.name}", flush=True)
                chain.append(trial)
            trials.append(trial)
        if args.chain and chain:
            close_chain(chain, verify(folder, out, model, expected, expected_files, expected_manifest))
        survived = sum(t["survived"] for t in trials)
    result = {"kills": kills, "survived": survived, "attempts": attempts, "chain": args.chain, "seed": args.seed,
              "records": n_records, "startup_s": round(startup, 2), "work_s": round(work_s, 2), "trials": trials}
    args.out_json.parent.mkdir(parents=True, exist_ok=True)
    args.out_json.write_text(json.dumps(result, indent=2) + "\n")
    print(f"SIGKILL trials survived: {survived}/{kills} ({attempts - kills} draws finished before the kill); "
          f"wrote {args.out_json}")
    return 0 if survived == kills and kills == args.kills else 1


def verify(folder, out, model, expected, expected_files, expected_manifest) -> dict:
    result = finish(spawn(folder, out, model))
    checks = {
        "complete": result["complete"],
        "records": record_hashes(out) == expected,
        "shard files": shard_files(out) == expected_files,
        "manifest": manifest_shards(out) == expected_manifest,
        "no temp files": not list(out.rglob("*.tmp.*")),
        "rerun is a no-op": finish(spawn(folder, out, model))["written"] == 0,
    }
    failed = [k for k, ok in checks.items() if not ok]
    return {"survived": not failed, "why": ", ".join(failed), "resumed_shards": result["resumed"],
            "written_on_resume": result["written"]}


if __name__ == "__main__":
    sys.exit(main())
