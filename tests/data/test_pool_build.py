"""build_synthetic(pool=..., neighbours=...): retrieved records beside the variants, their
provenance columns, the pool-representation cache, identity and exact resume; PoolIndex search."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from rcg_augment.cli import main
from rcg_augment.data import (
    StaleCacheError,
    SyntheticDataset,
    build_synthetic,
    load_synthetic,
    open_source,
)
from rcg_augment.data.sources import pil_to_tensor
from rcg_augment.retrieval import PoolIndex, encode_source
from tests.cache_records import record_hashes

from .conftest import FAST


@pytest.fixture
def grey_folder(tmp_path, make_folder):
    """3 classes x 4 grey images: shots and pool at once."""
    root = make_folder(tmp_path / "grey", per_class=4, classes=("a", "b", "c"), size=12, seed=3)
    for p in root.rglob("*.png"):
        Image.open(p).convert("L").save(p)
    return root


@pytest.fixture
def pool_dir(tmp_path, make_folder):
    root = make_folder(tmp_path / "pool", per_class=5, classes=("x", "y"), size=12, seed=7)
    for p in root.rglob("*.png"):
        Image.open(p).convert("L").save(p)
    return root


def build(source, out, pipe, **kw):
    args = dict(variants_per_image=2, noise_level=0.4, batch_size=4, progress=False, shots=1, **FAST)
    args.update(kw)
    return build_synthetic(source, out, pipeline=pipe, **args)


def png_pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)))


def test_records_per_shot_are_variants_then_neighbours_with_provenance(grey_folder, pool_dir, tmp_path,
                                                                       tiny_pipeline):
    out = tmp_path / "cache"
    summary = build(grey_folder, out, tiny_pipeline, pool=pool_dir, neighbours=3, pool_cache_dir=tmp_path / "pc")
    assert summary.complete and summary.records == 3 * (2 + 3) and summary.retrieved == 9
    ds = load_synthetic(out).cast_column("image", __import__("datasets").Image(decode=False))
    assert ds["origin"] == (["variant"] * 2 + ["retrieved"] * 3) * 3
    pool = open_source(pool_dir)
    index = PoolIndex.from_source(tiny_pipeline, pool, use_cache=False)
    shots = open_source(grey_folder)
    for row in ds:
        if row["origin"] == "variant":
            assert row["pool_index"] is None and row["similarity"] is None and row["noise_level"] == 0.4
            continue
        # labelled by its shot; the image is the pool image at the model's size; the similarity is the cosine
        assert row["label"] == shots.labels[row["source_index"]] and row["noise_level"] is None
        expected = (pil_to_tensor(pool.load(row["pool_index"]), tiny_pipeline.image_size, 1)[0] * 255).round()
        assert np.array_equal(png_pixels(row["image"]["bytes"]), expected.to(torch.uint8).numpy())
        shot_rep = encode_source(tiny_pipeline, shots, indices=[row["source_index"]], progress=False)
        sim = float(shot_rep @ index.representations[row["pool_index"]])
        assert row["similarity"] == pytest.approx(sim, abs=1e-5)
    # nearest first, per shot
    sims = np.asarray([s for s in ds["similarity"] if s is not None]).reshape(3, 3)
    assert (np.diff(sims, axis=1) <= 1e-7).all()
    ds_torch = SyntheticDataset(out)
    assert ds_torch.origin == ds["origin"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["pool"]["neighbours"] == 3 and manifest["pool"]["num_images"] == 10
    assert manifest["pool"]["fingerprint"] == pool.fingerprint()


def test_same_source_never_retrieves_the_shots_and_variants_zero_is_retrieval_only(grey_folder, tmp_path,
                                                                                   tiny_pipeline):
    out = tmp_path / "cache"
    summary = build(grey_folder, out, tiny_pipeline, variants_per_image=0, pool=grey_folder, neighbours=9,
                    pool_cache_dir=tmp_path / "pc")
    ds = load_synthetic(out)
    shot_rows = set(ds["source_index"])
    assert summary.records == 3 * 9 and set(ds["origin"]) == {"retrieved"} and len(shot_rows) == 3
    for s in shot_rows:
        rows = [p for p, si in zip(ds["pool_index"], ds["source_index"], strict=True) if si == s]
        assert not set(rows) & shot_rows and len(set(rows)) == 9  # every image but the 3 shots
    with pytest.raises(ValueError, match="`k` must be in \\[1, 9\\]"):
        build(grey_folder, tmp_path / "c2", tiny_pipeline, variants_per_image=0, pool=grey_folder, neighbours=10,
              pool_cache_dir=tmp_path / "pc")


def test_pool_is_encoded_once_then_read_from_the_cache(grey_folder, pool_dir, tmp_path, tiny_pipeline, monkeypatch):
    build(grey_folder, tmp_path / "c1", tiny_pipeline, pool=pool_dir, neighbours=2, pool_cache_dir=tmp_path / "pc")
    assert len(list((tmp_path / "pc").glob("*.safetensors"))) == 1

    def no_encoding(*args, **kwargs):
        raise AssertionError("the pool was encoded again")

    monkeypatch.setattr("rcg_augment.retrieval.encode_source", no_encoding)
    build(grey_folder, tmp_path / "c2", tiny_pipeline, pool=pool_dir, neighbours=2, pool_cache_dir=tmp_path / "pc")
    assert record_hashes(tmp_path / "c1") == record_hashes(tmp_path / "c2")
    # a damaged cache file is not trusted: encoded again
    path = next((tmp_path / "pc").glob("*.safetensors"))
    path.write_bytes(b"garbage")
    with pytest.raises(AssertionError, match="encoded again"):
        build(grey_folder, tmp_path / "c3", tiny_pipeline, pool=pool_dir, neighbours=2, pool_cache_dir=tmp_path / "pc")


def test_pool_and_neighbours_are_part_of_the_identity_and_resume_is_exact(grey_folder, pool_dir, tmp_path,
                                                                          tiny_pipeline):
    kw = dict(pool=pool_dir, neighbours=3, pool_cache_dir=tmp_path / "pc", records_per_shard=4)
    whole = tmp_path / "whole"
    build(grey_folder, whole, tiny_pipeline, **kw)
    with pytest.raises(StaleCacheError, match="pool.neighbours"):
        build(grey_folder, whole, tiny_pipeline, **{**kw, "neighbours": 2})
    with pytest.raises(StaleCacheError, match="pool"):
        build(grey_folder, whole, tiny_pipeline, records_per_shard=4)  # the same build without a pool
    # kill-and-resume: shards removed (as a killed build leaves them) are written again, byte for byte
    resumed = tmp_path / "resumed"
    build(grey_folder, resumed, tiny_pipeline, **kw)
    (resumed / "manifest.json").unlink()
    for p in sorted((resumed / "shards").glob("shard-0000[13].*")):
        p.unlink()
    summary = build(grey_folder, resumed, tiny_pipeline, **kw)
    assert summary.shards_resumed == 2 and record_hashes(resumed) == record_hashes(whole)


def test_label_filter_drops_retrieved_images_nearer_another_class(grey_folder, tmp_path, tiny_pipeline):
    out = tmp_path / "cache"
    summary = build(grey_folder, out, tiny_pipeline, variants_per_image=0, pool=grey_folder, neighbours=9,
                    label_filter=True, pool_cache_dir=tmp_path / "pc")
    ds = load_synthetic(out)
    shots = open_source(grey_folder).few_shot(1, seed=0)
    index = PoolIndex.from_source(tiny_pipeline, open_source(grey_folder), use_cache=False)
    protos = torch.stack([index.representations[i] for i in _indices_of(shots, grey_folder)])
    nearest = (torch.nn.functional.normalize(index.representations[ds["pool_index"]], dim=-1)
               @ torch.nn.functional.normalize(protos, dim=-1).t()).argmax(1)
    assert nearest.tolist() == ds["label"]  # every kept one sits nearest its shot's prototype
    assert summary.dropped == 27 - len(ds) > 0  # random tiny model: some are dropped


def _indices_of(shots, folder):
    full = open_source(folder)
    paths = [str(p) for p in full._items]
    return [paths.index(str(p)) for p in shots._items]


def test_argument_errors(grey_folder, pool_dir, tmp_path, tiny_pipeline, capsys):
    with pytest.raises(ValueError, match="`neighbours` \\(2\\) needs a `pool`"):
        build(grey_folder, tmp_path / "c", tiny_pipeline, neighbours=2)
    with pytest.raises(ValueError, match="`pool` needs `neighbours` >= 1"):
        build(grey_folder, tmp_path / "c", tiny_pipeline, pool=pool_dir)
    with pytest.raises(ValueError, match="`variants_per_image` must be >= 1 without a `pool`"):
        build(grey_folder, tmp_path / "c", tiny_pipeline, variants_per_image=0)
    model = tmp_path / "model"
    tiny_pipeline.save_pretrained(model)
    code = main(["build", "--input", str(grey_folder), "--out", str(tmp_path / "c"), "--variants", "1",
                 "--neighbours", "2", "--model", str(model)])
    assert code == 1 and "--neighbours needs --pool" in capsys.readouterr().err


def test_cli_pool_build_and_contact_sheet(grey_folder, pool_dir, tmp_path, tiny_pipeline, capsys, monkeypatch):
    monkeypatch.setenv("RCG_AUGMENT_CACHE", str(tmp_path / "rc"))
    model = tmp_path / "model"
    tiny_pipeline.save_pretrained(model)
    code = main(["build", "--input", str(grey_folder), "--shots", "1", "--pool", str(pool_dir), "--neighbours", "2",
                 "--variants", "1", "--out", str(tmp_path / "c"), "--model", str(model), "--no-progress",
                 "--num-iter", "2", "--rdm-steps", "2", "--batch-size", "4", "--contact-sheet"])
    out = capsys.readouterr().out
    assert code == 0
    assert "9 = 3 sources x (1 variant x 1 noise level (0.3) + 2 neighbours from --pool); 6 retrieved" in out
    assert len(list((tmp_path / "rc" / "pools").glob("*.safetensors"))) == 1
    sheet = np.asarray(Image.open(tmp_path / "c" / "contact_sheet.png").convert("RGB"))
    blue = (sheet[..., 2] > 180) & (sheet[..., 0] < 80)
    assert blue.sum() > 0  # retrieved cells are framed blue


def test_pool_index_search_chunked_equals_whole_and_excludes():
    g = torch.Generator().manual_seed(0)
    reps = torch.nn.functional.normalize(torch.randn(50, 8, generator=g), dim=-1)
    index = PoolIndex(reps)
    queries = torch.randn(7, 8, generator=g)
    sim_all, idx_all = index.search(queries, 5, chunk=1000)
    sim_chunked, idx_chunked = index.search(queries, 5, chunk=3)
    assert torch.equal(idx_all, idx_chunked) and torch.allclose(sim_all, sim_chunked)
    brute = torch.nn.functional.normalize(queries, dim=-1) @ reps.t()
    assert torch.equal(idx_all, brute.topk(5, dim=1).indices)
    _, idx_ex = index.search(queries, 5, exclude=idx_all[:, 0].tolist())
    assert not set(idx_ex.flatten().tolist()) & set(idx_all[:, 0].tolist())
    with pytest.raises(ValueError, match="`k` must be in \\[1, 50\\]"):
        index.search(queries, 51)
    with pytest.raises(ValueError, match="`queries` must have shape"):
        index.search(queries[:, :4], 2)


def test_shot_variant_dataset_swaps_shots_for_their_own_variants_beside_retrieved(grey_folder, pool_dir, tmp_path,
                                                                                 tiny_pipeline):
    from rcg_augment.data import ShotVariantDataset

    out = tmp_path / "cache"
    build(grey_folder, out, tiny_pipeline, pool=pool_dir, neighbours=3, pool_cache_dir=tmp_path / "pc")
    cache, real = SyntheticDataset(out), open_source(grey_folder)
    src_col = np.asarray(cache.hf_dataset["source_index"])
    shots = sorted(set(src_col.tolist()))
    as_array = np.asarray

    never = ShotVariantDataset(real, cache, p=0.0)
    assert len(never) == len(shots) + 9  # 3 shots, then their 3 x 3 retrieved records
    for i, s in enumerate(shots):  # p = 0: the shots themselves
        assert never.variant_record(i) is None
        assert (as_array(never[i][0]) == as_array(real[s][0])).all() and never[i][1] == real[s][1]
    for i in range(len(shots), len(never)):  # then the retrieved records, labelled by their shot
        rec = never.variant_record(i)
        assert cache.origin[rec] == "retrieved" and never[i][1] == real[int(src_col[rec])][1]

    always = ShotVariantDataset(real, cache, p=1.0, include_retrieved=False)
    assert len(always) == len(shots)
    for i, s in enumerate(shots):  # p = 1: one of its own variants, never another shot's
        rec = always.variant_record(i)
        assert cache.origin[rec] == "variant" and src_col[rec] == s
        assert (as_array(always[i][0]) == as_array(cache[rec][0])).all() and always[i][1] == real[s][1]

    half = ShotVariantDataset(real, cache, p=0.5, seed=3)
    draws = {e: [half.variant_record(i) for i in range(len(shots))] for e in range(6) if not half.set_epoch(e)}
    assert draws[0] == [ShotVariantDataset(real, cache, p=0.5, seed=3).variant_record(i) for i in range(len(shots))]
    assert len({tuple(d) for d in draws.values()}) > 1  # epochs draw anew
    assert any(r is None for d in draws.values() for r in d) and any(r is not None for d in draws.values() for r in d)

    with pytest.raises(ValueError, match="`p` must be in"):
        ShotVariantDataset(real, cache, p=1.5)
    with pytest.raises(ValueError, match="pass the source the cache was built from"):
        ShotVariantDataset(torch.utils.data.Subset(real, [0]), cache)
    with pytest.raises(IndexError):
        never[len(never)]
