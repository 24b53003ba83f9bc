"""`rcg-augment train` / `finetune`: write a pipeline folder that from_pretrained loads."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from rcg_augment import RCGPipeline
from rcg_augment.cli import main
from rcg_augment.data import open_source
from rcg_augment.data.splits import benchmark_split, indices_sha256
from tests.training.helpers import digits_array, micro_pipeline

QUICK = ["--steps", "2", "--batch-size", "4", "--no-progress", "--log-every", "1"]


@pytest.fixture
def image_folder(tmp_path):
    images, labels = digits_array(12)
    root = tmp_path / "images"
    for i, (img, label) in enumerate(zip(images, labels, strict=True)):
        (root / str(label)).mkdir(parents=True, exist_ok=True)
        Image.fromarray(img, mode="L").save(root / str(label) / f"{i}.png")
    return root


@pytest.fixture
def micro_dir(tmp_path):
    return micro_pipeline().save_pretrained(tmp_path / "micro")


def test_train_stage_writes_a_loadable_pipeline(image_folder, micro_dir, tmp_path, capsys):
    out = tmp_path / "out"
    rc = main(["train", "tokenizer", "--data", str(image_folder), "--out", str(out), "--init", str(micro_dir),
               *QUICK, "--set", "recon_loss=\"mse\"", "--seed", "3"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "tokenizer done: step 2/2" in printed and "from_pretrained" in printed
    pipe = RCGPipeline.from_pretrained(out)
    record = pipe.config.metadata["training"][-1]
    assert record["stage"] == "tokenizer" and record["seed"] == 3 and record["num_images"] == 12
    # what a bit-exact reproduction needs besides the seed
    assert record["torch_threads"] == torch.get_num_threads() and record["torch"] == torch.__version__
    start = json.loads((out / "log.jsonl").read_text().splitlines()[0])
    assert start["settings"]["options"]["recon_loss"] == "mse"


def test_train_all_from_preset_infers_channels(image_folder, tmp_path):
    out = tmp_path / "all"
    assert main(["train", "all", "--data", str(image_folder), "--out", str(out), *QUICK[:-2]]) == 0
    pipe = RCGPipeline.from_pretrained(out)
    assert pipe.in_channels == 1 and pipe.image_size == 32  # tiny preset, gray data
    assert [r["stage"] for r in pipe.config.metadata["training"]] == ["encoder", "tokenizer", "rdm", "mage"]


def test_recipe_quick_run_and_finetune(micro_dir, tmp_path):
    out = tmp_path / "recipe"
    rc = main(["train", "rdm", "--recipe", "digits-tiny", "--init", str(micro_dir), "--out", str(out),
               "--steps-scale", "0.002", "--batch-size", "4", "--no-progress"])
    assert rc == 0
    record = RCGPipeline.from_pretrained(out).config.metadata["training"][-1]
    assert record["recipe"] == "digits-tiny" and record["steps"] == 2  # 1200 * 0.002, rounded
    # a recipe trains on the benchmark pool: the few-shot test split is held out and fingerprinted
    digits = open_source("digits")
    pool, test = benchmark_split(digits)
    assert record["num_images"] == len(pool) == 1258
    assert record["excluded_test_indices_sha256"] == indices_sha256(test)
    ft = tmp_path / "ft"
    rc = main(["finetune", "--from", str(out), "--data", "lfw-faces", "--classes", "face", "--out", str(ft),
               "--stages", "mage", *QUICK])
    assert rc == 0
    meta = RCGPipeline.from_pretrained(ft).config.metadata["training"][-1]
    assert meta["stage"] == "mage" and meta["num_images"] == 100 and meta["finetuned_from"] == str(out)


def test_recipe_continuation_runs_after_its_stage_and_resumes_as_finished(micro_dir, tmp_path, capsys):
    """digits-tiny continues MAGE after the four stages (the bundled weights were made that way):
    the continuation trains into the same folder under its own checkpoint name, with its own
    settings, and a rerun skips both runs instead of mistaking one for the other."""
    out = tmp_path / "cont"
    args = ["train", "mage", "--recipe", "digits-tiny", "--init", str(micro_dir), "--out", str(out),
            "--steps-scale", "0.002", "--batch-size", "4", "--no-progress"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "mage      done: step 2/2" in printed and "mage-continued-1 done: step 2/2" in printed
    assert "mage-continued-2 done: step 6/6" in printed and "mage-continued-3 done: step 5/5" in printed
    # `train mage` runs the recipe's MAGE continuations only (6 follows the encoder's and RDM's 4, 5)
    assert "mage-continued-6 done: step 2/2" in printed and "continued-4" not in printed
    assert "mage-continued-7 done: step 4/4" in printed and "continued-8" not in printed
    assert "mage-continued-10 done: step 6/6" in printed and "mage-continued-11 done: step 3/3" in printed
    records = RCGPipeline.from_pretrained(out).config.metadata["training"]
    first, cont, cont2, cont3, cont6, cont7, cont10, cont11 = records[-8:]
    assert cont3["run_name"] == "mage-continued-3" and cont3["continuation"] == 3 and cont3["seed"] == 3
    assert cont6["run_name"] == "mage-continued-6" and cont6["continuation"] == 6 and cont6["seed"] == 6
    assert cont7["run_name"] == "mage-continued-7" and cont7["continuation"] == 7 and cont7["seed"] == 7
    assert cont10["continuation"] == 10 and cont10["seed"] == 10 and "rep_crop" not in cont10["options"]
    # the last continuation takes MAGE's training representation from a second crop
    assert cont11["continuation"] == 11 and cont11["seed"] == 11 and cont11["options"]["rep_crop"] == "independent"
    assert first["stage"] == cont["stage"] == "mage"
    assert "run_name" not in first and first["seed"] == 0
    assert cont["run_name"] == "mage-continued-1" and cont["continuation"] == 1 and cont["seed"] == 1
    assert cont["lr"] == pytest.approx(2 * first["lr"])  # blr 3e-3 after 1.5e-3
    assert cont2["run_name"] == "mage-continued-2" and cont2["continuation"] == 2 and cont2["seed"] == 2
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [
        "mage", "mage-continued-1", "mage-continued-10", "mage-continued-11", "mage-continued-2",
        "mage-continued-3", "mage-continued-6", "mage-continued-7"]
    weights = (out / "model.safetensors").read_bytes()
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert printed.count("already finished") == 8
    assert (out / "model.safetensors").read_bytes() == weights


def test_recipe_from_a_continuation_starts_at_a_finished_model(micro_dir, tmp_path, capsys):
    """--continuation K trains only the recipe's K-th continuation (and later ones) on top of --init,
    e.g. the bundled digits-tiny; it resumes as finished, and bad uses are refused."""
    out = tmp_path / "c3"
    args = ["train", "mage", "--recipe", "digits-tiny", "--init", str(micro_dir), "--continuation", "3",
            "--out", str(out), "--steps-scale", "0.002", "--batch-size", "4", "--no-progress"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "mage-continued-3 done: step 5/5" in printed and "continued-2" not in printed
    pipe = RCGPipeline.from_pretrained(out)
    record, *later = pipe.config.metadata["training"]  # the micro start had no training records
    assert record["continuation"] == 3 and record["seed"] == 3 and record["init"] == str(micro_dir)
    assert [(r["continuation"], r["seed"]) for r in later] == [(6, 6), (7, 7), (10, 10), (11, 11)]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [
        "mage-continued-10", "mage-continued-11", "mage-continued-3", "mage-continued-6", "mage-continued-7"]
    assert main(args) == 0 and "already finished" in capsys.readouterr().out
    assert main([*args[:7], "12", *args[8:]]) == 1
    assert "`from_continuation` must be in [1, 11]" in capsys.readouterr().err
    assert main(["train", "mage", "--recipe", "digits-tiny", "--continuation", "3", "--out",
                 str(tmp_path / "none"), "--no-progress"]) == 1
    assert "needs `init`" in capsys.readouterr().err
    assert main(["train", "mage", "--data", "digits", "--continuation", "3", "--out", str(tmp_path / "x")]) == 1
    assert "add --recipe" in capsys.readouterr().err


def test_recipe_without_continuations_stops_after_its_stages(micro_dir, tmp_path, capsys):
    """--no-continuations trains the recipe's stage and none of its continuation phases (how a
    bundled model that predates a recipe's continuations is rebuilt); misuse is refused."""
    out = tmp_path / "plain"
    args = ["train", "mage", "--recipe", "digits-tiny", "--init", str(micro_dir), "--out", str(out),
            "--steps-scale", "0.002", "--batch-size", "4", "--no-progress", "--no-continuations"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "mage      done: step 2/2" in printed and "continued" not in printed
    records = RCGPipeline.from_pretrained(out).config.metadata["training"]
    assert [r["stage"] for r in records][-1] == "mage" and "continuation" not in records[-1]
    assert main([*args, "--continuation", "3"]) == 1
    assert "cannot be combined with `from_continuation`" in capsys.readouterr().err
    assert main(["train", "mage", "--data", "digits", "--no-continuations", "--out", str(tmp_path / "x")]) == 1
    assert "add --recipe" in capsys.readouterr().err


def test_recipe_encoder_continuation_retrains_what_reads_the_representation(micro_dir, tmp_path, capsys):
    """digits-tiny's continuations 4 and 8 train the encoder further; the RDM and MAGE continuations
    after each then follow its new representations, in recipe order, into one folder."""
    out = tmp_path / "c4"
    before = RCGPipeline.from_pretrained(micro_dir)
    args = ["train", "all", "--recipe", "digits-tiny", "--init", str(micro_dir), "--continuation", "4",
            "--out", str(out), "--steps-scale", "0.002", "--batch-size", "4", "--no-progress"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    names = ("encoder-continued-4", "rdm-continued-5", "mage-continued-6", "mage-continued-7",
             "encoder-continued-8", "rdm-continued-9", "mage-continued-10", "mage-continued-11")
    at = [printed.index(f"{name} done") for name in names]
    assert at == sorted(at)
    after = RCGPipeline.from_pretrained(out)
    records = after.config.metadata["training"]
    assert [(r["stage"], r["continuation"], r["seed"]) for r in records] == [
        ("encoder", 4, 5), ("rdm", 5, 5), ("mage", 6, 6), ("mage", 7, 7),
        ("encoder", 8, 9), ("rdm", 9, 9), ("mage", 10, 10), ("mage", 11, 11)]
    for net in ("encoder", "rdm", "mage"):
        a, b = getattr(before, net).state_dict(), getattr(after, net).state_dict()
        assert any(not torch.equal(a[k], b[k]) for k in a), f"{net} did not change"
    tok_a, tok_b = before.tokenizer.state_dict(), after.tokenizer.state_dict()
    assert all(torch.equal(tok_a[k], tok_b[k]) for k in tok_a)


def test_run_name_must_be_a_plain_folder_name():
    from rcg_augment.training.loop import TrainConfig

    for bad in ("", "..", "a/b", "../x"):
        with pytest.raises(ValueError, match="run_name"):
            TrainConfig(run_name=bad)
    assert TrainConfig(run_name="mage-continued-1").run_name == "mage-continued-1"


def test_benchmark_pool_of_one_class():
    from rcg_augment.training.api import _benchmark_pool

    source, meta = _benchmark_pool("lfw-faces", ("face",))
    full = open_source("lfw-faces")
    pool, test = benchmark_split(full)
    expected = [i for i in pool if full.classes[full.labels[i]] == "face"]
    assert len(source) == len(expected) == 70
    assert set(source.labels) == {full.classes.index("face")}
    assert meta["excluded_test_indices_sha256"] == indices_sha256(test)
    with pytest.raises(ValueError, match="not in"):
        _benchmark_pool("lfw-faces", ("cat",))


def test_faces_recipe_fine_tunes_on_the_whole_pool():
    """A faces model must see every class of its task (faces and non-faces), unlabelled."""
    from rcg_augment.training.api import _benchmark_pool
    from rcg_augment.training.recipes import get_recipe

    r = get_recipe("faces-tiny")
    assert r.classes is None and r.data == "lfw-faces" and r.init == "digits-tiny"
    source, _ = _benchmark_pool(r.data, r.classes)
    full = open_source("lfw-faces")
    pool, _ = benchmark_split(full)
    assert len(source) == len(pool) == 140 and sorted(set(source.labels)) == [0, 1]


def test_max_steps_stops_with_exit_code_3_and_resumes(micro_dir, tmp_path, capsys):
    args = ["train", "rdm", "--data", "digits", "--out", str(tmp_path / "o"), "--init", str(micro_dir),
            "--steps", "4", "--batch-size", "4", "--no-progress"]
    assert main([*args, "--max-steps", "2"]) == 3
    assert "STOPPED" in capsys.readouterr().out
    assert main(args) == 0
    assert "done: step 4/4" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["train", "rdm", "--out", "X"], "--data is required"),
    (["train", "rdm", "--data", "digits", "--out", "X", "--set", "nope=1"], "nope"),
    (["train", "all", "--recipe", "no-such", "--out", "X"], "unknown recipe"),
    (["finetune", "--data", "digits", "--out", "X"], "--from"),
    (["finetune", "--from", "a", "--data", "digits", "--out", "X", "--stages", "rdm,gan"], "gan"),
])
def test_errors_name_the_problem(argv, message, capsys):
    assert main(argv) == 1
    assert message in capsys.readouterr().err


