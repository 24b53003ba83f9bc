"""The fidelity/variety frontier benchmark: quick mode runs and its statistics are right."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

import frontier  # noqa: E402


def test_frontier_quick(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "frontier.py"), "--quick", "--out-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads((tmp_path / "frontier_quick.json").read_text())
    assert data["seeds"] == [0, 1] and data["held_out_images"] == 24
    assert [r["overrides"] for r in data["rows"]] == [
        {"num_iter": 2, "rdm_steps": 3}, {"num_iter": 2, "rdm_steps": 3, "cfg": 1, "token_temperature": 1.3}]
    for row in data["rows"]:
        assert row["settings"]["num_iter"] == 2 and row["settings"]["rdm_steps"] == 3  # resolved, then overridden
        assert [r["seed"] for r in row["per_seed"]] == [0, 1]
        for key in ("own", "preservation"):
            assert 0.0 <= row["summary"][key]["mean"] <= 1.0
        assert row["summary"]["images_per_s"]["mean"] > 0
        assert row["summary"]["rms_between"]["mean"] > 0 and row["summary"]["rms_to_source"]["mean"] > 0
    assert (tmp_path / "frontier_quick.png").stat().st_size > 0
    assert "| settings | own (goal 0.93) |" in (tmp_path / "frontier_quick.md").read_text()


def test_summary_is_mean_and_standard_error_over_seeds():
    per_seed = [{k: v for k in frontier.METRICS} for v in (0.8, 0.9, 1.0)]
    s = frontier.summarise(per_seed)
    assert s["own"]["mean"] == pytest.approx(0.9)
    assert s["own"]["se"] == pytest.approx(np.std([0.8, 0.9, 1.0], ddof=1) / np.sqrt(3))
    assert frontier.summarise(per_seed[:1])["preservation"]["se"] == 0.0


def test_settings_are_parsed_and_checked():
    assert frontier.parse_setting("defaults") == {}
    assert frontier.parse_setting("cfg=2, token_temperature=1.3") == {"cfg": 2, "token_temperature": 1.3}
    with pytest.raises(TypeError, match="unknown generation settings"):
        frontier.parse_setting("guidance=2")
    with pytest.raises(ValueError, match="token_temperature"):
        frontier.parse_setting("token_temperature=0")
    with pytest.raises(ValueError, match="name=value"):
        frontier.parse_setting("cfg")
    for bad in ("cfg=null", "cfg=abc", "cfg=true"):
        with pytest.raises(ValueError, match="not a number"):
            frontier.parse_setting(bad)


def test_run_one_distances_and_rates_on_a_stub_pipeline():
    """Variant k of source i is x_i + 0.1 k (two variants): RMS between them 0.1, to the source
    0.05; a judge that returns the true labels for images it sees gives rates of 1."""
    from types import SimpleNamespace

    import torch

    from rcg_augment import GenerationSettings

    x = torch.rand(5, 1, 4, 4) * 0.5
    y = np.arange(5)
    calls = {"n": 0}

    def reconstruct(batch, level, generator=None, **kw):
        k = torch.arange(len(batch)) % 2  # repeat_interleave order: source 0 twice, then 1...
        return batch + 0.1 * k.view(-1, 1, 1, 1).float()

    def render(rep, generator=None, **kw):  # the stub "representation" is the image itself
        return rep.view(-1, 1, 4, 4)

    pipe = SimpleNamespace(
        resolve_settings=lambda **o: GenerationSettings(cfg=0.0, temperature=1.0, num_iter=1, rdm_steps=1, eta=0.0,
                                                        repaint_fraction=1.0, token_temperature=1.0),
        _resize=lambda imgs, size: imgs, encode=lambda b: b.flatten(1), render=render,
        reconstruct=reconstruct)
    # The judge recognises a source by its first pixel, shifted or not.
    firsts = x.flatten(1)[:, 0].numpy()

    class Judge:
        def predict(self, flat):
            calls["n"] += 1
            return np.array([int(np.argmin(np.minimum(abs(firsts - v), abs(firsts + 0.1 - v)))) for v in flat[:, 0]])

    r = frontier.run_one(pipe, Judge(), x, y, {}, noise_level=0.3, variants=2, seed=0, batch_size=4)  # even: pairs stay in a batch
    assert r["rms_between"] == pytest.approx(0.1, abs=1e-6)
    assert r["rms_to_source"] == pytest.approx(0.05, abs=1e-6)
    assert r["own"] == 1.0 and r["preservation"] == 1.0 and calls["n"] == 2


def test_bad_arguments_exit_with_a_message():
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "frontier.py"), "--quick", "--variants", "1"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--variants must be >= 2" in proc.stderr


def _result(points, seeds=(0, 1)):
    rows = []
    for rf, tt, own, rms in points:
        summary = {k: {"mean": 0.5, "se": 0.01} for k in frontier.METRICS}
        summary["own"], summary["rms_between"] = {"mean": own, "se": 0.002}, {"mean": rms, "se": 0.001}
        rows.append({"label": f"repaint_fraction {rf}, token_temperature {tt}",
                     "settings": {"repaint_fraction": float(rf), "token_temperature": float(tt), "cfg": 0.0},
                     "summary": summary})
    return {"seeds": list(seeds), "rows": rows}


def test_frontier_compare_plots_earlier_runs_without_a_model(tmp_path, capsys):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps(_result([(1, 1.0, 0.94, 0.145), (0.7, 1.0, 0.95, 0.12)])))
    b.write_text(json.dumps(_result([(1, 0.95, 0.951, 0.158), (1, 1.05, 0.938, 0.176)])))
    assert frontier.main(["--compare", f"{a}+{b}=joined", f"{b}=after", "--where", "repaint_fraction=1",
                          "--out-dir", str(tmp_path), "--name", "cmp"]) == 0
    table = (tmp_path / "cmp.md").read_text()
    assert (tmp_path / "cmp.png").stat().st_size > 0
    # the repaint_fraction 0.7 row is filtered out; the joined curve has a's and b's rows
    assert "0.7" not in table and table.count("| joined |") == 3 and table.count("| after |") == 2
    assert "| after | repaint_fraction 1, token_temperature 1.05 | 0,1 | 0.938 ± 0.002 | 0.500 | 0.176 |" in table
    with pytest.raises(SystemExit):
        frontier.main(["--compare", str(a), "--where", "repaint_fraction=0.5", "--out-dir", str(tmp_path)])
    assert "no row matches" in capsys.readouterr().err
    for bad in (["--where", "no_such_setting=1"], ["--targets", "0.9,0.1"]):
        with pytest.raises(SystemExit):
            frontier.main(["--compare", str(a), "--out-dir", str(tmp_path), *bad])
    with pytest.raises(SystemExit):
        frontier.main(["--compare", str(tmp_path / "missing.json"), "--out-dir", str(tmp_path)])
