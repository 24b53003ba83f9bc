"""`from_pretrained` reads only JSON and safetensors: hostile or broken files give clear errors."""

from __future__ import annotations

import pickle

import pytest
import torch

from rcg_augment import RCGPipeline


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    d = tmp_path_factory.mktemp("saved") / "m"
    RCGPipeline.from_preset("tiny").save_pretrained(d)
    return d


def test_pickle_beside_weights_is_never_read(saved, tmp_path):
    marker = tmp_path / "pwned"
    (saved / "pytorch_model.bin").write_bytes(pickle.dumps(_Payload(str(marker))))
    RCGPipeline.from_pretrained(saved)
    assert not marker.exists()


def test_pickle_named_as_safetensors_is_refused(saved, tmp_path):
    d = tmp_path / "evil"
    d.mkdir()
    (d / "config.json").write_text((saved / "config.json").read_text())
    marker = tmp_path / "pwned"
    torch.save({"x": _Payload(str(marker))}, d / "model.safetensors")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        RCGPipeline.from_pretrained(d)
    assert not marker.exists()


def test_truncated_safetensors(saved, tmp_path):
    d = tmp_path / "cut"
    d.mkdir()
    (d / "config.json").write_text((saved / "config.json").read_text())
    data = (saved / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 3])
    with pytest.raises(ValueError, match="model.safetensors: not a readable safetensors file"):
        RCGPipeline.from_pretrained(d)


def test_missing_files(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="model.safetensors is missing"):
        RCGPipeline.from_pretrained(tmp_path)
