"""Suite-wide: no test reaches the network or the user's Hugging Face cache; shared fixtures.

Set before any test module imports huggingface_hub or datasets (both read these at import):
offline mode, and a fresh HF_HOME (Hub cache, datasets cache) per test session.

Fixtures every folder uses: ``one_torch_thread``; ``gray_dir`` / ``rgb_dir``, random tiny
pipelines (1 and 3 channels) saved once per session; ``spy_reconstruct`` records a pipeline's
``reconstruct`` calls. ``record_hashes`` (in ``tests/cache_records.py``) hashes a synthetic cache
record by record.
"""

from __future__ import annotations

import os
import shutil
import tempfile

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
_HF_HOME = tempfile.mkdtemp(prefix="rcg-tests-hf-home-")
os.environ["HF_HOME"] = _HF_HOME
for _name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_DATASETS_CACHE"):
    os.environ.pop(_name, None)


@pytest.fixture
def one_torch_thread():
    """Intra-op threads thrash on a shared 2-core box; results do not depend on them.
    Use with ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _save_tiny(tmp_path_factory, name: str, seed: int, channels: int) -> str:
    import torch

    from rcg_augment import RCGPipeline

    torch.manual_seed(seed)
    return str(RCGPipeline.from_preset("tiny", in_channels=channels).save_pretrained(tmp_path_factory.mktemp(name)))


@pytest.fixture(scope="session")
def gray_dir(tmp_path_factory) -> str:
    """A random tiny 1-channel pipeline (seed 0), saved: its folder. Tests read it, never write it."""
    return _save_tiny(tmp_path_factory, "tiny-gray", 0, 1)


@pytest.fixture(scope="session")
def rgb_dir(tmp_path_factory) -> str:
    """A random tiny 3-channel pipeline (seed 1), saved: its folder. Tests read it, never write it."""
    return _save_tiny(tmp_path_factory, "tiny-rgb", 1, 3)


@pytest.fixture
def spy_reconstruct(monkeypatch):
    """``calls = spy_reconstruct(pipe)``: from then on each ``pipe.reconstruct`` call appends
    (input shape, noise levels) to ``calls`` and runs as usual."""
    import torch

    def install(pipe) -> list:
        calls, real = [], pipe.reconstruct

        def spy(images, noise_level, **kwargs):
            calls.append((tuple(images.shape), torch.as_tensor(noise_level).clone()))
            return real(images, noise_level, **kwargs)

        monkeypatch.setattr(pipe, "reconstruct", spy)
        return calls

    return install


def pytest_unconfigure(config):
    shutil.rmtree(_HF_HOME, ignore_errors=True)
