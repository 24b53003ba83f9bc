"""The few-shot benchmark: its quick mode runs every arm and writes well-formed reports; shot
draws never touch the held-out test split."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from rcg_augment.data.splits import stratified_holdout

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "fewshot.py"


def load_script():
    if str(SCRIPT.parent) not in sys.path:  # as `python benchmarks/fewshot.py` has it: for benchmarks/_common.py
        sys.path.insert(0, str(SCRIPT.parent))
    spec = importlib.util.spec_from_file_location("fewshot_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


def test_shot_draws_are_nested_and_stay_in_the_pool():
    fs = load_script()
    labels = np.repeat(np.arange(4), 20)
    pool, test = (np.asarray(a) for a in stratified_holdout(labels))
    for seed in range(5):
        small, large = fs.draw_shots(labels, pool, 2, seed), fs.draw_shots(labels, pool, 5, seed)
        assert set(small) <= set(large)
        assert not set(large) & set(test)
        assert np.bincount(labels[large]).tolist() == [5, 5, 5, 5]
    assert not np.array_equal(fs.draw_shots(labels, pool, 5, 0), fs.draw_shots(labels, pool, 5, 1))


def test_validation_draw_leaves_half_of_a_small_pool_to_search():
    """A pool of 140 (lfw-faces) minus 10 shots: 65 validation images, 65 left for retrieval; a
    large pool keeps the full validation size."""
    fs = load_script()
    assert fs.validation_size(300, 130) == 65
    assert fs.validation_size(300, 1250) == 300
    labels = np.repeat(np.arange(2), 70)
    d = fs.DatasetData.__new__(fs.DatasetData)
    d.labels, d.pool = labels, np.arange(140)
    s = fs.Settings.__new__(fs.Settings)
    s.val_size = 300
    _, train, val = fs.validation_draw(d, 5, 0, s)
    assert len(train) == 10 and len(val) == 65 and not set(val) & set(train)


def test_t_interval_matches_the_closed_form():
    fs = load_script()
    ci = fs.t_interval([0.5, 0.7])  # mean 0.6, sd 0.1414, t(0.975, 1) = 12.706
    assert ci["mean"] == pytest.approx(0.6)
    assert ci["half_width"] == pytest.approx(12.7062 * 0.141421 / math.sqrt(2), rel=1e-4)
    assert math.isnan(fs.t_interval([0.5])["half_width"])


def test_p_zero_trains_exactly_as_the_classical_recipe_and_variants_change_it():
    fs = load_script()
    _, s = fs.parse_args(["--quick"])
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(6, 1, 32, 32, generator=g), torch.tensor([0, 0, 0, 1, 1, 1])
    variants = torch.rand(6, 2, 1, 32, 32, generator=g)

    def weights(arm):
        return torch.cat([t.flatten() for t in fs.train_cnn(x, y, 2, arm, s, seed=5).state_dict().values()
                          if t.is_floating_point()])

    classical = weights(fs.ImageArm("affine-light"))
    assert torch.equal(weights(fs.ImageArm("affine-light", variants=variants, p=0.0)), classical)
    assert torch.equal(weights(fs.ImageArm("affine-light", variants=variants, p=0.5)),
                       weights(fs.ImageArm("affine-light", variants=variants, p=0.5)))  # seeded
    assert not torch.equal(weights(fs.ImageArm("affine-light", variants=variants, p=0.5)), classical)
    # images without a usable variant are never replaced: all counts 0 is the classical run again
    none_left = fs.ImageArm("affine-light", variants=variants, counts=torch.zeros(6, dtype=torch.long), p=1.0)
    assert torch.equal(weights(none_left), classical)


def test_label_filter_keeps_the_first_accepted_candidates_in_draw_order():
    fs = load_script()
    # two classes with prototypes along e0 / e1; candidate reps point at one of them
    e0, e1 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    reps = torch.stack([torch.stack([e1, e0, e1, e0]),   # source 0 (class 0): candidates 1 and 3 accepted
                        torch.stack([e0, e0, e0, e0])])  # source 1 (class 1): none accepted
    images = torch.arange(8, dtype=torch.float32).view(2, 4, 1, 1, 1).expand(2, 4, 1, 2, 2).clone()
    cands = fs.Candidates(images, reps, seconds_per_variant=0.5, encode_seconds_per_variant=0.25)
    train_reps = np.stack([e0.numpy(), e1.numpy()])
    labels = np.array([0, 1])
    config = fs.RCGConfig(0.5, 0.3, 0.7, True, 2)
    picked, counts, stats = fs.select_variants(cands, [0, 1], labels, config, train_reps, 2)
    assert counts.tolist() == [2, 0]
    assert picked[0, :, 0, 0, 0].tolist() == [1.0, 3.0]
    assert stats == {"candidates_per_image": 4, "acceptance": 0.25, "images_without_variant": 1}
    assert fs.generation_seconds(cands, config, 2, stats) == pytest.approx((0.5 + 0.25) * 2 * 4)
    off = fs.RCGConfig(0.5, 0.3, 0.7, False, 3)
    picked, counts, stats = fs.select_variants(cands, [1, 0], labels[::-1].copy(), off, train_reps, 2)
    assert counts.tolist() == [3, 3] and picked[0, :, 0, 0, 0].tolist() == [4.0, 5.0, 6.0]
    assert fs.generation_seconds(cands, off, 2, stats) == pytest.approx(0.5 * 2 * 3)
    assert fs.generation_seconds(cands, fs.RCGConfig(0.0), 2, stats) == 0.0


def test_grid_puts_classical_alone_first_and_rejects_bad_values():
    fs = load_script()
    _, s = fs.parse_args(["--grid-p", "0.5", "--grid-noise", "0,0.3", "--grid-repaint", "1",
                          "--grid-filter", "on", "--grid-variants", "8,2"])
    grid = s.grid()
    assert grid[0] == fs.RCGConfig(0.0) and len(grid) == 1 + 2 * 1 * 1 * 2
    assert s.candidates == 8 and {c.variants for c in grid[1:]} == {2, 8}
    assert all(c.label_filter for c in grid[1:])
    for bad in (["--grid-p", "0,0.5"], ["--grid-repaint", "0.4"], ["--grid-filter", "maybe"],
                ["--grid-variants", "0"], ["--grid-noise", "0.3,0.3"], ["--arms", "classical+rcg-cache@0.3"]):
        with pytest.raises(SystemExit):
            fs.parse_args(bad)


def test_best_on_key_skips_classical_alone_and_breaks_ties_to_the_earlier_point():
    fs = load_script()
    val = {"p=0 (classical alone)": 0.9, "a": 0.7, "b": 0.8, "c": 0.8}
    assert fs.best_on_key({"rcg_val_accuracy": val}) == "b"
    assert fs.best_on_key({"rcg_val_accuracy": val, "rcg_on_key": "c"}) == "c"  # the record wins
    _, s = fs.parse_args(["--quick"])
    keys = [c.key() for c in s.grid()]
    scores = {k: 0.5 for k in keys} | {keys[0]: 0.9, keys[-1]: 0.6}
    assert fs.best_with_rcg({"rcg_val_accuracy": scores}, s) == s.grid()[-1]  # p = 0 scored higher: skipped


def test_fewshot_quick(tmp_path):
    split = tmp_path / "split.json"
    arms = ["none", "classical", "classical+rcg", "classical+rcg-default", "probe", "probe+rep-aug",
            "classical+rcg-online", "classical+rcg-on"]
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--out-dir", str(tmp_path), "--train-split-file", str(split),
         "--arms", ",".join(arms)],
        capture_output=True, text=True, timeout=600, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "saw no data" in proc.stdout  # the provenance statement is printed

    data = json.loads((tmp_path / "fewshot_quick.json").read_text())
    settings = data["settings"]
    assert settings["arms"] == arms
    assert set(data["datasets"]) == {"digits", "lfw-faces"}
    for key in ("date", "machine", "versions", "wall_seconds"):
        assert data[key]
    fs = load_script()
    for name, result in data["datasets"].items():
        assert result["provenance"]["statement"]
        assert result["grid_points"] == 1 + 2 * 2  # p=0, then 1 p x 1 noise x 2 repaints x 2 filters x 1 count
        for t in result["tuning"].values():
            assert t["classical"] in settings["classical_candidates"]
            assert set(t["rcg_val_accuracy"]) == {c.key() for c in fs.Settings(**settings).grid()}
            assert t["rcg_key"] == fs.RCGConfig(**t["rcg"]).key()
            assert t["rcg_val_accuracy"][t["rcg_key"]] == max(t["rcg_val_accuracy"].values())
            assert t["rcg_val_accuracy"]["p=0 (classical alone)"] == t["classical_val_accuracy"][t["classical"]]
            assert all(0.0 <= v <= 1.0 for v in t["rcg_filter_acceptance"].values())
            on = t["rcg_on_key"]  # arm (h): the best point with p > 0, also readable from older records
            assert on != "p=0 (classical alone)" and on in t["rcg_val_accuracy"]
            assert on == fs.best_on_key({k: v for k, v in t.items() if k != "rcg_on_key"})
        assert result["default_rcg"]["noise_level"] == 0.3 and not result["default_rcg"]["label_filter"]
        for cell in result["shots"].values():
            for arm in arms:
                accs = cell["per_seed"][arm]
                assert len(accs) == settings["seeds"] and all(0.0 <= a <= 1.0 for a in accs), (name, arm)
                summary = cell["summary"][arm]
                assert math.isfinite(summary["mean"]) and math.isfinite(summary["half_width"]), (name, arm)
                assert cell["seconds_per_run"][arm] >= cell["generation_seconds_per_run"][arm] >= 0.0
            assert cell["generation_seconds_per_run"]["classical+rcg-default"] > 0  # its variants cost something
            paired = cell["paired"]
            for arm in arms:
                if arm.startswith("classical+rcg"):
                    assert paired[arm]["reference"] == "classical"
                    assert math.isfinite(paired[arm]["low"]) and math.isfinite(paired[arm]["high"])
            assert paired["probe+rep-aug"]["reference"] == "probe"

    md = (tmp_path / "fewshot_quick.md").read_text()
    for label in ("(a) none", "(b) classical", "(c)", "(d)", "(e) linear probe", "(f)", "(g)", "(h)",
                  "Paired differences",
                  "RCG settings chosen", "best with p > 0, for (h)", "Cost: seconds per classifier"):
        assert label in md
    assert md.count("| (c) ") == 2 * 3  # results, paired differences, cost; per dataset

    from PIL import Image

    with Image.open(tmp_path / "fewshot_quick.png") as img:
        assert img.format == "PNG" and img.width > 400 and img.height > 200

    record = json.loads(split.read_text())
    for name, entry in record["datasets"].items():
        assert len(entry["test_indices"]) == len(set(entry["test_indices"])) > 0
        assert entry["pool_size"] + len(entry["test_indices"]) == entry["num_images"], name

    # merge: one report from per-dataset result files (a later file wins for a dataset in both)
    report = json.loads((tmp_path / "fewshot_quick.json").read_text())
    parts = []
    for name in report["datasets"]:
        part = dict(report, datasets={name: report["datasets"][name]}, command=f"run {name}", wall_seconds=2.0)
        parts.append(tmp_path / f"{name}.json")
        parts[-1].write_text(json.dumps(part))
    merged_dir = tmp_path / "merged"
    proc = subprocess.run([sys.executable, str(SCRIPT), "merge", *map(str, parts), "--out-dir", str(merged_dir)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    merged = json.loads((merged_dir / "fewshot_quick.json").read_text())
    assert merged["datasets"] == report["datasets"]
    assert merged["wall_seconds"] == 4.0 and [r["command"] for r in merged["runs"]] == ["run digits", "run lfw-faces"]
    assert (merged_dir / "fewshot_quick.md").read_text() == (tmp_path / "fewshot_quick.md").read_text().replace(
        f"wall time {report['wall_seconds']:.0f} s", "wall time 4 s")


def test_tuning_from_reuses_choices_and_reproduces_the_arms(tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    base = [sys.executable, str(SCRIPT), "--quick", "--datasets", "lfw-faces"]
    # arm (h) alone (without (c)) still gets the RCG tuning it needs
    proc = subprocess.run([*base, "--arms", "classical,classical+rcg-on", "--shots", "1,2", "--out-dir", str(first)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    tuned = first / "fewshot_quick.json"
    proc = subprocess.run([*base, "--arms", "classical,classical+rcg-on,classical+rcg-default", "--out-dir", str(second),
                           "--tuning-from", str(tuned)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a = json.loads(tuned.read_text())["datasets"]["lfw-faces"]
    b = json.loads((second / "fewshot_quick.json").read_text())["datasets"]["lfw-faces"]
    assert b["tuning"] == {"1": a["tuning"]["1"]} and b["tuning_from"] == str(tuned)
    for arm in ("classical", "classical+rcg-on"):  # same seeds, same choices: the same accuracies
        assert b["shots"]["1"]["per_seed"][arm] == a["shots"]["1"]["per_seed"][arm]
    proc = subprocess.run([*base, "--steps", "9", "--out-dir", str(tmp_path / "bad"), "--tuning-from", str(tuned)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0 and "tuned with steps=8" in proc.stderr
    proc = subprocess.run([*base, "--num-iter", "3", "--out-dir", str(tmp_path / "bad"), "--tuning-from", str(tuned)],
                          capture_output=True, text=True, timeout=600)  # another generator: not the same choices
    assert proc.returncode != 0 and "tuned with num_iter=" in proc.stderr
    proc = subprocess.run([*base, "--token-temperature", "0.5", "--out-dir", str(tmp_path / "bad"), "--tuning-from",
                           str(tuned)], capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0 and "tuned with token_temperature=None" in proc.stderr

    # merge: a later run under the same tuning adds its arms to the dataset (paired differences recomputed)
    proc = subprocess.run([sys.executable, str(SCRIPT), "merge", str(tuned), str(second / "fewshot_quick.json"),
                           "--out-dir", str(tmp_path / "merged")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    merged = json.loads((tmp_path / "merged" / "fewshot_quick.json").read_text())
    assert merged["settings"]["arms"] == ["classical", "classical+rcg-default", "classical+rcg-on"]
    cell = merged["datasets"]["lfw-faces"]["shots"]["1"]
    assert cell["per_seed"]["classical+rcg-default"] == b["shots"]["1"]["per_seed"]["classical+rcg-default"]
    assert cell["paired"]["classical+rcg-default"] == b["shots"]["1"]["paired"]["classical+rcg-default"]
    assert merged["datasets"]["lfw-faces"]["shots"]["2"] == a["shots"]["2"]  # the later run had 1 shot only
    md = (tmp_path / "merged" / "fewshot_quick.md").read_text()
    row = next(line for line in md.splitlines() if line.startswith("| (d) (b) + RCG cache, library defaults |"))
    assert row.endswith("| - |")  # no 2-shot result for the added arm

    # --first-seed: fresh draws under the same tuning; seed 1 here is seed 1 there
    proc = subprocess.run([*base, "--arms", "classical", "--first-seed", "1", "--out-dir", str(tmp_path / "later"),
                           "--tuning-from", str(tuned)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    c = json.loads((tmp_path / "later" / "fewshot_quick.json").read_text())["datasets"]["lfw-faces"]
    assert c["eval_seeds"] == [1, 2] and a["eval_seeds"] == [0, 1]
    assert c["shots"]["1"]["per_seed"]["classical"][0] == a["shots"]["1"]["per_seed"]["classical"][1]
    proc = subprocess.run([sys.executable, str(SCRIPT), "merge", str(tuned), str(tmp_path / "later" / "fewshot_quick.json"),
                           "--out-dir", str(tmp_path / "merged2")], capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "other shot draws" in proc.stderr
    proc = subprocess.run([*base, "--first-seed", "9999", "--out-dir", str(tmp_path / "bad")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "--first-seed must be in [0, 9998]" in proc.stderr


def test_merge_refuses_runs_with_different_seed_counts():
    fs = load_script()

    def result(per_seed):
        return {"shots": {"1": {"per_seed": per_seed}}}

    a = result({"classical": [0.5, 0.6, 0.7]})
    combined = fs.combine_arms(a, result({"classical": [0.5, 0.6, 0.7], "classical+rcg-default": [0.6, 0.6, 0.8]}))
    assert combined["shots"]["1"]["paired"]["classical+rcg-default"]["mean"] == pytest.approx(0.2 / 3)
    with pytest.raises(SystemExit, match="different seed counts"):
        fs.combine_arms(a, result({"classical+rcg-default": [0.6, 0.6]}))  # no shared arm, still refused


def test_merge_adds_another_runs_shot_counts_and_refuses_another_model(tmp_path, monkeypatch):
    fs = load_script()
    monkeypatch.setattr(fs, "markdown", lambda report: "")  # the tables need a full report; the data is tested
    monkeypatch.setattr(fs, "plot", lambda report, path: None)

    def run(shots, fingerprint="abc", test_size=100):
        d = {"test_size": test_size, "provenance": {"fingerprint": fingerprint}, "seconds": 10.0,
             "shots": {str(k): {"per_seed": {"classical": [0.1 * k, 0.2 * k]}} for k in shots},
             "tuning": {str(k): {"classical": "randaugment"} for k in shots}}
        return {"settings": {"quick": True, "arms": ["classical"]}, "date": "d", "command": f"run {shots}",
                "wall_seconds": 1.0, "datasets": {"x": d}}

    paths = []
    for i, r in enumerate([run([5]), run([1, 2])]):
        paths.append(tmp_path / f"r{i}.json")
        paths[-1].write_text(json.dumps(r))
    assert fs.merge_reports(paths, tmp_path / "out") == 0
    merged = json.loads((tmp_path / "out" / "fewshot_quick.json").read_text())["datasets"]["x"]
    assert list(merged["shots"]) == ["1", "2", "5"] and list(merged["tuning"]) == ["1", "2", "5"]
    assert merged["shots"]["5"]["per_seed"]["classical"] == [0.5, 1.0] and merged["seconds"] == 20.0
    with pytest.raises(SystemExit, match="different generative models"):
        fs.add_shot_counts(run([1])["datasets"]["x"], run([2], fingerprint="other")["datasets"]["x"])
    paths[1].write_text(json.dumps(run([1, 2], test_size=50)))  # other test images: not one table, later file wins
    fs.merge_reports(paths, tmp_path / "out2")
    assert list(json.loads((tmp_path / "out2" / "fewshot_quick.json").read_text())["datasets"]["x"]["shots"]) == ["1", "2"]


# ============================================================================== the real-data arms (issue 31)
def synthetic_task(fs, duplicate_test: bool = True):
    """4 classes x 12 images of noise; the last 2 of each class are the test split. With
    ``duplicate_test`` every test image is an exact copy of a pool image (the first of its
    class), so a search that could reach the test split would return it first."""
    from rcg_augment.data import ImageSource

    rng = np.random.default_rng(0)
    arrays, labels = [], []
    for c in range(4):
        for _ in range(12):
            arrays.append(rng.integers(0, 256, (8, 8), dtype=np.uint8))
            labels.append(c)
    labels = np.asarray(labels)
    test = np.asarray([12 * c + j for c in range(4) for j in (10, 11)])
    if duplicate_test:
        for t in test:
            arrays[t] = arrays[12 * (t // 12)].copy()
    pool = np.setdiff1d(np.arange(len(labels)), test)
    src = ImageSource("synthetic", ["a", "b", "c", "d"], labels.tolist(), arrays)
    images = torch.stack([fs.pil_to_tensor(src.load(i), fs.IMAGE_SIZE, 1) for i in range(len(src))])
    return fs.DatasetData("synthetic", list(src.classes), labels, images, pool, test, test, src)


def tiny_real(fs, d, tmp_path):
    from rcg_augment import RCGPipeline

    torch.manual_seed(0)
    pipe = RCGPipeline.from_preset("tiny", in_channels=1)
    _, s = fs.parse_args(["--quick", "--pool-cache", str(tmp_path / "pools")])
    return fs.RealData(d, pipe, s, log=lambda msg: None), s


def test_retrieval_pool_excludes_shots_validation_and_test_images_and_labels_by_the_shot(tmp_path):
    fs = load_script()
    d = synthetic_task(fs)
    real, s = tiny_real(fs, d, tmp_path)
    assert len(real.index) == len(d.pool) and not set(d.retrieval_pool.tolist()) & set(d.test.tolist())
    shots = fs.draw_shots(d.labels, d.pool, 2, seed=0)
    val = np.setdiff1d(d.pool, shots)[:6]
    k = len(d.pool) - len(shots) - len(val)  # every searchable image: the search must still avoid the rest
    found, sims, shot_labels = real.retrieve(shots, k, val)
    assert found.shape == (len(shots), k)
    assert not set(found.ravel().tolist()) & (set(shots.tolist()) | set(val.tolist()) | set(d.test.tolist()))
    assert set(found.ravel().tolist()) == set(np.setdiff1d(d.pool, np.concatenate([shots, val])).tolist())
    assert (np.diff(sims, axis=1) <= 1e-6).all()  # most similar first
    with pytest.raises(ValueError):
        real.retrieve(shots, k + 1, val)  # no more images left than that
    # the arm's extra images: each shot's neighbours, labelled by that shot
    config = fs.RealConfig("retrieval", k=3, weight=0.5)
    arm, stats = fs.real_arm(real, shots, val, config, "none")
    found, _, _ = real.retrieve(shots, 3, val)
    assert torch.equal(arm.extra_y, torch.as_tensor(np.repeat(d.labels[shots], 3)))
    assert torch.equal(arm.extra_x, d.images[found.ravel()])
    assert torch.all(arm.extra_w == 0.5) and stats["extra"] == 3 * len(shots)
    # a pool that holds a test image is refused
    with pytest.raises(ValueError, match="test images"):
        fs.DatasetData("bad", d.classes, d.labels, d.images, d.pool, d.test, d.test, d.source,
                       retrieval_pool=np.arange(len(d.labels)))


def test_pseudo_label_keeps_the_most_confident_share_of_each_class():
    fs = load_script()
    from rcg_augment.label_filter import PrototypeFilter

    protos = PrototypeFilter(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    angles = torch.tensor([0.05, 0.6, 0.3, 0.7, 1.5, 1.0, 0.9, 1.2])  # class 0 below pi/4, class 1 above
    reps = torch.stack([torch.cos(angles), torch.sin(angles)], dim=1)
    allowed = torch.ones(8, dtype=torch.bool)
    rows, labels, margin = fs.pseudo_label(reps, protos, 0.5, allowed)
    assert rows.tolist() == [0, 2, 4, 7] and labels.tolist() == [0, 0, 1, 1]  # nearest prototype, largest margins
    assert (margin[:2] >= margin[:2].min()).all() and margin[0] > margin[1]
    allowed[0] = False  # an excluded row (a shot, a validation image) is never kept
    rows, labels, _ = fs.pseudo_label(reps, protos, 0.5, allowed)
    assert rows.tolist() == [2, 1, 4, 7]
    rows, _, _ = fs.pseudo_label(reps, protos, 1.0, torch.ones(8, dtype=torch.bool))
    assert sorted(rows.tolist()) == list(range(8))


def test_default_output_folder_is_outside_the_committed_results():
    fs = load_script()
    args, _ = fs.parse_args([])
    out = (ROOT / args.out_dir).resolve()
    assert fs.RESULTS.resolve() not in [out, *out.parents]
    assert args.out_dir == fs.DEFAULT_OUT and args.out_dir.parts[0] == "runs"  # gitignored
    assert "runs/" in (ROOT / ".gitignore").read_text().split()


def test_novel_regime_refuses_a_model_not_trained_on_the_base_classes_only():
    fs = load_script()
    base = "fashion-mnist, classes ['T-shirt/top', 'Trouser', 'Coat', 'Sandal', 'Bag'] (its train split)"

    def meta(*trained_on, top=None):
        records = [{"stage": "encoder", "data": "fashion-mnist (split train)", "trained_on": t} for t in trained_on]
        return {"training": [{"stage": "mage", "data": "digits"}, *records], **({"trained_on": top} if top else {})}

    assert "base classes" in fs.check_base_only(meta(base, base), "m")
    for bad in (meta(base, "fashion-mnist (its train split; the test split is not read)"),  # a stage saw all
                meta(base.replace("'Bag'", "'Bag', 'Sneaker'")),  # a novel class
                meta(base, top="fashion-mnist (all ten classes)"),
                {"training": [{"stage": "mage", "data": "digits"}]}):  # never saw Fashion at all
        with pytest.raises(SystemExit, match="base classes only"):
            fs.check_base_only(bad, "m")
    # the command line refuses before reading any data
    proc = subprocess.run([sys.executable, str(SCRIPT), "--regime", "novel", "--model", "digits-tiny", "--quick"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "base classes only" in proc.stderr
    _, s = fs.parse_args(["--regime", "novel"])
    assert s.datasets == ["fashion-novel"] and s.regime == "novel" and not any(a.startswith("pseudo") for a in s.arms)
    with pytest.raises(SystemExit):
        fs.parse_args(["--regime", "novel", "--datasets", "digits"])


def test_real_data_arms_run_in_quick_mode(tmp_path):
    arms = ["none", "classical", "retrieval", "retrieval+classical", "pseudo-label", "pseudo-label+classical",
            "classical+rcg", "retrieval+rcg", "retrieval+rcg+classical", "retrieval+classical+rcg-mix"]
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--datasets", "digits", "--arms", ",".join(arms),
         "--out-dir", str(tmp_path), "--pool-cache", str(tmp_path / "pools")],
        capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    fs = load_script()
    data = json.loads((tmp_path / "fewshot_quick.json").read_text())
    r = data["datasets"]["digits"]
    settings = fs.Settings(**data["settings"])
    tuned = r["tuning"]["1"]
    for arm in arms[2:6]:
        family = fs.real_base(arm)
        assert set(tuned["real"][arm]["val_accuracy"]) == {c.key() for c in settings.real_grid(family)}
    for arm in ("retrieval+rcg", "retrieval+rcg+classical"):
        rr = tuned["real"][arm]
        assert set(rr["val_accuracy"]) == {c.key() for c in settings.gen_grid()} and len(rr["val_accuracy"]) == 8
        assert rr["retrieval"] == tuned["real"][arm.replace("retrieval+rcg", "retrieval")]["config"]
        assert {"source=interp", "novelty=True", "weight=1.0"} <= set(rr["options"])
    assert tuned["best_non_generative"] in fs.NON_GENERATIVE
    cell = r["shots"]["1"]
    assert cell["paired"]["retrieval+rcg"]["reference"] == "retrieval"
    assert cell["paired"]["retrieval+rcg+classical"]["reference"] == "retrieval+classical"
    best = cell["vs_best_non_generative"]
    assert best["reference"] == tuned["best_non_generative"] and set(best["arms"]) == set(arms) - {best["reference"]}
    for arm, v in best["arms"].items():
        diff = np.asarray(cell["per_seed"][arm]) - np.asarray(cell["per_seed"][best["reference"]])
        assert v["mean"] == pytest.approx(diff.mean())
    assert cell["real_stats"]["retrieval"]["extra"] == 10 * 2  # 10 shots x K=2
    # (o) = (j)'s retrieval with (c)'s variants: with (c) at p = 0 it trains exactly as (j)
    assert cell["paired"]["retrieval+classical+rcg-mix"]["reference"] == "retrieval+classical"
    if tuned["rcg"]["p"] == 0:
        assert cell["per_seed"]["retrieval+classical+rcg-mix"] == cell["per_seed"]["retrieval+classical"]
    else:
        assert cell["generation_seconds_per_run"]["retrieval+classical+rcg-mix"] > 0
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--arms", "classical+rcg,retrieval+classical+rcg-mix",
                           "--out-dir", str(tmp_path / "bad")], capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "name both too" in proc.stderr
    assert cell["generation_seconds_per_run"]["retrieval+rcg"] > 0
    md = (tmp_path / "fewshot_quick.md").read_text()
    for label in ("(i) retrieval", "(k) pseudo-label", "(m) (i) + RCG images", "Gain over the best arm without "
                  "generation", "Complementarity options", "Real-data arms chosen"):
        assert label in md


def test_fashion_datasets_and_the_novel_regime_run_in_quick_mode(tmp_path):
    """Tiny IDX fixtures stand in for Fashion-MNIST (the suite needs neither apt nor the real files)."""
    import gzip
    import os
    import struct

    rng = np.random.default_rng(0)
    folder = tmp_path / "fm"
    folder.mkdir()
    for stem, n in (("train", 300), ("t10k", 100)):
        for kind, array in (("images-idx3", rng.integers(0, 256, (n, 28, 28))), ("labels-idx1", np.arange(n) % 10)):
            head = struct.pack(">BBBB", 0, 0, 8, array.ndim) + b"".join(struct.pack(">I", d) for d in array.shape)
            (folder / f"{stem}-{kind}-ubyte.gz").write_bytes(gzip.compress(head + array.astype(np.uint8).tobytes()))
    env = dict(os.environ, RCG_AUGMENT_FASHION_MNIST=str(folder))
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--datasets", "fashion-mnist,fashion-novel", "--arms",
         "none,classical,retrieval,pseudo-label,classical+rcg,retrieval+rcg", "--grid-gen-source", "retrieved",
         "--max-test", "40", "--out-dir", str(tmp_path), "--pool-cache", str(tmp_path / "pools")],
        capture_output=True, text=True, timeout=600, cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    data = json.loads((tmp_path / "fewshot_quick.json").read_text())
    fashion, novel = data["datasets"]["fashion-mnist"], data["datasets"]["fashion-novel"]
    assert fashion["pool_size"] == fashion["retrieval_pool_size"] == 300 and fashion["test_size"] == 40
    assert set(fashion["shots"]["1"]["per_seed"]) == {"none", "classical", "retrieval", "pseudo-label",
                                                      "classical+rcg", "retrieval+rcg"}
    # novel: shots among the 150 train images of the five novel classes, retrieval from the 150 base ones
    assert novel["pool_size"] == 150 and novel["retrieval_pool_size"] == 150 and novel["test_size"] == 40
    assert set(novel["shots"]["1"]["per_seed"]) == {"none", "classical", "retrieval", "classical+rcg", "retrieval+rcg"}
    assert novel["shots"]["1"]["real_stats"]["retrieval"]["label_accuracy"] == 0.0  # none of the right class
