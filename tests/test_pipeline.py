"""RCGPipeline: end-to-end shapes, seeding, save/load, config and input errors (tiny preset)."""

from __future__ import annotations

import json
import os
import re

import pytest
import torch
from safetensors.torch import load_file, save_file

from rcg_augment import RCGPipeline
from rcg_augment.files import sha256_file
from rcg_augment.pipeline import ConfigError, PipelineConfig
from rcg_augment.zoo import available_models

FAST = {"num_iter": 2, "rdm_steps": 3}


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def pipe():
    torch.manual_seed(0)
    return RCGPipeline.from_preset("tiny")


def test_presets_and_attributes(pipe):
    assert pipe.image_size == 32 and pipe.in_channels == 3
    gray = RCGPipeline.from_preset("tiny", in_channels=1)
    assert gray.in_channels == 1 and gray.config.encoder.in_channels == 1
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        RCGPipeline.from_preset("huge")


@pytest.mark.parametrize("preset,size,params", [("rcg-b", 256, 0.6e9), ("rcg-l", 256, 1.3e9)])
def test_official_presets_build(preset, size, params):
    p = RCGPipeline.from_preset(preset)
    n = sum(x.numel() for x in p.parameters())
    assert p.image_size == size and 0.5 * params < n < 1.5 * params


def test_reconstruct_shape_range_and_seed(pipe):
    x = torch.rand(4, 3, 32, 32, generator=gen(1))
    a = pipe.reconstruct(x, 0.3, generator=gen(0), **FAST)
    b = pipe.reconstruct(x, 0.3, generator=gen(0), **FAST)
    c = pipe.reconstruct(x, 0.3, generator=gen(1), **FAST)
    assert a.shape == x.shape and a.dtype == torch.float32
    assert a.min() >= 0 and a.max() <= 1
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_reconstruct_any_size_and_per_image_levels(pipe):
    x = torch.rand(3, 3, 17, 45)
    out = pipe.reconstruct(x, torch.tensor([0.0, 0.5, 1.0]), generator=gen(0), **FAST)
    assert out.shape == x.shape
    assert pipe.reconstruct(torch.rand(0, 3, 32, 32), 0.3).shape == (0, 3, 32, 32)


def test_noise_level_zero_keeps_representation(pipe):
    rep = pipe.encode(torch.rand(2, 3, 32, 32))
    torch.testing.assert_close(pipe.denoise_representations(rep, 0.0, generator=gen(0)), rep)
    moved = pipe.denoise_representations(rep, 1.0, generator=gen(0), rdm_steps=3)
    assert not torch.allclose(moved, rep)


def test_generate_and_interpolate(pipe):
    g = pipe.generate(3, generator=gen(0), cfg=1.0, **FAST)
    assert g.shape == (3, 3, 32, 32) and torch.equal(g, pipe.generate(3, generator=gen(0), cfg=1.0, **FAST))
    a, b = torch.rand(2, 3, 32, 32), torch.rand(2, 3, 32, 32)
    frames = pipe.interpolate(a, b, [0.0, 0.5, 1.0], generator=gen(0), num_iter=2)
    assert frames.shape == (3, 2, 3, 32, 32)
    # alpha = 0 renders a's own representation with the shared seed: the same as rendering it directly.
    seed = int(torch.randint(0, 2**62, (1,), generator=gen(0)).item())
    direct = pipe.render(pipe.encode(a), generator=torch.Generator().manual_seed(seed), num_iter=2)
    torch.testing.assert_close(frames[0], direct, atol=1e-5, rtol=0)


def test_encode_is_normalised(pipe):
    rep = pipe.encode(torch.rand(5, 3, 32, 32))
    assert rep.shape == (5, 256)
    torch.testing.assert_close(rep.std(1), torch.ones(5), atol=1e-4, rtol=0)


@pytest.mark.parametrize("train", [False, True])
def test_encode_rows_do_not_depend_on_the_batch(train):
    """A source's representation is the same whether it is encoded alone or among 19 others (in
    eval mode), so a build may encode each source once and share it among its variants."""
    torch.manual_seed(0)
    gray = RCGPipeline.from_preset("tiny", in_channels=1)
    x = torch.rand(20, 1, 32, 32, generator=gen(3))
    full = gray.encode(x)
    for b in range(1, 21):
        assert torch.equal(gray.encode(x[:b]), full[:b]), b
        assert torch.equal(gray.tokenize(x[:b]), gray.tokenize(x)[:b]), b
    assert gray.tokenize(x).shape == (20, 64) and gray.tokenize(x).dtype == torch.long
    if train:  # training mode: BatchNorm uses the batch's statistics; no padding rows may enter them
        gray.encoder.train()
        enc = gray.encoder
        with torch.no_grad():
            feats = enc.features(x[:3])
            plain = enc.head(enc.vit(enc.preprocess(x[:3])))
        assert torch.equal(feats, plain)
        gray.encoder.eval()


