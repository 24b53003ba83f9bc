"""build_synthetic: round trip, determinism, resume after SIGKILL, stale-cache refusal, locking,
distributed split, corrupt inputs, quality filter."""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time

import datasets
import numpy as np
import pytest
from PIL import Image

from rcg_augment.cpu_matmul import onednn_linear_available
from rcg_augment.data import (
    BuildLockedError,
    SourceError,
    StaleCacheError,
    SyntheticDataset,
    build_synthetic,
    load_synthetic,
    open_source,
)
from rcg_augment.data.build import batch_seed
from tests.cache_records import record_hashes

from .conftest import FAST

KILLS = int(os.environ.get("RCG_BUILD_KILLS", "3"))  # raise for a long run, e.g. RCG_BUILD_KILLS=50


def build(source, out, pipeline, **kw):
    args = dict(variants_per_image=2, noise_level=0.4, batch_size=4, progress=False, **FAST)
    args.update(kw)
    return build_synthetic(source, out, pipeline=pipeline, **args)


# ------------------------------------------------------------------------------------ basics
def test_round_trip(image_folder, tmp_path, tiny_pipeline):
    out = tmp_path / "cache"
    summary = build(image_folder, out, tiny_pipeline, variants_per_image=3, noise_level=[0.2, 0.7],
                    records_per_shard=8)
    assert summary.complete and summary.records == 6 * 3 * 2 == summary.records_written
    assert len(summary.shards) == 5 and all(p.is_file() for p in summary.shards)
    assert summary.variants_per_second > 0 and summary.skipped == []

    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["model"]["fingerprint"] == tiny_pipeline.fingerprint()
    assert manifest["source"]["fingerprint"] == open_source(image_folder).fingerprint()
    assert manifest["generation"]["noise_levels"] == [0.2, 0.7]
    assert manifest["generation"]["num_iter"] == 2 and manifest["generation"]["rdm_steps"] == 2
    assert manifest["versions"]["torch"] and manifest["versions"]["rcg_augment"]
    assert sum(s["records"] for s in manifest["shards"]) == manifest["records"] == 36
    for s in manifest["shards"]:
        assert hashlib.sha256((out / s["file"]).read_bytes()).hexdigest() == s["sha256"]

    ds = load_synthetic(out, verify=True)
    assert ds.features["label"].names == ["cat", "dog"]
    assert isinstance(ds.features["image"], datasets.Image)
    # record order: source-major, then variant; levels by variant // K
    assert ds["source_index"] == [s for s in range(6) for _ in range(6)]
    assert ds["variant_index"] == list(range(6)) * 6
    assert ds["noise_level"] == [0.2, 0.2, 0.2, 0.7, 0.7, 0.7] * 6
    assert ds["label"] == [0] * 18 + [1] * 18
    assert set(ds["seed"]) == {0}

    synth = SyntheticDataset(out)
    image, label = synth[20]
    assert isinstance(image, Image.Image) and image.mode == "L" and image.size == (32, 32)
    assert label == 1 and synth.classes == ["cat", "dog"] and len(synth) == 36


