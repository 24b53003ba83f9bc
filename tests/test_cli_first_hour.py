"""The first hour with `rcg-augment build`: what a new user runs into, each checked."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from PIL import Image

from rcg_augment.cli import main
from tests.training.helpers import micro_pipeline

FAST = ["--num-iter", "2", "--rdm-steps", "2", "--batch-size", "4", "--no-progress"]


@pytest.fixture(scope="module")
def grey_model(tmp_path_factory):
    return str(micro_pipeline().save_pretrained(tmp_path_factory.mktemp("m") / "grey"))


def folder(root, mode: str, per_class: dict[str, int]):
    rng = np.random.default_rng(0)
    for name, n in per_class.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)).convert(mode).save(root / name / f"{i}.png")
    return str(root)


def test_usage_errors_are_one_line(capsys):
    with pytest.raises(SystemExit) as info:
        main(["build", "--input", "digits", "--out", "x"])
    err = capsys.readouterr().err.strip()
    assert info.value.code == 2 and len(err.splitlines()) == 1
    assert err == "rcg-augment build: error: the following arguments are required: --variants " \
                  "(see rcg-augment build --help)"


def test_colour_photos_without_model_are_refused_naming_the_fix(tmp_path, capsys):
    photos = folder(tmp_path / "photos", "RGB", {"cat": 2, "dog": 2})
    code = main(["build", "--input", photos, "--out", str(tmp_path / "c"), "--variants", "1", *FAST])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 1 and "holds colour images" in err and "--model" in err and "rcg-augment finetune" in err
    assert not (tmp_path / "c").exists()


def test_colour_photos_with_a_named_grey_model_warn(tmp_path, grey_model):
    photos = folder(tmp_path / "photos", "RGB", {"cat": 2, "dog": 2})
    from rcg_augment.data import build_synthetic

    with pytest.warns(UserWarning, match="holds colour images, but the model"):
        build_synthetic(photos, tmp_path / "c", variants_per_image=1, noise_level=0.3, pipeline=grey_model,
                        num_iter=2, rdm_steps=2, progress=False)


def test_refused_out_leaves_no_lock_and_overwrite_does_not_claim_to_remove(tmp_path, grey_model, capsys, caplog):
    images = folder(tmp_path / "in", "L", {"a": 2, "b": 2})
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with caplog.at_level(logging.INFO):
        code = main(["build", "--input", images, "--out", str(foreign), "--variants", "1", "--model", grey_model,
                     "--overwrite", *FAST])
    err = capsys.readouterr().err
    assert code == 1 and "`--out`" in err and "out_dir" not in err  # the flag, not the Python name
    assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]  # no .lock left behind, nothing removed
    assert "removing" not in caplog.text


def test_shots_larger_than_a_class_are_reported_and_plurals(tmp_path, grey_model, capsys):
    images = folder(tmp_path / "in", "L", {"big": 4, "small": 1})
    code = main(["build", "--input", images, "--out", str(tmp_path / "c"), "--variants", "1", "--shots", "3",
                 "--model", grey_model, *FAST])
    out = capsys.readouterr().out
    assert code == 0
    assert "records        4 = 4 sources x 1 variant x 1 noise level (0.3)" in out
    assert "short classes  fewer than --shots 3 images, all used: small 1" in out


def test_verbose_does_not_flood_with_pillow_debug(tmp_path, grey_model):
    import os
    import subprocess
    import sys

    images = folder(tmp_path / "in", "L", {"a": 1, "b": 1})
    done = subprocess.run([sys.executable, "-m", "rcg_augment", "-v", "build", "--input", images, "--out",
                           str(tmp_path / "c"), "--variants", "1", "--model", grey_model, *FAST],
                          capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "STREAM b'" not in done.stderr  # PIL's PNG chunk debug lines
    assert "overwrite" not in done.stderr and done.stdout.startswith("rcg-augment build: done")


def test_help_shows_real_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["build", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "tiny: 4)" in text and "tiny: 10)" in text  # num_iter and rdm_steps of digits-tiny
