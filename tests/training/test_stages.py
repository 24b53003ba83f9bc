"""Every stage trains a few steps, touches only its own module, and learns on a tiny set."""

from __future__ import annotations

import math

import pytest
import torch

from rcg_augment import RCGPipeline
from rcg_augment.training import STAGES, finetune, train_all, train_stage
from rcg_augment.training.augment import color_jitter, gaussian_blur, resized_crop_flip
from rcg_augment.training.encoder import contrastive_loss
from tests.training.helpers import FAST, digits_source, micro_pipeline


def _state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("stage", STAGES)
def test_stage_trains_only_its_module(stage, tmp_path):
    init = micro_pipeline()
    before = {name: _state(getattr(init, name)) for name in STAGES}
    result = train_stage(stage, digits_source(), tmp_path, init=init, steps=3, **FAST)
    assert result.completed and result.steps_done == 3
    assert all(math.isfinite(r["loss"]) for r in result.history)
    loaded = RCGPipeline.from_pretrained(tmp_path)
    for name in STAGES:
        after = _state(getattr(loaded, name))
        assert _same(before[name], after) == (name != stage), name
    record = loaded.config.metadata["training"][-1]
    assert record["stage"] == stage and record["completed"] and record["steps"] == 3
    # the pipeline object is usable and trainable again afterwards (requires_grad flags restored)
    assert {n: p.requires_grad for n, p in result.pipeline.named_parameters()} == {
        n: p.requires_grad for n, p in micro_pipeline().named_parameters()}
    assert result.pipeline.reconstruct(torch.rand(2, 1, 16, 16), 0.5,
                                       generator=torch.Generator().manual_seed(0)).shape == (2, 1, 16, 16)


def test_encoder_stage_keeps_patch_projection_frozen(tmp_path):
    init = micro_pipeline()
    proj = _state(init.encoder.vit.patch_embed.proj)
    blocks = _state(init.encoder.vit.blocks)
    train_stage("encoder", digits_source(), tmp_path, init=init, steps=3, blr=1e-2, **FAST)
    loaded = RCGPipeline.from_pretrained(tmp_path)
    assert _same(proj, _state(loaded.encoder.vit.patch_embed.proj))  # MoCo v3 stop-grad conv1
    assert not _same(blocks, _state(loaded.encoder.vit.blocks))


def test_contrastive_loss_is_scaled_infonce():
    class _One:  # a single-process stand-in for the accelerator
        process_index = 0

        @staticmethod
        def gather(t):
            return t

    q = torch.randn(6, 8)
    perfect = contrastive_loss(q, q * 5, 0.2, _One())
    shuffled = contrastive_loss(q, q[torch.randperm(6, generator=torch.Generator().manual_seed(1))], 0.2, _One())
    assert perfect < shuffled
    logits = torch.nn.functional.normalize(q, dim=1) @ torch.nn.functional.normalize(q, dim=1).t() / 0.2
    expected = torch.nn.functional.cross_entropy(logits, torch.arange(6)) * 0.4
    assert torch.allclose(perfect, expected)


@pytest.mark.parametrize("stage, blr", [("tokenizer", 0.05), ("rdm", 5e-3)])
def test_tiny_overfit_loss_falls(stage, blr, tmp_path):
    result = train_stage(stage, digits_source(8), tmp_path, init=micro_pipeline(), steps=30, blr=blr,
                         warmup_steps=2, **FAST)
    losses = [r["loss"] for r in result.history]
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < 0.6 * first, losses


def test_tokenizer_restarts_dead_codes(tmp_path):
    kw = dict(FAST, steps=6, blr=0.01)
    plain = train_stage("tokenizer", digits_source(), tmp_path / "a", init=micro_pipeline(), restart_every=0, **kw)
    restarted = train_stage("tokenizer", digits_source(), tmp_path / "b", init=micro_pipeline(), restart_every=3,
                            **kw)
    usage = [r.get("codebook_usage") for r in restarted.history]
    assert usage[0] is not None and restarted.history[0]["codes_restarted"] > 0
    assert "codebook_usage" not in plain.history[-1]
    idx_plain = plain.pipeline.tokenizer.encode(torch.rand(8, 1, 16, 16))
    idx_restart = restarted.pipeline.tokenizer.encode(torch.rand(8, 1, 16, 16))
    assert idx_restart.unique().numel() > idx_plain.unique().numel()