def test_reconstruct_reuses_given_representations_and_tokens(pipe):
    """``representations`` / ``source_tokens`` as ``encode`` / ``tokenize`` return them give the very
    output of encoding inside the call; other representations give another output."""
    x = torch.rand(4, 3, 32, 32, generator=gen(2))
    kw = {**FAST, "repaint_fraction": 0.7}
    ref = pipe.reconstruct(x, 0.3, generator=gen(0), **kw)
    rep, tok = pipe.encode(x), pipe.tokenize(x)
    assert torch.equal(pipe.reconstruct(x, 0.3, generator=gen(0), representations=rep, source_tokens=tok, **kw), ref)
    assert torch.equal(pipe.reconstruct(x, 0.3, generator=gen(0), representations=rep, **kw), ref)
    other = pipe.reconstruct(x, 0.3, generator=gen(0), representations=rep.flip(0), **kw)
    assert not torch.equal(other, ref)
    assert not torch.equal(pipe.reconstruct(x, 0.3, generator=gen(0), source_tokens=tok.flip(0), **kw), ref)
    # at full repaint the source's tokens are not used
    full = pipe.reconstruct(x, 0.3, generator=gen(0), **FAST, repaint_fraction=1.0)
    assert torch.equal(pipe.reconstruct(x, 0.3, generator=gen(0), **FAST, repaint_fraction=1.0,
                                        source_tokens=tok.flip(0)), full)


def test_save_load_round_trip(pipe, tmp_path):
    pipe.save_pretrained(tmp_path / "m")
    loaded = RCGPipeline.from_pretrained(tmp_path / "m")
    x = torch.rand(2, 3, 32, 32)
    torch.testing.assert_close(loaded.reconstruct(x, 0.4, generator=gen(3), **FAST),
                               pipe.reconstruct(x, 0.4, generator=gen(3), **FAST), rtol=0, atol=0)
    assert loaded.fingerprint() == pipe.fingerprint()
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert len(config["metadata"]["weights_sha256"]) == 64
    assert not list((tmp_path / "m").glob("*.pt*"))  # nothing pickled


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_saved_files_get_the_usual_permissions(pipe, tmp_path, umask):
    old = os.umask(umask)
    try:
        directory = pipe.save_pretrained(tmp_path / "m")
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in directory.iterdir()}
    assert modes == dict.fromkeys(["config.json", "model.safetensors", "README.md"], 0o666 & ~umask)


def test_config_json_errors(pipe, tmp_path):
    pipe.save_pretrained(tmp_path / "m")
    path = tmp_path / "m" / "config.json"
    good = json.loads(path.read_text())
    bad = dict(good, mage=dict(good["mage"], bogus=1))
    path.write_text(json.dumps(bad))
    with pytest.raises(ConfigError, match=r"section 'mage': unknown fields \['bogus'\]"):
        RCGPipeline.from_pretrained(tmp_path / "m")
    bad = {k: v for k, v in good.items() if k != "rdm"}
    path.write_text(json.dumps(bad))
    with pytest.raises(ConfigError, match="missing section 'rdm'"):
        RCGPipeline.from_pretrained(tmp_path / "m")
    path.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        RCGPipeline.from_pretrained(tmp_path / "m")


def test_weights_shape_mismatch_is_clear(pipe, tmp_path):
    pipe.save_pretrained(tmp_path / "m")
    path = tmp_path / "m" / "config.json"
    cfg = json.loads(path.read_text())
    cfg["rdm"]["hidden_dim"] = 256
    path.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="model.safetensors does not match.*wrong shapes: rdm"):
        RCGPipeline.from_pretrained(tmp_path / "m")


def test_inconsistent_config():
    p = RCGPipeline.from_preset("tiny")
    d = p.config.to_dict()
    d["mage"]["codebook_size"] = 128
    d["mage"]["fake_class_id"] = 128
    with pytest.raises(ConfigError, match="codebook_size differs"):
        PipelineConfig.from_dict(d)


