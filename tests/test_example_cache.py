"""examples/cache_training_loop.py runs end to end (build a digits cache, train with the mix)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "cache_training_loop.py"


def test_cache_training_loop_example(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, str(EXAMPLE), "--out", str(tmp_path / "cache"), "--variants", "2"],
                          env=env, capture_output=True, text=True, timeout=300)
    seconds = time.monotonic() - t0
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert re.search(r"cache: 100 variants of 50 images", out), out
    scores = {m.group(1).strip(): float(m.group(2)) for m in re.finditer(r"^\s*(.+?): .*test accuracy ([0-9.]+)", out, re.M)}
    assert set(scores) == {"real only", "real + RCG variants"}, out
    assert scores["real only"] > 0.5  # the classifier learns from 5 shots per class
    assert (tmp_path / "cache" / "manifest.json").is_file()
    assert seconds < 120, f"example took {seconds:.0f} s"
