"""Property tests: RCGAugment and AlbuRCGAugment over hostile arrays give a correct output or one clear error.

The input space: sizes from 0 to 4096 (1x1, 1x4096, 0-size), 1 to 5 channels, dtypes bool, uint8,
uint16, int32, float16/32/64, and float values that may hold NaN, inf or values outside [0, 1].
An input is either transformed (same shape and dtype, values in the dtype's range, alpha kept)
or refused with a ValueError/TypeError raised by the input checks, before the model runs.
"""

from __future__ import annotations

import traceback
from pathlib import Path

import albumentations as A
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import rcg_augment
from rcg_augment import RCGAugment
from rcg_augment.albumentations import AlbuRCGAugment

from .conftest import FAST

PACKAGE = Path(rcg_augment.__file__).parent
CHECKERS = {PACKAGE / "_image_io.py", PACKAGE / "frontend.py", PACKAGE / "transforms.py", PACKAGE / "albumentations.py"}
MAX = {"bool": 1, "uint8": 255, "uint16": 65535, "int32": 255}

sizes = st.sampled_from([(1, 1), (1, 4096), (4096, 1), (0, 4), (4, 0), (3, 5), (17, 9), (32, 32)])
channels = st.sampled_from([None, 1, 2, 3, 4, 5])  # None: no channel axis
dtypes = st.sampled_from(["bool", "uint8", "uint16", "int32", "float16", "float32", "float64"])
specials = st.sampled_from([None, "nan", "inf", "-inf", "above", "below"])


def hostile(size, c, dtype, special, seed, *, channels_last: bool) -> np.ndarray:
    rng = np.random.default_rng(seed)
    h, w = size
    shape = (h, w) if c is None else ((h, w, c) if channels_last else (c, h, w))
    if dtype in MAX:
        a = rng.integers(0, MAX[dtype] + 1, shape).astype(dtype)
    else:
        a = rng.random(shape).astype(dtype)
        if special and a.size:
            a.flat[rng.integers(a.size)] = {"nan": np.nan, "inf": np.inf, "-inf": -np.inf,
                                            "above": 3.0, "below": -2.0}[special]
    return a


def refused_clearly(err: BaseException) -> None:
    """The error is a ValueError/TypeError with a message, raised by the input checks."""
    assert isinstance(err, (ValueError, TypeError)), f"{type(err).__name__}: {err}"
    assert "`image" in str(err), str(err)
    frames = traceback.extract_tb(err.__traceback__)
    assert Path(frames[-1].filename) in CHECKERS, f"raised in {frames[-1].filename}:{frames[-1].lineno}"


def check_output(out, src, dtype) -> None:
    out_np = out.numpy() if isinstance(out, torch.Tensor) else out
    src_np = src.numpy() if isinstance(src, torch.Tensor) else src
    assert out_np.shape == src_np.shape and out_np.dtype == src_np.dtype
    values = out_np.astype(np.float64)
    assert np.isfinite(values).all()
    assert values.min() >= 0 and values.max() <= MAX.get(dtype, 1)


@pytest.fixture(scope="module")
def transforms(tmp_path_factory):
    torch.manual_seed(0)
    d = str(rcg_augment.RCGPipeline.from_preset("tiny", in_channels=3).save_pretrained(
        tmp_path_factory.mktemp("rgb-hostile")))
    return RCGAugment(0.3, model=d, seed=0, **FAST), AlbuRCGAugment(model=d, **FAST)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(size=sizes, c=channels, dtype=dtypes, special=specials, seed=st.integers(0, 2**16))
def test_torchvision_api_on_hostile_tensors(transforms, size, c, dtype, special, seed):
    a = hostile(size, c, dtype, special, seed, channels_last=False)
    if c is None:
        a = a[None]  # a tensor image is (C, H, W)
    x = torch.from_numpy(a) if dtype != "uint16" else torch.from_numpy(a.astype(np.int32)).to(torch.uint16)
    try:
        out = transforms[0](x)
    except Exception as err:  # noqa: BLE001 - every failure must be a clear input error
        refused_clearly(err)
        return
    poisoned = special is not None and dtype not in MAX
    assert dtype in ("uint8", "float16", "float32", "float64") and not poisoned and min(size) > 0
    check_output(out, x, dtype)
    if a.shape[0] in (2, 4):
        assert torch.equal(out[-1], x[-1])  # alpha untouched


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(size=sizes, c=channels, dtype=dtypes, special=specials, seed=st.integers(0, 2**16))
def test_albumentations_api_on_hostile_arrays(transforms, size, c, dtype, special, seed):
    a = hostile(size, c, dtype, special, seed, channels_last=True)
    try:
        out = A.Compose([transforms[1]], seed=0)(image=a)["image"]
    except Exception as err:  # noqa: BLE001 - every failure must be a clear input error
        refused_clearly(err)
        return
    poisoned = special is not None and dtype not in MAX
    assert dtype in ("uint8", "uint16", "float16", "float32", "float64") and not poisoned and min(size) > 0
    assert c != 5
    check_output(out, a, dtype)
    if c in (2, 4):
        assert np.array_equal(out[..., -1], a[..., -1])  # alpha untouched
