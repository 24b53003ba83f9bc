"""Bundled weights stored as float16 (scripts/bundle_model.py --float16, i.e. save_pretrained(dtype=torch.float16))
load into float32 and give the float32 model's outputs to float16 rounding."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rcg_augment import RCGPipeline
from rcg_augment.files import sha256_file
from rcg_augment.zoo import WEIGHTS_DIR, available_models
from tests.training.helpers import micro_pipeline

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


@pytest.fixture
def bundle(monkeypatch):
    monkeypatch.syspath_prepend(str(SCRIPTS))
    import bundle_model

    yield bundle_model
    sys.modules.pop("bundle_model", None)


def test_bundle_float16_stores_half_scrubs_machine_paths_and_matches(tmp_path, bundle, monkeypatch):
    pipe = micro_pipeline()
    runs = tmp_path / "runs"
    folder = pipe.save_pretrained(runs / "m", metadata={"training": [{"stage": "rdm", "init": f"{runs}/base"}]})
    monkeypatch.setattr(bundle, "WEIGHTS", tmp_path / "weights")
    monkeypatch.setattr(sys, "argv", ["bundle_model.py", str(folder), "micro", "--source", "a test",
                                      "--trained-on", "nothing", "--license", "MIT", "--float16"])
    bundle.main()
    out = tmp_path / "weights" / "micro"
    assert {v.dtype for v in load_file(str(out / "model.safetensors")).values() if v.is_floating_point()} == \
        {torch.float16}
    config = json.loads((out / "config.json").read_text())
    assert config["metadata"]["weights_sha256"] == sha256_file(out / "model.safetensors")
    assert config["metadata"]["weights_sha256"] in (out / "README.md").read_text()
    assert config["metadata"]["weights_dtype"] == "float16"
    assert str(tmp_path) not in json.dumps(config) and config["metadata"]["training"][0]["init"] == "runs/base"
    half = RCGPipeline.from_pretrained(out)
    assert all(p.dtype == torch.float32 for p in half.parameters())
    for name, tensor in pipe.state_dict().items():  # every weight is the float32 one rounded to float16
        assert torch.equal(half.state_dict()[name], tensor.half().float() if tensor.is_floating_point() else tensor)
    x = torch.rand(8, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    cos = torch.nn.functional.cosine_similarity(pipe.encode(x), half.encode(x))
    assert cos.min() > 0.999


def test_bundled_fashion_tiny_is_float16_on_disk_and_float32_in_memory():
    if "fashion-tiny" not in available_models():
        pytest.skip("fashion-tiny not bundled")
    on_disk = load_file(str(WEIGHTS_DIR / "fashion-tiny" / "model.safetensors"))
    assert {v.dtype for v in on_disk.values() if v.is_floating_point()} == {torch.float16}
    pipe = RCGPipeline.from_pretrained("fashion-tiny")
    assert all(p.dtype == torch.float32 for p in pipe.parameters())
    assert pipe.config.metadata["weights_dtype"] == "float16"
    assert "/work/" not in json.dumps(pipe.config.metadata)  # no path of the training machine
