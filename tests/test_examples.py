"""Every example script runs offline to completion (exit code 0)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def run_example(name: str, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, str(EXAMPLES / name), *args], capture_output=True, text=True,
                            timeout=timeout, env=env, cwd=EXAMPLES.parent)
    assert result.returncode == 0, f"{name} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


@pytest.mark.parametrize(("name", "expected"), [
    ("torchvision_pipeline.py", "batched call: (32, 1, 8, 8) torch.uint8"),
    ("albumentations_pipeline.py", "restored pipeline gives the same output under the same seed: True"),
    ("hf_datasets_with_transform.py", "train[:32] in one call: (32, 1, 8, 8)"),
])
def test_example_runs(name, expected):
    assert expected in run_example(name).stdout
