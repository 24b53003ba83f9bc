"""Property tests: `reconstruct` gives a correct output or one clear error for any input."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rcg_augment import RCGPipeline

PIPE = RCGPipeline.from_preset("tiny", in_channels=1)
FAST = {"num_iter": 1, "rdm_steps": 1}
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.uint8, torch.int16, torch.bool]


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    batch=st.integers(0, 3),
    channels=st.integers(1, 5),
    height=st.sampled_from([0, 1, 2, 7, 32, 33]),
    width=st.sampled_from([0, 1, 5, 32, 4096]),
    dtype=st.sampled_from(DTYPES),
    special=st.sampled_from([None, "nan", "inf", "big", "negative"]),
    level=st.one_of(st.floats(-0.5, 1.5), st.just(float("nan")), st.just(0.0), st.just(1.0)),
)
def test_reconstruct_output_or_clear_error(batch, channels, height, width, dtype, special, level):
    x = torch.rand(batch, channels, height, width, dtype=torch.float64)
    if special == "nan" and x.numel():
        x.view(-1)[0] = float("nan")
    elif special == "inf" and x.numel():
        x.view(-1)[0] = float("inf")
    elif special == "big":
        x = x * 3
    elif special == "negative":
        x = x - 1
    x = x.to(dtype) if dtype.is_floating_point else (x.clamp(0, 1) * 255).to(dtype)
    expected_errors = (TypeError, ValueError)
    try:
        out = PIPE.reconstruct(x, level, generator=torch.Generator().manual_seed(0), **FAST)
    except expected_errors as err:
        msg = str(err)
        assert "`" in msg or "images" in msg, msg  # the error names the argument
        valid = (dtype.is_floating_point and channels == 1 and height > 0 and width > 0 and 0 <= level <= 1
                 and (special in (None,) or x.numel() == 0))
        assert not valid or batch == 0, f"valid input refused: {msg}"
        return
    assert out.shape == x.shape and out.dtype == torch.float32
    if out.numel():
        assert torch.isfinite(out).all() and out.min() >= 0 and out.max() <= 1


@pytest.mark.parametrize("level", [float("nan"), -0.01, 1.01])
def test_bad_noise_levels_name_the_argument(level):
    with pytest.raises(ValueError, match="`noise_level`"):
        PIPE.reconstruct(torch.rand(1, 1, 8, 8), level)
