"""Suite-wide: no test reaches the network or the user's Hugging Face cache.

Set before any test module imports huggingface_hub or datasets (both read these at import):
offline mode, and a fresh HF_HOME (Hub cache, datasets cache) per test session.
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


def pytest_unconfigure(config):
    shutil.rmtree(_HF_HOME, ignore_errors=True)
