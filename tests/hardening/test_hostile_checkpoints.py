"""Hostile checkpoints handed to every loader: a pickle whose ``__reduce__`` writes a marker file
is refused with a clear error, and the marker never appears. Also config.json files that ask for
absurd models fail on the shapes, before any memory is allocated.

Loaders: ``from_official`` (every slot / kind), ``convert_official_file``, ``from_pretrained``,
``RCGAugment(model=dir)`` (torchvision and albumentations), ``rcg-augment build --model dir``,
and the trainer's resume (``train_stage`` on a checkpoint folder).
"""

from __future__ import annotations

import json
import pickle
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from rcg_augment import RCGAugment, RCGPipeline
from rcg_augment.official import OfficialCheckpointError, convert_official_file
from rcg_augment.pipeline import ConfigError

from .conftest import CLI_FAST, assert_one_line_error, run_cli


class _Payload:
    """Unpickling this writes ``marker``: the proof that a loader ran code from a file."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('pwned')",))


def _hostile_files(directory: Path, marker: Path) -> dict[str, Path]:
    """The payload in each container a checkpoint may come in."""
    directory.mkdir(parents=True, exist_ok=True)
    files = {
        "torch-zip": directory / "zip.pth",  # torch.save's default (zip) format
        "torch-legacy": directory / "legacy.pth",  # the pre-1.6 format
        "raw-pickle": directory / "raw.pkl",  # pickle.dumps, no torch framing
        "nested-args": directory / "args.pth",  # where RDM/MAGE files keep their argparse.Namespace
    }
    torch.save({"model": {"w": torch.zeros(2)}, "payload": _Payload(marker)}, files["torch-zip"])
    torch.save({"state_dict": _Payload(marker)}, files["torch-legacy"], _use_new_zipfile_serialization=False)
    files["raw-pickle"].write_bytes(pickle.dumps({"model": _Payload(marker)}, protocol=2))
    torch.save({"model": {"w": torch.zeros(2)}, "args": _Payload(marker)}, files["nested-args"])
    return files


@pytest.fixture
def marker(tmp_path) -> Path:
    path = tmp_path / "MARKER"
    yield path
    assert not path.exists(), "a loader unpickled the payload"


@pytest.fixture
def evil_pretrained(tmp_path, model_dir, marker) -> Path:
    """A save_pretrained folder whose model.safetensors is a torch pickle carrying the payload."""
    d = tmp_path / "evil-model"
    d.mkdir()
    shutil.copy(model_dir / "config.json", d / "config.json")
    torch.save({"encoder.vit.cls_token": _Payload(marker)}, d / "model.safetensors")
    return d


# ------------------------------------------------------------------------------------- official files
@pytest.mark.parametrize("container", ["torch-zip", "torch-legacy", "raw-pickle", "nested-args"])
@pytest.mark.parametrize("kind", ["encoder", "rdm", "mage", "tokenizer"])
def test_convert_official_file_refuses(tmp_path, marker, container, kind):
    path = _hostile_files(tmp_path / "files", marker)[container]
    with pytest.raises(OfficialCheckpointError) as info:
        convert_official_file(path, kind)
    assert str(path) in str(info.value)
    if container != "raw-pickle":  # a raw pickle is not a torch file at all: "cannot be read"
        assert "refused" in str(info.value)


@pytest.mark.parametrize("slot", ["encoder", "tokenizer", "mage", "rdm"])
def test_from_official_refuses_in_every_slot(tmp_path, marker, slot):
    files = _hostile_files(tmp_path / "files", marker)
    kwargs = {"rdm": files["nested-args"], "mage": files["torch-zip"], slot: files["torch-legacy"]}
    with pytest.raises(OfficialCheckpointError, match="refused") as info:
        RCGPipeline.from_official(**kwargs)
    assert any(str(p) in str(info.value) for p in kwargs.values())


# ------------------------------------------------------------------------------------- saved pipelines
def test_transforms_refuse_a_pickled_model(evil_pretrained):
    """The torchvision and albumentations transforms load lazily: the first call refuses."""
    img = Image.fromarray(np.zeros((8, 8), np.uint8))
    aug = RCGAugment(model=evil_pretrained, seed=0)
    with pytest.raises(ValueError, match="model.safetensors: not a readable safetensors file"):
        aug(img)
    import albumentations as A

    from rcg_augment.albumentations import AlbuRCGAugment

    tf = A.Compose([AlbuRCGAugment(model=str(evil_pretrained), p=1.0)], seed=0)
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        tf(image=np.zeros((8, 8, 3), np.uint8))


def test_build_cli_refuses_a_pickled_model(evil_pretrained, tmp_path, capsys):
    root = tmp_path / "in" / "a"
    root.mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(root / "0.png")
    code, _, err = run_cli(capsys, "--input", root.parent, "--out", tmp_path / "out", "--variants", 1,
                           "--noise-level", 0.5, "--model", evil_pretrained, *CLI_FAST)
    assert_one_line_error(code, err, str(evil_pretrained / "model.safetensors"), "not a readable safetensors file")
    assert not (tmp_path / "out").exists()  # refused before anything is written


def _edit_config(src: Path, dst: Path, section: str, key: str, value) -> Path:
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg[section][key] = value
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


@pytest.mark.parametrize("section,key,value,error,match", [
    ("rdm", "hidden_dim", 200_000, ValueError, r"wrong shapes: rdm\..* expected \(200000"),  # 160 GB if built
    ("encoder", "depth", 100_000, ConfigError, "more than .* parameter tensors"),  # minutes to build, then OOM
    ("rdm", "num_timesteps", 10**9, ConfigError, r"num_timesteps must be an integer in \[1, 100000\]"),
    ("mage", "depth", 1e9, ConfigError, "cannot build the model it describes"),
    ("tokenizer", "ch", -8, (ConfigError, ValueError), "config"),
])
def test_absurd_config_fails_before_allocating(tmp_path, model_dir, section, key, value, error, match):
    d = _edit_config(model_dir, tmp_path / "m", section, key, value)
    t0 = time.perf_counter()
    with pytest.raises(error, match=match) as info:
        RCGPipeline.from_pretrained(d)
    assert str(d) in str(info.value)
    assert time.perf_counter() - t0 < 30  # about a second on a busy box; building would take minutes or fail


def test_deeply_nested_config_json_is_a_config_error(tmp_path, model_dir):
    d = tmp_path / "m"
    shutil.copytree(model_dir, d)
    (d / "config.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ConfigError, match="config.json"):
        RCGPipeline.from_pretrained(d)


# ------------------------------------------------------------------------------------- trainer resume
def test_trainer_resume_refuses_pickled_checkpoint_files(tmp_path, marker):
    """train_stage resumes from out/checkpoints/<stage>/step_*: a payload in accelerate's RNG file
    or in the saved base pipeline never runs. (optimizer.bin is covered in tests/training/test_loop.py.)

    accelerate reads random_states_*.pkl with weights_only=True but ignores a file it cannot read
    (it logs "Could not load random states" and goes on); the trainer reseeds every step, so the
    resume still completes. The saved base pipeline is refused with a clear error."""
    import pickle as pickle_module

    from rcg_augment.training.api import train_stage
    from tests.training.helpers import FAST, digits_source, micro_pipeline

    kw = dict(FAST, steps=4)
    train_stage("rdm", digits_source(), tmp_path / "run", init=micro_pipeline(), max_steps=2, **kw)
    root = tmp_path / "run" / "checkpoints" / "rdm"
    ckpt = next(root.glob("step_*"))
    rng_files = sorted(ckpt.glob("random_states_*.pkl"))
    assert rng_files, sorted(p.name for p in ckpt.iterdir())
    saved = rng_files[0].read_bytes()
    torch.save({"step": 0, "random_state": _Payload(marker)}, rng_files[0])
    try:
        train_stage("rdm", digits_source(), tmp_path / "run", init=micro_pipeline(), max_steps=3, **kw)
    except (pickle_module.UnpicklingError, ValueError, RuntimeError):
        pass  # refusing outright is fine too; running the payload is not
    assert not marker.exists()
    rng_files[0].write_bytes(saved)
    base = next(p for p in root.iterdir() if (p / "model.safetensors").is_file() and not p.name.startswith("step_"))
    torch.save({"w": _Payload(marker)}, base / "model.safetensors")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        train_stage("rdm", digits_source(), tmp_path / "run", init=micro_pipeline(), **kw)
