"""The shared training loop: schedule, scaling rule, data order, EMA, checkpoints, resume, budgets."""

from __future__ import annotations

import json
import math
import pickle

import pytest
import torch

from rcg_augment import RCGPipeline
from rcg_augment.training import TrainConfig, train_stage
from rcg_augment.training.loop import (
    BatchOrder,
    check_checkpoint_dir,
    ema_update,
    lr_at,
    resolve_lr,
)
from rcg_augment.training.mage import MAGEStage, deepen_mage
from rcg_augment.training.rdm import RDMStage
from rcg_augment.training.stage import StepContext
from tests.training.helpers import FAST, digits_source, micro_pipeline


# ----------------------------------------------------------------------------- pure helpers
def test_lr_schedule_warmup_then_cosine_closed_form():
    lr, steps, warmup = 1e-3, 100, 10
    got = [lr_at(s, lr=lr, steps=steps, warmup=warmup, schedule="cosine", min_lr=1e-5) for s in range(steps)]
    assert got[0] == pytest.approx(lr / warmup)
    assert got[warmup - 1] == pytest.approx(lr)
    for s in range(warmup, steps):
        expected = 1e-5 + (lr - 1e-5) * 0.5 * (1 + math.cos(math.pi * (s - warmup) / (steps - warmup)))
        assert got[s] == pytest.approx(expected)
    assert all(a >= b for a, b in zip(got[warmup:], got[warmup + 1:], strict=False))  # decays monotonically
    const = [lr_at(s, lr=lr, steps=steps, warmup=0, schedule="constant") for s in range(steps)]
    assert const == [lr] * steps


def test_official_scaling_rules():
    cfg = TrainConfig(batch_size=64, grad_accum=2, blr=1e-4)
    # MAGE (and encoder, tokenizer): blr * batch / 256; RDM: blr * batch, no / 256 (main_rdm.py).
    assert resolve_lr(MAGEStage(), cfg, 512) == pytest.approx(1e-4 * 512 / 256)
    assert resolve_lr(RDMStage(), cfg, 512) == pytest.approx(1e-4 * 512)
    assert resolve_lr(RDMStage(), TrainConfig(), 512) == pytest.approx(1e-6 * 512)  # official default blr
    assert resolve_lr(RDMStage(), TrainConfig(lr=3e-4, blr=1.0), 512) == 3e-4  # lr wins


