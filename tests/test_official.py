"""Official checkpoint files (built from the key manifests) load strictly and fully."""

from __future__ import annotations

import gc
import os
import re

import pytest
import torch

from rcg_augment import RCGPipeline
from rcg_augment.official import (
    OfficialCheckpointError,
    convert_official_file,
    load_official_checkpoint,
    rdm_ema_key,
)
from tests.official_files import ALL_MANIFESTS, manifest, write_official_file

KIND = {"mocov3": "encoder", "rdm": "rdm", "mage": "mage", "vqgan": "tokenizer"}


def kind_of(name: str) -> str:
    return next(v for k, v in KIND.items() if name.startswith(k))


def test_every_manifest_is_covered():
    assert len(ALL_MANIFESTS) == 7, f"expected the 7 official manifests, found {ALL_MANIFESTS}"


@pytest.fixture(scope="module")
def base_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("official_base")
    files = {}
    for name in ("mocov3_vit_base", "rdm_mocov3vitb", "mage_vit_base_rep", "vqgan"):
        path = d / f"{name}.pth"
        files[name] = (path, write_official_file(name, path, seed=len(files)))
    yield files
    for path, _ in files.values():
        path.unlink(missing_ok=True)


@pytest.fixture(scope="module")
def base_pipeline(base_files):
    return RCGPipeline.from_official(
        encoder=base_files["mocov3_vit_base"][0], rdm=base_files["rdm_mocov3vitb"][0],
        mage=base_files["mage_vit_base_rep"][0], tokenizer=base_files["vqgan"][0], arch="base",
    )


@pytest.fixture(scope="module")
def blank_base():
    return RCGPipeline.from_preset("rcg-b")


def _assert_consumed(name, converted):
    total = sum(len(p) for p in converted.parts.values()) + len(converted.ignored)
    assert total == len(manifest(name)["params"]), f"{name}: {total} keys accounted for"


@pytest.mark.parametrize("name", ["mocov3_vit_base", "rdm_mocov3vitb", "mage_vit_base_rep", "vqgan"])
def test_base_files_every_key_consumed(name, base_files, blank_base):
    converted = convert_official_file(base_files[name][0], kind_of(name), pipeline=blank_base)
    _assert_consumed(name, converted)
    # Every converted part loads strictly into the part of the official-shape pipeline.
    for part, state in converted.parts.items():
        getattr(blank_base, part).load_state_dict(state, strict=True)


def test_base_weights_are_transferred(base_files, base_pipeline):
    enc_sd = base_files["mocov3_vit_base"][1]
    torch.testing.assert_close(base_pipeline.encoder.vit.blocks[3].attn.qkv.weight,
                               enc_sd["module.base_encoder.blocks.3.attn.qkv.weight"])
    torch.testing.assert_close(base_pipeline.encoder.head[7].running_var, enc_sd["module.base_encoder.head.7.running_var"])
    rdm_sd = base_files["rdm_mocov3vitb"][1]
    # The RDM file's LitEma weights are the ones sampled with.
    torch.testing.assert_close(base_pipeline.rdm.res_blocks[11].out_layers[3].weight,
                               rdm_sd[rdm_ema_key("res_blocks.11.out_layers.3.weight")])
    mage_sd = base_files["mage_vit_base_rep"][1]
    torch.testing.assert_close(base_pipeline.mage.fake_latent, mage_sd["fake_latent"])
    torch.testing.assert_close(base_pipeline.mage.mlm_layer.bias, mage_sd["mlm_layer.bias"])
    vq_sd = base_files["vqgan"][1]
    torch.testing.assert_close(base_pipeline.tokenizer.decoder.up[2].upsample.conv.weight,
                               vq_sd["decoder.up.2.upsample.conv.weight"])
    meta = base_pipeline.config.metadata["official"]
    assert meta["encoder"]["license"] == "CC BY-NC 4.0"
    assert len(meta["mage"]["sha256"]) == 64


def test_base_pipeline_reconstructs_256px(base_pipeline):
    assert base_pipeline.image_size == 256 and base_pipeline.in_channels == 3
    images = torch.rand(1, 3, 256, 256, generator=torch.Generator().manual_seed(0))
    out = base_pipeline.reconstruct(images, 0.5, generator=torch.Generator().manual_seed(0), num_iter=2,
                                    rdm_steps=2, cfg=1.0)
    assert out.shape == images.shape
    assert torch.isfinite(out).all() and out.min() >= 0 and out.max() <= 1


def test_embedded_copies_stand_in(base_files):
    """MAGE's file embeds the encoder and VQGAN: rdm + mage alone make a pipeline."""
    pipe = RCGPipeline.from_official(rdm=base_files["rdm_mocov3vitb"][0], mage=base_files["mage_vit_base_rep"][0])
    mage_sd = base_files["mage_vit_base_rep"][1]
    torch.testing.assert_close(pipe.encoder.vit.cls_token, mage_sd["pretrained_encoder.cls_token"])
    torch.testing.assert_close(pipe.tokenizer.quantize.embedding.weight, mage_sd["vqgan.quantize.embedding.weight"])