def test_tokenizer_decoder_only_keeps_every_token_and_trains_the_decoder(tmp_path):
    start = micro_pipeline()
    before = {k: v.clone() for k, v in start.tokenizer.state_dict().items()}
    images = torch.rand(8, 1, 16, 16, generator=torch.Generator().manual_seed(3))
    tokens_before = start.tokenizer.encode(images)
    result = train_stage("tokenizer", digits_source(), tmp_path, init=start, steps=6, blr=0.05, warmup_steps=1,
                         train="decoder", **FAST)
    tok = result.pipeline.tokenizer
    after = tok.state_dict()
    frozen = [k for k in after if not k.startswith("decoder.")]
    assert frozen and all(torch.equal(after[k], before[k]) for k in frozen)  # encoder and codebook as they were
    assert any(not torch.equal(after[k], before[k]) for k in after if k.startswith("decoder."))
    assert torch.equal(tok.encode(images), tokens_before)
    assert all("codes_restarted" not in r or r["codes_restarted"] == 0 for r in result.history)
    with pytest.raises(ValueError, match="train"):
        train_stage("tokenizer", digits_source(), tmp_path / "bad", init=micro_pipeline(), steps=1, train="codebook",
                    **FAST)


def test_train_all_and_finetune(tmp_path):
    results = train_all(digits_source(), tmp_path / "all", init=micro_pipeline(), steps=2, **FAST,
                        per_stage={"mage": {"steps": 3}})
    assert list(results) == list(STAGES) and all(r.completed for r in results.values())
    assert results["mage"].steps_done == 3
    pipe = RCGPipeline.from_pretrained(tmp_path / "all")
    assert [r["stage"] for r in pipe.config.metadata["training"]] == list(STAGES)
    again = train_all(digits_source(), tmp_path / "all", init=micro_pipeline(), steps=2, **FAST,
                      per_stage={"mage": {"steps": 3}})
    assert all(r.skipped for r in again.values())  # a finished run resumes to "nothing to do"

    tuned = finetune(tmp_path / "all", digits_source(16), tmp_path / "ft", steps=2, **FAST)
    assert list(tuned) == ["rdm", "mage"]
    ft = RCGPipeline.from_pretrained(tmp_path / "ft")
    assert _same(_state(ft.encoder), _state(pipe.encoder)) and not _same(_state(ft.rdm), _state(pipe.rdm))
    assert ft.config.metadata["training"][-1]["finetuned_from"] == str(tmp_path / "all")


def test_augmentations_are_seeded_and_bounded():
    x = torch.rand(4, 3, 16, 16)
    a = resized_crop_flip(x, generator=torch.Generator().manual_seed(0), scale=(0.2, 1.0), hflip=True)
    b = resized_crop_flip(x, generator=torch.Generator().manual_seed(0), scale=(0.2, 1.0), hflip=True)
    assert torch.equal(a, b) and a.shape == x.shape
    flip_only = resized_crop_flip(x, generator=torch.Generator().manual_seed(0), hflip=True)
    for i in range(4):  # each sample is the image or its mirror
        assert torch.allclose(flip_only[i], x[i], atol=1e-5) or torch.allclose(flip_only[i], x[i].flip(-1), atol=1e-5)
    for out in (color_jitter(x, generator=torch.Generator().manual_seed(1)),
                gaussian_blur(x, generator=torch.Generator().manual_seed(1), p=1.0, sigma=(0.5, 1.0))):
        assert out.shape == x.shape and out.min() >= 0 and out.max() <= 1
