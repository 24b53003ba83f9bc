"""`rcg-augment build`: help, summary, corrupt inputs, errors, overwrite, contact sheet, accelerate."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from rcg_augment.cli import main
from rcg_augment.data import SyntheticDataset, build_synthetic, load_synthetic
from rcg_augment.zoo import available_models

FAST = ["--num-iter", "2", "--rdm-steps", "2", "--no-progress"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # intra-op threads thrash on a shared 2-core box


@pytest.fixture(scope="module")
def model_dir(gray_dir):
    return Path(gray_dir)


@pytest.fixture
def folder(tmp_path):
    rng = np.random.default_rng(0)
    for c in ("left", "right"):
        (tmp_path / "in" / c).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 256, (10, 10), dtype=np.uint8)).save(tmp_path / "in" / c / f"{i}.png")
    return tmp_path / "in"


def run(capsys, *argv):
    code = main(["build", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


def test_help_lists_every_flag(capsys):
    with pytest.raises(SystemExit) as info:
        main(["build", "--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--input", "--out", "--variants", "--noise-level", "--shots", "--seed", "--model", "--batch-size",
                 "--device", "--cfg", "--num-iter", "--rdm-steps", "--quality-threshold", "--contact-sheet",
                 "--repaint-fraction", "--label-filter", "--max-attempts", "--cpu-matmul",
                 "--overwrite", "digits", "lfw-faces", "accelerate launch"):
        assert flag in text
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "build" in capsys.readouterr().out


def test_build_with_corrupt_files_summary_and_contact_sheet(capsys, folder, tmp_path, model_dir):
    (folder / "left" / "broken.png").write_bytes((folder / "left" / "0.png").read_bytes()[:40])
    (folder / "right" / "notes.jpg").write_text("this is text")
    out = tmp_path / "cache"
    code, text, err = run(capsys, "--input", folder, "--out", out, "--variants", 2, "--noise-level", "0.2,0.6",
                          "--model", model_dir, "--batch-size", 8, "--contact-sheet", *FAST)
    assert code == 0, err
    assert "records        24 = 6 sources x 2 variants x 2 noise levels (0.2, 0.6)" in text
    assert "skipped files  2" in text and "broken.png" in text and "notes.jpg" in text
    assert "variants/s" in text and str(out) in text
    assert (out / "contact_sheet.png").is_file() and "contact sheet" in text
    ds = SyntheticDataset(out)
    assert len(ds) == 24 and ds.classes == ["left", "right"]
    assert sorted(set(load_synthetic(out)["noise_level"])) == [0.2, 0.6]
    assert len(text.splitlines()) <= 20  # one screen


def test_noise_level_defaults_to_the_librarys_recommended_level(capsys, folder, tmp_path, model_dir):
    from rcg_augment.settings import DEFAULT_NOISE_LEVEL

    code, text, err = run(capsys, "--input", folder, "--out", tmp_path / "c", "--variants", 1, "--model", model_dir,
                          *FAST)
    assert code == 0, err
    assert f"1 noise level ({DEFAULT_NOISE_LEVEL:g})" in text
    assert json.loads((tmp_path / "c" / "manifest.json").read_text())["generation"]["noise_levels"] == [
        DEFAULT_NOISE_LEVEL]


def test_rerun_is_a_noop_stale_is_refused_overwrite_rebuilds(capsys, folder, tmp_path, model_dir):
    args = ["--input", folder, "--out", tmp_path / "c", "--variants", 1, "--noise-level", 0.5, "--model", model_dir,
            *FAST]
    assert run(capsys, *args)[0] == 0
    code, text, _ = run(capsys, *args)
    assert code == 0 and "0 written this run" in text and "already complete" in text
    code, _, err = run(capsys, *args, "--seed", 3)
    assert code == 1 and "seed (cache 0, now 3)" in err and "--overwrite" in err
    code, text, _ = run(capsys, *args, "--seed", 3, "--overwrite")
    assert code == 0 and "6 written this run" in text
    assert json.loads((tmp_path / "c" / "manifest.json").read_text())["seed"] == 3


def test_builtin_sources_with_shots(capsys, tmp_path, model_dir):
    code, text, err = run(capsys, "--input", "digits", "--shots", 1, "--out", tmp_path / "d", "--variants", 1,
                          "--noise-level", 0.3, "--model", model_dir, *FAST)
    assert code == 0, err
    assert "sources used   10 of 1797 (--shots 1, --seed 0)" in text
    code, text, err = run(capsys, "--input", "lfw-faces", "--shots", 2, "--out", tmp_path / "f", "--variants", 1,
                          "--noise-level", 0.3, "--model", model_dir, *FAST)
    assert code == 0, err
    assert SyntheticDataset(tmp_path / "f").classes == ["non-face", "face"]


def test_errors_are_clear(capsys, tmp_path, model_dir, folder):
    (tmp_path / "empty").mkdir()
    code, _, err = run(capsys, "--input", tmp_path / "empty", "--out", tmp_path / "o1", "--variants", 1,
                       "--noise-level", 0.3, "--model", model_dir, *FAST)
    assert code == 1 and "empty" in err
    (folder / "nothing").mkdir()
    code, _, err = run(capsys, "--input", folder, "--out", tmp_path / "o2", "--variants", 1,
                       "--noise-level", 0.3, "--model", model_dir, *FAST)
    assert code == 1 and "'nothing' holds no images" in err
    if "digits-tiny" not in available_models():
        code, _, err = run(capsys, "--input", folder, "--out", tmp_path / "o3", "--variants", 1, "--noise-level", 0.3)
        assert code == 1 and "digits-tiny" in err and "rcg-augment train" in err
    for bad in ("1.5", "a,b", ""):
        with pytest.raises(SystemExit) as info:
            main(["build", "--input", "digits", "--out", str(tmp_path / "o4"), "--variants", "1", "--noise-level", bad])
        assert info.value.code == 2
    assert "noise" in capsys.readouterr().err


def test_manual_process_split_flags(capsys, folder, tmp_path, model_dir):
    common = ["--input", folder, "--out", tmp_path / "c", "--variants", 2, "--noise-level", 0.5, "--model", model_dir,
              "--batch-size", 2, "--records-per-shard", 2, *FAST]
    code, text, _ = run(capsys, *common, "--process-index", 1, "--num-processes", 2)
    assert code == 0 and "waiting for the others" in text
    code, text, _ = run(capsys, *common, "--process-index", 0, "--num-processes", 2)
    assert code == 0 and "done" in text.splitlines()[0] and "records        12" in text


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("accelerate", path=os.path.dirname(sys.executable)) is None,
                    reason="accelerate CLI not installed")
def test_accelerate_launch_two_processes_equals_one(folder, tmp_path, model_dir):
    """`accelerate launch --multi_gpu --num_processes 2` on CPU: gloo group, barrier, overwrite."""
    accelerate = shutil.which("accelerate", path=os.path.dirname(sys.executable))
    out = tmp_path / "dist"
    env = dict(os.environ, OMP_NUM_THREADS="1")

    def launch(*extra):
        cmd = [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
               "--main_process_port", "0", "--mixed_precision", "no", "--dynamo_backend", "no",
               "-m", "rcg_augment", "build", "--input", str(folder), "--out", str(out), "--variants", "2",
               "--noise-level", "0.5", "--model", str(model_dir), "--batch-size", "2", "--records-per-shard", "2",
               "--device", "cpu", *FAST, *extra]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc.stdout

    launch()
    assert (out / ".lock-p1").exists()  # really ran as two processes
    text = launch("--seed", "4", "--overwrite")
    assert text.count("rcg-augment build: done") == 1  # only process 0 prints
    build_synthetic(folder, tmp_path / "one", variants_per_image=2, noise_level=0.5, pipeline=model_dir,
                    batch_size=2, records_per_shard=2, seed=4, num_iter=2, rdm_steps=2, progress=False)
    one = json.loads((tmp_path / "one" / "manifest.json").read_text())
    two = json.loads((out / "manifest.json").read_text())
    assert two["seed"] == 4 and two["shards"] == one["shards"]


def test_label_filter_and_repaint_fraction_flags(capsys, folder, model_dir, tmp_path):
    out = tmp_path / "cache"
    code, text, err = run(capsys, "--input", folder, "--out", out, "--model", model_dir, "--variants", 2,
                          "--noise-level", 0.3, "--repaint-fraction", 0.6, "--label-filter", "--max-attempts", 2,
                          "--token-temperature", 0.8, *FAST)
    assert code == 0, err
    assert "label filter" in text and "per class: left" in text and "--max-attempts 2" in text
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["generation"]["repaint_fraction"] == 0.6 and manifest["generation"]["token_temperature"] == 0.8
    assert manifest["generation"]["label_filter"]["max_attempts"] == 2
    assert set(manifest["label_filter_draws"]) == {"left", "right"}
    code, _, err = run(capsys, "--input", folder, "--out", tmp_path / "x", "--model", model_dir, "--variants", 1,
                       "--noise-level", 0.3, "--repaint-fraction", 0.2, *FAST)
    assert code != 0 and "`--repaint-fraction` must be in [0.5, 1]" in err  # the flag, not the Python name


def test_cpu_matmul_flag(capsys, folder, model_dir, tmp_path):
    from rcg_augment.cpu_matmul import onednn_linear_available

    out = tmp_path / "cache"
    backend = "onednn" if onednn_linear_available() else "default"
    code, _, err = run(capsys, "--input", folder, "--out", out, "--model", model_dir, "--variants", 1,
                       "--noise-level", 0.3, "--cpu-matmul", backend, *FAST)
    assert code == 0, err
    assert json.loads((out / "manifest.json").read_text()).get("cpu_matmul", "default") == backend
    with pytest.raises(SystemExit):
        main(["build", "--input", str(folder), "--out", str(tmp_path / "x"), "--cpu-matmul", "mkl"])
    assert "invalid choice: 'mkl'" in capsys.readouterr().err