@pytest.mark.parametrize(("key", "damage", "message"), [
    ("pretrained_encoder.blocks.0.attn.qkv.weight", lambda t: t[:-1],
     r"the encoder copy it embeds does not fit.*vit\.blocks\.0\.attn\.qkv\.weight "
     r"\(stored as pretrained_encoder\.blocks\.0\.attn\.qkv\.weight\) \(2304, 768\) vs \(2303, 768\)"),
    ("vqgan.quantize.embedding.weight", lambda t: t.to(torch.int64),
     r"the tokenizer copy it embeds does not fit.*Wrong dtypes.*quantize\.embedding\.weight "
     r"\(stored as vqgan\.quantize\.embedding\.weight\) torch\.float32 vs torch\.int64"),
])
def test_damaged_embedded_copy_is_refused_beside_separate_files(base_files, tmp_path, key, damage, message):
    """The MAGE file's encoder and VQGAN copies are checked even when `encoder=` and `tokenizer=`
    files stand in for them (they used to load silently)."""
    obj = torch.load(base_files["mage_vit_base_rep"][0], weights_only=False)
    obj["model"][key] = damage(obj["model"][key])
    damaged = tmp_path / "mage_damaged.pth"
    torch.save(obj, damaged)
    del obj
    error = _official_error(encoder=base_files["mocov3_vit_base"][0], rdm=base_files["rdm_mocov3vitb"][0],
                            mage=damaged, tokenizer=base_files["vqgan"][0])
    assert re.search(message, error) and "mage_damaged.pth" in error
    damaged.unlink()


def _official_error(**files) -> str:
    """The message of from_official's OfficialCheckpointError, keeping no traceback: its frames
    hold gigabytes of converted weights that the ViT-L test below needs."""
    try:
        RCGPipeline.from_official(**files, verify_sha256=False)
    except OfficialCheckpointError as err:
        return str(err)
    finally:
        gc.collect()
    raise AssertionError("from_official raised no OfficialCheckpointError")


def test_ema_preferred_and_optional(tmp_path):
    path = tmp_path / "mage.pth"
    sd = write_official_file("mage_vit_base_rep", path, ema=True)
    ema = convert_official_file(path, "mage", use_ema=True).parts["mage"]
    raw = convert_official_file(path, "mage", use_ema=False).parts["mage"]
    torch.testing.assert_close(raw["fake_latent"], sd["fake_latent"])
    torch.testing.assert_close(ema["fake_latent"], sd["fake_latent"] + 1.0)


def test_wrong_arch_names_file_and_keys(base_files):
    with pytest.raises(OfficialCheckpointError) as info:
        RCGPipeline.from_official(rdm=base_files["rdm_mocov3vitb"][0], mage=base_files["mage_vit_base_rep"][0],
                                  arch="large")
    msg = str(info.value)
    assert "mage_vit_base_rep.pth" in msg and "arch='large'" in msg and "vs" in msg


def test_wrong_file_kind_is_refused(base_files):
    with pytest.raises(OfficialCheckpointError, match=r"vqgan.pth \(passed as `mage`\): no weights"):
        RCGPipeline.from_official(rdm=base_files["rdm_mocov3vitb"][0], mage=base_files["vqgan"][0])
    with pytest.raises(OfficialCheckpointError, match=r"mage_vit_base_rep.pth \(passed as `rdm`\): unexpected keys for an RDM file"):
        RCGPipeline.from_official(rdm=base_files["mage_vit_base_rep"][0], mage=base_files["mage_vit_base_rep"][0])
    with pytest.raises(OfficialCheckpointError, match="passed as `encoder`.*unexpected keys for a MoCo v3 file"):
        convert_official_file(base_files["vqgan"][0], "encoder")


def test_truncated_file(base_files, tmp_path):
    src = base_files["vqgan"][0]
    cut = tmp_path / "cut.ckpt"
    cut.write_bytes(src.read_bytes()[: os.path.getsize(src) // 2])
    with pytest.raises(OfficialCheckpointError, match="cut.ckpt.*cannot be read"):
        load_official_checkpoint(cut)


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_code_carrying_pickle_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "payload": _Payload(str(marker))}, path)
    with pytest.raises(OfficialCheckpointError, match="refused"):
        load_official_checkpoint(path)
    assert not marker.exists()


def test_modified_schedule_is_refused(tmp_path):
    path = tmp_path / "rdm.pth"
    write_official_file("rdm_mocov3vitb", path)
    obj = torch.load(path, weights_only=False)
    obj["model"]["betas"] = torch.linspace(1e-4, 0.02, 1000)
    torch.save(obj, path)
    pipe = RCGPipeline.from_preset("tiny")
    with pytest.raises(OfficialCheckpointError, match="betas"):
        convert_official_file(path, "rdm", pipeline=pipe)


@pytest.mark.slow
def test_large_files_load_and_reconstruct(tmp_path):
    """ViT-L manifests (2.3 B parameters written and read back): strict load, every key consumed."""
    paths = {}
    for name in ("mocov3_vit_large", "rdm_mocov3vitl", "mage_vit_large_rep"):
        paths[name] = tmp_path / f"{name}.pth"
        write_official_file(name, paths[name])
        gc.collect()
    pipe = RCGPipeline.from_official(encoder=paths["mocov3_vit_large"], rdm=paths["rdm_mocov3vitl"],
                                     mage=paths["mage_vit_large_rep"], arch="large", verify_sha256=False)
    for name, path in paths.items():
        converted = convert_official_file(path, kind_of(name), pipeline=pipe)
        _assert_consumed(name, converted)
        del converted
        gc.collect()
    assert pipe.config.mage.temperature == 11.0
    out = pipe.reconstruct(torch.rand(1, 3, 256, 256), 0.3, generator=torch.Generator().manual_seed(0),
                           num_iter=1, rdm_steps=1)
    assert out.shape == (1, 3, 256, 256) and torch.isfinite(out).all()


def test_the_old_loader_name_still_imports():
    import rcg_augment.official as official

    with pytest.warns(DeprecationWarning, match="now load_official_checkpoint"):
        assert official.load_checkpoint is load_official_checkpoint
