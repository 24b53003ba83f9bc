"""Build checkpoint files in the official layouts from the key manifests in tests/fixtures/official_keys.

Random tensors of the listed shapes; the RDM's schedule buffers hold the true schedule (they are
constants of the method, and the loader checks `betas`).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from rcg_augment.sampling.diffusion import NoiseSchedule

# Copies of the official key manifests, kept with the tests (see the README.md beside them).
MANIFEST_DIR = Path(__file__).resolve().parent / "fixtures" / "official_keys"

INTEGER_SUFFIXES = ("num_batches_tracked", "position_ids", "num_updates")


def manifest(name: str) -> dict:
    return json.loads((MANIFEST_DIR / f"{name}.json").read_text())


def random_state_dict(params: dict[str, list[int]], seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    schedule = NoiseSchedule()
    sd = {}
    for key, shape in params.items():
        if key.endswith(INTEGER_SUFFIXES):
            sd[key] = torch.randint(0, 100, shape, generator=g, dtype=torch.long)
        elif key == "betas":
            sd[key] = schedule.betas.float()
        elif key == "alphas_cumprod":
            sd[key] = schedule.alphas_cumprod.float()
        else:
            sd[key] = torch.randn(shape, generator=g) * 0.02
    return sd


def write_official_file(name: str, path: Path, *, seed: int = 0, ema: bool = False) -> dict[str, torch.Tensor]:
    """Write ``path`` in the layout ``checkpoint_layout`` describes; returns the weights."""
    m = manifest(name)
    sd = random_state_dict(m["params"], seed)
    args = argparse.Namespace(model=name, batch_size=64, blr=1.5e-4, epochs=200)
    if name.startswith("mocov3"):
        obj = {"epoch": 300, "arch": name, "state_dict": sd, "optimizer": {"state": {}, "param_groups": []},
               "scaler": {"scale": 65536.0}}
    elif name.startswith(("rdm", "mage")):
        model_ema = {k: v + 1.0 if v.is_floating_point() else v for k, v in sd.items()} if ema else None
        obj = {"model": sd, "model_ema": model_ema, "optimizer": {"state": {}, "param_groups": []}, "epoch": 199,
               "scaler": {"scale": 65536.0}, "args": args}
    elif name == "vqgan":
        obj = {"state_dict": sd}
    else:
        raise ValueError(name)
    torch.save(obj, path)
    return sd


ALL_MANIFESTS = sorted(p.stem for p in MANIFEST_DIR.glob("*.json"))
