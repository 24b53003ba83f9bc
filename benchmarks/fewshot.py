"""Few-shot classification: what RCG augmentation buys over a tuned classical recipe.

Datasets (offline): sklearn digits (10 classes; 1, 5, 10 shots per class) and skimage's
``lfw_subset`` faces vs non-faces (2 classes; 2, 5, 10 shots per class), via
``rcg_augment.data.open_source``. Each is split once by ``rcg_augment.data.splits`` into a
held-out TEST split (a seeded, stratified 30%) and a POOL; shots are drawn from the pool, the
classical recipe and the probe are tuned on the pool, and the generative model must have been
trained on the pool only (the script checks the model's metadata and says so).

Arms (same classifier, steps and batch size for every image arm):
  (a) none            small CNN, no augmentation
  (b) classical       the classical recipe chosen on validation draws from the pool
  (c) +rcg-online     (b) + RCGAugment on every batch (each image replaced with probability p)
  (d) +rcg-cache@L    (b) + a pre-built build_synthetic cache at noise level L (each image
                      replaced with probability p by one of its cached variants); one arm per L
  (e) probe           logistic regression on the frozen encoder's representations
  (f) probe+rep-aug   (e) + RepresentationAugment copies of the training representations

Every cell runs >= 10 seeds (different shot draws) in full mode; the report gives the mean with a
95% t-interval and the paired difference of each RCG arm against its reference (same seeds).

Usage:
    python benchmarks/fewshot.py --quick                       # seconds, random tiny model
    python benchmarks/fewshot.py --model digits=DIR --model lfw-faces=DIR2
    python benchmarks/fewshot.py --train-split-file split.json --split-only
    python benchmarks/fewshot.py --datasets digits --seeds 3 --arms none,classical,probe,probe+rep-aug
    python benchmarks/fewshot.py merge runs/a/fewshot.json runs/b/fewshot.json   # one report from per-dataset runs
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import math
import signal
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from _common import machine, utc_now, versions
from torch import nn
from torchvision.transforms import v2

from rcg_augment import RCGAugment, RCGPipeline, RepresentationAugment
from rcg_augment.data import SyntheticDataset, build_synthetic, open_source, pil_to_tensor
from rcg_augment.data.splits import SPLIT_SEED, TEST_FRACTION, benchmark_split, indices_sha256

logger = logging.getLogger("fewshot")

RESULTS = Path(__file__).parent / "results"
IMAGE_SIZE = 32  # the classifier's (and the tiny models') resolution
PROVENANCE_KEY = "excluded_test_indices_sha256"
TUNING_SEED_BASE = 10_000  # tuning draws use seeds disjoint from the evaluation seeds

DATASETS = {
    "digits": {"shots": (1, 5, 10), "default_model": "digits-tiny"},
    "lfw-faces": {"shots": (2, 5, 10), "default_model": "faces-tiny"},
}

# Arm ids, their labels, and which arm an RCG arm is compared with (same seeds).
CACHE_PREFIX = "classical+rcg-cache@"


def arm_label(arm: str) -> str:
    labels = {"none": "(a) none", "classical": "(b) classical (tuned)",
              "classical+rcg-online": "(c) (b) + RCGAugment online",
              "probe": "(e) linear probe", "probe+rep-aug": "(f) (e) + RepresentationAugment"}
    if arm.startswith(CACHE_PREFIX):
        return f"(d) (b) + RCG cache, noise {arm[len(CACHE_PREFIX):]}"
    return labels[arm]


def arm_reference(arm: str) -> str | None:
    if arm == "classical+rcg-online" or arm.startswith(CACHE_PREFIX):
        return "classical"
    if arm == "probe+rep-aug":
        return "probe"
    return None


# ============================================================================== settings
@dataclass
class Settings:
    quick: bool
    datasets: list[str]
    shots: dict[str, list[int]]
    seeds: int
    tune_seeds: int
    steps: int
    batch_size: int
    lr: float
    width: int
    val_size: int
    max_test: int | None
    rcg_p: float
    online_noise: float
    cache_noise_levels: list[float]
    cache_variants: int
    rep_noise: float
    rep_copies: int
    num_iter: int | None
    rdm_steps: int | None
    cfg: float | None
    temperature: float | None
    probe_cs: list[float]
    classical_candidates: list[str]
    arms: list[str]
    device: str
    models: dict[str, str] = field(default_factory=dict)


def all_arms(cache_levels: list[float]) -> list[str]:
    return (["none", "classical", "classical+rcg-online"]
            + [f"{CACHE_PREFIX}{lvl:g}" for lvl in cache_levels] + ["probe", "probe+rep-aug"])


# ============================================================================== classical recipes
def _autoaugment(op: v2.Transform) -> v2.Transform:
    # The auto-augment policies are defined on uint8 pixels.
    return v2.Compose([v2.ToDtype(torch.uint8, scale=True), op, v2.ToDtype(torch.float32, scale=True)])


def classical_transform(name: str) -> v2.Transform | None:
    """A per-image transform on (C, 32, 32) float tensors in [0, 1]; None for no augmentation."""
    affine_light = v2.RandomAffine(degrees=10, translate=(0.1, 0.1), scale=(0.9, 1.1))
    recipes = {
        "none": None,
        "affine-light": affine_light,
        "affine-strong": v2.RandomAffine(degrees=20, translate=(0.15, 0.15), scale=(0.8, 1.2), shear=10),
        "crop": v2.RandomResizedCrop(IMAGE_SIZE, scale=(0.6, 1.0), ratio=(0.85, 1.15), antialias=True),
        "hflip+affine-light": v2.Compose([v2.RandomHorizontalFlip(), affine_light]),
        "trivialaugment": _autoaugment(v2.TrivialAugmentWide()),
        "randaugment": _autoaugment(v2.RandAugment(num_ops=2, magnitude=9)),
    }
    if name not in recipes:
        raise ValueError(f"unknown classical recipe {name!r}; choose from {sorted(recipes)}")
    return recipes[name]


CLASSICAL_CANDIDATES = ["none", "affine-light", "affine-strong", "crop", "hflip+affine-light",
                        "trivialaugment", "randaugment"]


def apply_per_image(transform: v2.Transform | None, x: torch.Tensor) -> torch.Tensor:
    # v2 transforms draw one set of parameters per call: call them per image for per-image draws.
    if transform is None:
        return x
    return torch.stack([transform(img) for img in x])


# ============================================================================== classifier
class SmallCNN(nn.Module):
    """A strided conv net for 32x32 inputs: cheap enough for hundreds of runs on a CPU."""

    def __init__(self, in_channels: int, num_classes: int, width: int = 16):
        super().__init__()

        def block(cin, cout, stride):
            return [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

        self.features = nn.Sequential(
            *block(in_channels, width, 2),          # 16x16
            *block(width, 2 * width, 1), nn.MaxPool2d(2),  # 8x8
            *block(2 * width, 4 * width, 1), nn.MaxPool2d(2),  # 4x4
            *block(4 * width, 4 * width, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.head = nn.Linear(4 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


@dataclass
class ImageArm:
    """How a CNN run augments: a classical recipe, plus RCG online or from a cache."""

    classical: str = "none"
    online: RCGAugment | None = None
    variants: torch.Tensor | None = None  # (N, V, C, H, W): cached variants of each training image
    p: float = 0.0


def train_cnn(x: torch.Tensor, y: torch.Tensor, num_classes: int, arm: ImageArm, s: Settings,
              seed: int) -> SmallCNN:
    """Fixed-budget training: ``s.steps`` steps of ``s.batch_size`` images drawn with replacement.

    The same ``seed`` gives every arm the same initialisation, batch indices and classical draws
    (common random numbers), so paired differences measure the augmentation, not the luck.
    """
    device = torch.device(s.device)
    torch.manual_seed(seed)  # model init and the v2 transforms draw from the global RNG
    model = SmallCNN(x.shape[1], num_classes, s.width).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=s.lr, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=s.steps)
    g = torch.Generator().manual_seed(seed + 1)  # batch indices
    g_cache = torch.Generator().manual_seed(seed + 2)  # which slots take a cached variant
    transform = classical_transform(arm.classical)
    model.train()
    for _ in range(s.steps):
        idx = torch.randint(len(x), (s.batch_size,), generator=g)
        xb, yb = x[idx], y[idx]
        if arm.variants is not None:
            take = torch.rand(len(idx), generator=g_cache) < arm.p
            which = torch.randint(arm.variants.shape[1], (len(idx),), generator=g_cache)
            if take.any():
                xb = xb.clone()
                xb[take] = arm.variants[idx[take], which[take]]
        if arm.online is not None:
            xb = arm.online(xb)  # one batched pipeline call; p and the noise level are per image
        xb = apply_per_image(transform, xb)
        loss = F.cross_entropy(model(xb.to(device)), yb.to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return model.eval()


@torch.inference_mode()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, device: str) -> float:
    correct = 0
    for i in range(0, len(x), 512):
        pred = model(x[i:i + 512].to(device)).argmax(1).cpu()
        correct += int((pred == y[i:i + 512]).sum())
    return correct / len(x)


def probe_accuracy(train_rep: np.ndarray, train_y: np.ndarray, test_rep: np.ndarray, test_y: np.ndarray,
                   c: float, seed: int) -> float:
    from sklearn.linear_model import LogisticRegression

    clf = LogisticRegression(C=c, max_iter=3000, random_state=seed)
    clf.fit(train_rep, train_y)
    return float((clf.predict(test_rep) == test_y).mean())


# ============================================================================== data
def draw_shots(labels: np.ndarray, pool: np.ndarray, shots: int, seed: int) -> np.ndarray:
    """``shots`` images per class from ``pool``: the first ``shots`` of a seeded permutation of each
    class, so draws are nested (the 5-shot set of a seed contains its 1-shot set)."""
    out = []
    for c in np.unique(labels[pool]):
        members = pool[labels[pool] == c]
        perm = np.random.default_rng([seed, int(c)]).permutation(members)
        out.extend(perm[:shots].tolist())
    return np.asarray(sorted(out), dtype=np.int64)


def run_seed(*parts) -> int:
    return int.from_bytes(hashlib.sha256("/".join(map(str, parts)).encode()).digest()[:4], "little") & 0x7FFFFFFF


@dataclass
class DatasetData:
    name: str
    classes: list[str]
    labels: np.ndarray
    images: torch.Tensor  # (N, 1, 32, 32) float in [0, 1]
    pool: np.ndarray
    test: np.ndarray  # evaluated indices (all of the test split unless --max-test)
    test_full: np.ndarray  # the whole held-out split
    source: object


def load_dataset(name: str, max_test: int | None) -> DatasetData:
    src = open_source(name)
    labels = np.asarray(src.labels)
    images = torch.stack([pil_to_tensor(src.load(i), IMAGE_SIZE, 1) for i in range(len(src))])
    pool, test = (np.asarray(a, dtype=np.int64) for a in benchmark_split(src))
    test_eval = test
    if max_test is not None and len(test) > max_test:  # quick mode only: a seeded subset of the test split
        test_eval = np.sort(np.random.default_rng(0).choice(test, size=max_test, replace=False))
    return DatasetData(name, list(src.classes), labels, images, pool, test_eval, test, src)


def split_record(data: dict[str, DatasetData]) -> dict:
    return {
        "split_seed": SPLIT_SEED, "test_fraction": TEST_FRACTION,
        "what": "held-out test images of each benchmark dataset; generative models must be trained on the rest",
        "datasets": {n: {"num_images": len(d.labels), "pool_size": len(d.pool),
                         "test_indices": d.test_full.tolist(),
                         PROVENANCE_KEY: indices_sha256(d.test_full.tolist())} for n, d in data.items()},
    }


# ============================================================================== models and provenance
def _find_key(obj, key: str) -> list:
    found = []
    if isinstance(obj, dict):
        for k, v in obj.items():
            if k == key:
                found.append(v)
            found.extend(_find_key(v, key))
    elif isinstance(obj, list):
        for v in obj:
            found.extend(_find_key(v, key))
    return found


def provenance(pipe: RCGPipeline, spec: str | None, d: DatasetData) -> dict:
    """What the model was trained on, and whether its metadata proves the test split was excluded."""
    if spec is None:
        return {"model": "random tiny pipeline (quick mode, torch seed 0)", "verified": True,
                "statement": "random untrained pipeline: it saw no data (RCG arms exercise the code, not the method)"}
    meta = pipe.config.metadata
    expected = indices_sha256(d.test_full.tolist())
    values = _find_key(meta, PROVENANCE_KEY)
    shas = set()
    for v in values:
        if isinstance(v, str):
            shas.add(v)
        elif isinstance(v, dict):
            shas.update(str(x) for k, x in v.items() if k == d.name)
    trained_on = [{"stage": r.get("stage"), "data": r.get("data"), "num_images": r.get("num_images")}
                  for r in meta.get("training", []) if isinstance(r, dict)]
    out = {"model": spec, "fingerprint": pipe.fingerprint()[:16], "recipe": meta.get("recipe"),
           "trained_on": meta.get("trained_on"), "training_records": trained_on,
           "expected_" + PROVENANCE_KEY: expected}
    said = f" (metadata: trained on {meta['trained_on']})" if meta.get("trained_on") else ""
    saw_all = [r for r in trained_on if r["data"] == d.name and r["num_images"] == len(d.labels)]
    if expected in shas:
        out["verified"] = True
        out["statement"] = (f"model metadata confirms the {len(d.test_full)} test images were excluded "
                            f"({PROVENANCE_KEY} matches){said}")
    elif saw_all:
        out["verified"] = False
        out["statement"] = (f"WARNING: the model was trained on all {len(d.labels)} {d.name} images, so it has "
                            "seen the test split: RCG results are optimistic")
    elif shas:
        out["verified"] = False
        out["statement"] = (f"WARNING: the model records {PROVENANCE_KEY} for a different split: model "
                            "provenance unverified (it may have seen test images)")
    else:
        out["verified"] = False
        out["statement"] = (f"WARNING: model provenance unverified (no {PROVENANCE_KEY} in its metadata){said}; "
                            "train it on the pool (see --train-split-file) to make the comparison clean")
    return out


def load_model(name: str, s: Settings) -> tuple[RCGPipeline, str | None]:
    spec = s.models.get(name, s.models.get("*"))
    if spec is None and s.quick:
        torch.manual_seed(0)
        return RCGPipeline.from_preset("tiny", in_channels=1).to(s.device), None
    spec = spec or DATASETS[name]["default_model"]
    try:
        return RCGPipeline.from_pretrained(spec, device=s.device), spec
    except FileNotFoundError as err:
        raise SystemExit(f"fewshot: no generative model for {name!r}: {err}\n"
                         f"Pass --model {name}=DIR (a pipeline trained on the pool; see --train-split-file), "
                         f"leave {name} out with --datasets, or use --quick.") from None


# ============================================================================== statistics
def t_interval(values) -> dict:
    """Mean and 95% t-interval half-width (nan for fewer than two values)."""
    from scipy import stats

    a = np.asarray(values, dtype=np.float64)
    n = len(a)
    mean = float(a.mean()) if n else math.nan
    if n < 2:
        return {"n": n, "mean": mean, "half_width": math.nan, "low": math.nan, "high": math.nan}
    half = float(stats.t.ppf(0.975, n - 1) * a.std(ddof=1) / math.sqrt(n))
    return {"n": n, "mean": mean, "half_width": half, "low": mean - half, "high": mean + half}


# ============================================================================== tuning
def tune(d: DatasetData, shots: int, s: Settings, reps) -> dict:
    """Pick the classical recipe and the probe's C on validation draws from the pool.

    Each tuning seed (disjoint from the evaluation seeds) draws ``shots`` per class from the pool
    and validates on other pool images; the test split is never read here.
    """
    scores = {c: [] for c in s.classical_candidates}
    probe_scores = {c: [] for c in s.probe_cs}
    want_probe = any(a.startswith("probe") for a in s.arms)
    y_all = torch.as_tensor(d.labels)
    for t in range(s.tune_seeds):
        seed = TUNING_SEED_BASE + t
        train = draw_shots(d.labels, d.pool, shots, seed)
        rest = np.setdiff1d(d.pool, train)
        val = np.sort(np.random.default_rng([seed, 99]).choice(rest, size=min(s.val_size, len(rest)), replace=False))
        rs = run_seed(d.name, shots, "tune", seed)
        for cand in s.classical_candidates:
            model = train_cnn(d.images[train], y_all[train], len(d.classes), ImageArm(classical=cand), s, rs)
            scores[cand].append(accuracy(model, d.images[val], y_all[val], s.device))
        if want_probe:
            tr, va = reps(train), reps(val)
            for c in s.probe_cs:
                probe_scores[c].append(probe_accuracy(tr, d.labels[train], va, d.labels[val], c, rs))
    means = {c: float(np.mean(v)) for c, v in scores.items()}
    best = max(s.classical_candidates, key=lambda c: (means[c], -s.classical_candidates.index(c)))
    out = {"classical": best, "classical_val_accuracy": means, "tune_seeds": s.tune_seeds,
           "val_size": s.val_size}
    if want_probe:
        pmeans = {str(c): float(np.mean(v)) for c, v in probe_scores.items()}
        out["probe_c"] = max(s.probe_cs, key=lambda c: (pmeans[str(c)], -s.probe_cs.index(c)))
        out["probe_val_accuracy"] = pmeans
    return out


# ============================================================================== one dataset
def build_cache(d: DatasetData, union: np.ndarray, pipe: RCGPipeline, s: Settings, seed: int,
                root: Path) -> dict[float, torch.Tensor]:
    """RCG variants of the images in ``union`` at every cache noise level: {level: (N, V, C, H, W)}."""
    out_dir = root / f"{d.name}-seed{seed}"
    build_synthetic(d.source.subset(union.tolist()), out_dir, variants_per_image=s.cache_variants,
                    noise_level=s.cache_noise_levels, pipeline=pipe, batch_size=64, seed=seed,
                    cfg=s.cfg, temperature=s.temperature, num_iter=s.num_iter, rdm_steps=s.rdm_steps,
                    overwrite=True, progress=False)
    ds = SyntheticDataset(out_dir)
    table = ds.hf_dataset
    src_idx = np.asarray(table["source_index"])
    var_idx = np.asarray(table["variant_index"])
    levels = np.asarray(table["noise_level"])
    if len(ds) != len(union) * s.cache_variants * len(s.cache_noise_levels):
        raise RuntimeError(f"cache {out_dir} holds {len(ds)} records, expected "
                           f"{len(union) * s.cache_variants * len(s.cache_noise_levels)}")
    out = {lvl: torch.zeros(len(union), s.cache_variants, 1, IMAGE_SIZE, IMAGE_SIZE) for lvl in s.cache_noise_levels}
    for r in range(len(ds)):
        img, _ = ds[r]
        lvl = min(s.cache_noise_levels, key=lambda v: abs(v - levels[r]))
        out[lvl][src_idx[r], var_idx[r] % s.cache_variants] = pil_to_tensor(img, IMAGE_SIZE, 1)
    return out


def run_dataset(d: DatasetData, pipe: RCGPipeline, s: Settings, cache_root: Path, log) -> dict:
    y_all = torch.as_tensor(d.labels)
    rep_encoder = RepresentationAugment(s.rep_noise, model=pipe, rdm_steps=s.rdm_steps, seed=0)
    rep_cache: dict[int, np.ndarray] = {}

    def reps(indices: np.ndarray) -> np.ndarray:
        todo = [int(i) for i in indices if int(i) not in rep_cache]
        for i in range(0, len(todo), 256):
            chunk = todo[i:i + 256]
            r = rep_encoder.encode_images(d.images[chunk].to(s.device)).cpu().numpy()
            rep_cache.update(zip(chunk, r, strict=True))
        return np.stack([rep_cache[int(i)] for i in indices])

    want_probe = any(a.startswith("probe") for a in s.arms)
    cache_arms = [a for a in s.arms if a.startswith(CACHE_PREFIX)]
    shots_list = s.shots[d.name]
    result = {"shots": {}, "tuning": {}, "test_size": len(d.test), "pool_size": len(d.pool),
              # the settings every RCG arm ran with, the model's defaults filled in
              "generation": pipe.resolve_settings(cfg=s.cfg, temperature=s.temperature, num_iter=s.num_iter,
                                                  rdm_steps=s.rdm_steps).to_dict()}
    t0 = time.perf_counter()
    for k in shots_list:
        result["tuning"][str(k)] = tune(d, k, s, reps)
        log(f"  tuned {d.name} {k}-shot: classical={result['tuning'][str(k)]['classical']}"
            + (f", probe C={result['tuning'][str(k)]['probe_c']}" if want_probe else ""))
    result["tuning_seconds"] = time.perf_counter() - t0
    test_rep = reps(d.test) if want_probe else None
    x_test, y_test = d.images[d.test], y_all[d.test]
    per = {str(k): {a: [] for a in s.arms} for k in shots_list}
    seconds = {a: 0.0 for a in s.arms}
    seconds["cache_build"] = 0.0
    for seed in range(s.seeds):
        union = draw_shots(d.labels, d.pool, max(shots_list), seed)
        cache = None
        if cache_arms:
            t = time.perf_counter()
            cache = build_cache(d, union, pipe, s, run_seed(d.name, "cache", seed), cache_root)
            seconds["cache_build"] += time.perf_counter() - t
        pos = {int(g): p for p, g in enumerate(union)}
        for k in shots_list:
            train = draw_shots(d.labels, d.pool, k, seed)
            x, y = d.images[train], y_all[train]
            tuned = result["tuning"][str(k)]
            rs = run_seed(d.name, k, seed)
            for arm in s.arms:
                t = time.perf_counter()
                if arm == "none":
                    acc = accuracy(train_cnn(x, y, len(d.classes), ImageArm(), s, rs), x_test, y_test, s.device)
                elif arm == "classical":
                    acc = accuracy(train_cnn(x, y, len(d.classes), ImageArm(tuned["classical"]), s, rs),
                                   x_test, y_test, s.device)
                elif arm == "classical+rcg-online":
                    online = RCGAugment(s.online_noise, model=pipe, p=s.rcg_p, cfg=s.cfg, temperature=s.temperature,
                                        num_iter=s.num_iter, rdm_steps=s.rdm_steps, seed=rs)
                    acc = accuracy(train_cnn(x, y, len(d.classes), ImageArm(tuned["classical"], online=online), s, rs),
                                   x_test, y_test, s.device)
                elif arm.startswith(CACHE_PREFIX):
                    level = float(arm[len(CACHE_PREFIX):])
                    lvl = min(s.cache_noise_levels, key=lambda v: abs(v - level))
                    variants = cache[lvl][[pos[int(i)] for i in train]]
                    acc = accuracy(train_cnn(x, y, len(d.classes),
                                             ImageArm(tuned["classical"], variants=variants, p=s.rcg_p), s, rs),
                                   x_test, y_test, s.device)
                elif arm == "probe":
                    acc = probe_accuracy(reps(train), d.labels[train], test_rep, d.labels[d.test],
                                         tuned["probe_c"], rs)
                elif arm == "probe+rep-aug":
                    aug = RepresentationAugment(s.rep_noise, model=pipe, rdm_steps=s.rdm_steps, seed=rs).train()
                    base = torch.as_tensor(reps(train))
                    extra = aug(base.repeat(s.rep_copies, 1).to(s.device)).cpu().numpy()
                    tr = np.concatenate([base.numpy(), extra])
                    ty = np.concatenate([d.labels[train]] * (s.rep_copies + 1))
                    acc = probe_accuracy(tr, ty, test_rep, d.labels[d.test], tuned["probe_c"], rs)
                else:  # pragma: no cover - arms are validated in parse_args
                    raise ValueError(arm)
                seconds[arm] += time.perf_counter() - t
                per[str(k)][arm].append(acc)
        log(f"  {d.name} seed {seed + 1}/{s.seeds} done ({time.perf_counter() - t0:.0f} s): "
            + "; ".join(f"{k}-shot " + " ".join(f"{a}={per[str(k)][a][-1]:.3f}" for a in s.arms) for k in shots_list))
    for k in shots_list:
        cell = {"per_seed": per[str(k)], "summary": {a: t_interval(v) for a, v in per[str(k)].items()}, "paired": {}}
        for arm in s.arms:
            ref = arm_reference(arm)
            if ref is not None and ref in s.arms:
                diff = np.asarray(per[str(k)][arm]) - np.asarray(per[str(k)][ref])
                cell["paired"][arm] = {"reference": ref, **t_interval(diff)}
            if arm == "probe+rep-aug" and "classical" in s.arms:  # also against the CNN baseline
                diff = np.asarray(per[str(k)][arm]) - np.asarray(per[str(k)]["classical"])
                cell["paired"][arm + " vs classical"] = {"reference": "classical", **t_interval(diff)}
        result["shots"][str(k)] = cell
    result["arm_seconds"] = seconds
    result["seconds"] = time.perf_counter() - t0
    return result


# ============================================================================== reporting
def pct(x: float) -> str:
    return "nan" if not math.isfinite(x) else f"{100 * x:.1f}"


def markdown(report: dict) -> str:
    s = report["settings"]
    lines = [f"# Few-shot benchmark ({'quick' if s['quick'] else 'full'} mode)", "",
             f"{report['date']} · {report['machine']['summary']} · wall time {report['wall_seconds']:.0f} s · "
             f"rcg-augment {report['versions']['rcg_augment']}", "",
             f"Classifier: SmallCNN (width {s['width']}), {s['steps']} steps x batch {s['batch_size']}, AdamW "
             f"lr {s['lr']} cosine, same for every image arm. {s['seeds']} seeds per cell (shot draws); "
             f"mean test accuracy (%) ± 95% t-interval half-width. RCG: p={s['rcg_p']}, online noise "
             f"{s['online_noise']}, cache {s['cache_variants']} variants/image/level, num_iter={s['num_iter']}, "
             f"rdm_steps={s['rdm_steps']}; RepresentationAugment noise {s['rep_noise']}, {s['rep_copies']} copies.", ""]
    for name, r in report["datasets"].items():
        shots = list(r["shots"])
        lines += [f"## {name}", "",
                  f"Test split: {r['test_size']} images (held out; seed {SPLIT_SEED}, {TEST_FRACTION:.0%} per class); "
                  f"pool: {r['pool_size']} images.", "",
                  f"Generative model: {r['provenance']['model']}. **{r['provenance']['statement']}**", ""]
        tuned = ", ".join(f"{k}-shot: {r['tuning'][k]['classical']}" for k in shots)
        lines += [f"Classical recipe chosen on pool validation draws: {tuned}.", ""]
        lines += ["| arm | " + " | ".join(f"{k} shot{'s' if k != '1' else ''}" for k in shots) + " |",
                  "|---|" + "---|" * len(shots)]
        for arm in s["arms"]:
            cells = []
            for k in shots:
                m = r["shots"][k]["summary"][arm]
                cells.append(f"{pct(m['mean'])} ± {pct(m['half_width'])}")
            lines.append(f"| {arm_label(arm)} | " + " | ".join(cells) + " |")
        paired = [a for a in r["shots"][shots[0]]["paired"]]
        if paired:
            lines += ["", "Paired differences (percentage points, same seeds), mean [95% CI]:", "",
                      "| arm − reference | " + " | ".join(f"{k} shot{'s' if k != '1' else ''}" for k in shots) + " |",
                      "|---|" + "---|" * len(shots)]
            for a in paired:
                ref = r["shots"][shots[0]]["paired"][a]["reference"]
                base = a.split(" vs ")[0]
                cells = []
                for k in shots:
                    p = r["shots"][k]["paired"][a]
                    cells.append(f"{100 * p['mean']:+.1f} [{pct(p['low'])}, {pct(p['high'])}]")
                lines.append(f"| {arm_label(base)} − {arm_label(ref).split(' ')[0]} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(report["datasets"])
    fig, axes = plt.subplots(1, len(names), figsize=(6 * len(names), 4.5), squeeze=False)
    for ax, name in zip(axes[0], names, strict=True):
        r = report["datasets"][name]
        shots = [int(k) for k in r["shots"]]
        for arm in report["settings"]["arms"]:
            m = np.array([r["shots"][str(k)]["summary"][arm]["mean"] for k in shots]) * 100
            h = np.nan_to_num(np.array([r["shots"][str(k)]["summary"][arm]["half_width"] for k in shots]) * 100)
            style = "--" if arm.startswith("probe") else "-"
            line, = ax.plot(shots, m, style, marker="o", label=arm_label(arm))
            ax.fill_between(shots, m - h, m + h, color=line.get_color(), alpha=0.15)
        if len(shots) > 1:
            ax.set_xscale("log")
        ax.set_xticks(shots, [str(k) for k in shots])
        ax.minorticks_off()
        ax.set_xlabel("shots per class")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(f"{name} ({r['test_size']} test images)")
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7, loc="lower right")
    fig.suptitle(f"Few-shot accuracy, mean ± 95% CI over {report['settings']['seeds']} seeds")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ============================================================================== command line
def _int_list(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def parse_args(argv=None) -> tuple[argparse.Namespace, Settings]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="seconds: 2 seeds, one shot count, tiny budgets, "
                   "a random tiny pipeline unless --model is given (for CI)")
    p.add_argument("--model", action="append", default=[], metavar="[DATASET=]DIR",
                   help="a pipeline trained on the pool (directory or named model); DATASET=DIR for one dataset. "
                        "Default: digits-tiny for digits, faces-tiny for lfw-faces (fine-tuned on the whole "
                        "unlabelled lfw pool, faces and non-faces)")
    p.add_argument("--datasets", default=",".join(DATASETS), help="comma-separated, from " + ", ".join(DATASETS))
    p.add_argument("--shots", action="append", default=[], metavar="[DATASET=]K,K",
                   help="shot counts per class (default digits=1,5,10 lfw-faces=2,5,10)")
    p.add_argument("--seeds", type=int, help="evaluation seeds (shot draws) per cell (default 10; quick 2)")
    p.add_argument("--tune-seeds", type=int, help="tuning draws per shot count (default 3; quick 1)")
    p.add_argument("--arms", help="comma-separated subset of: " + ", ".join(all_arms([0.0, 0.3, 0.6])))
    p.add_argument("--steps", type=int, help="classifier steps (default 150; quick 8)")
    p.add_argument("--batch-size", type=int, help="classifier batch (default 32; quick 16)")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--width", type=int, default=16, help="SmallCNN base width")
    p.add_argument("--p", dest="rcg_p", type=float, default=0.5, help="probability an image is replaced by an RCG variant")
    p.add_argument("--online-noise", type=float, default=0.3, help="noise_level of the online RCGAugment arm")
    p.add_argument("--cache-noise-levels", default="0.0,0.3,0.6", help="one cache arm per level")
    p.add_argument("--cache-variants", type=int, help="variants per image and level (default 4; quick 1)")
    p.add_argument("--rep-noise", type=float, default=0.3, help="noise_level of RepresentationAugment")
    p.add_argument("--rep-copies", type=int, help="augmented copies of each training rep (default 10; quick 2)")
    p.add_argument("--num-iter", type=int, help="MAGE decoding steps (default: the model's; quick 2)")
    p.add_argument("--rdm-steps", type=int, help="RDM DDIM steps (default: the model's; quick 5)")
    p.add_argument("--cfg", type=float, help="MAGE guidance scale (default: the model's)")
    p.add_argument("--temperature", type=float, help="MAGE temperature (default: the model's)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: the CNN's kernels are tiny, and on a shared box more "
                        "threads spin against each other; measured 8x slower with 2 threads at load 10 on 2 cores)")
    p.add_argument("--out-dir", type=Path, default=RESULTS, help="where fewshot[_quick].{md,json,png} go")
    p.add_argument("--cache-dir", type=Path, help="keep the synthetic caches here (default: a temp dir)")
    p.add_argument("--train-split-file", type=Path,
                   help="write the held-out test indices per dataset (JSON) for the model recipe to exclude")
    p.add_argument("--split-only", action="store_true", help="write --train-split-file and exit")
    args = p.parse_args(argv)
    q = args.quick

    names = [n.strip() for n in args.datasets.split(",") if n.strip()]
    for n in names:
        if n not in DATASETS:
            p.error(f"--datasets: unknown dataset {n!r}; choose from {', '.join(DATASETS)}")
    shots = {n: ([DATASETS[n]["shots"][0]] if q else list(DATASETS[n]["shots"])) for n in names}
    for item in args.shots:
        target, _, values = item.rpartition("=")
        try:
            ks = _int_list(values)
        except ValueError:
            p.error(f"--shots {item!r}: expected [DATASET=]K,K,... with integers")
        if not ks or min(ks) < 1:
            p.error(f"--shots {item!r}: shot counts must be integers >= 1")
        for n in ([target] if target else names):
            if n not in shots:
                p.error(f"--shots {item!r}: {n!r} is not among --datasets ({', '.join(names)})")
            shots[n] = sorted(set(ks))
    models = {}
    for item in args.model:
        target, sep, value = item.partition("=")
        if sep and target in DATASETS:
            models[target] = value
        else:
            models["*"] = item
    levels = [float(v) for v in args.cache_noise_levels.split(",") if v.strip()]
    if any(not 0.0 <= v <= 1.0 for v in levels) or len(set(levels)) != len(levels):
        p.error(f"--cache-noise-levels must be distinct values in [0, 1], got {args.cache_noise_levels}")
    arms = all_arms(levels)
    if args.arms:
        chosen = [a.strip() for a in args.arms.split(",") if a.strip()]
        bad = [a for a in chosen if a not in arms]
        if bad:
            p.error(f"--arms: unknown {bad}; choose from {arms}")
        arms = [a for a in arms if a in chosen]

    def pick(value, full, quick):
        return value if value is not None else (quick if q else full)

    s = Settings(
        quick=q, datasets=names, shots=shots, seeds=pick(args.seeds, 10, 2), tune_seeds=pick(args.tune_seeds, 3, 1),
        steps=pick(args.steps, 150, 8), batch_size=pick(args.batch_size, 32, 16), lr=args.lr, width=args.width,
        val_size=100 if q else 300, max_test=150 if q else None, rcg_p=args.rcg_p, online_noise=args.online_noise,
        cache_noise_levels=levels, cache_variants=pick(args.cache_variants, 4, 1), rep_noise=args.rep_noise,
        rep_copies=pick(args.rep_copies, 10, 2), num_iter=pick(args.num_iter, None, 2),
        rdm_steps=pick(args.rdm_steps, None, 5), cfg=args.cfg, temperature=args.temperature,
        probe_cs=[0.1, 1.0, 10.0], classical_candidates=list(CLASSICAL_CANDIDATES), arms=arms,
        device=args.device, models=models,
    )
    if args.threads < 1:
        p.error(f"--threads must be >= 1, got {args.threads}")
    if s.seeds < 2:
        p.error(f"--seeds must be >= 2 for a confidence interval, got {s.seeds}")
    if s.tune_seeds < 1 or s.steps < 1 or s.batch_size < 1 or s.cache_variants < 1 or s.rep_copies < 1:
        p.error("--tune-seeds, --steps, --batch-size, --cache-variants and --rep-copies must be >= 1")
    if not 0.0 <= s.rcg_p <= 1.0:
        p.error(f"--p must be in [0, 1], got {s.rcg_p}")
    if args.split_only and not args.train_split_file:
        p.error("--split-only needs --train-split-file PATH")
    return args, s


def merge_reports(paths: list[Path], out_dir: Path) -> int:
    """One report from the datasets of several result JSONs (e.g. one run per dataset)."""
    reports = [json.loads(Path(p).read_text()) for p in paths]
    merged = dict(reports[0], datasets={}, runs=[])
    for path, r in zip(paths, reports, strict=True):
        if r["settings"]["quick"] != merged["settings"]["quick"]:
            raise SystemExit(f"{path}: cannot merge quick and full results")
        for name, d in r["datasets"].items():
            merged["datasets"][name] = d  # a later file wins
        merged["runs"].append({"file": str(path), "date": r["date"], "command": r["command"],
                               "datasets": sorted(r["datasets"]), "wall_seconds": r.get("wall_seconds")})
    merged["wall_seconds"] = sum(run["wall_seconds"] or 0.0 for run in merged["runs"])
    merged["command"] = " ; ".join(run["command"] for run in merged["runs"])
    stem = "fewshot_quick" if merged["settings"]["quick"] else "fewshot"
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{stem}.json").write_text(json.dumps(merged, indent=1) + "\n")
    md = markdown(merged)
    (out_dir / f"{stem}.md").write_text(md + "\n")
    plot(merged, out_dir / f"{stem}.png")
    print(md)
    return 0


def main(argv=None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if argv is None:
        argv = sys.argv[1:]
    if argv and argv[0] == "merge":
        ap = argparse.ArgumentParser(prog="fewshot.py merge", description=merge_reports.__doc__)
        ap.add_argument("reports", nargs="+", type=Path, help="result JSONs, e.g. one per dataset")
        ap.add_argument("--out-dir", type=Path, default=RESULTS)
        a = ap.parse_args(argv[1:])
        return merge_reports(a.reports, a.out_dir)
    args, s = parse_args(argv)
    t_start = time.perf_counter()
    torch.set_num_threads(args.threads)
    with contextlib.suppress(ValueError):  # not in the main thread: keep the default handler
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwind, so the temporary caches are removed

    def log(msg: str) -> None:
        print(msg, flush=True)

    data = {n: load_dataset(n, s.max_test) for n in s.datasets}
    if args.train_split_file:
        args.train_split_file.parent.mkdir(parents=True, exist_ok=True)
        args.train_split_file.write_text(json.dumps(split_record(data), indent=1) + "\n")
        log(f"wrote the held-out test indices to {args.train_split_file}")
        if args.split_only:
            return 0

    report = {"date": utc_now(), "machine": machine(), "settings": asdict(s), "command": " ".join(sys.argv),
              "versions": versions("torchvision", "numpy", "sklearn", "scipy", "matplotlib"), "datasets": {}}
    stem = "fewshot_quick" if s.quick else "fewshot"
    args.out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path, png_path = (args.out_dir / f"{stem}.{ext}" for ext in ("json", "md", "png"))
    with tempfile.TemporaryDirectory(prefix="rcg-fewshot-") as tmp:
        cache_root = args.cache_dir or Path(tmp)
        for name, d in data.items():
            pipe, spec = load_model(name, s)
            prov = provenance(pipe, spec, d)
            log(f"{name}: {len(d.pool)} pool / {len(d.test_full)} test images "
                f"({len(d.test)} evaluated); shots {s.shots[name]}; {s.seeds} seeds")
            log(f"  generative model: {prov['model']}")
            log(f"  {prov['statement']}")
            r = run_dataset(d, pipe, s, cache_root, log)
            r["provenance"] = prov
            report["datasets"][name] = r
            report["wall_seconds"] = time.perf_counter() - t_start
            json_path.write_text(json.dumps(report, indent=1) + "\n")  # partial results survive a kill
    report["wall_seconds"] = time.perf_counter() - t_start
    json_path.write_text(json.dumps(report, indent=1) + "\n")
    md = markdown(report)
    md_path.write_text(md + "\n")
    plot(report, png_path)
    print(md)
    log(f"wrote {json_path}, {md_path}, {png_path} in {report['wall_seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
