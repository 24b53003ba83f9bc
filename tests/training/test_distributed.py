"""Every stage under ``accelerate launch`` with 2 CPU processes (gloo), including an exact resume."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

from rcg_augment import RCGPipeline
from rcg_augment.training import STAGES

ROOT = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_all_stages_under_accelerate_launch_two_processes(tmp_path):
    # In accelerate 1.15, `launch --cpu --num_processes 2` starts ONE process unless MPI is installed;
    # `--multi_gpu` starts 2 via torchrun, and our Accelerator(cpu=True) makes them a gloo CPU group.
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(_free_port()), str(ROOT / "tests" / "training" / "launch_script.py"),
           str(tmp_path)]
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["num_processes"] == 2 and result["distributed_type"] == "DistributedType.MULTI_CPU"
    assert list(result["losses"]) == list(STAGES)
    assert all(len(v) == 2 and all(math.isfinite(x) for x in v) for v in result["losses"].values())
    assert result["resumed_from"] == 2 and result["split"] == result["full"]
    assert RCGPipeline.from_pretrained(tmp_path / "all").config.metadata["training"][-1]["stage"] == "mage"
    start = [json.loads(x) for x in (tmp_path / "all" / "log.jsonl").read_text().splitlines()][0]
    assert start["settings"]["num_processes"] == 2