def test_help_lists_stages_and_examples(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = capsys.readouterr().out
    for word in ("encoder", "tokenizer", "rdm", "mage", "--recipe", "digits-tiny", "accelerate launch", "--max-time"):
        assert word in text
    with pytest.raises(SystemExit):
        main(["finetune", "--help"])
    assert "--official" in capsys.readouterr().out


def test_duration_parsing():
    from rcg_augment.cli.train import parse_duration

    assert parse_duration("90") == 90 and parse_duration("45m") == 2700 and parse_duration("1.5h") == 5400
    with pytest.raises(Exception, match="duration"):
        parse_duration("soon")


def test_numpy_source_gray_detection():
    from rcg_augment.data import open_source
    from rcg_augment.training.api import infer_channels

    assert infer_channels(open_source(np.zeros((3, 8, 8), np.uint8))) == 1
    assert infer_channels(open_source(np.zeros((3, 8, 8, 3), np.uint8))) == 3


def test_finetuned_model_does_not_inherit_the_init_identity(tmp_path):
    from rcg_augment.training.api import resolve_init

    pipe = micro_pipeline()
    init_dir = pipe.save_pretrained(tmp_path / "named", metadata={
        "name": "digits-tiny", "source": "somewhere", "excluded_test_indices_sha256": "abc", "license": "MIT"})
    start, described = resolve_init(str(init_dir), tmp_path / "new", None)
    meta = start.config.metadata
    assert described == str(init_dir)
    assert "name" not in meta and "excluded_test_indices_sha256" not in meta
    assert meta["init_model"] == {"name": "digits-tiny", "source": "somewhere", "excluded_test_indices_sha256": "abc"}
    assert meta["license"] == "MIT"  # weights derived from licensed weights keep the license


def test_reinit_retrains_one_stage_on_top_of_the_others(image_folder, micro_dir, tmp_path, capsys):
    from rcg_augment.training.api import reinitialise

    start = RCGPipeline.from_pretrained(micro_dir)
    with torch.no_grad():  # stands in for trained weights
        for p in start.parameters():
            p.add_(0.5)
    fresh = reinitialise(start, ["mage"], {"mage": {"rep_drop_prob": 0.2}, "encoder": {"depth": 2}})
    assert fresh.config.mage.rep_drop_prob == 0.2 and fresh.config.encoder.depth == 1  # only mage's section
    for part in ("encoder", "tokenizer", "rdm"):
        assert all(torch.equal(a, b) for a, b in zip(getattr(fresh, part).state_dict().values(),
                                                     getattr(start, part).state_dict().values(), strict=False))
    assert not torch.equal(fresh.mage.token_emb.word_embeddings.weight, start.mage.token_emb.word_embeddings.weight)
    again = reinitialise(start, ["mage"], {"mage": {"rep_drop_prob": 0.2}})
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), again.state_dict().values(), strict=False))

    out = tmp_path / "out"
    assert main(["train", "mage", "--data", str(image_folder), "--out", str(out), "--init", str(micro_dir),
                 "--reinit", *QUICK]) == 0
    trained = RCGPipeline.from_pretrained(out)
    assert "mage re-initialised" in trained.config.metadata["training"][-1]["init"]
    assert all(torch.equal(a, b) for a, b in zip(trained.encoder.state_dict().values(),
                                                 RCGPipeline.from_pretrained(micro_dir).encoder.state_dict().values(), strict=False))
    assert main(["train", "mage", "--data", str(image_folder), "--out", str(tmp_path / "x"), "--reinit", *QUICK]) != 0
    assert "--reinit needs --init" in capsys.readouterr().err
