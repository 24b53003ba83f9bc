"""benchmarks/encoder_knn.py on tiny IDX files and a micro model: it runs, its neighbour search is
exact, and a checkpoint's encoder is really swapped in."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from tests.data.test_fashion_mnist import write_split
from tests.training.helpers import micro_pipeline

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.fixture
def encoder_knn(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import encoder_knn

    return encoder_knn


def test_neighbour_accuracy_matches_a_brute_force_search(encoder_knn):
    g = torch.Generator().manual_seed(0)
    f_train, f_test = torch.randn(50, 8, generator=g), torch.randn(12, 8, generator=g)
    y_train, y_test = torch.randint(0, 3, (50,), generator=g), torch.randint(0, 3, (12,), generator=g)
    got = encoder_knn.neighbour_accuracy(f_test, f_train, y_test, y_train, k=5, chunk=7)  # chunks cross the top-k
    sim = torch.nn.functional.normalize(f_test, dim=-1) @ torch.nn.functional.normalize(f_train, dim=-1).t()
    assert got["nn1"] == float((y_train[sim.argmax(1)] == y_test).float().mean())
    top, idx = sim.topk(5, dim=1)
    votes = torch.zeros(12, 3).scatter_add_(1, y_train[idx], top.clamp(min=0) + 1e-6)
    assert got["nn5"] == float((votes.argmax(1) == y_test).float().mean())
    # a test set that is the train set finds itself
    assert encoder_knn.neighbour_accuracy(f_train, f_train, y_train, y_train, k=1)["nn1"] == 1.0


def test_quick_run_and_checkpoint_weights(tmp_path, encoder_knn, one_torch_thread):
    write_split(tmp_path / "fm", "train", 60)
    write_split(tmp_path / "fm", "test", 30, seed=1)
    pipe = micro_pipeline()
    model = pipe.save_pretrained(tmp_path / "model")
    root = ["--data-root", str(tmp_path / "fm"), "--quick", "--out-dir", str(tmp_path / "out")]
    assert encoder_knn.main(["--models", str(model), *root]) == 0
    first = json.loads((tmp_path / "out" / "encoder_knn_quick.json").read_text())
    row = first["rows"][0]
    assert first["test_images"] == 20 and first["train_images"] == 60
    assert 0 <= row["nn1"] <= 1 and 0 <= row["pixels"]["nn1"] <= 1
    # a checkpoint file in the MoCo model's key layout, with other encoder weights
    other = {f"module.encoder.{k}": torch.randn_like(v) if v.is_floating_point() else v
             for k, v in pipe.encoder.state_dict().items()}
    other["module.predictor.0.weight"] = torch.zeros(2, 2)
    save_file(other, str(tmp_path / "ckpt.safetensors"))
    state = encoder_knn.encoder_state_from_checkpoint(tmp_path / "ckpt.safetensors")
    assert set(state) == set(pipe.encoder.state_dict())
    assert encoder_knn.main(["--models", str(model), "--encoder-weights", str(tmp_path / "ckpt.safetensors"),
                             *root]) == 0
    second = json.loads((tmp_path / "out" / "encoder_knn_quick.json").read_text())["rows"][0]
    assert second["model"].endswith("ckpt.safetensors") and second["pixels"] == row["pixels"]
    md = (tmp_path / "out" / "encoder_knn_quick.md").read_text()
    assert md.startswith("# Fashion-MNIST") and "| 1-NN |" in md
    with pytest.raises(SystemExit):  # --encoder-weights with two models is refused
        encoder_knn.main(["--models", str(model), str(model), "--encoder-weights", "x", *root])
