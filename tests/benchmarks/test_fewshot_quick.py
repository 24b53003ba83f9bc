"""The few-shot benchmark: its quick mode runs every arm and writes well-formed reports; shot
draws never touch the held-out test split."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from rcg_augment.data.splits import stratified_holdout

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "fewshot.py"


def load_script():
    if str(SCRIPT.parent) not in sys.path:  # as `python benchmarks/fewshot.py` has it: for benchmarks/_common.py
        sys.path.insert(0, str(SCRIPT.parent))
    spec = importlib.util.spec_from_file_location("fewshot_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


def test_shot_draws_are_nested_and_stay_in_the_pool():
    fs = load_script()
    labels = np.repeat(np.arange(4), 20)
    pool, test = (np.asarray(a) for a in stratified_holdout(labels))
    for seed in range(5):
        small, large = fs.draw_shots(labels, pool, 2, seed), fs.draw_shots(labels, pool, 5, seed)
        assert set(small) <= set(large)
        assert not set(large) & set(test)
        assert np.bincount(labels[large]).tolist() == [5, 5, 5, 5]
    assert not np.array_equal(fs.draw_shots(labels, pool, 5, 0), fs.draw_shots(labels, pool, 5, 1))


def test_t_interval_matches_the_closed_form():
    fs = load_script()
    ci = fs.t_interval([0.5, 0.7])  # mean 0.6, sd 0.1414, t(0.975, 1) = 12.706
    assert ci["mean"] == pytest.approx(0.6)
    assert ci["half_width"] == pytest.approx(12.7062 * 0.141421 / math.sqrt(2), rel=1e-4)
    assert math.isnan(fs.t_interval([0.5])["half_width"])


def test_fewshot_quick(tmp_path):
    split = tmp_path / "split.json"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--out-dir", str(tmp_path), "--cache-dir", str(tmp_path / "caches"),
         "--train-split-file", str(split)],
        capture_output=True, text=True, timeout=600, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "saw no data" in proc.stdout  # the provenance statement is printed

    data = json.loads((tmp_path / "fewshot_quick.json").read_text())
    settings = data["settings"]
    arms = settings["arms"]
    assert arms == ["none", "classical", "classical+rcg-online", "classical+rcg-cache@0", "classical+rcg-cache@0.3",
                    "classical+rcg-cache@0.6", "probe", "probe+rep-aug"]
    assert set(data["datasets"]) == {"digits", "lfw-faces"}
    for key in ("date", "machine", "versions", "wall_seconds"):
        assert data[key]
    for name, result in data["datasets"].items():
        assert result["provenance"]["statement"]
        assert result["tuning"] and all(t["classical"] in settings["classical_candidates"]
                                        for t in result["tuning"].values())
        for cell in result["shots"].values():
            for arm in arms:
                accs = cell["per_seed"][arm]
                assert len(accs) == settings["seeds"] and all(0.0 <= a <= 1.0 for a in accs), (name, arm)
                summary = cell["summary"][arm]
                assert math.isfinite(summary["mean"]) and math.isfinite(summary["half_width"]), (name, arm)
            paired = cell["paired"]
            for arm in arms:
                if arm.startswith("classical+rcg"):
                    assert paired[arm]["reference"] == "classical"
                    assert math.isfinite(paired[arm]["low"]) and math.isfinite(paired[arm]["high"])
            assert paired["probe+rep-aug"]["reference"] == "probe"

    md = (tmp_path / "fewshot_quick.md").read_text()
    for label in ("(a) none", "(b) classical", "(c)", "(d)", "(e) linear probe", "(f)", "Paired differences"):
        assert label in md
    assert md.count("| (d) ") >= 2 * 3  # three cache arms per dataset

    from PIL import Image

    with Image.open(tmp_path / "fewshot_quick.png") as img:
        assert img.format == "PNG" and img.width > 400 and img.height > 200

    record = json.loads(split.read_text())
    for name, entry in record["datasets"].items():
        assert len(entry["test_indices"]) == len(set(entry["test_indices"])) > 0
        assert entry["pool_size"] + len(entry["test_indices"]) == entry["num_images"], name

    # merge: one report from per-dataset result files (a later file wins for a dataset in both)
    report = json.loads((tmp_path / "fewshot_quick.json").read_text())
    parts = []
    for name in report["datasets"]:
        part = dict(report, datasets={name: report["datasets"][name]}, command=f"run {name}", wall_seconds=2.0)
        parts.append(tmp_path / f"{name}.json")
        parts[-1].write_text(json.dumps(part))
    merged_dir = tmp_path / "merged"
    proc = subprocess.run([sys.executable, str(SCRIPT), "merge", *map(str, parts), "--out-dir", str(merged_dir)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    merged = json.loads((merged_dir / "fewshot_quick.json").read_text())
    assert merged["datasets"] == report["datasets"]
    assert merged["wall_seconds"] == 4.0 and [r["command"] for r in merged["runs"]] == ["run digits", "run lfw-faces"]
    assert (merged_dir / "fewshot_quick.md").read_text() == (tmp_path / "fewshot_quick.md").read_text().replace(
        f"wall time {report['wall_seconds']:.0f} s", "wall time 4 s")