@pytest.mark.parametrize("n", [5, 37])
def test_batch_order_partitions_each_epoch_across_processes(n):
    orders = [BatchOrder(n, batch_size=4, num_processes=2, process_index=r, seed=3) for r in range(2)]
    stream = []
    for b in range(20):
        a, c = orders[0].indices(b), orders[1].indices(b)
        assert len(a) == len(c) == 4
        stream.extend(a + c)
    for e in range(len(stream) // n):  # every full epoch is a permutation of the data
        assert sorted(stream[e * n:(e + 1) * n]) == list(range(n))
    again = BatchOrder(n, batch_size=4, num_processes=2, process_index=1, seed=3)
    assert again.indices(7) == orders[1].indices(7)  # pure function of (seed, batch, process)
    other = BatchOrder(n, batch_size=4, num_processes=2, process_index=1, seed=4)
    assert [other.indices(b) for b in range(5)] != [orders[1].indices(b) for b in range(5)]


def test_ema_update_math():
    model, ema = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    before = ema.weight.detach().clone()
    ema_update(ema, model, 0.9, copy_buffers=True)
    assert torch.allclose(ema.weight, 0.9 * before + 0.1 * model.weight)


@pytest.mark.parametrize("bad, name", [({"steps": 0}, "steps"), ({"ema_decay": 1.0}, "ema_decay"),
                                       ({"mixed_precision": "fp16"}, "mixed_precision"),
                                       ({"betas": (0.9,)}, "betas")])
def test_config_errors_name_the_setting(bad, name):
    with pytest.raises(ValueError, match=f"`{name}`"):
        TrainConfig(**bad)


def test_unknown_setting_is_named(tmp_path):
    with pytest.raises(TypeError, match="hflp"):
        train_stage("rdm", digits_source(8), tmp_path, init=micro_pipeline(), steps=1, hflp=False)


def test_a_killed_piece_counts_up_to_its_last_checkpoint(tmp_path):
    """A piece killed without an ``end`` event counts the time of its last checkpoint; a stopped
    piece its ``end``; pieces before the last completed run of the stage, and other stages, nothing."""
    from rcg_augment.training.loop import _earlier_pieces_seconds

    events = [
        {"event": "start", "stage": "mage"}, {"event": "end", "stage": "mage", "completed": True, "seconds": 500},
        {"event": "start", "stage": "mage"}, {"event": "checkpoint", "stage": "mage", "seconds": 10},
        {"event": "checkpoint", "stage": "mage", "seconds": 20},  # then killed
        {"event": "resume", "stage": "mage"}, {"event": "end", "stage": "mage", "completed": False, "seconds": 7},
        {"event": "start", "stage": "rdm"}, {"event": "checkpoint", "stage": "rdm", "seconds": 99},
        {"event": "resume", "stage": "mage"}, {"event": "checkpoint", "stage": "mage", "seconds": 3},  # killed
        {"event": "resume", "stage": "mage"}, {"event": "checkpoint", "stage": "mage", "seconds": 4},  # the piece now ending
    ]
    log = tmp_path / "log.jsonl"
    log.write_text("\n".join(json.dumps(e) for e in events) + "\nnot json\n")
    assert _earlier_pieces_seconds(log, "mage") == 20 + 7 + 3
    assert _earlier_pieces_seconds(log, "rdm") == 0.0
    assert _earlier_pieces_seconds(tmp_path / "missing.jsonl", "mage") == 0.0
    # a fresh start (checkpoints deleted) after a killed piece: the discarded piece does not count
    log.write_text("\n".join(json.dumps(e) for e in events[2:4] + [{"event": "start", "stage": "mage"}]))
    assert _earlier_pieces_seconds(log, "mage") == 0.0


# ----------------------------------------------------------------------------- runs
def _losses(result):
    return [r["loss"] for r in result.history]


def test_resume_continues_the_same_run(tmp_path):
    """N steps == N/2 steps, stop, resume N/2: same step count, identical losses and weights (CPU)."""
    kw = dict(FAST, steps=6, checkpoint_every=2, warmup_steps=2)
    full = train_stage("mage", digits_source(), tmp_path / "full", init=micro_pipeline(), **kw)
    first = train_stage("mage", digits_source(), tmp_path / "split", init=micro_pipeline(), max_steps=3, **kw)
    assert not first.completed and first.steps_done == 3
    ckpts = sorted(p.name for p in (tmp_path / "split" / "checkpoints" / "mage").glob("step_*"))
    assert ckpts == ["step_00000002", "step_00000003"]  # periodic + the one at the stop
    # init differs on purpose: a resumed stage starts from the base saved with its checkpoints.
    second = train_stage("mage", digits_source(), tmp_path / "split", init=micro_pipeline(seed=9), **kw)
    assert second.resumed_from == 3 and second.completed and second.steps_done == 6
    assert [r["step"] for r in first.history + second.history] == list(range(1, 7))
    assert _losses(first) + _losses(second) == _losses(full)
    a, b = RCGPipeline.from_pretrained(tmp_path / "full"), RCGPipeline.from_pretrained(tmp_path / "split")
    assert a.fingerprint() == b.fingerprint()
    # the training record's time counts both pieces (the model card's time column)
    record = b.config.metadata["training"][-1]
    assert abs(record["seconds"] - (first.seconds + second.seconds)) < 0.1
    # each checkpoint is logged with the piece's time so far (what counts if a piece is killed)
    events = [json.loads(line) for line in (tmp_path / "split" / "log.jsonl").read_text().splitlines()]
    marks = [(e["step"], e["seconds"]) for e in events if e.get("event") == "checkpoint"]
    assert [step for step, _ in marks] == [2, 3, 4] and 0 < marks[0][1] <= marks[1][1] <= first.seconds + 0.01  # rounded to 0.01 s
    assert "| time |" in (tmp_path / "split" / "README.md").read_text()
    # finished: checkpoints cleaned up, a second call skips the stage
    assert not list((tmp_path / "split" / "checkpoints" / "mage").glob("step_*"))
    again = train_stage("mage", digits_source(), tmp_path / "split", init=micro_pipeline(), **kw)
    assert again.skipped and again.pipeline.fingerprint() == a.fingerprint()


def test_resume_refuses_other_settings(tmp_path):
    kw = dict(FAST, steps=4)
    train_stage("rdm", digits_source(), tmp_path, init=micro_pipeline(), max_steps=2, **kw)
    with pytest.raises(ValueError, match="batch_size: 8 -> 4"):
        train_stage("rdm", digits_source(), tmp_path, init=micro_pipeline(), **{**kw, "batch_size": 4})
    fresh = train_stage("rdm", digits_source(), tmp_path, init=micro_pipeline(), resume=False,
                        **{**kw, "batch_size": 4})
    assert fresh.resumed_from is None and fresh.completed


class _Payload:
    """Pickles to a call of ``exec`` -- a stand-in for a malicious checkpoint."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",))


def test_resume_never_unpickles_arbitrary_objects(tmp_path):
    kw = dict(FAST, steps=4)
    train_stage("rdm", digits_source(), tmp_path, init=micro_pipeline(), max_steps=2, **kw)
    ckpt = tmp_path / "checkpoints" / "rdm" / "step_00000002"
    marker = tmp_path / "marker.txt"
    torch.save({"state": _Payload(marker), "param_groups": []}, ckpt / "optimizer.bin")
    with pytest.raises(pickle.UnpicklingError):
        train_stage("rdm", digits_source(), tmp_path, init=micro_pipeline(), **kw)
    assert not marker.exists()


def test_checkpoint_with_foreign_files_is_refused(tmp_path):
    kw = dict(FAST, steps=4)
    train_stage("rdm", digits_source(), tmp_path, init=micro_pipeline(), max_steps=2, **kw)
    ckpt = tmp_path / "checkpoints" / "rdm" / "step_00000002"
    check_checkpoint_dir(ckpt)  # as written: fine
    files = sorted(p.name for p in ckpt.iterdir())
    assert "model.safetensors" in files and "ema.safetensors" in files
    (ckpt / "custom_checkpoint_0.pkl").write_bytes(b"x")
    with pytest.raises(ValueError, match="custom_checkpoint_0.pkl"):
        train_stage("rdm", digits_source(), tmp_path, init=micro_pipeline(), **kw)


def test_wall_time_budget_checkpoints_and_stops(tmp_path):
    result = train_stage("rdm", digits_source(), tmp_path, init=micro_pipeline(), steps=10_000, max_time=0.5,
                         **FAST)
    assert not result.completed and 1 <= result.steps_done < 10_000
    state = json.loads((tmp_path / "checkpoints" / "rdm" / f"step_{result.steps_done:08d}" / "trainer_state.json")
                       .read_text())
    assert state["step"] == result.steps_done
    meta = RCGPipeline.from_pretrained(tmp_path).config.metadata["training"][-1]
    assert meta["completed"] is False and meta["steps"] == result.steps_done


def test_log_records(tmp_path):
    train_stage("tokenizer", digits_source(), tmp_path, init=micro_pipeline(), steps=4,
                **{**FAST, "log_every": 2})
    lines = [json.loads(x) for x in (tmp_path / "log.jsonl").read_text().splitlines()]
    steps = [r for r in lines if "loss" in r]
    assert [r["step"] for r in steps] == [2, 4]
    for r in steps:
        assert {"loss", "lr", "images_per_s", "s_per_step", "grad_norm", "epoch", "recon", "vq"} <= set(r)
        assert r["images_per_s"] > 0 and math.isfinite(r["loss"])
    assert lines[0]["event"] == "start" and lines[-1]["event"] == "end"


def test_mage_label_smoothing_option_is_saved_and_checked(tmp_path):
    """MAGEStage(label_smoothing=...) trains with it and the saved config records it."""
    assert micro_pipeline().config.mage.label_smoothing == 0.1
    res = train_stage("mage", digits_source(), tmp_path, init=micro_pipeline(), steps=1, label_smoothing=0.0, **FAST)
    assert res.completed
    assert RCGPipeline.from_pretrained(tmp_path).config.mage.label_smoothing == 0.0


@pytest.mark.parametrize("name", ["label_smoothing", "dropout", "rep_drop_prob"])
def test_mage_config_options_are_checked_recorded_and_leave_the_preset(name):
    """A bad value is refused up front; unset, the option stays out of a run's record (records made
    before it existed still match); training with it does not modify the preset's shared config."""
    for bad in (1.0, -0.1, "0", True):
        with pytest.raises(ValueError, match=name):
            MAGEStage(**{name: bad})
    assert name not in MAGEStage().options()
    assert MAGEStage(**{name: 0.0}).options()[name] == 0.0
    from rcg_augment.models import MAGE_PRESETS

    MAGEStage(**{name: 0.0}).build(micro_pipeline())
    assert getattr(MAGE_PRESETS["tiny"], name) == 0.1


