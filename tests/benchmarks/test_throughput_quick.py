"""The throughput benchmark's quick mode runs and writes a well-formed report."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_throughput_quick(tmp_path):
    out = tmp_path / "t.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "throughput.py"), "--quick", "--repeats", "1", "--out", str(out)],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "% of matmul peak" in proc.stdout
    data = json.loads(out.read_text())
    assert data["matmul_peak_gflops_s"] > 0
    assert [r["batch"] for r in data["rows"]] == [1, 8]
    for row in data["rows"]:
        assert row["images_per_s"] > 0 and row["gflops_per_image"] > 0
        assert set(row["stage_seconds_per_batch"]) == {"encoder", "rdm", "mage", "decode"}
    # the build at digits-tiny's defaults with each CPU matmul library: a rate, FLOPs by stage that
    # add up, a share of the faster library's peak, the records equal to the default build's
    from rcg_augment.cpu_matmul import onednn_linear_available

    backends = ["default", "onednn"] if onednn_linear_available() else ["default"]
    assert [b["cpu_matmul"] for b in data["build"]] == backends
    assert set(data["matmul_peaks_gflops_s"]) == set(backends)
    assert data["matmul_peak_gflops_s"] == max(data["matmul_peaks_gflops_s"].values())
    for build in data["build"]:
        assert build["model"] == "digits-tiny" and build["threads"] == 1 and build["records"] == 40
        assert build["variants_per_s"] > 0 and build["wall_variants_per_s"] > 0
        stages = build["gflops_per_variant"]
        assert set(stages) == {"encoder", "rdm", "mage", "vq_encode", "vq_decode", "other"}
        assert stages["mage"] > stages["encoder"] > 0 and stages["vq_decode"] > 0 and stages["rdm"] > 0
        assert abs(sum(stages.values()) - build["gflops_per_variant_total"]) < 1e-6
        assert build["matmul_peak_gflops_s"] == max(build["matmul_peaks_gflops_s"].values())
        assert build["share_of_peak"] == pytest.approx(build["achieved_gflops_s"] / build["matmul_peak_gflops_s"])
        assert 0 < build["share_of_peak"] < 1.5
        assert 0 <= build["records_identical_to_default"] <= build["records"]
    assert data["build"][0]["records_identical_to_default"] == 40  # the default build against itself
    assert "share of the peak" in proc.stdout and "| digits-tiny | 1 | default |" in proc.stdout
    # training throughput per stage of the quick recipe (digits-tiny: every stage, from scratch)
    stages = [r["stage"] for r in data["training"]]
    assert stages == ["encoder", "tokenizer", "rdm", "mage"]
    for r in data["training"]:
        assert r["recipe"] == "digits-tiny" and r["threads"] == 1 and r["measured_steps"] == 2
        assert r["seconds_per_step"] > 0 and abs(r["images_per_s"] * r["seconds_per_step"] - r["batch_size"]) < 1e-6
        assert r["recipe_minutes"] == pytest.approx(r["recipe_steps"] * r["seconds_per_step"] / 60)
    assert "Training throughput per stage" in proc.stdout


def test_training_only_replaces_the_training_rows_of_an_existing_report(tmp_path):
    out = tmp_path / "t.json"
    out.write_text(json.dumps({"date": "d", "rows": [{"kept": True}], "training": [{"old": 1}]}))
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "throughput.py"), "--quick", "--training-only", "--out", str(out)],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads(out.read_text())
    assert data["rows"] == [{"kept": True}] and data["date"] == "d"  # the other results are kept
    assert [r["stage"] for r in data["training"]] == ["encoder", "tokenizer", "rdm", "mage"]
    assert "training_date" in data and "| digits-tiny | mage | 1 |" in proc.stdout