def test_unknown_named_model():
    with pytest.raises(FileNotFoundError, match="neither a directory nor a named model"):
        RCGPipeline.from_pretrained("no-such-model")


@pytest.mark.parametrize(
    "images,kwargs,error,match",
    [
        (torch.rand(2, 1, 32, 32), {}, ValueError, "1 channels but this model expects 3"),
        (torch.rand(3, 32, 32), {}, ValueError, r"shape \(B, C, H, W\)"),
        ((torch.rand(1, 3, 8, 8) * 255).to(torch.uint8), {}, TypeError, "float tensor"),
        (torch.full((1, 3, 8, 8), float("nan")), {}, ValueError, "NaN"),
        (torch.rand(1, 3, 8, 8) * 2, {}, ValueError, r"must be in \[0, 1\]"),
        (torch.rand(1, 3, 8, 8), {"noise_level": 1.5}, ValueError, r"`noise_level` must be in \[0, 1\]"),
        (torch.rand(1, 3, 8, 8), {"cfg": -1.0}, ValueError, "`cfg` must be >= 0"),
        (torch.rand(1, 3, 8, 8), {"num_iter": 0}, ValueError, "`num_iter` must be >= 1"),
        (torch.rand(1, 3, 8, 8), {"rdm_steps": 5000}, ValueError, "`rdm_steps` must be in"),
        ([[0.0]], {}, TypeError, "must be a torch.Tensor"),
        (torch.rand(2, 3, 8, 8), {"representations": torch.rand(1, 256)}, ValueError,
         r"`representations` must have shape \(2, 256\)"),
        (torch.rand(1, 3, 8, 8), {"representations": torch.full((1, 256), float("inf"))}, ValueError, "infinite"),
        (torch.rand(1, 3, 8, 8), {"representations": torch.ones(1, 256, dtype=torch.long)}, TypeError, "float tensor"),
        (torch.rand(1, 3, 8, 8), {"source_tokens": torch.zeros(1, 3, dtype=torch.long)}, ValueError,
         r"`source_tokens` must have shape \(1, 64\)"),
        (torch.rand(1, 3, 8, 8), {"source_tokens": torch.full((1, 64), 256)}, ValueError, r"in \[0, 256\)"),
        (torch.rand(1, 3, 8, 8), {"source_tokens": torch.zeros(1, 64)}, TypeError, "integer tensor"),
    ],
)
def test_reconstruct_input_errors(pipe, images, kwargs, error, match):
    kwargs = {"noise_level": 0.3, **kwargs}
    with pytest.raises(error, match=match):
        pipe.reconstruct(images, **kwargs)


# ------------------------------------------------------------------ float16 storage
@pytest.fixture(scope="module")
def gray_pipe():
    torch.manual_seed(0)
    return RCGPipeline.from_preset("tiny", in_channels=1)


def test_float16_storage_halves_the_file_and_computes_in_float32(gray_pipe, tmp_path):
    full = gray_pipe.save_pretrained(tmp_path / "fp32")
    half = gray_pipe.save_pretrained(tmp_path / "fp16", dtype=torch.float16)
    size = lambda d: (d / "model.safetensors").stat().st_size  # noqa: E731
    assert size(half) < 0.51 * size(full)
    config = json.loads((half / "config.json").read_text())
    assert config["metadata"]["weights_dtype"] == "float16"
    assert config["metadata"]["weights_sha256"] == sha256_file(half / "model.safetensors")
    assert "stored as float16, cast to float32" in (half / "README.md").read_text()
    loaded = RCGPipeline.from_pretrained(half)
    assert {p.dtype for p in loaded.parameters()} == {torch.float32}
    for (k, mine), theirs in zip(gray_pipe.state_dict().items(), loaded.state_dict().values(), strict=True):
        want = mine.half().float() if mine.is_floating_point() else mine
        assert torch.equal(theirs, want), k
    # the fingerprint hashes the weights computed with: rounded, so not the original's, and the
    # same whichever dtype the rounded weights are stored in next
    fingerprint = loaded.fingerprint()
    assert fingerprint != gray_pipe.fingerprint()
    for dtype in (torch.float16, torch.float32):
        again = RCGPipeline.from_pretrained(loaded.save_pretrained(tmp_path / f"again-{dtype}", dtype=dtype))
        assert again.fingerprint() == fingerprint
    assert "weights_dtype" not in loaded.config.metadata  # the last save was float32
    assert "weights_dtype" not in json.loads((full / "config.json").read_text())["metadata"]