def test_mage_dropout_option_turns_dropout_off_and_is_saved(tmp_path):
    """MAGEStage(dropout=0) trains without dropout (two training-mode forwards agree) and the
    saved config records it for both fields."""
    pipe = micro_pipeline()
    assert pipe.config.mage.dropout > 0 and pipe.config.mage.attn_dropout > 0
    tokens = torch.randint(0, pipe.config.mage.codebook_size, (2, pipe.config.mage.num_tokens))
    rep = torch.randn(2, pipe.config.mage.rep_dim)
    model = MAGEStage(dropout=0.0).build(pipe).train()
    with torch.no_grad():
        assert torch.equal(model.mage(tokens, rep), model.mage(tokens, rep))
    noisy = MAGEStage(dropout=0.5).build(micro_pipeline()).train()
    with torch.no_grad():
        assert not torch.equal(noisy.mage(tokens, rep), noisy.mage(tokens, rep))
    res = train_stage("mage", digits_source(), tmp_path, init=micro_pipeline(), steps=1, dropout=0.0, **FAST)
    assert res.completed
    saved = RCGPipeline.from_pretrained(tmp_path)
    assert saved.config.mage.dropout == 0.0 and saved.config.mage.attn_dropout == 0.0
    assert all(m.p == 0.0 for m in saved.mage.modules() if isinstance(m, torch.nn.Dropout))


