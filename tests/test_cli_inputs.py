"""CLI inputs: parquet and imagefolder datasets through `build --input` and `train --data`
(with --split / --image-column / --label-column), and the default --noise-level."""

from __future__ import annotations

import json

import pytest

from rcg_augment import RCGPipeline
from rcg_augment.cli import main
from rcg_augment.data import SyntheticDataset
from rcg_augment.settings import DEFAULT_NOISE_LEVEL
from tests.data.test_dataset_inputs import make_imagefolder_dataset, make_parquet_dataset
from tests.training.helpers import micro_pipeline

FAST = ["--num-iter", "2", "--rdm-steps", "2", "--no-progress", "--variants", "1"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return micro_pipeline().save_pretrained(tmp_path_factory.mktemp("micro"))


def _manifest(out):
    return json.loads((out / "manifest.json").read_text())


def test_build_from_a_parquet_dataset_keeps_label_names(tmp_path, model_dir, capsys):
    root = make_parquet_dataset(tmp_path / "pq")
    out = tmp_path / "cache"
    code = main(["build", "--input", str(root), "--split", "test", "--image-column", "photo",
                 "--label-column", "kind", "--out", str(out), "--model", str(model_dir), *FAST])
    assert code == 0, capsys.readouterr().err
    manifest = _manifest(out)
    assert manifest["source"]["classes"] == ["ant", "bee", "cat"] and manifest["source"]["num_images"] == 3
    assert manifest["provenance"]["source"].endswith("pq (split test)")
    cache = SyntheticDataset(out)
    assert cache.classes == ["ant", "bee", "cat"] and len(cache) == 3
    assert cache.hf_dataset.features["label"].names == ["ant", "bee", "cat"]
    # without flags the train split and the only ClassLabel column are found; only the image column is named
    code = main(["build", "--input", str(root), "--image-column", "photo", "--out", str(tmp_path / "c2"),
                 "--model", str(model_dir), *FAST])
    assert code == 0 and _manifest(tmp_path / "c2")["source"]["num_images"] == 6


def test_build_from_an_imagefolder_dataset_with_default_noise_level(tmp_path, model_dir, capsys):
    root = make_imagefolder_dataset(tmp_path / "imgs")
    out = tmp_path / "cache"
    code = main(["build", "--input", str(root), "--out", str(out), "--model", str(model_dir), *FAST])
    text = capsys.readouterr().out
    assert code == 0
    assert f"1 noise level ({DEFAULT_NOISE_LEVEL:g})" in text
    manifest = _manifest(out)
    assert manifest["generation"]["noise_levels"] == [DEFAULT_NOISE_LEVEL]
    assert manifest["source"]["classes"] == ["left", "right"] and manifest["source"]["num_images"] == 4


def test_build_input_errors_are_one_line(tmp_path, model_dir, capsys):
    root = make_parquet_dataset(tmp_path / "pq")
    capsys.readouterr()
    code = main(["build", "--input", str(root), "--split", "nope", "--image-column", "photo",
                 "--out", str(tmp_path / "c"), "--model", str(model_dir), *FAST])
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("rcg-augment")]
    assert code == 1 and len(errors) == 1
    assert errors[0].startswith(f"rcg-augment build: error: {root} has no split 'nope' (Unknown split")
    assert "--split" in errors[0]


def test_train_on_a_parquet_dataset_split(tmp_path, model_dir, capsys):
    root = make_parquet_dataset(tmp_path / "pq")
    out = tmp_path / "run"
    code = main(["train", "rdm", "--data", str(root), "--split", "test", "--image-column", "photo",
                 "--init", str(model_dir), "--out", str(out), "--steps", "1", "--batch-size", "2", "--no-progress"])
    assert code == 0, capsys.readouterr().err
    record = RCGPipeline.from_pretrained(out).config.metadata["training"][-1]
    assert record["data"].endswith("pq (split test)") and record["num_images"] == 3
    assert main(["train", "rdm", "--split", "test", "--out", str(out)]) == 1
    assert "give --data too" in capsys.readouterr().err