@pytest.mark.parametrize("repaint", [1.0, 0.7])
def test_png_pixels_are_the_pipeline_output(image_folder, tmp_path, tiny_pipeline, repaint):
    """The stored image is reconstruct()'s output for that batch (each source repeated, encoded
    and tokenized with every copy), quantised to 8 bits."""
    import torch

    from rcg_augment.data import pil_to_tensor

    out = tmp_path / "cache"
    build(image_folder, out, tiny_pipeline, variants_per_image=2, batch_size=4, repaint_fraction=repaint)
    src = open_source(image_folder)
    x = torch.stack([pil_to_tensor(src[i][0], 32, 1) for i in (0, 0, 1, 1)])
    g = torch.Generator().manual_seed(batch_seed(0, np.array([[0, 0], [0, 1], [1, 0], [1, 1]])))
    expected = tiny_pipeline.reconstruct(x, torch.full((4,), 0.4), generator=g, repaint_fraction=repaint, **FAST)
    expected = (expected * 255).round().to(torch.uint8)[:, 0].numpy()
    ds = load_synthetic(out)
    got = np.stack([np.asarray(ds[i]["image"]) for i in range(4)])
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("filters", [{}, {"label_filter": True, "max_attempts": 2, "quality_threshold": -1.0}])
def test_each_source_encoded_once(make_folder, tmp_path, tiny_pipeline, monkeypatch, filters):
    """A source with K variants is encoded (and VQ-tokenized) once, not K times; the label and
    quality filters reuse its representation and the variants' own; the records are those of
    encoding every copy (test above: reconstruct() on repeated images)."""
    folder = make_folder(tmp_path / "imgs", per_class=3, classes=("a", "b"))
    rows = {"encoder": 0, "tokenizer": 0}

    def counting(module, name):
        forward = module.forward

        def wrapped(x, *a, **k):
            rows[name] += x.shape[0]
            return forward(x, *a, **k)
        monkeypatch.setattr(module, "forward", wrapped)

    counting(tiny_pipeline.encoder, "encoder")
    counting(tiny_pipeline.tokenizer.encoder, "tokenizer")
    s = build(folder, tmp_path / "cache", tiny_pipeline, variants_per_image=4, batch_size=8,
              repaint_fraction=0.7, **filters)
    monkeypatch.undo()
    assert rows["tokenizer"] == 6
    if not filters:
        assert rows["encoder"] == 6
    else:  # the 6 sources once, then each draw of a variant once (the label filter's redraws included)
        draws = sum(v["generated"] for v in s.label_filter.values())
        assert 24 <= draws <= 48 and rows["encoder"] == 6 + draws
    ref = build(folder, tmp_path / "ref", tiny_pipeline, variants_per_image=4, batch_size=8,
                repaint_fraction=0.7, **filters)
    assert record_hashes(tmp_path / "ref") == record_hashes(tmp_path / "cache") and ref.records == s.records


def test_same_seed_identical_records_other_seed_differs(image_folder, tmp_path, tiny_pipeline):
    build(image_folder, tmp_path / "a", tiny_pipeline)
    build(image_folder, tmp_path / "b", tiny_pipeline)
    build(image_folder, tmp_path / "c", tiny_pipeline, seed=1)
    a, b, c = (record_hashes(tmp_path / n) for n in "abc")
    assert a == b
    assert len(set(a) & set(c)) == 0


def test_named_model_and_directory(image_folder, tmp_path, tiny_pipeline_dir, tiny_pipeline):
    build(image_folder, tmp_path / "a", tiny_pipeline_dir)
    build(image_folder, tmp_path / "b", tiny_pipeline)
    assert record_hashes(tmp_path / "a") == record_hashes(tmp_path / "b")
    with pytest.raises(FileNotFoundError, match="not bundled|neither a directory"):
        build(image_folder, tmp_path / "c", "digits-tiny" if "digits-tiny" not in _bundled() else "nope")


def _bundled():
    from rcg_augment.zoo import available_models

    return available_models()


def test_shots_and_numpy_source(tmp_path, tiny_pipeline):
    images = np.random.default_rng(0).random((20, 8, 8))
    labels = [i % 4 for i in range(20)]
    src = open_source(images, labels=labels)
    s = build(src, tmp_path / "a", tiny_pipeline, shots=2, variants_per_image=1)
    assert s.sources_used == 8 and s.sources_total == 20
    ds = load_synthetic(tmp_path / "a")
    chosen = sorted(set(ds["source_index"]))
    assert len(chosen) == 8 and all(ds["label"][i] == labels[ds["source_index"][i]] for i in range(len(ds)))
    assert sorted(np.bincount([labels[i] for i in chosen]).tolist()) == [2, 2, 2, 2]


def test_hf_dataset_folder_source(tmp_path, tiny_pipeline):
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)) for _ in range(4)]
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["x", "y"])})
    datasets.Dataset.from_dict({"image": images, "label": [0, 1, 0, 1]}, features=features).save_to_disk(
        str(tmp_path / "hf"))
    s = build(str(tmp_path / "hf"), tmp_path / "cache", tiny_pipeline, variants_per_image=1)
    assert s.complete and s.records == 4 and s.classes == ["x", "y"]
    assert load_synthetic(tmp_path / "cache")["label"] == [0, 1, 0, 1]


