"""The speed/quality benchmark's quick mode runs and writes a well-formed report."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_speed_quality_quick(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "speed_quality.py"), "--quick", "--out-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads((tmp_path / "speed_quality_quick.json").read_text())
    grid = {(r["num_iter"], r["rdm_steps"]) for r in data["rows"]}
    assert grid == {(1, 2), (1, 5), (2, 2), (2, 5)}
    for row in data["rows"]:
        assert row["images_per_s"] > 0
        assert 0.0 <= row["label_preservation"] <= 1.0
        assert row["rms_between_variants"] > 0  # variants of one source differ
    assert (tmp_path / "speed_quality_quick.png").stat().st_size > 0
    assert "| cfg | num_iter | rdm_steps |" in (tmp_path / "speed_quality_quick.md").read_text()
