"""What every benchmark script records about its run: the date, the machine, the versions and
the command that reproduces it; and what the quality benchmarks share: images of a source as
tensors and the pixel label judge. The scripts run as ``python benchmarks/<name>.py``, which puts
this folder on ``sys.path``: ``from _common import machine, versions``.
"""

from __future__ import annotations

import os
import platform
import sys
from datetime import datetime, timezone
from pathlib import Path

import torch

import rcg_augment


def utc_now() -> str:
    """The current time, UTC, to the second (ISO 8601)."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def cpu_model() -> str | None:
    """The CPU's model name (Linux: /proc/cpuinfo), e.g. "AMD EPYC": which BLAS code path runs
    depends on it (MKL's float32 GEMM is about half as fast on some AMD CPUs as oneDNN's)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def machine(device: torch.device | str | None = None) -> dict:
    """The machine a result was measured on, with a one-line ``summary``."""
    device = torch.device(device) if device is not None else None
    cuda = device.type == "cuda" if device is not None else torch.cuda.is_available()
    info = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_model": cpu_model(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
            "nice": os.nice(0) if hasattr(os, "nice") else None,
            "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
            "device": str(device) if device is not None else None,
            "gpu": torch.cuda.get_device_name(device if cuda and device is not None else 0) if cuda else None}
    info["summary"] = f"{info['cpu_model'] or info['processor']}, {info['cpu_count']} CPUs, {info['torch_threads']} torch threads" + (
        f", {info['gpu']}" if info["gpu"] else "")
    return info


def versions(*packages: str) -> dict:
    """rcg-augment, torch and Python versions, plus those of the named importable ``packages``
    (e.g. ``"numpy"``, ``"sklearn"``; recorded under the distribution's name for sklearn)."""
    out = {"rcg_augment": rcg_augment.__version__, "torch": torch.__version__, "python": platform.python_version()}
    for name in packages:
        module = __import__(name)
        out["scikit-learn" if name == "sklearn" else name] = module.__version__
    return out


def command(script: str, argv: list[str] | None = None) -> str:
    """The command line that ran ``benchmarks/<script>`` (``argv`` as given to ``main``)."""
    return f"python benchmarks/{script} " + " ".join(sys.argv[1:] if argv is None else argv)


__all__ = ["command", "machine", "utc_now", "versions"]


def load_images(source, indices, size: int, channels: int) -> torch.Tensor:
    """Images ``indices`` of an ImageSource as one (N, channels, size, size) float tensor in [0, 1]."""
    from rcg_augment.data import pil_to_tensor

    return torch.stack([pil_to_tensor(source.load(int(i)), size, channels) for i in indices])


def pixel_judge(x_pool: torch.Tensor, y_pool):
    """The label judge of quality.py, speed_quality.py and frontier.py: a logistic regression on the
    pixels of the real benchmark pool (``C`` 0.5), whose ``predict`` takes flattened images."""
    from sklearn.linear_model import LogisticRegression

    return LogisticRegression(max_iter=2000, C=0.5).fit(x_pool.flatten(1).numpy(), y_pool)


# The generation settings that act when MAGE renders a representation (no RDM, nothing kept from a source).
RENDER_SETTINGS = ("cfg", "temperature", "num_iter", "token_temperature")


def render_own(pipe, x: torch.Tensor, settings, *, generator: torch.Generator, batch: int) -> torch.Tensor:
    """MAGE rendering each image's own representation (noise 0, no RDM, full repaint) at the
    ``RENDER_SETTINGS`` of ``settings`` (a mapping with those keys), ``batch`` images at a time."""
    kw = {k: settings[k] for k in RENDER_SETTINGS}
    with torch.inference_mode():
        return torch.cat([pipe.render(pipe.encode(x[i:i + batch]), generator=generator, repaint_fraction=1.0, **kw)
                          for i in range(0, len(x), batch)])
