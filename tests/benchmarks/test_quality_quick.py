"""The quality benchmark's quick modes run and write well-formed reports (fidelity table, surface)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]


def _run(tmp_path, *args):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "quality.py"), "--quick", "--out-dir",
                           str(tmp_path), *args], capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def test_quality_quick_reports_the_fidelity_decomposition(tmp_path):
    text = _run(tmp_path, "--noise-levels", "0,0.5")
    assert "VQ tokenizer round trip" in text and "MAGE from the image's own representation" in text
    data = json.loads((tmp_path / "quality_quick.json").read_text())
    f = data["fidelity"]
    for key in ("oracle_on_real", "tokenizer_round_trip", "encoder_nearest_neighbour", "mage_from_own_representation"):
        assert 0.0 <= f[key] <= 1.0
    m = f["masked_token_accuracy"]
    assert 0.0 <= m["conditional"] <= 1.0 and 0.0 <= m["unconditional"] <= 1.0
    assert 0.0 <= m["stray_mass"] <= 1.0
    assert set(data["per_noise_level"]) == {"0.0", "0.5"}
    assert (tmp_path / "quality_quick.png").is_file()


def test_quality_quick_surface(tmp_path):
    text = _run(tmp_path, "--surface", "--noise-levels", "0,0.5", "--repaint-fractions", "0.5,1")
    assert "| noise_level | repaint_fraction |" in text
    data = json.loads((tmp_path / "anchoring_quick.json").read_text())
    cells = {(r["noise_level"], r["repaint_fraction"]) for r in data["surface"]}
    assert cells == {(0.0, 0.5), (0.0, 1.0), (0.5, 0.5), (0.5, 1.0)}
    assert (tmp_path / "anchoring_quick.png").is_file()


def test_quality_quick_fidelity_only_with_label_filter(tmp_path):
    text = _run(tmp_path, "--fidelity-only", "--label-filter", "--max-attempts", "2", "--noise-levels", "0.3")
    assert "with the label filter, noise 0.3" in text
    f = json.loads((tmp_path / "fidelity_quick.json").read_text())["fidelity"]
    assert set(f["reconstruct"]) == {"0.3"}
    row = f["label_filter"]["0.3"]
    assert 0.0 <= row["kept_fraction"] <= 1.0 and 1.0 <= row["draws_per_image"] <= 2.0


def test_stray_mass_is_the_probability_on_codes_rated_below_uniform():
    """A stub MAGE that gives code 0 probability 0.9 and spreads 0.1 over the other 255 codes:
    all of those are below 1/256, so the stray mass is 0.1; arg-max accuracy counts code 0."""
    from types import SimpleNamespace

    import torch

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from quality import masked_token_accuracy

    k = 256
    logits = torch.full((k,), float(np.log(0.1 / (k - 1))))
    logits[0] = float(np.log(0.9))
    images = torch.zeros(4, 1, 8, 8)
    images[:2] = 1  # the stub tokenizer reads codes off the pixels: half the images' codes are 1,
    # which the stub MAGE never predicts
    pipe = SimpleNamespace(
        config=SimpleNamespace(mage=SimpleNamespace(mask_token_id=k)),
        tokenizer=SimpleNamespace(encode=lambda x: x[:, 0, :4, :4].long()),
        encode=lambda x: torch.zeros(len(x), 8),
        mage=lambda tokens, rep: logits.expand(*tokens.shape, k),
    )
    m = masked_token_accuracy(pipe, images, mask_ratio=0.75, batch=3)
    assert m["stray_mass"] == pytest.approx(0.1, abs=1e-5)
    assert m["conditional"] == pytest.approx(0.5) and m["unconditional"] == pytest.approx(0.5)
