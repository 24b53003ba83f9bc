"""rcg_augment.albumentations.AlbuRCGAugment: schema validation, Compose seeding, dtypes, serialisation."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys

import albumentations as A
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from rcg_augment import RCGPipeline
from rcg_augment.albumentations import AlbuRCGAugment
from rcg_augment.cpu_matmul import onednn_linear_available
from rcg_augment.zoo import available_models

FAST = {"num_iter": 2, "rdm_steps": 2}


def image(shape, dtype=np.uint8, seed=0):
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 256, shape, dtype=np.uint8)
    return a if dtype == np.uint8 else (a / 255.0).astype(dtype)


def test_default_model_is_digits_tiny():
    if "digits-tiny" in available_models():
        assert AlbuRCGAugment(**FAST).model == "digits-tiny"
    else:
        with pytest.raises(FileNotFoundError, match="digits-tiny.*not bundled"):
            AlbuRCGAugment()


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"noise_level": 1.5}, r"`noise_level` must be in \[0, 1\], got 1.5"),
    ({"noise_level": (0.5, 0.1)}, "0 <= low <= high <= 1"),
    ({"noise_level": "high"}, "`noise_level` must be a number"),
    ({"num_iter": 0}, "`num_iter` must be >= 1"),
    ({"rdm_steps": 1.5}, "`rdm_steps` must be an int"),
    ({"cfg": -2}, "`cfg` must be >= 0"),
    ({"device": "nowhere"}, "`device` must be a torch device"),
    ({"model": 12}, "`model` must be a named model"),
    ({"cpu_matmul": "mkl"}, "`cpu_matmul` must be one of default, onednn, got 'mkl'"),
    ({"p": 1.5}, "less than or equal to 1"),
])
def test_init_schema_rejects_bad_arguments(gray_dir, kwargs, message):
    with pytest.raises(ValueError, match=message):
        AlbuRCGAugment(**{"model": gray_dir, **kwargs})


@pytest.mark.parametrize("shape", [(9, 11), (9, 11, 1), (9, 11, 3), (5, 6, 4), (1, 1, 3), (1, 7)])
@pytest.mark.parametrize("dtype", [np.uint8, np.float32])
def test_keeps_shape_and_dtype(gray_dir, rgb_dir, shape, dtype):
    img = image(shape, dtype)
    for model in (gray_dir, rgb_dir):
        out = A.Compose([AlbuRCGAugment(model=model, **FAST)], seed=0)(image=img)["image"]
        assert out.shape == img.shape and out.dtype == img.dtype
        assert out.min() >= 0 and out.max() <= (255 if dtype == np.uint8 else 1)
        if len(shape) == 3 and shape[-1] == 4:
            assert np.array_equal(out[..., 3], img[..., 3])  # alpha untouched


def test_compose_seed_reproduces(rgb_dir):
    img = image((12, 12, 3))

    def run(seed):
        tf = A.Compose([A.HorizontalFlip(p=0.5), AlbuRCGAugment((0.1, 0.9), model=rgb_dir, **FAST)], seed=seed)
        return tf(image=img)["image"], tf(image=img)["image"]

    a1, a2 = run(0)
    b1, b2 = run(0)
    c1, _ = run(1)
    assert np.array_equal(a1, b1) and np.array_equal(a2, b2)
    assert not np.array_equal(a1, a2) and not np.array_equal(a1, c1)


def test_p_zero_is_identity(gray_dir):
    img = image((8, 8, 3))
    out = A.Compose([AlbuRCGAugment(model=gray_dir, p=0.0, **FAST)], seed=0)(image=img)["image"]
    assert np.array_equal(out, img)


def test_images_target_is_one_batch_with_per_image_levels(gray_dir, spy_reconstruct):
    aug = AlbuRCGAugment((0.2, 0.7), model=gray_dir, **FAST)
    pipe = aug._model.get()
    calls = spy_reconstruct(pipe)
    images = image((6, 10, 10, 3))
    out = A.Compose([aug], seed=0)(images=images)["images"]
    assert out.shape == images.shape and out.dtype == np.uint8
    assert len(calls) == 1 and calls[0][0] == (6, 1, 10, 10)
    levels = calls[0][1]
    assert levels.shape == (6,) and levels.min() >= 0.2 and levels.max() <= 0.7 and levels.unique().numel() == 6


def test_to_dict_from_dict_round_trip(gray_dir, tmp_path):
    tf = A.Compose([A.HorizontalFlip(p=0.5), AlbuRCGAugment((0.1, 0.4), model=gray_dir, p=0.8, **FAST)], seed=3)
    data = A.to_dict(tf)
    entry = data["transform"]["transforms"][1]
    assert entry == {"__class_fullname__": "rcg_augment.albumentations.AlbuRCGAugment", "p": 0.8,
                     "noise_level": [0.1, 0.4], "model": gray_dir, "cfg": None, "temperature": None,
                     "num_iter": 2, "rdm_steps": 2, "repaint_fraction": None, "token_temperature": None,
                     "device": None, "cpu_matmul": "default"}
    path = tmp_path / "pipeline.json"
    A.save(tf, str(path))
    for restored in (A.from_dict(json.loads(json.dumps(data))), A.load(str(path))):
        aug = restored.transforms[1]
        assert isinstance(aug, AlbuRCGAugment) and aug.noise_level == (0.1, 0.4) and aug.p == 0.8
        restored.set_random_seed(3)
        tf.set_random_seed(3)
        img = image((8, 8, 3))
        assert np.array_equal(restored(image=img)["image"], tf(image=img)["image"])


def test_from_dict_in_a_fresh_process(gray_dir, tmp_path):
    path = tmp_path / "pipeline.json"
    A.save(A.Compose([AlbuRCGAugment(0.3, model=gray_dir, **FAST)]), str(path))
    code = (
        "import albumentations as A, numpy as np, rcg_augment.albumentations\n"
        f"tf = A.load({str(path)!r})\n"
        "out = tf(image=np.zeros((5, 5, 3), np.uint8))['image']\n"
        "assert out.shape == (5, 5, 3), out.shape\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_pipeline_object_cannot_be_serialised(gray_dir):
    pipe = RCGPipeline.from_pretrained(gray_dir)
    aug = AlbuRCGAugment(model=pipe, **FAST)
    assert "preset=tiny in_channels=1" in repr(aug)
    out = A.Compose([aug], seed=0)(image=image((8, 8)))["image"]
    assert out.shape == (8, 8)
    with pytest.raises(ValueError, match="save_pretrained"):
        A.to_dict(A.Compose([aug]))


def test_pickle_and_repr(gray_dir):
    tf = A.Compose([AlbuRCGAugment(0.25, model=gray_dir, **FAST)], seed=0)
    blob = pickle.dumps(tf)
    assert len(blob) < 50_000
    assert "AlbuRCGAugment(p=1.0, noise_level=0.25" in repr(pickle.loads(blob))


@pytest.mark.parametrize(("img", "error", "message"), [
    (np.full((4, 4, 3), 2.0, np.float32), ValueError, r"in \[0, 1\]"),
    (np.full((4, 4, 3), np.nan, np.float32), ValueError, "NaN"),
    (np.zeros((4, 4, 5), np.uint8), ValueError, "channels"),
])
def test_bad_images(gray_dir, img, error, message):
    with pytest.raises(error, match=message):
        AlbuRCGAugment(model=gray_dir, **FAST)(image=img)


class _Arrays(Dataset):
    def __init__(self, transform):
        self.transform = transform
        self.img = image((8, 8))

    def __len__(self):
        return 4

    def __getitem__(self, i):
        return torch.from_numpy(self.transform(image=self.img)["image"])


def _reseed_worker(worker_id):
    # albumentations 2.0 does not re-seed per worker: without this both workers repeat one stream.
    info = torch.utils.data.get_worker_info()
    info.dataset.transform.set_random_seed(info.seed % 2**32)


def test_dataloader_with_two_workers(gray_dir):
    def run(seed):
        torch.manual_seed(seed)
        tf = A.Compose([AlbuRCGAugment((0.2, 0.8), model=gray_dir, **FAST)], seed=0)
        loader = DataLoader(_Arrays(tf), batch_size=2, num_workers=2, worker_init_fn=_reseed_worker)
        return torch.cat(list(loader))

    a, b, c = run(0), run(0), run(1)
    assert a.shape == (4, 8, 8) and a.dtype == torch.uint8
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert not torch.equal(a[0:2], a[2:4])  # worker 0 and worker 1 differ


def test_the_old_name_still_imports_and_old_saved_pipelines_load(gray_dir):
    import rcg_augment.albumentations as module

    with pytest.warns(DeprecationWarning, match="now AlbuRCGAugment"):
        assert module.RCGAugment is AlbuRCGAugment
    assert "RCGAugment" not in module.__all__
    data = A.to_dict(A.Compose([AlbuRCGAugment(0.3, model=gray_dir, **FAST)]))
    data["transform"]["transforms"][0]["__class_fullname__"] = "rcg_augment.albumentations.RCGAugment"
    assert isinstance(A.from_dict(data).transforms[0], AlbuRCGAugment)


@pytest.mark.skipif(not onednn_linear_available(), reason="this torch build has no oneDNN")
def test_cpu_matmul_onednn_runs_the_onednn_kernel_and_serialises(gray_dir):
    from tests.test_cpu_matmul import _kernels

    aug = AlbuRCGAugment(0.3, model=gray_dir, cpu_matmul="onednn", **FAST)
    tf = A.Compose([aug], seed=0)
    img = image((8, 8, 3))
    names = _kernels(lambda: tf(image=img))
    assert any("mkldnn._linear_pointwise" in n for n in names) and not any("addmm" in n for n in names)
    restored = A.from_dict(A.to_dict(tf))
    assert restored.transforms[0].cpu_matmul == "onednn"
    restored.set_random_seed(0)
    tf.set_random_seed(0)
    assert np.array_equal(restored(image=img)["image"], tf(image=img)["image"])  # deterministic per library
