"""Which library computes the float32 linear layers on the CPU: torch's default BLAS or oneDNN.

torch sends a CPU ``F.linear`` to its BLAS (Intel MKL in the x86-64 wheels). On some CPUs that is
far from the machine's speed: on the AMD EPYC (Zen 5) this project measures on, MKL's float32 GEMM
runs at about 45% of the rate oneDNN reaches on the same matrices (benchmarks/throughput.py
measures both). ``cpu_matmul("onednn")`` routes every eligible ``F.linear`` inside it through
oneDNN (``torch.ops.mkldnn._linear_pointwise``, the kernel torch.compile's CPU backend uses):

    from rcg_augment.cpu_matmul import cpu_matmul

    with cpu_matmul("onednn"):
        variants = pipe.reconstruct(images, noise_level=0.3, generator=g)

It is opt-in: the two libraries add in different orders, so outputs differ from the default's in
float32 rounding (and, through MAGE's sampling, in an occasional token); each backend on its own
is deterministic for a given seed on a given machine. Only inference-time calls are routed (CPU,
float32, no autograd, no autocast); anything else falls through to ``F.linear`` unchanged.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from .settings import CPU_MATMUL_BACKENDS, DEFAULT_CPU_MATMUL

__all__ = ["CPU_MATMUL_BACKENDS", "DEFAULT_CPU_MATMUL", "check_cpu_matmul", "cpu_matmul", "onednn_linear_available"]


def onednn_linear_available() -> bool:
    """Whether this torch build has the oneDNN linear kernel (x86-64 and most Linux wheels)."""
    return bool(torch.backends.mkldnn.is_available()) and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def check_cpu_matmul(backend: str) -> str:
    """``backend`` if it names a backend this machine can run; a ValueError naming the fix if not."""
    if backend not in CPU_MATMUL_BACKENDS:
        raise ValueError(f"`cpu_matmul` must be one of {', '.join(CPU_MATMUL_BACKENDS)}, got {backend!r}")
    if backend == "onednn" and not onednn_linear_available():
        raise ValueError("`cpu_matmul` 'onednn' needs a torch build with oneDNN (torch.backends.mkldnn); this one "
                         "has none: use 'default'")
    return backend


def _routable(x, weight, bias) -> bool:
    """An inference-time float32 CPU linear that oneDNN computes the same way F.linear would."""
    if not (isinstance(x, torch.Tensor) and isinstance(weight, torch.Tensor)):
        return False
    if x.device.type != "cpu" or x.dtype != torch.float32 or weight.dtype != torch.float32:
        return False
    if weight.dim() != 2 or x.dim() < 2 or x.shape[-1] != weight.shape[1] or x.numel() == 0:
        return False  # shapes F.linear reports an error for, or handles specially, stay with it
    if bias is not None and (not isinstance(bias, torch.Tensor) or bias.dtype != torch.float32
                             or bias.shape != (weight.shape[0],)):
        return False
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias)):
        return False  # the oneDNN kernel has no backward
    if torch.is_autocast_enabled("cpu"):
        return False
    return True


class _OneDNNLinear(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:
            x = args[0] if args else kwargs.get("input")
            weight = args[1] if len(args) > 1 else kwargs.get("weight")
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            if _routable(x, weight, bias):
                return torch.ops.mkldnn._linear_pointwise(x.contiguous(), weight.contiguous(), bias, "none", [], "")
        return func(*args, **kwargs)


@contextmanager
def cpu_matmul(backend: str = DEFAULT_CPU_MATMUL):
    """Run the block with ``backend`` computing CPU float32 linear layers: ``"default"`` (torch's
    BLAS; does nothing) or ``"onednn"``. The setting is per thread, like every torch mode."""
    if check_cpu_matmul(backend) == "default":
        yield
        return
    with _OneDNNLinear():
        yield
