"""RCGAugment (torchvision v2 / v1): input types, determinism, pipelines, workers, errors."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T
from torchvision import tv_tensors
from torchvision.transforms import v2

from rcg_augment import RCGAugment, RCGPipeline
from rcg_augment import frontend as rt
from rcg_augment.cpu_matmul import onednn_linear_available
from rcg_augment.zoo import available_models

FAST = {"num_iter": 2, "rdm_steps": 2}


@pytest.fixture(params=["gray", "rgb"])
def model_dir(request, gray_dir, rgb_dir):
    return gray_dir if request.param == "gray" else rgb_dir


def pil(mode: str, size=(9, 7), seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    rgba = rng.integers(0, 256, (size[1], size[0], 4), dtype=np.uint8)
    return Image.fromarray(rgba, "RGBA").convert(mode)


# ------------------------------------------------------------------------------------- construction
def test_default_model_is_digits_tiny():
    if "digits-tiny" in available_models():
        assert RCGAugment(**FAST).model == "digits-tiny"
    else:
        with pytest.raises(FileNotFoundError, match="digits-tiny.*not bundled"):
            RCGAugment()


@pytest.mark.parametrize(("kwargs", "error", "message"), [
    ({"noise_level": 1.5}, ValueError, r"`noise_level` must be in \[0, 1\], got 1.5"),
    ({"noise_level": -0.1}, ValueError, r"`noise_level` must be in \[0, 1\], got -0.1"),
    ({"noise_level": float("nan")}, ValueError, "`noise_level` must be in"),
    ({"noise_level": (0.6, 0.2)}, ValueError, "0 <= low <= high <= 1, got \\(0.6, 0.2\\)"),
    ({"noise_level": (0.1, 0.2, 0.3)}, ValueError, r"\(low, high\) pair"),
    ({"noise_level": "0.3"}, TypeError, "`noise_level` must be a number"),
    ({"noise_level": True}, TypeError, "`noise_level` must be a number"),
    ({"p": 1.2}, ValueError, r"`p` must be in \[0, 1\], got 1.2"),
    ({"num_iter": 0}, ValueError, "`num_iter` must be >= 1, got 0"),
    ({"rdm_steps": 2.5}, TypeError, "`rdm_steps` must be an int"),
    ({"cfg": -1.0}, ValueError, "`cfg` must be >= 0, got -1.0"),
    ({"temperature": -0.5}, ValueError, "`temperature` must be >= 0"),
    ({"seed": -3}, ValueError, "`seed` must be in"),
    ({"seed": "7"}, TypeError, "`seed` must be an int"),
    ({"device": "not-a-device"}, ValueError, "`device` must be a torch device"),
    ({"model": 3}, TypeError, "`model` must be a named model"),
    ({"model": "/nonexistent/rcg-model"}, FileNotFoundError, "neither a directory nor a named model"),
])
def test_invalid_arguments_fail_at_construction(gray_dir, kwargs, error, message):
    with pytest.raises(error, match=message):
        RCGAugment(**{"model": gray_dir, **kwargs})


def test_construction_does_not_load_and_loads_once(gray_dir):
    rt.clear_pipeline_cache()
    a = RCGAugment(model=gray_dir, **FAST)
    b = RCGAugment(0.7, model=gray_dir, **FAST)
    assert rt._PIPELINES == {}
    assert a.pipeline is b.pipeline
    assert len(rt._PIPELINES) == 1
    assert dict(a.named_parameters()) == {} and a.state_dict() == {}  # the model is not a submodule


def test_repr_shows_settings(gray_dir):
    text = repr(RCGAugment((0.1, 0.4), model=gray_dir, p=0.5, cfg=1.0, seed=3, **FAST))
    for part in ("RCGAugment(", "noise_level=(0.1, 0.4)", f"model={gray_dir!r}", "p=0.5", "cfg=1.0", "num_iter=2",
                 "rdm_steps=2", "seed=3"):
        assert part in text
    pipe = RCGPipeline.from_preset("tiny", in_channels=1)
    assert "preset=tiny in_channels=1" in repr(RCGAugment(model=pipe))


# ------------------------------------------------------------------------------------- input types
@pytest.mark.parametrize("mode", ["L", "LA", "RGB", "RGBA", "1", "P", "CMYK", "I;16"])
def test_pil_keeps_size_and_mode(model_dir, mode):
    img = pil(mode)
    out = RCGAugment(model=model_dir, seed=0, **FAST)(img)
    assert isinstance(out, Image.Image)
    assert out.size == img.size and out.mode == img.mode


@pytest.mark.parametrize("mode", ["RGBA", "LA"])
def test_alpha_is_untouched(model_dir, mode):
    img = pil(mode, size=(12, 10))
    out = RCGAugment(model=model_dir, seed=0, **FAST)(img)
    assert np.array_equal(np.asarray(out)[..., -1], np.asarray(img)[..., -1])
    x = torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)
    y = RCGAugment(model=model_dir, seed=0, **FAST)(x)
    assert torch.equal(y[-1], x[-1]) and not torch.equal(y[:-1], x[:-1])


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("channels", [1, 3])
def test_tensor_keeps_shape_dtype(model_dir, dtype, channels):
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (channels, 11, 6), generator=gen, dtype=torch.uint8)
    x = x if dtype == torch.uint8 else (x.float() / 255).to(dtype)
    out = RCGAugment(model=model_dir, seed=0, **FAST)(x)
    assert type(out) is torch.Tensor and out.shape == x.shape and out.dtype == dtype
    if dtype.is_floating_point:
        assert 0 <= out.float().min() and out.float().max() <= 1
    assert not torch.equal(out, x)


def test_rgb_through_gray_model_comes_back_as_equal_channels(gray_dir):
    x = torch.randint(0, 256, (3, 10, 10), dtype=torch.uint8)
    out = RCGAugment(model=gray_dir, seed=0, **FAST)(x)
    assert torch.equal(out[0], out[1]) and torch.equal(out[1], out[2])


def test_tv_tensor_image_and_passthrough_of_other_targets(model_dir):
    img = tv_tensors.Image(torch.randint(0, 256, (3, 16, 16), dtype=torch.uint8))
    boxes = tv_tensors.BoundingBoxes([[1, 1, 5, 5]], format="XYXY", canvas_size=(16, 16))
    mask = tv_tensors.Mask(torch.zeros(16, 16, dtype=torch.uint8))
    sample = {"image": img, "boxes": boxes, "mask": mask, "label": 3, "extra": torch.arange(4)}
    out = v2.Compose([RCGAugment(model=model_dir, seed=0, **FAST)])(sample)
    assert isinstance(out["image"], tv_tensors.Image) and out["image"].shape == img.shape
    assert out["image"].dtype == torch.uint8 and not torch.equal(out["image"], img)
    assert out["boxes"] is boxes and out["mask"] is mask and out["label"] == 3 and out["extra"] is sample["extra"]


def test_batch_is_one_pipeline_call_with_per_image_levels(gray_dir, spy_reconstruct):
    aug = RCGAugment((0.2, 0.6), model=gray_dir, seed=0, **FAST)
    pipe = aug.pipeline
    calls = spy_reconstruct(pipe)
    x = tv_tensors.Image(torch.rand(16, 1, 9, 13))
    out = aug(x)
    assert isinstance(out, tv_tensors.Image) and out.shape == x.shape
    assert len(calls) == 1 and calls[0][0] == (16, 1, 9, 13)
    levels = calls[0][1]
    assert levels.shape == (16,) and levels.min() >= 0.2 and levels.max() <= 0.6 and levels.unique().numel() > 1
    calls.clear()
    RCGAugment(0.45, model=pipe, seed=0, **FAST)(torch.rand(4, 1, 8, 8))
    assert torch.allclose(calls[0][1], torch.full((4,), 0.45, dtype=torch.float64))


def test_p_zero_is_identity_and_never_loads(gray_dir):
    rt.clear_pipeline_cache()
    aug = RCGAugment(model=gray_dir, p=0.0, **FAST)
    img = pil("RGB")
    x = torch.rand(5, 3, 7, 7)
    assert np.array_equal(np.asarray(aug(img)), np.asarray(img))
    assert torch.equal(aug(x), x)
    assert rt._PIPELINES == {}


def test_p_applies_per_image(gray_dir):
    x = torch.randint(0, 256, (32, 1, 8, 8), dtype=torch.uint8)
    out = RCGAugment(model=gray_dir, p=0.5, seed=0, **FAST)(x)
    same = torch.tensor([torch.equal(a, b) for a, b in zip(out, x, strict=True)])
    assert 0 < same.sum() < 32


# ------------------------------------------------------------------------------------- randomness
def test_same_seed_same_images_different_seed_different(model_dir):
    x = torch.randint(0, 256, (4, 3, 12, 12), dtype=torch.uint8)

    def run(seed):
        aug = RCGAugment((0.2, 0.8), model=model_dir, seed=seed, **FAST)
        return aug(x), aug(x)

    a1, a2 = run(0)
    b1, b2 = run(0)
    c1, _ = run(1)
    assert torch.equal(a1, b1) and torch.equal(a2, b2)
    assert not torch.equal(a1, a2)  # the stream moves on
    assert not torch.equal(a1, c1)


def test_global_rng_without_seed(gray_dir):
    aug = RCGAugment((0.2, 0.8), model=gray_dir, **FAST)
    img = pil("L")
    torch.manual_seed(5)
    a = np.asarray(aug(img))
    torch.manual_seed(5)
    b = np.asarray(aug(img))
    torch.manual_seed(6)
    c = np.asarray(aug(img))
    assert np.array_equal(a, b) and not np.array_equal(a, c)


# ------------------------------------------------------------------------------------- pipelines
def test_inside_v1_compose(gray_dir):
    tf = T.Compose([T.RandomHorizontalFlip(), RCGAugment((0.1, 0.5), model=gray_dir, seed=0, **FAST), T.ToTensor()])
    out = tf(pil("L", size=(8, 8)))
    assert out.shape == (1, 8, 8) and out.dtype == torch.float32


def test_inside_v2_compose_with_label(rgb_dir):
    tf = v2.Compose([v2.RandomHorizontalFlip(), RCGAugment(model=rgb_dir, seed=0, **FAST), v2.ToImage(),
                     v2.ToDtype(torch.float32, scale=True)])
    img, label = tf(pil("RGB", size=(20, 14)), 7)
    assert isinstance(img, tv_tensors.Image) and img.shape == (3, 14, 20) and label == 7


class _Digits(Dataset):
    def __init__(self, transform, n=8):
        self.transform, self.n = transform, n
        self.img = pil("L", size=(8, 8))

    def __len__(self):
        return self.n

    def __getitem__(self, i):  # the same image everywhere: differences come from the transform
        return self.transform(self.img), i


def _collect(transform, seed):
    torch.manual_seed(seed)
    loader = DataLoader(_Digits(T.Compose([transform, T.PILToTensor()])), batch_size=2, num_workers=2)
    xs, idx = zip(*loader, strict=True)
    return torch.cat(xs), torch.cat(idx)


@pytest.mark.parametrize("seed", [None, 0])
def test_dataloader_with_two_workers(gray_dir, seed):
    rt.clear_pipeline_cache()  # each worker loads lazily
    aug = RCGAugment((0.2, 0.8), model=gray_dir, seed=seed, **FAST)
    a, idx = _collect(aug, 0)
    b, _ = _collect(aug, 0)
    c, _ = _collect(aug, 1)
    assert a.shape == (8, 1, 8, 8) and idx.tolist() == list(range(8))
    assert torch.equal(a, b)  # reproducible under torch.manual_seed
    assert not torch.equal(a, c)
    # batches 0, 2 come from worker 0 and 1, 3 from worker 1: the workers' streams differ
    assert not torch.equal(a[0:2], a[2:4])


def test_pickle_is_small_and_round_trips(gray_dir):
    aug = RCGAugment((0.2, 0.5), model=gray_dir, seed=4, **FAST)
    blob = pickle.dumps(aug)
    assert len(blob) < 20_000
    clone = pickle.loads(blob)
    x = torch.rand(2, 1, 8, 8)
    assert torch.equal(clone(x), RCGAugment((0.2, 0.5), model=gray_dir, seed=4, **FAST)(x))
    assert repr(clone) == repr(aug)


def test_pipeline_object_model(gray_dir):
    pipe = RCGPipeline.from_pretrained(gray_dir)
    aug = RCGAugment(model=pipe, seed=0, **FAST)
    x = torch.rand(2, 1, 8, 8)
    out = aug(x)
    assert aug.model is pipe and aug.pipeline is pipe
    assert torch.equal(pickle.loads(pickle.dumps(aug))(x), RCGAugment(model=pipe, seed=0, **FAST)(x))
    assert out.shape == x.shape


def test_output_is_an_ordinary_tensor(gray_dir):
    out = RCGAugment(model=gray_dir, seed=0, **FAST)(torch.rand(2, 1, 8, 8))
    assert not out.is_inference()
    head = torch.nn.Linear(64, 2)
    head(out.flatten(1)).sum().backward()
    assert head.weight.grad is not None


# ------------------------------------------------------------------------------------- bad inputs
@pytest.mark.parametrize(("inpt", "error", "message"), [
    (torch.rand(8, 8), ValueError, r"\(C, H, W\) or \(B, C, H, W\), got \(8, 8\)"),
    (torch.rand(1, 1, 1, 8, 8), ValueError, r"got \(1, 1, 1, 8, 8\)"),
    (torch.rand(1, 0, 8), ValueError, r"empty: shape \(1, 0, 8\)"),
    (torch.rand(0, 1, 8, 8), ValueError, "empty"),
    (torch.full((1, 4, 4), float("nan")), ValueError, "NaN or infinite"),
    (torch.ones(1, 4, 4, dtype=torch.int32), TypeError, "uint8 or floating point.*int32"),
    (torch.ones(1, 4, 4, dtype=torch.bool), TypeError, "uint8 or floating point.*bool"),
    (torch.full((1, 4, 4), 2.0), ValueError, r"in \[0, 1\].*before Normalize"),
    (torch.rand(5, 8, 8), ValueError, "1 \\(L\\), 2 \\(LA\\), 3 \\(RGB\\) or 4 \\(RGBA\\)"),
    (torch.rand(8, 8, 3), ValueError, "permute"),
    (Image.new("F", (4, 4)), TypeError, "mode 'F' are not supported"),
    (Image.new("L", (0, 3)), ValueError, "empty"),
])
def test_bad_inputs_give_one_clear_error(gray_dir, inpt, error, message):
    with pytest.raises(error, match=message):
        RCGAugment(model=gray_dir, seed=0, **FAST)(inpt)


# ------------------------------------------------------------------------------------- property
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    h=st.sampled_from([1, 2, 5, 8, 13]), w=st.sampled_from([1, 3, 8, 17]), c=st.sampled_from([1, 2, 3, 4]),
    batch=st.sampled_from([None, 1, 3]), dtype=st.sampled_from(["uint8", "float32", "float64"]),
    rgb_model=st.booleans(), level=st.floats(0, 1),
)
def test_property_any_shape_channels_dtype(gray_dir, rgb_dir, h, w, c, batch, dtype, rgb_model, level):
    gen = torch.Generator().manual_seed(h * 100 + w)
    shape = (c, h, w) if batch is None else (batch, c, h, w)
    x = torch.randint(0, 256, shape, generator=gen, dtype=torch.uint8)
    if dtype != "uint8":
        x = (x.double() / 255).to(getattr(torch, dtype))
    out = RCGAugment(level, model=rgb_dir if rgb_model else gray_dir, seed=0, **FAST)(x)
    assert out.shape == x.shape and out.dtype == x.dtype and torch.isfinite(out.double()).all()
    assert out.double().min() >= 0 and out.double().max() <= (255 if dtype == "uint8" else 1)
    if c in (2, 4):
        assert torch.equal(out[..., -1, :, :], x[..., -1, :, :])


# ------------------------------------------------------------------ module layout
def test_plumbing_lives_apart_from_the_transform_class():
    import ast
    import importlib
    from pathlib import Path

    import rcg_augment.transforms as transforms_module
    from rcg_augment import _image_io

    assert transforms_module.__all__ == ["RCGAugment"]
    assert transforms_module.RCGAugment is RCGAugment
    # image conversion knows no model, seed or transform: it imports nothing of this package
    tree = ast.parse(Path(_image_io.__file__).read_text())
    assert not [n for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level > 0]
    # the names transforms.py exported before still resolve (the moved ones saying where they live now)
    before = ["PIL_MODES", "ModelHandle", "RandomSource", "augment_batch", "augment_pil", "check_image_batch",
              "check_noise_level", "check_probability", "check_sampling_settings", "check_seed",
              "clear_pipeline_cache", "from_model_channels", "numpy_to_batch", "batch_to_numpy", "to_model_channels"]
    assert set(transforms_module._MOVED) <= set(before)
    for name in set(before) - set(transforms_module._MOVED):
        assert getattr(transforms_module, name) is getattr(rt, name)
    for name in transforms_module._MOVED:
        with pytest.warns(DeprecationWarning, match=f"{name} moved: import it from rcg_augment.frontend"):
            assert getattr(transforms_module, name) is getattr(rt, name)
    with pytest.raises(AttributeError):
        transforms_module.no_such_name  # noqa: B018
    assert importlib.import_module("rcg_augment.frontend").numpy_to_batch is _image_io.numpy_to_batch


@pytest.mark.skipif(not onednn_linear_available(), reason="this torch build has no oneDNN")
def test_cpu_matmul_onednn_runs_the_onednn_kernel_and_pickles(gray_dir):
    from tests.test_cpu_matmul import _kernels

    aug = RCGAugment(0.3, model=gray_dir, seed=0, cpu_matmul="onednn", **FAST)
    assert "cpu_matmul='onednn'" in repr(aug) and "cpu_matmul" not in repr(RCGAugment(model=gray_dir, **FAST))
    x = torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    names = _kernels(lambda: aug(x))
    assert any("mkldnn._linear_pointwise" in n for n in names) and not any("addmm" in n for n in names)
    a, b = RCGAugment(0.3, model=gray_dir, seed=0, cpu_matmul="onednn", **FAST), pickle.loads(pickle.dumps(aug))
    assert b.cpu_matmul == "onednn"
    b = RCGAugment(0.3, model=gray_dir, seed=0, cpu_matmul="onednn", **FAST)
    assert torch.equal(a(x), b(x))  # same seed, same library: the same output
    with pytest.raises(ValueError, match="`cpu_matmul` must be one of default, onednn"):
        RCGAugment(model=gray_dir, cpu_matmul="mkl")