def test_deepen_mage_adds_identity_blocks():
    """A grown MAGE gives exactly the logits of the model it came from (conditional and not), its
    old blocks keep their weights, and shrinking or a non-int depth is refused."""
    mage = micro_pipeline().mage.eval()
    for block in list(mage.blocks) + list(mage.decoder_blocks):  # trained-looking: no zero projections
        torch.nn.init.normal_(block.attn.proj.weight, std=0.1)
        torch.nn.init.normal_(block.mlp.fc2.weight, std=0.1)
    grown = deepen_mage(mage, depth=3, decoder_depth=2).eval()
    assert (grown.config.depth, grown.config.decoder_depth) == (3, 2) and (mage.config.depth, mage.config.decoder_depth) == (1, 1)
    assert len(grown.blocks) == 3 and len(grown.decoder_blocks) == 2
    assert torch.equal(grown.blocks[0].attn.qkv.weight, mage.blocks[0].attn.qkv.weight)
    assert not grown.blocks[1].attn.proj.weight.any() and grown.blocks[1].attn.qkv.weight.any()
    c = mage.config
    tokens = torch.randint(0, c.codebook_size, (3, c.num_tokens))
    tokens[:, ::3] = c.mask_token_id
    rep = torch.nn.functional.normalize(torch.randn(3, c.rep_dim), dim=1)
    with torch.no_grad():
        assert torch.equal(grown(tokens, rep), mage(tokens, rep))
        assert torch.equal(grown(tokens, None), mage(tokens, None))
    # a freshly initialised block is not the identity: the check above can fail
    with torch.no_grad():
        grown.blocks[2].attn.proj.weight.normal_()
        assert not torch.equal(grown(tokens, rep), mage(tokens, rep))
    for bad in ({"depth": 0}, {"decoder_depth": 0}, {"depth": 2.0}):
        with pytest.raises(ValueError, match="depth"):
            deepen_mage(mage, **bad)