def test_argument_errors(image_folder, tmp_path, tiny_pipeline):
    with pytest.raises(ValueError, match="noise_level"):
        build(image_folder, tmp_path / "x", tiny_pipeline, noise_level=1.5)
    with pytest.raises(ValueError, match="variants_per_image"):
        build(image_folder, tmp_path / "x", tiny_pipeline, variants_per_image=0)
    with pytest.raises(ValueError, match="records_per_shard"):
        build(image_folder, tmp_path / "x", tiny_pipeline, records_per_shard=6)
    with pytest.raises(ValueError, match="quality_threshold"):
        build(image_folder, tmp_path / "x", tiny_pipeline, quality_threshold=2)
    with pytest.raises(ValueError, match="num_iter"):
        build(image_folder, tmp_path / "x", tiny_pipeline, num_iter=0)
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="holds no rcg-augment cache"):
        build(image_folder, tmp_path / "foreign", tiny_pipeline)


# ------------------------------------------------------------------------------------ inputs
def test_corrupt_files_skipped_and_reported(make_folder, tmp_path, tiny_pipeline):
    root = make_folder(tmp_path / "imgs")
    good = (root / "cat" / "0.png").read_bytes()
    (root / "cat" / "truncated.png").write_bytes(good[: len(good) // 2])
    (root / "dog" / "text.jpg").write_text("not an image")
    s = build(root, tmp_path / "cache", tiny_pipeline, variants_per_image=1)
    assert s.complete and s.sources_used == 6 and s.records == 6
    reasons = dict(s.skipped)
    assert set(reasons) == {str(root / "cat" / "truncated.png"), str(root / "dog" / "text.jpg")}
    manifest = json.loads((tmp_path / "cache" / "manifest.json").read_text())
    assert len(manifest["skipped_sources"]) == 2


def test_image_that_fails_only_on_decode_is_skipped(tmp_path, tiny_pipeline, monkeypatch):
    """A file can pass open_source's quick verify() yet fail to decode; the build skips it too."""
    from rcg_augment.data import sources

    src = open_source(make_png_folder(tmp_path / "imgs"))
    bad = str(src._items[1])
    real_read = sources.read_image

    def flaky(path):
        if str(path) == bad:
            raise OSError("broken data stream")
        return real_read(path)

    monkeypatch.setattr(sources, "read_image", flaky)
    s = build(src, tmp_path / "cache", tiny_pipeline, variants_per_image=1)
    assert s.sources_used == 3 and [p for p, _ in s.skipped] == [bad]
    assert 1 not in load_synthetic(tmp_path / "cache")["source_index"]


def make_png_folder(root):
    root.mkdir(parents=True)
    for i in range(4):
        Image.fromarray(np.full((8, 8), i * 60, np.uint8)).save(root / f"{i}.png")
    return root


def test_empty_inputs_are_clear_errors(tmp_path, tiny_pipeline):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SourceError, match="empty"):
        build(tmp_path / "empty", tmp_path / "c1", tiny_pipeline)
    (tmp_path / "labels" / "cat").mkdir(parents=True)
    (tmp_path / "labels" / "dog").mkdir()
    Image.new("L", (8, 8)).save(tmp_path / "labels" / "cat" / "a.png")
    with pytest.raises(SourceError, match="'dog' holds no images"):
        build(tmp_path / "labels", tmp_path / "c2", tiny_pipeline)


# ------------------------------------------------------------------------------------ stale / overwrite
def test_stale_cache_refused_with_what_differs(image_folder, tmp_path, tiny_pipeline):
    import torch

    from rcg_augment import RCGPipeline

    out = tmp_path / "cache"
    build(image_folder, out, tiny_pipeline)
    before = record_hashes(out)
    s = build(image_folder, out, tiny_pipeline)  # same arguments: nothing to do
    assert s.complete and s.records_written == 0 and s.shards_resumed == len(s.shards)

    with pytest.raises(StaleCacheError, match=r"seed \(cache 0, now 1\)"):
        build(image_folder, out, tiny_pipeline, seed=1)
    with pytest.raises(StaleCacheError, match="generation.noise_levels"):
        build(image_folder, out, tiny_pipeline, noise_level=0.5)
    with pytest.raises(StaleCacheError, match="generation.num_iter"):
        build(image_folder, out, tiny_pipeline, num_iter=3)
    with pytest.raises(StaleCacheError, match="layout.batch_size"):
        build(image_folder, out, tiny_pipeline, batch_size=2)
    torch.manual_seed(1)
    other = RCGPipeline.from_preset("tiny", in_channels=1)
    with pytest.raises(StaleCacheError, match="model.fingerprint"):
        build(image_folder, out, other)
    (image_folder / "cat" / "0.png").unlink()
    Image.new("RGB", (12, 12), (9, 9, 9)).save(image_folder / "cat" / "0.png")
    with pytest.raises(StaleCacheError, match="source.fingerprint") as info:
        build(image_folder, out, tiny_pipeline)
    assert "--overwrite" in str(info.value)
    assert record_hashes(out) == before  # refusals touch nothing

    s = build(image_folder, out, tiny_pipeline, seed=1, overwrite=True)
    assert s.complete and s.records_written == s.records == 12
    assert json.loads((out / "manifest.json").read_text())["seed"] == 1
    assert len(set(record_hashes(out)) & set(before)) == 0


# ------------------------------------------------------------------------------------ resume
def test_resume_repairs_partial_and_corrupt_shards(image_folder, tmp_path, tiny_pipeline):
    ref, out = tmp_path / "ref", tmp_path / "cache"
    kw = dict(batch_size=2, records_per_shard=2)
    build(image_folder, ref, tiny_pipeline, **kw)
    build(image_folder, out, tiny_pipeline, **kw)
    shards = out / "shards"
    # the states a kill can leave: no manifest, a shard without its sidecar, temp files,
    # a torn shard, a sidecar of an older build
    (out / "manifest.json").unlink()
    (shards / "shard-00001.json").unlink()
    (shards / "shard-00002.arrow.tmp.99999").write_bytes(b"partial")
    data = (shards / "shard-00003.arrow").read_bytes()
    (shards / "shard-00003.arrow").write_bytes(data[:-10] + b"0123456789")
    meta = json.loads((shards / "shard-00004.json").read_text())
    meta["spec_sha256"] = "0" * 64
    (shards / "shard-00004.json").write_text(json.dumps(meta))
    (shards / "shard-00005.arrow").unlink()
    with pytest.raises(FileNotFoundError, match="manifest.json is missing"):
        SyntheticDataset(out)

    s = build(image_folder, out, tiny_pipeline, **kw)
    assert s.complete and s.shards_resumed == 2 and s.records_written == 8
    assert sorted(p.name for p in shards.iterdir()) == sorted(p.name for p in (ref / "shards").iterdir())
    assert record_hashes(out) == record_hashes(ref)


WORKER = textwrap.dedent("""
    import json, sys
    from rcg_augment.data import build_synthetic
    source, out, pipe, kwargs = json.loads(sys.argv[1])
    s = build_synthetic(source, out, pipeline=pipe, progress=False, **kwargs)
    print(json.dumps({"complete": s.complete, "records": s.records, "written": s.records_written}))
""")


def _spawn(args):
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-c", WORKER, json.dumps(args)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(proc, timeout=300):
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err[-3000:]
    return json.loads(out.strip().splitlines()[-1])


def test_resume_after_sigkill_matches_uninterrupted(make_folder, tmp_path, tiny_pipeline_dir):
    """SIGKILL the builder at random moments (RCG_BUILD_KILLS times), rerun, compare every record."""
    folder = make_folder(tmp_path / "imgs", per_class=4)
    kwargs = dict(variants_per_image=4, noise_level=[0.3, 0.8], batch_size=2, records_per_shard=4, **FAST)
    ref = tmp_path / "ref"
    t0 = time.monotonic()
    proc = _spawn([str(folder), str(ref), str(tiny_pipeline_dir), kwargs])
    while proc.poll() is None and not (ref / "plan.json").exists():
        time.sleep(0.02)
    startup = time.monotonic() - t0
    assert _finish(proc)["records"] == 64
    work = time.monotonic() - t0 - startup
    expected = record_hashes(ref)

    rng = random.Random(int(os.environ.get("RCG_BUILD_KILL_SEED", "0")))
    # The kill times come from the reference run's timing; on a machine whose load changes between
    # runs every builder may finish before its kill. Then start again on a fresh cache with shorter
    # delays, so the test always checks a resume after a real SIGKILL.
    for attempt in range(6):
        out = tmp_path / f"cache{attempt}"
        interrupted, scale = 0, 0.5 ** attempt
        for _ in range(KILLS):
            proc = _spawn([str(folder), str(out), str(tiny_pipeline_dir), kwargs])
            time.sleep(scale * rng.uniform(0.5 * startup, startup + work))
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                interrupted += 1
            proc.communicate()
        if interrupted:
            break
    result = _finish(_spawn([str(folder), str(out), str(tiny_pipeline_dir), kwargs]))
    assert result["complete"] and result["records"] == 64
    assert interrupted >= 1
    assert record_hashes(out) == expected
    assert not list((out / "shards").glob("*.tmp.*"))
    ref_files = {p.name: p.read_bytes() for p in (ref / "shards").iterdir()}
    assert {p.name: p.read_bytes() for p in (out / "shards").iterdir()} == ref_files


# ------------------------------------------------------------------------------------ distributed
def test_two_processes_equal_one(make_folder, tmp_path, tiny_pipeline_dir, tiny_pipeline):
    folder = make_folder(tmp_path / "imgs", per_class=3)
    kwargs = dict(variants_per_image=3, noise_level=0.5, batch_size=2, records_per_shard=4, **FAST)
    build_synthetic(folder, tmp_path / "one", pipeline=tiny_pipeline, progress=False, **kwargs)
    procs = [_spawn([str(folder), str(tmp_path / "two"), str(tiny_pipeline_dir),
                     dict(kwargs, process_index=i, num_processes=2)]) for i in range(2)]
    results = [_finish(p) for p in procs]
    assert any(r["complete"] for r in results)
    assert sum(r["written"] for r in results) == 18
    assert record_hashes(tmp_path / "two") == record_hashes(tmp_path / "one")
    m1 = json.loads((tmp_path / "one" / "manifest.json").read_text())
    m2 = json.loads((tmp_path / "two" / "manifest.json").read_text())
    assert m1["shards"] == m2["shards"]


def test_process_split_in_one_process(image_folder, tmp_path, tiny_pipeline):
    """Process 1 alone leaves the cache incomplete; process 0 then finishes it and writes the manifest."""
    kw = dict(batch_size=2, records_per_shard=2)  # 12 records, 6 shards, 3 per process
    build(image_folder, tmp_path / "one", tiny_pipeline, **kw)
    s1 = build(image_folder, tmp_path / "two", tiny_pipeline, process_index=1, num_processes=2, **kw)
    assert not s1.complete and s1.manifest_path is None and s1.records == 6
    assert [p.name for p in s1.shards] == ["shard-00001.arrow", "shard-00003.arrow", "shard-00005.arrow"]
    assert not (tmp_path / "two" / "manifest.json").exists()
    s0 = build(image_folder, tmp_path / "two", tiny_pipeline, process_index=0, num_processes=2, **kw)
    assert s0.complete and s0.records == 12 and s0.records_written == 6
    assert record_hashes(tmp_path / "two") == record_hashes(tmp_path / "one")
    with pytest.raises(ValueError, match="barrier"):
        build(image_folder, tmp_path / "two", tiny_pipeline, process_index=0, num_processes=2,
              overwrite=True, **kw)


# ------------------------------------------------------------------------------------ locking
HOLDER = textwrap.dedent("""
    import fcntl, os, sys, time
    fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    os.ftruncate(fd, 0); os.write(fd, str(os.getpid()).encode())
    print("locked", flush=True)
    time.sleep(60)
""")


def test_lock_refuses_second_builder(image_folder, tmp_path, tiny_pipeline):
    out = tmp_path / "cache"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(out / ".lock")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(BuildLockedError, match=rf"another build is running on .*cache \(pid {holder.pid}\)"):
            build(image_folder, out, tiny_pipeline)
        # a distributed process is refused too (shared lock vs the holder's exclusive one)
        with pytest.raises(BuildLockedError, match="another build is running"):
            build(image_folder, out, tiny_pipeline, process_index=1, num_processes=2)
    finally:
        holder.kill()
        holder.wait()
    assert build(image_folder, out, tiny_pipeline).complete  # the lock dies with its holder


# ------------------------------------------------------------------------------------ quality filter
def test_quality_filter_is_deterministic_and_reported(image_folder, tmp_path, tiny_pipeline):
    import torch

    from rcg_augment.data import pil_to_tensor

    a = build(image_folder, tmp_path / "none", tiny_pipeline, quality_threshold=-1.0, variants_per_image=4)
    assert a.dropped == 0 and a.records == 24
    # choose a threshold between the observed similarities so some are dropped, some kept
    ds = load_synthetic(tmp_path / "none")
    src = open_source(image_folder)
    x = torch.stack([pil_to_tensor(src[i][0], 32, 1) for i in ds["source_index"]])
    v = torch.stack([pil_to_tensor(im, 32, 1) for im in ds["image"]])
    cos = torch.nn.functional.cosine_similarity(tiny_pipeline.encode(x), tiny_pipeline.encode(v)).numpy()
    threshold = float(np.median(cos))
    b = build(image_folder, tmp_path / "b", tiny_pipeline, quality_threshold=threshold, variants_per_image=4)
    build(image_folder, tmp_path / "c", tiny_pipeline, quality_threshold=threshold, variants_per_image=4)
    assert 0 < b.dropped < 24 and b.records + b.dropped == 24
    assert b.dropped == int((cos < threshold).sum())
    assert record_hashes(tmp_path / "b") == record_hashes(tmp_path / "c")
    kept = load_synthetic(tmp_path / "b")
    assert list(zip(kept["source_index"], kept["variant_index"], strict=True)) == [
        (s, v) for s, v, c_ in zip(ds["source_index"], ds["variant_index"], cos, strict=True) if c_ >= threshold]
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert manifest["dropped"] == b.dropped and manifest["quality_threshold"] == threshold


def test_incomplete_dir_is_refused_by_dataset(tmp_path):
    (tmp_path / "x").mkdir()
    with pytest.raises(FileNotFoundError, match="not a complete synthetic cache"):
        SyntheticDataset(tmp_path / "x")
    (tmp_path / "x" / "manifest.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(ValueError, match="not a complete"):
        SyntheticDataset(tmp_path / "x")


# ------------------------------------------------------------------------------------ label filter, repaint
def test_label_filter_fills_each_source_and_reports_acceptance(make_folder, tmp_path, tiny_pipeline):
    folder = make_folder(tmp_path / "imgs", per_class=3, classes=("a", "b", "c"))
    out = tmp_path / "cache"
    s = build(folder, out, tiny_pipeline, label_filter=True, max_attempts=3, records_per_shard=4)
    assert s.complete and s.label_filter is not None
    draws = s.label_filter
    assert set(draws) == {"a", "b", "c"}
    assert sum(v["accepted"] for v in draws.values()) == s.records == 18 - s.dropped
    assert all(v["accepted"] <= v["generated"] <= 3 * 6 for v in draws.values())
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["generation"]["label_filter"]["max_attempts"] == 3
    assert manifest["label_filter_draws"] == draws
    rates = s.acceptance_by_class()
    assert all(0 <= r <= 1 for r in rates.values())
    # the same seed gives the same records; an interrupted build resumes to the same bytes
    ref = tmp_path / "ref"
    build(folder, ref, tiny_pipeline, label_filter=True, max_attempts=3, records_per_shard=4)
    assert record_hashes(ref) == record_hashes(out)
    (out / "manifest.json").unlink()
    for p in list((out / "shards").glob("shard-0000[13].*")):
        p.unlink()
    again = build(folder, out, tiny_pipeline, label_filter=True, max_attempts=3, records_per_shard=4)
    assert again.shards_resumed == len(again.shards) - 2
    assert record_hashes(out) == record_hashes(ref)
    assert json.loads((out / "manifest.json").read_text())["label_filter_draws"] == draws
    # filter settings are part of the cache identity
    with pytest.raises(StaleCacheError, match="generation"):
        build(folder, out, tiny_pipeline, label_filter=True, max_attempts=2, records_per_shard=4)
    with pytest.raises(StaleCacheError, match="generation"):
        build(folder, out, tiny_pipeline, records_per_shard=4)


def test_label_filter_needs_two_classes(make_folder, tmp_path, tiny_pipeline):
    folder = make_folder(tmp_path / "imgs", per_class=2, classes=("only",))
    with pytest.raises(ValueError, match="at least 2 classes"):
        build(folder, tmp_path / "cache", tiny_pipeline, label_filter=True)


@pytest.mark.parametrize("name, changed, other", [("repaint_fraction", 0.6, 0.7), ("token_temperature", 0.5, 0.7)])
def test_settings_added_later_are_part_of_the_identity(image_folder, tmp_path, tiny_pipeline, name, changed, other):
    """At 1.0 (what was done before the setting existed) a cache has the same identity, records
    and manifest (no key) as one built without it, so older caches stay valid; any other value
    is a different cache."""
    explicit, default = tmp_path / "explicit", tmp_path / "default"
    build(image_folder, default, tiny_pipeline)
    build(image_folder, explicit, tiny_pipeline, **{name: 1.0})
    assert record_hashes(explicit) == record_hashes(default)
    assert name not in json.loads((explicit / "manifest.json").read_text())["generation"]
    build(image_folder, explicit, tiny_pipeline)  # resumes: nothing differs
    moved = tmp_path / "moved"
    build(image_folder, moved, tiny_pipeline, **{name: changed})
    gen = json.loads((moved / "manifest.json").read_text())["generation"]
    assert gen[name] == changed and gen["requested"][name] == changed
    assert set(record_hashes(moved)).isdisjoint(record_hashes(default))
    with pytest.raises(StaleCacheError, match=name):
        build(image_folder, moved, tiny_pipeline, **{name: other})


# ------------------------------------------------------------------------------------ cpu_matmul
@pytest.mark.skipif(not onednn_linear_available(), reason="this torch build has no oneDNN")
def test_onednn_build_is_deterministic_and_part_of_the_identity(image_folder, tmp_path, tiny_pipeline):
    default = tmp_path / "default"
    build(image_folder, default, tiny_pipeline)
    assert "cpu_matmul" not in json.loads((default / "manifest.json").read_text())  # old caches keep their identity

    out = tmp_path / "onednn"
    s = build(image_folder, out, tiny_pipeline, cpu_matmul="onednn")
    assert s.complete and s.records == 12
    assert json.loads((out / "manifest.json").read_text())["cpu_matmul"] == "onednn"
    first = record_hashes(out)
    assert build(image_folder, out, tiny_pipeline, cpu_matmul="onednn").records_written == 0  # resumes
    with pytest.raises(StaleCacheError, match="cpu_matmul"):
        build(image_folder, out, tiny_pipeline)  # the default library would mix two kinds of records
    with pytest.raises(StaleCacheError, match="cpu_matmul"):
        build(image_folder, default, tiny_pipeline, cpu_matmul="onednn")
    assert build(image_folder, out, tiny_pipeline, cpu_matmul="onednn", overwrite=True).records_written == 12
    assert record_hashes(out) == first  # same seed, same library: the same records
    with pytest.raises(ValueError, match="`cpu_matmul` must be one of default, onednn"):
        build(image_folder, tmp_path / "bad", tiny_pipeline, cpu_matmul="mkl")