def test_float16_storage_reconstructs_within_tolerance(gray_pipe, tmp_path):
    """Stated tolerance, same seed, the model's defaults: mean |difference| <= 1e-3 and
    max <= 0.1 (a code MAGE draws differently changes a few pixels); representations within 5e-3."""
    half = RCGPipeline.from_pretrained(gray_pipe.save_pretrained(tmp_path / "fp16", dtype=torch.float16))
    x = torch.rand(16, 1, 32, 32, generator=gen(0))
    assert (gray_pipe.encode(x) - half.encode(x)).abs().max() <= 5e-3
    for noise_level in (0.0, 0.3, 1.0):
        a = gray_pipe.reconstruct(x, noise_level, generator=gen(1), num_iter=4, rdm_steps=10)
        b = half.reconstruct(x, noise_level, generator=gen(1), num_iter=4, rdm_steps=10)
        diff = (a - b).abs()
        assert diff.mean() <= 1e-3 and diff.max() <= 0.1, (noise_level, diff.mean(), diff.max())


def test_storage_dtype_errors(gray_pipe, tmp_path):
    with pytest.raises(ValueError, match="`dtype` must be one of torch.float32, torch.float16, torch.bfloat16"):
        gray_pipe.save_pretrained(tmp_path / "x", dtype=torch.int8)
    big = RCGPipeline.from_preset("tiny", in_channels=1)
    with torch.no_grad():
        big.rdm.state_dict()[next(iter(big.rdm.state_dict()))].fill_(1e5)
    with pytest.raises(ValueError, match=r"cannot store as float16: rdm\..* beyond \+-65504"):
        big.save_pretrained(tmp_path / "big", dtype=torch.float16)
    assert not (tmp_path / "big").exists()  # refused before writing anything
    RCGPipeline.from_pretrained(big.save_pretrained(tmp_path / "big", dtype=torch.bfloat16))
    # a file whose weights are integers (or counters floats) is refused before loading
    directory = gray_pipe.save_pretrained(tmp_path / "ints")
    state = load_file(str(directory / "model.safetensors"))
    key = next(k for k, v in state.items() if v.is_floating_point())
    state[key] = state[key].to(torch.int32)
    save_file(state, str(directory / "model.safetensors"))
    with pytest.raises(ValueError, match=f"wrong kind of dtype .*{re.escape(key)} \\(I32\\)"):
        RCGPipeline.from_pretrained(directory)


@pytest.mark.slow
@pytest.mark.skipif("digits-tiny" not in available_models(), reason="digits-tiny is not bundled")
def test_digits_tiny_float16_copy_matches_float32(tmp_path):
    """The measured check behind float16 storage: digits-tiny and its float16 copy on a fixed
    batch of 200 digits at the model's defaults, same seeds. Run with ``-s`` to see the numbers."""
    from sklearn.linear_model import LogisticRegression

    from rcg_augment.data import open_source, pil_to_tensor

    full = RCGPipeline.from_pretrained("digits-tiny")
    half = RCGPipeline.from_pretrained(full.save_pretrained(tmp_path / "fp16", dtype=torch.float16))
    source = open_source("digits")
    x = torch.stack([pil_to_tensor(source.load(i), full.image_size, 1) for i in range(len(source))])
    judge = LogisticRegression(max_iter=2000, C=0.5).fit(x.flatten(1).numpy(), source.labels)  # benchmarks' judge
    batch = x[::9][:200]

    def variants(pipe, seed):
        return torch.cat([pipe.reconstruct(batch[i:i + 100], generator=gen(seed + i)) for i in range(0, 200, 100)])

    a, b, other_seed = variants(full, 0), variants(half, 0), variants(full, 1000)
    labels = [judge.predict(v.flatten(1).numpy()) for v in (a, b, other_seed)]
    agreement, seed_agreement = (labels[0] == labels[1]).mean(), (labels[0] == labels[2]).mean()
    diff = (a - b).abs()
    within = (diff.flatten(1).max(1).values <= 1 / 255).float().mean().item()
    print(f"\ndigits-tiny float32 vs float16 copy, 200 digits, defaults, same seeds: label agreement {agreement:.3f} "
          f"(another seed: {seed_agreement:.3f}); pixels max {diff.max():.4f}, mean {diff.mean():.5f}; "
          f"images within 1/255: {within:.3f}")
    assert agreement >= 0.97 and diff.mean() <= 0.005 and within >= 0.8
