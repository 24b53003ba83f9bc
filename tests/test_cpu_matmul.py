"""rcg_augment.cpu_matmul: which library computes the CPU's float32 linear layers."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from rcg_augment.cpu_matmul import (
    CPU_MATMUL_BACKENDS,
    check_cpu_matmul,
    cpu_matmul,
    onednn_linear_available,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")
needs_onednn = pytest.mark.skipif(not onednn_linear_available(), reason="this torch build has no oneDNN")


class _Ops(TorchDispatchMode):
    """Records the name of every aten/mkldnn kernel that runs."""

    def __init__(self):
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


def _kernels(fn) -> list[str]:
    with _Ops() as ops:
        fn()
    return ops.names


def test_unknown_backend_is_a_clear_error():
    assert CPU_MATMUL_BACKENDS == ("default", "onednn")
    with pytest.raises(ValueError, match=r"`cpu_matmul` must be one of default, onednn, got 'mkl'"):
        check_cpu_matmul("mkl")
    with pytest.raises(ValueError, match="cpu_matmul"), cpu_matmul("blas"):
        pass


@needs_onednn
@pytest.mark.parametrize("shape", [(5, 12), (3, 7, 12), (2, 3, 4, 12)])
@pytest.mark.parametrize("bias", [True, False])
def test_onednn_computes_inference_linears_and_matches(shape, bias):
    g = torch.Generator().manual_seed(0)
    layer = torch.nn.Linear(12, 20, bias=bias)
    x = torch.randn(*shape, generator=g)
    with torch.inference_mode():
        expected = layer(x)
        with cpu_matmul("onednn"):
            got = layer(x)
            names = _kernels(lambda: layer(x))
    assert any("mkldnn._linear_pointwise" in n for n in names) and not any("addmm" in n for n in names)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    with torch.inference_mode():  # the default backend does nothing
        with cpu_matmul("default"):
            assert torch.equal(layer(x), expected)
            assert not any("mkldnn" in n for n in _kernels(lambda: layer(x)))


@needs_onednn
def test_onednn_takes_strided_inputs():
    w = torch.randn(6, 8)
    x = torch.randn(8, 4, 3).transpose(0, 2)  # (3, 4, 8), not contiguous
    with torch.no_grad(), cpu_matmul("onednn"):
        got = F.linear(x, w.t().contiguous().t())  # a transposed view of a weight
    torch.testing.assert_close(got, F.linear(x, w), rtol=1e-5, atol=1e-5)


@needs_onednn
def test_training_and_other_dtypes_fall_through_unchanged():
    layer = torch.nn.Linear(12, 4)
    x = torch.randn(3, 12)
    with cpu_matmul("onednn"):
        names = _kernels(lambda: layer(x).sum().backward())  # autograd: stays on F.linear's kernels
        assert layer.weight.grad is not None and layer.weight.grad.shape == (4, 12)
        assert not any("mkldnn" in n for n in names)
        double = layer.double()
        with torch.no_grad():
            xd = x.double()
            assert not any("mkldnn" in n for n in _kernels(lambda: double(xd)))
            assert torch.equal(double(xd), F.linear(xd, double.weight, double.bias))
        with pytest.raises(RuntimeError):  # a shape error is still F.linear's own
            F.linear(torch.randn(3, 5), torch.randn(4, 12))


@needs_onednn
def test_mode_ends_with_the_block():
    x, w = torch.randn(4, 8), torch.randn(3, 8)
    with torch.no_grad():
        with cpu_matmul("onednn"):
            pass
        assert not any("mkldnn" in n for n in _kernels(lambda: F.linear(x, w)))


@needs_onednn
def test_keyword_arguments_are_routed_too():
    x, w, b = torch.randn(4, 8), torch.randn(3, 8), torch.randn(3)
    with torch.no_grad(), cpu_matmul("onednn"):
        names = _kernels(lambda: F.linear(input=x, weight=w, bias=b))
        got = F.linear(input=x, weight=w, bias=b)
    assert any("mkldnn._linear_pointwise" in n for n in names)
    torch.testing.assert_close(got, F.linear(x, w, b), rtol=1e-5, atol=1e-5)