def test_mage_depth_option_grows_saves_and_resumes(tmp_path):
    """MAGEStage(depth=..., decoder_depth=...) trains the grown network, the saved config records it,
    and a run stopped and resumed equals the uninterrupted one (the growth is redone exactly)."""
    for bad in (0, 2.5, "3", True):
        with pytest.raises(ValueError, match="depth"):
            MAGEStage(depth=bad)
    assert "depth" not in MAGEStage().options() and MAGEStage(depth=2).options()["depth"] == 2
    kw = dict(FAST, steps=4, checkpoint_every=2, warmup_steps=1, depth=2, decoder_depth=2)
    full = train_stage("mage", digits_source(), tmp_path / "full", init=micro_pipeline(), **kw)
    first = train_stage("mage", digits_source(), tmp_path / "split", init=micro_pipeline(), max_steps=2, **kw)
    second = train_stage("mage", digits_source(), tmp_path / "split", init=micro_pipeline(), **kw)
    assert second.resumed_from == 2 and second.completed
    assert _losses(first) + _losses(second) == _losses(full)
    saved = RCGPipeline.from_pretrained(tmp_path / "full")
    assert (saved.config.mage.depth, saved.config.mage.decoder_depth) == (2, 2)
    assert saved.fingerprint() == RCGPipeline.from_pretrained(tmp_path / "split").fingerprint()
    # the added blocks trained: their residual projections moved off zero
    assert saved.mage.blocks[1].attn.proj.weight.abs().sum() > 0


def test_mage_rep_drop_prob_option_controls_the_unconditional_share():
    """With rep_drop_prob 0 the training loss never uses fake_latent (no gradient reaches it); at
    the preset's 0.1 some examples of a batch of 64 do."""
    c = micro_pipeline().config.mage
    tokens = torch.randint(0, c.codebook_size, (64, c.num_tokens))
    rep = torch.nn.functional.normalize(torch.randn(64, c.rep_dim), dim=1)
    grads = {}
    for value in (0.0, None):
        model = MAGEStage(rep_drop_prob=value).build(micro_pipeline())
        model(tokens, rep, generator=torch.Generator().manual_seed(0)).backward()
        grads[value] = model.mage.fake_latent.grad
    assert grads[0.0] is None or not grads[0.0].any()
    assert grads[None] is not None and grads[None].abs().sum() > 0


def _context(pipe, model):
    return StepContext(step=0, total_steps=1, micro=0, generator=torch.Generator().manual_seed(0), accelerator=None,
                       pipe=pipe, unwrapped=model, ema=None, optimizer=None, seed=0)


def test_mage_rep_crop_option_draws_a_second_crop_for_the_representation():
    """rep_crop='independent' encodes another crop than the one tokenized (so the loss differs from
    'shared' on the same seed), stays out of the run record when 'shared', and refuses other values."""
    with pytest.raises(ValueError, match="rep_crop"):
        MAGEStage(rep_crop="other")
    assert "rep_crop" not in MAGEStage().options()
    assert MAGEStage(rep_crop="independent").options()["rep_crop"] == "independent"
    images = torch.rand(8, 1, 16, 16)
    losses = {}
    for mode in ("shared", "independent"):
        pipe = micro_pipeline()
        stage = MAGEStage(crop_scale=(0.5, 1.0), rep_crop=mode)
        model = stage.build(pipe)
        with torch.no_grad():
            losses[mode] = stage.loss(model, images, _context(pipe, model))[0].item()
    assert losses["shared"] != losses["independent"]
    # without crops or flips there is nothing to draw: the two are the same
    pipe = micro_pipeline()
    same = [MAGEStage(rep_crop=mode) for mode in ("shared", "independent")]
    models = [s.build(pipe) for s in same]
    with torch.no_grad():
        got = [s.loss(m, images, _context(pipe, m))[0] for s, m in zip(same, models, strict=True)]
    assert torch.equal(got[0], got[1])
