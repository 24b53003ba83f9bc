"""Few-shot classification: what RCG augmentation buys over a tuned classical recipe.

Datasets (offline): sklearn digits (10 classes; 1, 2, 5, 10 shots per class) and skimage's
``lfw_subset`` faces vs non-faces (2 classes; 1, 2, 5 shots per class), via
``rcg_augment.data.open_source``. Each is split once by ``rcg_augment.data.splits`` into a
held-out TEST split (a seeded, stratified 30%) and a POOL; shots are drawn from the pool, every
tuned setting is chosen on validation draws from the pool, and the generative model must have
been trained on the pool only (the script checks the model's metadata and says so).
``fashion-mnist`` (when named; the Debian package dataset-fashion-mnist): pool = its 60,000 train
images, test = its test split (cap it with --max-test). ``fashion-novel`` (or --regime novel):
5-way among Pullover, Dress, Shirt, Sneaker, Ankle boot, shots from their train images, retrieval
from the train images of the five base classes only, with a model whose metadata says it was
trained on the base classes only (fashion-base-tiny; any other is refused).

Arms (same classifier, steps and batch size for every image arm):
  (a) none            small CNN, no augmentation
  (b) classical       the classical recipe chosen on validation draws from the pool
  (c) +rcg            (b) + cached RCG variants, every RCG setting chosen on the same validation
                      draws from a declared grid: the mix probability p (0 included: "no RCG"),
                      noise_level, repaint_fraction, the label filter on/off, variants per image
  (d) +rcg-default    (b) + cached RCG variants at the library's defaults, untuned (p 0.5,
                      noise_level 0.3, the model's repaint_fraction, no filter, 4 variants)
  (e) probe           logistic regression on the frozen encoder's representations
  (f) probe+rep-aug   (e) + RepresentationAugment copies of the training representations
  (g) +rcg-online     (b) + RCGAugment on every batch at (h)'s p, noise_level and repaint_fraction
                      (no filter); ~30 min per dataset, so not in the default arms
  (h) +rcg-on         (b) + cached RCG variants at the grid point with p > 0 that validated best
                      (what a user who always uses RCG gets; (c) may fall back to p = 0)
  Real-data arms (the unlabelled pool at hand; the search never returns a shot, a validation
  image or a test image), each tuned on the same validation draws, with and without (b)'s recipe:
  (i)/(j) retrieval          the shots + the K nearest pool images per shot in the model's encoder
                             space, labelled by their shot (K, their loss weight tuned)
  (k)/(l) pseudo-label       pool images labelled by the nearest class prototype (mean shot
                             representation), the most confident share of each class kept
                             (confidence: cosine margin to the second prototype; share, weight tuned)
  (m)/(n) retrieval+rcg      (i)/(j) + RCG images: variants of the shots, of the retrieved images,
                             both, or renders of shot-neighbour interpolations; their loss weight and
                             a novelty filter tuned (the complementarity options; see GenConfig)
  (o) retrieval+classical+rcg-mix  (j) with (c)'s cached variants swapped in for the shots at (c)'s
                             p: generation as an augmentation beside retrieval, no tuning of its own
                             (needs the arms retrieval+classical and classical+rcg)
  The report gives every arm's gain over the best arm without generation (chosen on the tuning
  draws), paired over the same draws.

Every cell runs >= 10 seeds (different shot draws) in full mode; the report gives the mean with a
95% t-interval, the paired difference of each RCG arm against its reference (same seeds), and the
cost of each arm in seconds per classifier (generation included).

Usage:
    python benchmarks/fewshot.py --quick                       # seconds, random tiny model; writes runs/fewshot/
    python benchmarks/fewshot.py --datasets digits --out-dir runs/fs-digits
    python benchmarks/fewshot.py --datasets fashion-mnist --model fashion-mnist=fashion-tiny --max-test 2000
    python benchmarks/fewshot.py --regime novel --max-test 2000    # benchmarks/models/fashion-base-tiny
    python benchmarks/fewshot.py --train-split-file split.json --split-only
    python benchmarks/fewshot.py --datasets digits --seeds 3 --arms none,classical,probe,probe+rep-aug
    python benchmarks/fewshot.py merge runs/a/fewshot.json runs/b/fewshot.json   # one report from per-dataset runs
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from _common import machine, utc_now, versions
from torch import nn
from torchvision.transforms import v2

from rcg_augment import RCGAugment, RCGPipeline, RepresentationAugment
from rcg_augment.data import open_source, pil_to_tensor
from rcg_augment.data.splits import SPLIT_SEED, TEST_FRACTION, benchmark_split, indices_sha256
from rcg_augment.label_filter import PrototypeFilter
from rcg_augment.settings import DEFAULT_NOISE_LEVEL, GenerationSettings

logger = logging.getLogger("fewshot")

RESULTS = Path(__file__).parent / "results"
IMAGE_SIZE = 32  # the classifier's (and the tiny models') resolution
PROVENANCE_KEY = "excluded_test_indices_sha256"
TUNING_SEED_BASE = 10_000  # tuning draws use seeds disjoint from the evaluation seeds

DATASETS = {
    "digits": {"shots": (1, 2, 5, 10), "default_model": "digits-tiny"},
    "lfw-faces": {"shots": (1, 2, 5), "default_model": "faces-tiny"},
    # Fashion-MNIST (the Debian package dataset-fashion-mnist): pool = its train split, test = its
    # test split. Not run by default: it needs the files and a Fashion model.
    "fashion-mnist": {"shots": (1, 2, 5, 10, 20), "default_model": "fashion-tiny"},
    # The novel-class regime (--regime novel): 5-way among classes the model never saw. Its model
    # is kept beside the benchmarks, not in the package (benchmarks/models/).
    "fashion-novel": {"shots": (1, 2, 5), "default_model": str(Path(__file__).parent / "models" / "fashion-base-tiny")},
}
DEFAULT_DATASETS = ("digits", "lfw-faces")
DEFAULT_OUT = Path("runs") / "fewshot"  # relative to the working directory; runs/ is gitignored
NOVEL_ARMS = ("none", "classical", "retrieval", "retrieval+classical", "classical+rcg", "retrieval+rcg",
              "retrieval+rcg+classical")

# Arm ids, their labels, and which arm an RCG arm is compared with (same seeds).
ARM_LABELS = {
    "none": "(a) none",
    "classical": "(b) classical (tuned)",
    "classical+rcg": "(c) (b) + RCG cache, tuned",
    "classical+rcg-default": "(d) (b) + RCG cache, library defaults",
    "probe": "(e) linear probe",
    "probe+rep-aug": "(f) (e) + RepresentationAugment",
    "classical+rcg-online": "(g) (b) + RCGAugment online, (h)'s setting",
    "classical+rcg-on": "(h) (b) + RCG cache, best setting with p > 0",
    "retrieval": "(i) retrieval: shots + K nearest pool images",
    "retrieval+classical": "(j) (i) + classical",
    "pseudo-label": "(k) pseudo-label: prototype-labelled pool share",
    "pseudo-label+classical": "(l) (k) + classical",
    "retrieval+rcg": "(m) (i) + RCG images",
    "retrieval+rcg+classical": "(n) (j) + RCG images",
    "retrieval+classical+rcg-mix": "(o) (j) + (c)'s RCG cache on the shots",
}
ALL_ARMS = list(ARM_LABELS)
DEFAULT_ARMS = [a for a in ALL_ARMS if a != "classical+rcg-online"]  # the online arm costs ~30 min per dataset
RCG_ARMS = ("classical+rcg", "classical+rcg-default", "classical+rcg-online", "classical+rcg-on")


def arm_label(arm: str) -> str:
    return ARM_LABELS[arm]


def arm_reference(arm: str) -> str | None:
    if arm in RCG_ARMS:
        return "classical"
    if arm in ("retrieval+rcg", "retrieval+rcg+classical"):
        return arm.replace("retrieval+rcg", "retrieval")  # what generation adds to retrieval (the issue's goal)
    if arm == "retrieval+classical+rcg-mix":
        return "retrieval+classical"
    if arm in ("retrieval", "pseudo-label"):
        return "none"
    if arm in ("retrieval+classical", "pseudo-label+classical"):
        return "classical"
    if arm == "probe+rep-aug":
        return "probe"
    return None


# ============================================================================== settings
@dataclass(frozen=True)
class RCGConfig:
    """One point of the RCG tuning grid: how a cached-variant arm augments.

    ``p`` = 0 is the classical recipe alone (the other fields are then unused)."""

    p: float
    noise_level: float = 0.0
    repaint_fraction: float = 1.0
    label_filter: bool = False
    variants: int = 0

    def key(self) -> str:
        if self.p == 0:
            return "p=0 (classical alone)"
        return (f"p={self.p:g} noise={self.noise_level:g} repaint={self.repaint_fraction:g} "
                f"filter={'on' if self.label_filter else 'off'} variants={self.variants}")

    @property
    def pair(self) -> tuple[float, float]:
        return (self.noise_level, self.repaint_fraction)


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
    grid_p: list[float]
    grid_noise: list[float]
    grid_repaint: list[float]
    grid_filter: list[bool]
    grid_variants: list[int]
    default_p: float
    default_variants: int
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
    tuning_from: str | None = None
    # after the fields every earlier report has, so Settings(**old_report["settings"]) still loads
    token_temperature: float | None = None
    # the real-data arms (issue 31); earlier reports lack them and load with these defaults
    grid_k: list[int] = field(default_factory=lambda: [4, 8, 16])
    grid_weight: list[float] = field(default_factory=lambda: [0.5, 1.0])
    grid_share: list[float] = field(default_factory=lambda: [0.1, 0.25, 0.5])
    grid_gen_source: list[str] = field(default_factory=lambda: list(GEN_SOURCES))
    grid_gen_weight: list[float] = field(default_factory=lambda: [0.25, 1.0])
    grid_novelty: list[bool] = field(default_factory=lambda: [False, True])
    rr_noise: float = 0.6
    rr_shot_variants: int = 8
    rr_retrieved_variants: int = 1
    rr_interp: int = 8
    pool_cache: str | None = None
    regime: str = "standard"
    first_seed: int = 0  # evaluation draws first_seed .. first_seed + seeds - 1 (fresh draws for a replication)

    def real_grid(self, kind: str) -> list[RealConfig]:
        if kind == "retrieval":
            return [RealConfig("retrieval", k=k, weight=w) for k in self.grid_k for w in self.grid_weight]
        return [RealConfig("pseudo-label", share=sh, weight=w) for sh in self.grid_share for w in self.grid_weight]

    def gen_grid(self) -> list[GenConfig]:
        return [GenConfig(src, w, nov) for src in self.grid_gen_source for w in self.grid_gen_weight
                for nov in self.grid_novelty]

    @property
    def generation(self) -> dict:
        """The generator overrides every RCG arm runs with (unset ones: the model's defaults)."""
        return GenerationSettings(cfg=self.cfg, temperature=self.temperature, num_iter=self.num_iter,
                                  rdm_steps=self.rdm_steps, token_temperature=self.token_temperature).overrides()

    def grid(self) -> list[RCGConfig]:
        """The declared RCG grid, p = 0 first: on a tie the earlier (simpler, cheaper) point wins."""
        points = [RCGConfig(0.0)]
        for p in self.grid_p:
            for noise in self.grid_noise:
                for repaint in self.grid_repaint:
                    for filt in self.grid_filter:
                        for v in self.grid_variants:
                            points.append(RCGConfig(p, noise, repaint, filt, v))
        return points

    @property
    def candidates(self) -> int:
        """Variants generated per source image and (noise, repaint) pair; arms use a prefix."""
        return max([*self.grid_variants, self.default_variants])


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
    """How a CNN run augments: a classical recipe, plus RCG online or from cached variants."""

    classical: str = "none"
    online: RCGAugment | None = None
    variants: torch.Tensor | None = None  # (N, V, C, H, W): cached variants of each training image
    counts: torch.Tensor | None = None  # (N,): usable variants per image (a filter may keep < V; 0 = none)
    p: float = 0.0
    # Extra labelled images trained beside the shots (retrieved, pseudo-labelled or generated),
    # each with a loss weight relative to a shot's 1 (see train_cnn).
    extra_x: torch.Tensor | None = None  # (E, C, H, W)
    extra_y: torch.Tensor | None = None  # (E,)
    extra_w: torch.Tensor | None = None  # (E,) > 0


def train_cnn(x: torch.Tensor, y: torch.Tensor, num_classes: int, arm: ImageArm, s: Settings,
              seed: int) -> SmallCNN:
    """Fixed-budget training: ``s.steps`` steps of ``s.batch_size`` images drawn with replacement.

    The same ``seed`` gives every arm the same initialisation, batch indices and classical draws
    (common random numbers), so paired differences measure the augmentation, not the luck; an arm
    with p = 0 trains exactly as the classical recipe alone.
    """
    device = torch.device(s.device)
    torch.manual_seed(seed)  # model init and the v2 transforms draw from the global RNG
    model = SmallCNN(x.shape[1], num_classes, s.width).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=s.lr, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=s.steps)
    g = torch.Generator().manual_seed(seed + 1)  # batch indices
    g_cache = torch.Generator().manual_seed(seed + 2)  # which slots take a cached variant, and which one
    transform = classical_transform(arm.classical)
    counts = None
    if arm.variants is not None:
        counts = arm.counts if arm.counts is not None else torch.full((len(x),), arm.variants.shape[1])
    n_shots = len(x)
    weights = None
    if arm.extra_x is not None and len(arm.extra_x):
        # Shots and extra images in one training set; an image's loss weight is applied as its
        # probability of being drawn (the same expected loss as weighting each term, with less
        # variance than drawing uniformly and scaling).
        x, y = torch.cat([x, arm.extra_x]), torch.cat([y, arm.extra_y])
        weights = torch.cat([torch.ones(n_shots), arm.extra_w.float()])
    model.train()
    for _ in range(s.steps):
        if weights is None:
            idx = torch.randint(len(x), (s.batch_size,), generator=g)
        else:
            idx = torch.multinomial(weights, s.batch_size, replacement=True, generator=g)
        xb, yb = x[idx], y[idx]
        if counts is not None:
            shot = idx < n_shots  # cached variants replace shots only
            cidx = idx.clamp(max=n_shots - 1)
            take = (torch.rand(len(idx), generator=g_cache) < arm.p) & (counts[cidx] > 0) & shot
            which = (torch.rand(len(idx), generator=g_cache) * counts[cidx]).long()
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
    labels: np.ndarray  # class of each image (-1: an image of no class of this task, e.g. a base class)
    images: torch.Tensor  # (N, 1, 32, 32) float in [0, 1]
    pool: np.ndarray  # where shots and validation images are drawn from (labelled side)
    test: np.ndarray  # evaluated indices (all of the test split unless --max-test)
    test_full: np.ndarray  # the whole held-out split
    source: object
    # The unlabelled pool the real-data arms retrieve from and pseudo-label: row r of
    # ``pool_source`` is image ``retrieval_pool[r]``. The pool itself unless the regime says otherwise.
    retrieval_pool: np.ndarray | None = None
    pool_source: object = None
    regime: str = "standard"

    def __post_init__(self):
        if self.retrieval_pool is None:
            self.retrieval_pool = self.pool
        if self.pool_source is None and self.source is not None:
            self.pool_source = self.source.subset(self.retrieval_pool.tolist())
        self.retrieval_pool = np.asarray(self.retrieval_pool, dtype=np.int64)
        # The pool never holds a test image (the real-data arms rely on it; checked once here).
        if np.intersect1d(self.retrieval_pool, self.test_full).size:
            raise ValueError(f"{self.name}: the retrieval pool holds test images")


# Fashion-MNIST's novel-class regime (issue 31): 5-way among classes the base model never saw,
# retrieval from the train images of the other five only.
FASHION_BASE = (0, 1, 4, 5, 8)  # T-shirt/top, Trouser, Coat, Sandal, Bag
FASHION_NOVEL = (2, 3, 6, 7, 9)  # Pullover, Dress, Shirt, Sneaker, Ankle boot


def _tensors(src, indices=None) -> torch.Tensor:
    order = range(len(src)) if indices is None else indices
    return torch.stack([pil_to_tensor(src.load(int(i)), IMAGE_SIZE, 1) for i in order])


def _capped(test: np.ndarray, max_test: int | None) -> np.ndarray:
    if max_test is not None and len(test) > max_test:  # a seeded subset of the test split
        return np.sort(np.random.default_rng(0).choice(test, size=max_test, replace=False))
    return test


def load_dataset(name: str, max_test: int | None) -> DatasetData:
    if name in ("fashion-mnist", "fashion-novel"):
        return load_fashion(name, max_test)
    src = open_source(name)
    labels = np.asarray(src.labels)
    images = _tensors(src)
    pool, test = (np.asarray(a, dtype=np.int64) for a in benchmark_split(src))
    return DatasetData(name, list(src.classes), labels, images, pool, _capped(test, max_test), test, src)


def load_fashion(name: str, max_test: int | None) -> DatasetData:
    """Fashion-MNIST: images 0..59,999 are its train split (pool), then its 10,000 test images.

    ``fashion-novel``: shots from the train images of the five novel classes (labels 0-4 in
    FASHION_NOVEL order), test on their test images, retrieval from the train images of the five
    base classes only."""
    train, test_src = open_source("fashion-mnist", split="train"), open_source("fashion-mnist", split="test")
    n = len(train)
    labels = np.concatenate([np.asarray(train.labels), np.asarray(test_src.labels)])
    images = torch.cat([_tensors(train), _tensors(test_src)])
    test = np.arange(n, n + len(test_src), dtype=np.int64)
    pool = np.arange(n, dtype=np.int64)
    if name == "fashion-mnist":
        return DatasetData(name, list(train.classes), labels, images, pool, _capped(test, max_test), test, train,
                           retrieval_pool=pool, pool_source=train)
    remap = np.full(len(train.classes), -1)
    remap[list(FASHION_NOVEL)] = np.arange(len(FASHION_NOVEL))
    task = remap[labels]
    base = pool[np.isin(labels[pool], FASHION_BASE)]
    novel_train = pool[task[pool] >= 0]
    novel_test = test[task[test] >= 0]
    return DatasetData(name, [train.classes[c] for c in FASHION_NOVEL], task, images, novel_train,
                       _capped(novel_test, max_test), novel_test, train, retrieval_pool=base,
                       pool_source=train.subset(base.tolist()), regime="novel")


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
    if d.name.startswith("fashion"):
        return fashion_provenance(pipe, spec, d)
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


def _classes_named(text: str) -> list[str] | None:
    import ast
    import re

    m = re.search(r"classes (\[[^\]]*\])", text)
    if m is None:
        return None
    try:
        return [str(c) for c in ast.literal_eval(m.group(1))]
    except (ValueError, SyntaxError):
        return None


def check_base_only(meta: dict, spec: str) -> str:
    """The novel-class regime's precondition: every Fashion-MNIST training record of the model (and
    its top-level ``trained_on``, if it speaks of Fashion-MNIST) names exactly the five base
    classes. Returns the statement; raises SystemExit otherwise (the benchmark would be unfair)."""
    from rcg_augment.data.fashion_mnist import CLASSES

    base = sorted(CLASSES[c] for c in FASHION_BASE)
    records = [r for r in meta.get("training", []) if isinstance(r, dict) and "fashion" in str(r.get("data", ""))]
    texts = [str(r.get("trained_on", "")) for r in records]
    top = meta.get("trained_on")
    if top and "fashion" in str(top).lower():
        texts.append(str(top))
    problem = None
    if not records:
        problem = "its metadata records no training on Fashion-MNIST base classes"
    for text, r in zip(texts, [*records, None], strict=False):
        named = (list(r["classes"]) if r is not None and r.get("classes") else None) or _classes_named(text)
        if named is None:
            problem = f"a training record names no classes ({text[:100]!r}): it may have seen every class"
        elif sorted(named) != base:
            problem = f"it was trained on the classes {named}, not exactly the base classes {base}"
    if problem:
        raise SystemExit(f"fewshot: the novel-class regime needs a model trained on the Fashion-MNIST base classes "
                         f"only; {spec}: {problem}. Use fashion-base-tiny (rcg-augment train all --recipe "
                         "fashion-base-tiny).")
    return f"model metadata: every Fashion-MNIST stage trained on the base classes {base} only (train split)"


def fashion_provenance(pipe: RCGPipeline, spec: str, d: DatasetData) -> dict:
    """Fashion-MNIST's test split is its own file: a model is clean if every Fashion training
    record read the train split (the novel regime also checks the classes, check_base_only)."""
    meta = pipe.config.metadata
    records = [r for r in meta.get("training", []) if isinstance(r, dict) and "fashion" in str(r.get("data", ""))]
    out = {"model": spec, "fingerprint": pipe.fingerprint()[:16], "recipe": meta.get("recipe"),
           "trained_on": meta.get("trained_on") or [r.get("trained_on") for r in records][-1:],
           "training_records": [{"stage": r.get("stage"), "data": r.get("data"), "num_images": r.get("num_images")}
                                for r in records]}
    if records and all("split train" in str(r.get("data")) for r in records):
        out["verified"] = True
        out["statement"] = (f"model metadata: all {len(records)} Fashion-MNIST training records read the train split "
                            f"only; the {len(d.test_full)} test images were never seen")
    else:
        out["verified"] = False
        out["statement"] = ("WARNING: model provenance unverified (no Fashion-MNIST training record, or one that did "
                            "not read the train split only)")
    if d.regime == "novel":
        out["base_classes_only"] = check_base_only(meta, spec)
        out["statement"] += "; " + out["base_classes_only"]
    return out


def applicable_arms(d: DatasetData, arms: list[str]) -> list[str]:
    """The arms that make sense on ``d``: the novel regime's pool holds no image of the task's
    classes, so it has no pseudo-label arm."""
    if d.regime == "novel":
        return [a for a in arms if not a.startswith("pseudo-label")]
    return list(arms)


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


# ============================================================================== RCG variants
@dataclass
class Candidates:
    """RCG variants of a set of source images at one (noise_level, repaint_fraction) pair."""

    images: torch.Tensor  # (U, M, C, H, W) in [0, 1], rounded to 8 bits as a cache stores them
    reps: torch.Tensor  # (U, M, rep_dim): each variant re-encoded (what the label filter checks)
    seconds_per_variant: float  # generation, one image
    encode_seconds_per_variant: float  # re-encoding, one image (paid only with the filter)


def generate_candidates(pipe: RCGPipeline, images: torch.Tensor, pair: tuple[float, float], count: int,
                        seed: int, s: Settings) -> Candidates:
    """``count`` variants of each of ``images`` (U, C, H, W), seeded, in batches of 128."""
    noise, repaint = pair
    x = images.repeat_interleave(count, dim=0)
    g = torch.Generator().manual_seed(seed)
    t = time.perf_counter()
    out = [pipe.reconstruct(x[i:i + 128].to(s.device), noise, generator=g, repaint_fraction=repaint,
                            **s.generation).cpu()
           for i in range(0, len(x), 128)]
    gen = time.perf_counter() - t
    variants = (torch.cat(out).clamp(0, 1) * 255).round() / 255
    t = time.perf_counter()
    reps = torch.cat([pipe.encode(variants[i:i + 256].to(s.device)).cpu() for i in range(0, len(variants), 256)])
    enc = time.perf_counter() - t
    n = max(len(x), 1)
    return Candidates(variants.view(len(images), count, *images.shape[1:]), reps.view(len(images), count, -1),
                      gen / n, enc / n)


def select_variants(cands: Candidates, rows: list[int], labels: np.ndarray, config: RCGConfig,
                    train_reps: np.ndarray, num_classes: int) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """The variants an arm trains with: the first ``config.variants`` candidates of each training
    image, or with the label filter the first ``config.variants`` candidates it accepts (the
    filter's prototypes are the class means of this training set's own representations, as
    ``rcg-augment build --label-filter`` builds them). Returns (variants, counts, stats)."""
    imgs = cands.images[rows]
    v = config.variants
    if not config.label_filter:
        return imgs[:, :v], torch.full((len(rows),), v), {"candidates_per_image": v}
    filt = PrototypeFilter.from_representations(torch.as_tensor(train_reps), torch.as_tensor(labels), num_classes)
    reps = cands.reps[rows]
    ok = filt.nearest(reps.flatten(0, 1)).view(len(rows), -1) == torch.as_tensor(labels)[:, None]
    order = torch.argsort((~ok).to(torch.int8), dim=1, stable=True)[:, :v]  # accepted first, in draw order
    picked = imgs[torch.arange(len(rows))[:, None], order]
    counts = ok.sum(dim=1).clamp(max=v)
    return picked, counts, {"candidates_per_image": cands.images.shape[1], "acceptance": float(ok.float().mean()),
                            "images_without_variant": int((counts == 0).sum())}


def generation_seconds(cands: Candidates, config: RCGConfig, n_train: int, stats: dict) -> float:
    """Seconds to generate (and, with the filter, re-encode) what one arm run used."""
    if config.p == 0:
        return 0.0
    per = cands.seconds_per_variant + (cands.encode_seconds_per_variant if config.label_filter else 0.0)
    return per * n_train * stats["candidates_per_image"]


class VariantBank:
    """Candidates per (noise, repaint) pair for one union of shot draws, generated on first use."""

    def __init__(self, d: DatasetData, union: np.ndarray, pipe: RCGPipeline, s: Settings, tag):
        self.d, self.union, self.pipe, self.s, self.tag = d, union, pipe, s, tag
        self.pos = {int(g): p for p, g in enumerate(union)}
        self.pairs: dict[tuple[float, float], Candidates] = {}
        self.seconds = 0.0

    def get(self, pair: tuple[float, float]) -> Candidates:
        if pair not in self.pairs:
            t = time.perf_counter()
            self.pairs[pair] = generate_candidates(self.pipe, self.d.images[self.union], pair, self.s.candidates,
                                                   run_seed(self.d.name, "variants", *self.tag, *pair), self.s)
            self.seconds += time.perf_counter() - t
        return self.pairs[pair]

    def arm(self, train: np.ndarray, config: RCGConfig, classical: str, train_reps: np.ndarray
            ) -> tuple[ImageArm, float, dict]:
        """The ImageArm for ``config`` on the training images ``train`` (a subset of the union)."""
        if config.p == 0:
            return ImageArm(classical), 0.0, {}
        cands = self.get(config.pair)
        rows = [self.pos[int(i)] for i in train]
        variants, counts, stats = select_variants(cands, rows, self.d.labels[train], config, train_reps,
                                                  len(self.d.classes))
        return (ImageArm(classical, variants=variants, counts=counts, p=config.p),
                generation_seconds(cands, config, len(train), stats), stats)


# ============================================================================== real-data arms
# The unlabelled pool a user of the library has at hand (issue 31): its nearest images to each
# shot in the model's encoder space, labelled by their shot (retrieval); its images labelled by
# the nearest class prototype, the most confident share (pseudo-label); and retrieval with RCG
# images on top (retrieval+rcg). Every knob is chosen on the tuning draws, as the classical
# recipe is; the search never returns a shot, a validation image or a test image.
@dataclass(frozen=True)
class RealConfig:
    """One grid point of a real-data arm: ``k`` neighbours per shot (retrieval) or the kept
    ``share`` of the pool (pseudo-label), and the loss weight of those images (a shot's is 1)."""

    kind: str  # "retrieval" or "pseudo-label"
    k: int = 0
    share: float = 0.0
    weight: float = 1.0

    def key(self) -> str:
        what = f"K={self.k}" if self.kind == "retrieval" else f"share={self.share:g}"
        return f"{what} weight={self.weight:g}"


@dataclass(frozen=True)
class GenConfig:
    """What retrieval+rcg generates on top of the retrieved images.

    ``source``: "shots" (RCG variants of each shot), "retrieved" (variants of each retrieved
    image: wider coverage than more copies of the shot), "both", or "interp" (MAGE renders of
    representations interpolated between a shot and a random one of its retrieved neighbours).
    ``weight``: loss weight of one generated image (a shot's is 1). ``novelty``: drop generated
    images that sit inside what retrieval already covers (cosine similarity to some real training
    image >= the similarity of their shot's K-th neighbour)."""

    source: str
    weight: float
    novelty: bool = False

    def key(self) -> str:
        return f"source={self.source} gen-weight={self.weight:g} novelty={'on' if self.novelty else 'off'}"


GEN_SOURCES = ("shots", "retrieved", "both", "interp")
REAL_ARMS = ("retrieval", "retrieval+classical", "pseudo-label", "pseudo-label+classical",
             "retrieval+rcg", "retrieval+rcg+classical")
# Arms that train on no generated image: the candidates for "the best arm without generation".
NON_GENERATIVE = ("none", "classical", "retrieval", "retrieval+classical", "pseudo-label", "pseudo-label+classical")


def real_base(arm: str) -> str:
    """The tuning family of a real-data arm ("retrieval", "pseudo-label", "retrieval+rcg")."""
    return arm.removesuffix("+classical")


def uses_classical(arm: str) -> bool:
    return arm == "classical" or arm.endswith("+classical") or arm.startswith("classical+")


def pseudo_label(pool_reps: torch.Tensor, protos: PrototypeFilter, share: float, allowed: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pool rows labelled by their nearest class prototype, the most confident ``share`` of each
    class's assigned rows kept (at least one per class that is assigned any).

    Confidence is the margin: cosine similarity to the nearest prototype minus that to the second
    nearest. ``allowed`` (N,) bool masks the rows that may be used. Returns (rows, labels, margin),
    rows sorted by class, then by decreasing margin."""
    reps = F.normalize(pool_reps.float(), dim=-1)
    sim = reps @ F.normalize(torch.nan_to_num(protos.prototypes), dim=-1).t()
    sim = sim.masked_fill(~protos.present[None], float("-inf"))
    top = sim.topk(2, dim=1)
    labels = protos.nearest(pool_reps)
    margin = top.values[:, 0] - top.values[:, 1]
    rows, labs, margins = [], [], []
    for c in torch.nonzero(protos.present).flatten().tolist():
        members = torch.nonzero((labels == c) & allowed).flatten()
        if len(members) == 0:
            continue
        keep = max(1, round(share * len(members)))
        order = torch.argsort(margin[members], descending=True, stable=True)[:keep]
        rows.append(members[order])
        labs.append(torch.full((keep,), c, dtype=torch.long))
        margins.append(margin[members[order]])
    if not rows:
        return torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long), torch.zeros(0)
    return torch.cat(rows), torch.cat(labs), torch.cat(margins)


class RealData:
    """One dataset's pool index (encoded once, cached on disk) and the representations of shots."""

    def __init__(self, d: DatasetData, pipe: RCGPipeline, s: Settings, log):
        from rcg_augment.retrieval import PoolIndex

        self.d, self.pipe, self.s = d, pipe, s
        t = time.perf_counter()
        self.index = PoolIndex.from_source(pipe, d.pool_source, cache_dir=s.pool_cache, progress=False)
        self.encode_seconds = time.perf_counter() - t
        self.row = {int(g): r for r, g in enumerate(d.retrieval_pool)}
        self._reps: dict[int, torch.Tensor] = {}
        log(f"  retrieval pool: {len(self.index)} images of {d.name}, encoded or read in {self.encode_seconds:.0f} s")

    def reps(self, indices) -> torch.Tensor:
        """Unit representations (N, rep_dim) of dataset images (the pool index's row if pooled)."""
        todo = [int(i) for i in indices if int(i) not in self._reps and int(i) not in self.row]
        for lo in range(0, len(todo), 256):
            chunk = todo[lo:lo + 256]
            with torch.inference_mode():
                r = F.normalize(self.pipe.encode(self.d.images[chunk].to(self.s.device)).float(), dim=-1).cpu()
            self._reps.update(zip(chunk, r, strict=True))
        return torch.stack([self.index.representations[self.row[int(i)]] if int(i) in self.row
                            else self._reps[int(i)] for i in indices]) if len(indices) else torch.zeros(0)

    def excluded_rows(self, *groups) -> list[int]:
        """Pool rows of the dataset images in ``groups`` (shots, validation images): never returned."""
        return sorted({self.row[int(i)] for g in groups for i in g if int(i) in self.row})

    def retrieve(self, train: np.ndarray, k: int, exclude) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The ``k`` nearest pool images of each shot: (dataset indices (S, k), similarity (S, k),
        the shot's label (S,)), never one of ``exclude`` (dataset indices) nor a test image."""
        sim, rows = self.index.search(self.reps(train), k, exclude=self.excluded_rows(train, exclude))
        found = self.d.retrieval_pool[rows.numpy()]
        assert not np.isin(found, self.d.test_full).any() and not np.isin(found, train).any()
        return found, sim.numpy(), self.d.labels[train]

    def pseudo(self, train: np.ndarray, share: float, exclude) -> tuple[np.ndarray, np.ndarray]:
        """(dataset indices, labels) of the kept pseudo-labelled pool images."""
        protos = PrototypeFilter.from_representations(self.reps(train), torch.as_tensor(self.d.labels[train]),
                                                      len(self.d.classes))
        allowed = torch.ones(len(self.index), dtype=torch.bool)
        allowed[self.excluded_rows(train, exclude)] = False
        rows, labels, _ = pseudo_label(self.index.representations, protos, share, allowed)
        return self.d.retrieval_pool[rows.numpy()], labels.numpy()


class GenBank:
    """RCG images for retrieval+rcg on one draw: variants of shots and of retrieved images
    (label-filtered against the shots' prototypes), and renders of interpolated representations;
    generated on first use and kept for every grid point and shot count of the draw."""

    def __init__(self, real: RealData, s: Settings, tag):
        self.real, self.s, self.tag = real, s, tag
        self.d, self.pipe = real.d, real.pipe
        self.cache: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}  # (role, index[, k]) -> (images, reps)
        self.seconds = 0.0
        self.generated = 0
        self.pair = (s.rr_noise, self.pipe.resolve_settings(**s.generation).repaint_fraction)

    def _variants(self, role: str, indices: list[int], count: int) -> None:
        todo = [i for i in dict.fromkeys(indices) if (role, i) not in self.cache]
        if not todo:
            return
        t = time.perf_counter()
        c = generate_candidates(self.pipe, self.d.images[todo], self.pair, count,
                                run_seed(self.d.name, "gen", role, *self.tag, len(self.cache)), self.s)
        for j, i in enumerate(todo):
            self.cache[(role, i)] = (c.images[j], F.normalize(c.reps[j], dim=-1))
        self.seconds += time.perf_counter() - t
        self.generated += len(todo) * count

    def _interp(self, train: np.ndarray, found: np.ndarray, k: int) -> None:
        todo = [j for j, i in enumerate(train) if ("interp", int(i), k) not in self.cache]
        if not todo:
            return
        t = time.perf_counter()
        m = self.s.rr_interp
        g = torch.Generator().manual_seed(run_seed(self.d.name, "interp", *self.tag, k, len(self.cache)))
        shot_reps = self.real.reps(train[todo]).repeat_interleave(m, 0)
        pick = torch.randint(k, (len(todo) * m,), generator=g)
        nb = torch.as_tensor(found[todo]).repeat_interleave(m, 0)[torch.arange(len(pick)), pick]
        lam = 0.25 + 0.5 * torch.rand(len(pick), 1, generator=g)
        reps = F.normalize((1 - lam) * shot_reps + lam * self.real.reps(nb.numpy()), dim=-1)
        kw = {key: v for key, v in self.s.generation.items() if key in ("cfg", "temperature", "num_iter",
                                                                          "token_temperature")}
        with torch.inference_mode():
            imgs = torch.cat([self.pipe.render(reps[lo:lo + 128].to(self.s.device), generator=g, repaint_fraction=1.0,
                                               **kw).cpu() for lo in range(0, len(reps), 128)])
            imgs = (imgs.clamp(0, 1) * 255).round() / 255
            out_reps = torch.cat([F.normalize(self.pipe.encode(imgs[lo:lo + 256].to(self.s.device)).float(), dim=-1)
                                  .cpu() for lo in range(0, len(imgs), 256)])
        for n, j in enumerate(todo):
            self.cache[("interp", int(train[j]), k)] = (imgs[n * m:(n + 1) * m], out_reps[n * m:(n + 1) * m])
        self.seconds += time.perf_counter() - t
        self.generated += len(reps)

    def images(self, train: np.ndarray, found: np.ndarray, sims: np.ndarray, k: int, config: GenConfig
               ) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """The generated (images, labels) for ``config`` on top of retrieval ``found`` (S, k), and
        stats: share kept by the label filter and by the novelty filter."""
        labels = self.d.labels[train]
        parts = []  # (images, reps, label, owner shot position)
        if config.source in ("shots", "both"):
            self._variants("shot", [int(i) for i in train], self.s.rr_shot_variants)
            parts += [(*self.cache[("shot", int(i))], j) for j, i in enumerate(train)]
        if config.source in ("retrieved", "both"):
            self._variants("retrieved", [int(i) for i in found.ravel()], self.s.rr_retrieved_variants)
            parts += [(*self.cache[("retrieved", int(i))], j) for j in range(len(train)) for i in found[j]]
        if config.source == "interp":
            self._interp(train, found, k)
            parts += [(*self.cache[("interp", int(i), k)], j) for j, i in enumerate(train)]
        imgs = torch.cat([p[0] for p in parts])
        reps = torch.cat([p[1] for p in parts])
        owner = torch.cat([torch.full((len(p[0]),), p[2]) for p in parts])
        y = torch.as_tensor(labels)[owner]
        protos = PrototypeFilter.from_representations(self.real.reps(train), torch.as_tensor(labels),
                                                      len(self.d.classes))
        keep = protos.nearest(reps) == y
        stats = {"generated": len(imgs), "label_filter_kept": float(keep.float().mean())}
        if config.novelty:
            real = torch.cat([self.real.reps(train), self.real.reps(found.ravel())])
            radius = torch.as_tensor(sims[:, -1]).float()[owner]  # the shot's K-th neighbour similarity
            novel = (reps @ real.t()).max(dim=1).values < radius
            stats["novelty_kept"] = float(novel[keep].float().mean()) if keep.any() else 0.0
            keep &= novel
        stats["kept"] = int(keep.sum())
        return imgs[keep], y[keep], stats


def real_arm(real: RealData, train: np.ndarray, exclude, config: RealConfig, classical: str,
             gen: tuple[GenBank, GenConfig] | None = None) -> tuple[ImageArm, dict]:
    """The ImageArm of a real-data arm: the shots, plus retrieved or pseudo-labelled pool images
    at ``config.weight``, plus (retrieval+rcg) generated images at their own weight."""
    d = real.d
    if config.kind == "retrieval":
        found, sims, shot_labels = real.retrieve(train, config.k, exclude)
        idx = found.ravel()
        labels = np.repeat(shot_labels, config.k)  # each retrieved image takes its shot's label
        correct = d.labels[idx] == labels
        stats = {"extra": len(idx), "label_accuracy": float(correct.mean())}
    else:
        idx, labels = real.pseudo(train, config.share, exclude)
        stats = {"extra": len(idx), "label_accuracy": float((d.labels[idx] == labels).mean()) if len(idx) else math.nan}
    x = d.images[idx]
    y = torch.as_tensor(labels, dtype=torch.long)
    w = torch.full((len(idx),), float(config.weight))
    if gen is not None:
        bank, gconf = gen
        gx, gy, gstats = bank.images(train, found, sims, config.k, gconf)
        x, y = torch.cat([x, gx]), torch.cat([y, gy])
        w = torch.cat([w, torch.full((len(gx),), float(gconf.weight))])
        stats.update(gstats)
    return ImageArm(classical, extra_x=x, extra_y=y, extra_w=w), stats


def default_config(pipe: RCGPipeline, s: Settings) -> RCGConfig:
    """The library's defaults: noise 0.3, the model's repaint_fraction, no filter."""
    g = pipe.resolve_settings(**s.generation)
    return RCGConfig(s.default_p, DEFAULT_NOISE_LEVEL, g.repaint_fraction, False, s.default_variants)


def vs_best(per: dict[str, list[float]], best: str) -> dict:
    """Every arm's per-seed gain over ``best`` (the best arm without generation, chosen on the
    tuning draws), paired over the same draws, with a 95% t-interval; and which arm without
    generation scored best on the evaluation mean (for the record: not used to choose)."""
    out = {"reference": best, "chosen_on": "tuning draws (validation mean)", "arms": {}}
    for arm, v in per.items():
        if arm != best:
            out["arms"][arm] = t_interval(np.asarray(v) - np.asarray(per[best]))
    ng = [a for a in NON_GENERATIVE if a in per]
    out["best_on_evaluation_mean"] = max(ng, key=lambda a: (float(np.mean(per[a])), -ng.index(a)))
    return out


def paired_differences(per: dict[str, list[float]], arms: list[str]) -> dict:
    """Each arm's per-seed difference from its reference (same seeds), with a 95% t-interval;
    the representation-space arm also against the classical CNN."""
    out = {}
    for arm in arms:
        ref = arm_reference(arm)
        if ref is not None and ref in per:
            out[arm] = {"reference": ref, **t_interval(np.asarray(per[arm]) - np.asarray(per[ref]))}
        if arm == "probe+rep-aug" and "classical" in per:
            diff = np.asarray(per[arm]) - np.asarray(per["classical"])
            out[arm + " vs classical"] = {"reference": "classical", **t_interval(diff)}
        if arm == "classical+rcg":  # generation against retrieval directly (the novel regime's question)
            for ref in ("retrieval", "retrieval+classical"):
                if ref in per:
                    diff = np.asarray(per[arm]) - np.asarray(per[ref])
                    out[f"{arm} vs {ref}"] = {"reference": ref, **t_interval(diff)}
    return out


# ============================================================================== tuning
def validation_draw(d: DatasetData, shots: int, t: int, s: Settings) -> tuple[int, np.ndarray, np.ndarray]:
    seed = TUNING_SEED_BASE + t
    train = draw_shots(d.labels, d.pool, shots, seed)
    rest = np.setdiff1d(d.pool, train)
    val = np.sort(np.random.default_rng([seed, 99]).choice(rest, size=validation_size(s.val_size, len(rest)),
                                                           replace=False))
    return seed, train, val


def validation_size(val_size: int, rest: int) -> int:
    """Validation images of a tuning draw: ``val_size``, but at most half of the pool images left
    after the shots, so the real-data arms (which never search validation images) keep the other
    half to retrieve from (lfw-faces' pool of 140 would otherwise be all validation)."""
    return min(val_size, rest // 2)


def tune(d: DatasetData, shots_list: list[int], s: Settings, reps, pipe: RCGPipeline, log,
         real: RealData | None = None) -> dict:
    """Pick the classical recipe, the probe's C and the RCG arm's settings on validation draws.

    Each tuning seed (disjoint from the evaluation seeds) draws shots per class from the pool and
    validates on other pool images; the test split is never read here. The classical recipe is
    chosen first; the RCG grid is then searched on top of it, on the same draws and with the same
    classifier seeds (so p = 0 reproduces the classical score exactly).
    """
    y_all = torch.as_tensor(d.labels)
    want_probe = any(a.startswith("probe") for a in s.arms)
    want_rcg = any(a in ("classical+rcg", "classical+rcg-online", "classical+rcg-on") for a in s.arms)
    out = {}
    for k in shots_list:
        scores = {c: [] for c in s.classical_candidates}
        probe_scores = {c: [] for c in s.probe_cs}
        t0 = time.perf_counter()
        for t in range(s.tune_seeds):
            seed, train, val = validation_draw(d, k, t, s)
            rs = run_seed(d.name, k, "tune", seed)
            for cand in s.classical_candidates:
                model = train_cnn(d.images[train], y_all[train], len(d.classes), ImageArm(classical=cand), s, rs)
                scores[cand].append(accuracy(model, d.images[val], y_all[val], s.device))
            if want_probe:
                tr, va = reps(train), reps(val)
                for c in s.probe_cs:
                    probe_scores[c].append(probe_accuracy(tr, d.labels[train], va, d.labels[val], c, rs))
        means = {c: float(np.mean(v)) for c, v in scores.items()}
        best = max(s.classical_candidates, key=lambda c: (means[c], -s.classical_candidates.index(c)))
        out[str(k)] = {"classical": best, "classical_val_accuracy": means, "tune_seeds": s.tune_seeds,
                       "val_size": s.val_size, "classical_seconds": time.perf_counter() - t0}
        if want_probe:
            pmeans = {str(c): float(np.mean(v)) for c, v in probe_scores.items()}
            out[str(k)]["probe_c"] = max(s.probe_cs, key=lambda c: (pmeans[str(c)], -s.probe_cs.index(c)))
            out[str(k)]["probe_val_accuracy"] = pmeans
    if real is not None:
        tune_real(d, shots_list, s, real, out, log)
    if not want_rcg:
        return out
    grid = s.grid()
    banks = [VariantBank(d, validation_draw(d, max(shots_list), t, s)[1], pipe, s, ("tune", t))
             for t in range(s.tune_seeds)]
    for k in shots_list:
        t0 = time.perf_counter()
        gen0 = sum(b.seconds for b in banks)
        scores = {c.key(): [] for c in grid}
        acceptance = {c.key(): [] for c in grid if c.label_filter}
        for t, bank in enumerate(banks):
            seed, train, val = validation_draw(d, k, t, s)
            rs = run_seed(d.name, k, "tune", seed)
            tr_reps = reps(train)
            for config in grid:
                arm, _, stats = bank.arm(train, config, out[str(k)]["classical"], tr_reps)
                model = train_cnn(d.images[train], y_all[train], len(d.classes), arm, s, rs)
                scores[config.key()].append(accuracy(model, d.images[val], y_all[val], s.device))
                if config.label_filter:
                    acceptance[config.key()].append(stats["acceptance"])
        means = {key: float(np.mean(v)) for key, v in scores.items()}
        chosen = max(range(len(grid)), key=lambda i: (means[grid[i].key()], -i))
        out[str(k)]["rcg"] = asdict(grid[chosen])
        out[str(k)]["rcg_key"] = grid[chosen].key()
        out[str(k)]["rcg_val_accuracy"] = means
        out[str(k)]["rcg_on_key"] = best_with_rcg(out[str(k)], s).key()  # arm (h)
        out[str(k)]["rcg_val_gain_over_classical"] = means[grid[chosen].key()] - means[grid[0].key()]
        out[str(k)]["rcg_filter_acceptance"] = {key: float(np.mean(v)) for key, v in acceptance.items()}
        out[str(k)]["rcg_seconds"] = time.perf_counter() - t0  # generation (first use) + grid CNNs
        out[str(k)]["rcg_generation_seconds"] = sum(b.seconds for b in banks) - gen0
        log(f"  tuned {d.name} {k}-shot RCG: {grid[chosen].key()} (val {100 * means[grid[chosen].key()]:.1f}% vs "
            f"classical {100 * means[grid[0].key()]:.1f}%; {len(grid)} grid points x {s.tune_seeds} draws, "
            f"{out[str(k)]['rcg_seconds']:.0f} s)")
    return out


def real_arms_wanted(arms: list[str]) -> dict[str, list[str]]:
    """The real-data tuning each family needs: retrieval+rcg builds on its retrieval arm's choice."""
    want = {"retrieval": [], "pseudo-label": [], "retrieval+rcg": []}
    for arm in arms:
        if arm not in REAL_ARMS:
            continue
        want[real_base(arm)].append(arm)
        if real_base(arm) == "retrieval+rcg":
            want["retrieval"].append(arm.replace("retrieval+rcg", "retrieval"))
    return {k: list(dict.fromkeys(v)) for k, v in want.items()}


def classical_of(arm: str, tuned: dict) -> str:
    return tuned["classical"] if uses_classical(arm) else "none"


def tune_real(d: DatasetData, shots_list: list[int], s: Settings, real: RealData, tuning: dict, log) -> None:
    """Choose each real-data arm's knobs on the tuning draws (same draws, validation images and
    classifier seeds as the classical recipe; validation images are excluded from the search),
    then the best arm that trains on no generated image. Adds to ``tuning[str(k)]``."""
    arms = applicable_arms(d, s.arms)
    want = real_arms_wanted(arms)
    y_all = torch.as_tensor(d.labels)
    banks = [GenBank(real, s, ("tune", t)) for t in range(s.tune_seeds)] if want["retrieval+rcg"] else []
    for k in shots_list:
        tk = tuning[str(k)]
        t0 = time.perf_counter()
        gen0 = sum(b.seconds for b in banks)
        draws = [validation_draw(d, k, t, s) for t in range(s.tune_seeds)]
        real_out = {}
        for family in ("retrieval", "pseudo-label"):
            for arm in want[family]:
                grid = s.real_grid(family)
                scores = {c.key(): [] for c in grid}
                label_acc = {c.key(): [] for c in grid}
                for seed, train, val in draws:
                    rs = run_seed(d.name, k, "tune", seed)
                    for config in grid:
                        image_arm, stats = real_arm(real, train, val, config, classical_of(arm, tk))
                        model = train_cnn(d.images[train], y_all[train], len(d.classes), image_arm, s, rs)
                        scores[config.key()].append(accuracy(model, d.images[val], y_all[val], s.device))
                        label_acc[config.key()].append(stats["label_accuracy"])
                means = {key: float(np.mean(v)) for key, v in scores.items()}
                chosen = max(range(len(grid)), key=lambda i: (means[grid[i].key()], -i))
                real_out[arm] = {"config": asdict(grid[chosen]), "key": grid[chosen].key(), "val_accuracy": means,
                                 "val": means[grid[chosen].key()],
                                 "label_accuracy": {key: float(np.mean(v)) for key, v in label_acc.items()}}
                log(f"  tuned {d.name} {k}-shot {arm}: {grid[chosen].key()} (val {100 * real_out[arm]['val']:.1f}%, "
                    f"retrieved/pseudo labels right {100 * real_out[arm]['label_accuracy'][grid[chosen].key()]:.0f}%)")
        for arm in want["retrieval+rcg"]:
            base = arm.replace("retrieval+rcg", "retrieval")
            rconf = RealConfig(**real_out[base]["config"])
            grid = s.gen_grid()
            scores = {c.key(): [] for c in grid}
            kept = {c.key(): [] for c in grid}
            for (seed, train, val), bank in zip(draws, banks, strict=True):
                rs = run_seed(d.name, k, "tune", seed)
                for config in grid:
                    image_arm, stats = real_arm(real, train, val, rconf, classical_of(arm, tk), gen=(bank, config))
                    model = train_cnn(d.images[train], y_all[train], len(d.classes), image_arm, s, rs)
                    scores[config.key()].append(accuracy(model, d.images[val], y_all[val], s.device))
                    kept[config.key()].append(stats)
            means = {key: float(np.mean(v)) for key, v in scores.items()}
            chosen = max(range(len(grid)), key=lambda i: (means[grid[i].key()], -i))
            ref = real_out[base]["val"]
            real_out[arm] = {"retrieval": asdict(rconf), "config": asdict(grid[chosen]), "key": grid[chosen].key(),
                             "val_accuracy": means, "val": means[grid[chosen].key()], "retrieval_val": ref,
                             "generated_kept": {key: {"per_draw_kept": [st["kept"] for st in v],
                                                      "label_filter_kept": float(np.mean([st["label_filter_kept"]
                                                                                          for st in v])),
                                                      **({"novelty_kept": float(np.mean([st["novelty_kept"]
                                                                                         for st in v]))}
                                                         if "novelty_kept" in v[0] else {})}
                                                for key, v in kept.items()},
                             "options": option_effects(grid, means, ref)}
            log(f"  tuned {d.name} {k}-shot {arm}: {grid[chosen].key()} (val {100 * means[grid[chosen].key()]:.1f}% "
                f"vs {base} {100 * ref:.1f}%)")
        tk["real"] = real_out
        tk["real_seconds"] = time.perf_counter() - t0
        tk["real_generation_seconds"] = sum(b.seconds for b in banks) - gen0
        # The best arm without generation, chosen on these validation draws (not the test split).
        val = {"none": tk["classical_val_accuracy"]["none"], "classical": tk["classical_val_accuracy"][tk["classical"]],
               **{a: r["val"] for a, r in real_out.items() if a in NON_GENERATIVE}}
        val = {a: v for a, v in val.items() if a in arms}
        if val:
            order = [a for a in NON_GENERATIVE if a in val]
            tk["best_non_generative"] = max(order, key=lambda a: (val[a], -order.index(a)))
            tk["non_generative_val_accuracy"] = val


def option_effects(grid: list[GenConfig], means: dict[str, float], reference: float) -> dict:
    """What each complementarity option measured on the tuning draws: for every value of every
    option, the mean and the best validation accuracy over the grid points that have it, minus
    retrieval alone (``reference``)."""
    out = {}
    for name in ("source", "weight", "novelty"):
        for value in dict.fromkeys(getattr(c, name) for c in grid):
            vals = [means[c.key()] for c in grid if getattr(c, name) == value]
            out[f"{name}={value}"] = {"mean_minus_retrieval": float(np.mean(vals)) - reference,
                                      "best_minus_retrieval": float(max(vals)) - reference, "points": len(vals)}
    return out


def tuning_from_report(path: str, name: str, shots_list: list[int], s: Settings) -> dict:
    """The tuning block of an earlier full run, to evaluate more arms under the same choices.

    The classifier budget, the candidates and the grid must be the ones that run tuned with."""
    report = json.loads(Path(path).read_text())
    old = report["settings"]
    for key in ("steps", "batch_size", "lr", "width", "tune_seeds", "val_size", "classical_candidates", "probe_cs",
                "grid_p", "grid_noise", "grid_repaint", "grid_filter", "grid_variants",
                "num_iter", "rdm_steps", "cfg", "temperature", "token_temperature", "models"):  # and the same generator
        if old.get(key) != asdict(s)[key]:
            raise SystemExit(f"--tuning-from {path}: it was tuned with {key}={old.get(key)!r}, this run has "
                             f"{asdict(s)[key]!r}")
    if any(a in REAL_ARMS for a in s.arms):  # the real-data grids (older reports: their defaults)
        filled = asdict(Settings(**old))
        for key in ("grid_k", "grid_weight", "grid_share", "grid_gen_source", "grid_gen_weight", "grid_novelty",
                    "rr_noise", "rr_shot_variants", "rr_retrieved_variants", "rr_interp"):
            if filled[key] != asdict(s)[key]:
                raise SystemExit(f"--tuning-from {path}: it was tuned with {key}={filled[key]!r}, this run has "
                                 f"{asdict(s)[key]!r}")
    old_candidates = Settings(**old).candidates
    if old_candidates != s.candidates:  # the filtered arms pick from this many candidates per image
        raise SystemExit(f"--tuning-from {path}: it drew {old_candidates} candidates per image, this run "
                         f"{s.candidates} (--default-variants)")
    tuning = report.get("datasets", {}).get(name, {}).get("tuning", {})
    missing = [k for k in shots_list if str(k) not in tuning or "rcg" not in tuning[str(k)]]
    if missing:
        raise SystemExit(f"--tuning-from {path}: no RCG tuning for {name} at {missing} shots")
    return {str(k): tuning[str(k)] for k in shots_list}


def best_on_key(tuned: dict) -> str:
    """Arm (h)'s grid point from a tuning record: recorded as ``rcg_on_key``; older records are
    read off ``rcg_val_accuracy`` (grid order, p = 0 first; ties: the earlier point)."""
    if "rcg_on_key" in tuned:
        return tuned["rcg_on_key"]
    keys = [key for key in tuned["rcg_val_accuracy"] if key != RCGConfig(p=0.0).key()]
    val = tuned["rcg_val_accuracy"]
    return keys[max(range(len(keys)), key=lambda i: (val[keys[i]], -i))]


def best_with_rcg(tuned: dict, s: Settings) -> RCGConfig:
    """The grid point with p > 0 that validated best (ties: the earlier point): the RCG arm for a
    user who uses RCG whatever the validation says."""
    key = best_on_key(tuned)
    return next(c for c in s.grid()[1:] if c.key() == key)


# ============================================================================== one dataset
def run_dataset(d: DatasetData, pipe: RCGPipeline, s: Settings, log) -> dict:
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
    shots_list = s.shots[d.name]
    arms = applicable_arms(d, s.arms)
    real = RealData(d, pipe, s, log) if any(a in REAL_ARMS for a in arms) else None
    defaults = default_config(pipe, s)
    result = {"shots": {}, "test_size": len(d.test), "test_split_size": len(d.test_full), "pool_size": len(d.pool),
              # the generation settings every RCG arm ran with (the model's defaults filled in)
              "generation": pipe.resolve_settings(**s.generation).to_dict(),
              "default_rcg": asdict(defaults), "grid_points": len(s.grid())}
    t0 = time.perf_counter()
    if real is not None:
        result["retrieval_pool_size"] = len(d.retrieval_pool)
        result["pool_encode_seconds"] = real.encode_seconds
    if s.tuning_from:
        result["tuning"] = tuning_from_report(s.tuning_from, d.name, shots_list, s)
        result["tuning_from"] = s.tuning_from
        if real is not None and any("real" not in result["tuning"][str(k)] for k in shots_list):
            raise SystemExit(f"--tuning-from {s.tuning_from}: no real-data tuning for {d.name}")
    else:
        result["tuning"] = tune(d, shots_list, s, reps, pipe, log, real)
    for k in shots_list:
        tk = result["tuning"][str(k)]
        log(f"  tuned {d.name} {k}-shot: classical={tk['classical']}"
            + (f", probe C={tk['probe_c']}" if want_probe else "") + (f", rcg: {tk['rcg_key']}" if "rcg" in tk else ""))
    result["tuning_seconds"] = time.perf_counter() - t0
    test_rep = reps(d.test) if want_probe else None
    x_test, y_test = d.images[d.test], y_all[d.test]
    per = {str(k): {a: [] for a in arms} for k in shots_list}
    cost = {str(k): {a: [] for a in arms} for k in shots_list}  # seconds per run, generation included
    gen_cost = {str(k): {a: [] for a in arms} for k in shots_list}
    filter_stats = {str(k): {a: [] for a in arms} for k in shots_list}
    real_stats = {str(k): {a: [] for a in arms if a in REAL_ARMS} for k in shots_list}
    result["eval_seeds"] = list(range(s.first_seed, s.first_seed + s.seeds))
    for i, seed in enumerate(result["eval_seeds"]):
        bank = VariantBank(d, draw_shots(d.labels, d.pool, max(shots_list), seed), pipe, s, ("eval", seed))
        gbank = GenBank(real, s, ("eval", seed)) if real is not None else None
        for k in shots_list:
            train = draw_shots(d.labels, d.pool, k, seed)
            x, y = d.images[train], y_all[train]
            tuned = result["tuning"][str(k)]
            rs = run_seed(d.name, k, seed)
            for arm in arms:
                gen = 0.0
                t = time.perf_counter()
                if arm in REAL_ARMS:
                    choice = tuned["real"][arm]
                    if real_base(arm) == "retrieval+rcg":
                        image_arm, stats = real_arm(real, train, [], RealConfig(**choice["retrieval"]),
                                                    classical_of(arm, tuned), gen=(gbank, GenConfig(**choice["config"])))
                        # generation from its measured rate in this draw, for the images this run drew on
                        gen = gbank.seconds / max(gbank.generated, 1) * stats["generated"]
                        t = time.perf_counter()
                    else:
                        image_arm, stats = real_arm(real, train, [], RealConfig(**choice["config"]),
                                                    classical_of(arm, tuned))
                    acc = accuracy(train_cnn(x, y, len(d.classes), image_arm, s, rs), x_test, y_test, s.device)
                    real_stats[str(k)][arm].append(stats)
                elif arm == "retrieval+classical+rcg-mix":
                    # (j)'s retrieved images beside the shots, and (c)'s cached variants swapped in for the
                    # shots at (c)'s p: generation as augmentation of the shots, not as more images
                    choice = tuned["real"]["retrieval+classical"]
                    image_arm, _ = real_arm(real, train, [], RealConfig(**choice["config"]), tuned["classical"])
                    rcg_arm, gen, _ = bank.arm(train, RCGConfig(**tuned["rcg"]), tuned["classical"], reps(train))
                    image_arm = replace(image_arm, variants=rcg_arm.variants, counts=rcg_arm.counts, p=rcg_arm.p)
                    t = time.perf_counter()
                    acc = accuracy(train_cnn(x, y, len(d.classes), image_arm, s, rs), x_test, y_test, s.device)
                elif arm == "none":
                    acc = accuracy(train_cnn(x, y, len(d.classes), ImageArm(), s, rs), x_test, y_test, s.device)
                elif arm == "classical":
                    acc = accuracy(train_cnn(x, y, len(d.classes), ImageArm(tuned["classical"]), s, rs),
                                   x_test, y_test, s.device)
                elif arm in ("classical+rcg", "classical+rcg-default", "classical+rcg-on"):
                    if arm == "classical+rcg":
                        config = RCGConfig(**tuned["rcg"])
                    elif arm == "classical+rcg-on":
                        config = best_with_rcg(tuned, s)
                    else:  # the library's defaults need no tuning
                        config = defaults
                    image_arm, gen, stats = bank.arm(train, config, tuned["classical"], reps(train))
                    t = time.perf_counter()  # generation is counted from its measured rate, not its wall time here
                    acc = accuracy(train_cnn(x, y, len(d.classes), image_arm, s, rs), x_test, y_test, s.device)
                    if "acceptance" in stats:
                        filter_stats[str(k)][arm].append(stats["acceptance"])
                elif arm == "classical+rcg-online":
                    config = best_with_rcg(tuned, s)
                    online = RCGAugment(config.noise_level, model=pipe, p=config.p,
                                        repaint_fraction=config.repaint_fraction, seed=rs, **s.generation)
                    acc = accuracy(train_cnn(x, y, len(d.classes), ImageArm(tuned["classical"], online=online), s, rs),
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
                per[str(k)][arm].append(acc)
                cost[str(k)][arm].append(time.perf_counter() - t + gen)
                gen_cost[str(k)][arm].append(gen)
        log(f"  {d.name} seed {i + 1}/{s.seeds} done ({time.perf_counter() - t0:.0f} s): "
            + "; ".join(f"{k}-shot " + " ".join(f"{a}={per[str(k)][a][-1]:.3f}" for a in arms) for k in shots_list))
    for k in shots_list:
        cell = {"per_seed": per[str(k)], "summary": {a: t_interval(v) for a, v in per[str(k)].items()},
                "paired": paired_differences(per[str(k)], arms),
                "seconds_per_run": {a: float(np.mean(v)) for a, v in cost[str(k)].items()},
                "generation_seconds_per_run": {a: float(np.mean(v)) for a, v in gen_cost[str(k)].items()},
                "filter_acceptance": {a: float(np.mean(v)) for a, v in filter_stats[str(k)].items() if v}}
        if real_stats[str(k)]:
            cell["real_stats"] = {a: {key: float(np.nanmean([st[key] for st in v])) for key in v[0]}
                                  for a, v in real_stats[str(k)].items() if v}
        best = result["tuning"][str(k)].get("best_non_generative")
        if best in per[str(k)]:  # (--tuning-from a run with more arms: it may not have run here)
            cell["vs_best_non_generative"] = vs_best(per[str(k)], best)
        result["shots"][str(k)] = cell
    result["seconds"] = time.perf_counter() - t0
    return result


# ============================================================================== reporting
def pct(x: float) -> str:
    return "nan" if not math.isfinite(x) else f"{100 * x:.1f}"


def dataset_arms(r: dict, arms: list[str]) -> list[str]:
    """The arms of ``arms`` that ran on this dataset at any shot count."""
    return [a for a in arms if any(a in cell["summary"] for cell in r["shots"].values())]


def _shots_header(shots: list[str]) -> str:
    return " | ".join(f"{k} shot{'s' if k != '1' else ''}" for k in shots)


def markdown(report: dict) -> str:
    s = report["settings"]
    grid = (f"p {s['grid_p']} (and 0), noise_level {s['grid_noise']}, repaint_fraction {s['grid_repaint']}, "
            f"label filter {['on' if f else 'off' for f in s['grid_filter']]}, variants per image {s['grid_variants']}")
    lines = [f"# Few-shot benchmark ({'quick' if s['quick'] else 'full'} mode)", "",
             f"{report['date']} · {report['machine']['summary']} · wall time {report['wall_seconds']:.0f} s · "
             f"rcg-augment {report['versions']['rcg_augment']}", "",
             f"Classifier: SmallCNN (width {s['width']}), {s['steps']} steps x batch {s['batch_size']}, AdamW "
             f"lr {s['lr']} cosine, same for every image arm. {s['seeds']} seeds per cell (shot draws); "
             f"mean test accuracy (%) ± 95% t-interval half-width. Tuned on {s['tune_seeds']} validation draws "
             f"from the pool per shot count: the classical recipe among {len(s['classical_candidates'])}, then "
             f"the RCG arm over the grid {grid}. RCG generation: num_iter={s['num_iter']}, "
             f"rdm_steps={s['rdm_steps']} (None: the model's); RepresentationAugment noise {s['rep_noise']}, "
             f"{s['rep_copies']} copies.", ""]
    for name, r in report["datasets"].items():
        shots = list(r["shots"])
        if name.startswith("fashion"):
            whole = f" of {r['test_split_size']}" if "test_split_size" in r else ""
            split = (f"Test: {r['test_size']}{whole} images of Fashion-MNIST's test split (a seeded subset where "
                     f"fewer; never seen by the model); shots drawn from {r['pool_size']} train images"
                     + (" of the five novel classes" if name == "fashion-novel" else "")
                     + (f"; retrieval pool: {r['retrieval_pool_size']} train images"
                        + (" of the five base classes only (none of the task's classes)" if name == "fashion-novel"
                           else "") if "retrieval_pool_size" in r else "") + ".")
        else:
            split = (f"Test split: {r['test_size']} images (held out; seed {SPLIT_SEED}, {TEST_FRACTION:.0%} per class); "
                     f"pool: {r['pool_size']} images.")
        lines += [f"## {name}", "", split, "",
                  f"Generative model: {r['provenance']['model']}. **{r['provenance']['statement']}**", ""]
        tuned = ", ".join(f"{k}-shot: {r['tuning'][k]['classical']}" for k in shots)
        lines += [f"Classical recipe chosen on pool validation draws: {tuned}.", ""]
        if all("rcg" in r["tuning"][k] for k in shots):
            lines += ["RCG settings chosen on the same validation draws (validation accuracy %, RCG vs classical "
                      "alone):", "",
                      "| shots | chosen for (c) | val. RCG | val. classical | filter acceptance | best with p > 0, for (h) "
                      "| val. (h) |", "|---|---|---|---|---|---|---|"]
            for k in shots:
                t = r["tuning"][k]
                val = t["rcg_val_accuracy"]
                acc = t["rcg_filter_acceptance"].get(t["rcg_key"])
                on = best_on_key(t)
                lines.append(f"| {k} | {t['rcg_key']} | {pct(val[t['rcg_key']])} | {pct(val['p=0 (classical alone)'])}"
                             f" | {'-' if acc is None else pct(acc)} | {on} | {pct(val[on])} |")
            lines.append("")
        lines += real_tuning_lines(r, shots)
        arms = dataset_arms(r, s["arms"])  # an arm added by a later run may cover fewer shot counts: "-"
        lines += ["| arm | " + _shots_header(shots) + " |", "|---|" + "---|" * len(shots)]
        for arm in arms:
            cells = []
            for k in shots:
                m = r["shots"][k]["summary"].get(arm)
                cells.append("-" if m is None else f"{pct(m['mean'])} ± {pct(m['half_width'])}")
            lines.append(f"| {arm_label(arm)} | " + " | ".join(cells) + " |")
        paired = list(dict.fromkeys(a for k in shots for a in r["shots"][k]["paired"]))
        if paired:
            lines += ["", "Paired differences (percentage points, same seeds), mean [95% CI]:", "",
                      "| arm − reference | " + _shots_header(shots) + " |", "|---|" + "---|" * len(shots)]
            for a in paired:
                ref = next(r["shots"][k]["paired"][a] for k in shots if a in r["shots"][k]["paired"])["reference"]
                base = a.split(" vs ")[0]
                cells = []
                for k in shots:
                    p = r["shots"][k]["paired"].get(a)
                    cells.append("-" if p is None else f"{100 * p['mean']:+.1f} [{pct(p['low'])}, {pct(p['high'])}]")
                lines.append(f"| {arm_label(base)} − {arm_label(ref).split(' ')[0]} | " + " | ".join(cells) + " |")
        if any("vs_best_non_generative" in r["shots"][k] for k in shots):
            refs = {k: r["shots"][k]["vs_best_non_generative"]["reference"] for k in shots
                    if "vs_best_non_generative" in r["shots"][k]}
            on_eval = {k: r["shots"][k]["vs_best_non_generative"]["best_on_evaluation_mean"] for k in refs}
            lines += ["", "Gain over the best arm without generation (percentage points, paired over the same draws), "
                      "mean [95% CI]. That arm is chosen per shot count on the tuning draws' validation mean, not "
                      "on the test split: " + ", ".join(f"{k}-shot: {v}" for k, v in refs.items()) + " (best on "
                      "the evaluation mean: " + ", ".join(f"{k}-shot: {v}" for k, v in on_eval.items()) + ").", "",
                      "| arm − best without generation | " + _shots_header(shots) + " |", "|---|" + "---|" * len(shots)]
            for arm in arms:
                cells = []
                for k in shots:
                    v = r["shots"][k].get("vs_best_non_generative")
                    if v is None or arm not in r["shots"][k]["per_seed"]:
                        cells.append("-")
                    elif arm == v["reference"]:
                        cells.append("(reference)")
                    else:
                        g = v["arms"][arm]
                        cells.append(f"{100 * g['mean']:+.1f} [{pct(g['low'])}, {pct(g['high'])}]")
                lines.append(f"| {arm_label(arm)} | " + " | ".join(cells) + " |")
        if any("real_stats" in r["shots"][k] for k in shots):
            lines += ["", "Real-data arms on the evaluation draws: pool images added per run, the share of them "
                      "whose true class is the label they were given, and generated images kept (label filter, "
                      "then novelty filter):", "",
                      "| arm | shots | pool images | right label | generated | kept |", "|---|---|---|---|---|---|"]
            for k in shots:
                for arm, st in r["shots"][k].get("real_stats", {}).items():
                    lines.append(f"| {arm_label(arm)} | {k} | {st['extra']:.0f} | {pct(st['label_accuracy'])} | "
                                 f"{st.get('generated', 0):.0f} | {st.get('kept', 0):.0f} |")
        if "seconds_per_run" in r["shots"][shots[0]]:
            lines += ["", "Cost: seconds per classifier, generation included (generation from its measured rate, "
                      "one thread), and the one-off tuning:", "",
                      "| arm | " + _shots_header(shots) + " |", "|---|" + "---|" * len(shots)]
            for arm in arms:
                cells = []
                for k in shots:
                    sec = r["shots"][k]["seconds_per_run"].get(arm)
                    gen = r["shots"][k]["generation_seconds_per_run"].get(arm, 0.0)
                    cells.append("-" if sec is None else f"{sec:.1f}" + (f" (gen. {gen:.1f})" if gen > 0 else ""))
                lines.append(f"| {arm_label(arm)} | " + " | ".join(cells) + " |")
            tune_cells = []
            for k in shots:
                t = r["tuning"][k]
                tune_cells.append(f"{t['classical_seconds']:.0f} + {t.get('rcg_seconds', 0.0):.0f}"
                                  + (f" + {t['real_seconds']:.0f}" if "real_seconds" in t else ""))
            real = any("real_seconds" in r["tuning"][k] for k in shots)
            lines.append(f"| tuning: classical + RCG grid{' + real-data grids' if real else ''} (s) | "
                         + " | ".join(tune_cells) + " |")
        lines.append("")
    return "\n".join(lines)


def real_tuning_lines(r: dict, shots: list[str]) -> list[str]:
    """The real-data arms' choices on the tuning draws, and what each retrieval+rcg option measured."""
    if not any("real" in r["tuning"][k] for k in shots):
        return []
    lines = ["Real-data arms chosen on the same validation draws (validation accuracy %; validation images "
             "are excluded from the search):", "", "| shots | arm | chosen | val. | val. of its reference |",
             "|---|---|---|---|---|"]
    for k in shots:
        for arm, c in r["tuning"][k].get("real", {}).items():
            ref = pct(c["retrieval_val"]) + " (retrieval alone)" if "retrieval_val" in c else "-"
            what = c["key"] + (f" on {RealConfig(**c['retrieval']).key()}" if "retrieval" in c else "")
            lines.append(f"| {k} | {arm} | {what} | {pct(c['val'])} | {ref} |")
    lines.append("")
    rr = [(k, a, c) for k in shots for a, c in r["tuning"][k].get("real", {}).items() if "options" in c]
    if rr:
        lines += ["Complementarity options of retrieval+rcg on the validation draws: for each option value, the "
                  "mean and the best validation accuracy of the grid points with it, minus retrieval alone "
                  "(percentage points):", "",
                  "| shots | arm | " + " | ".join(rr[0][2]["options"]) + " |", "|---|---|" + "---|" * len(rr[0][2]["options"])]
        for k, a, c in rr:
            lines.append(f"| {k} | {a} | " + " | ".join(
                f"{100 * o['mean_minus_retrieval']:+.1f} / {100 * o['best_minus_retrieval']:+.1f}"
                for o in c["options"].values()) + " |")
        lines.append("")
    return lines


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(report["datasets"])
    fig, axes = plt.subplots(1, len(names), figsize=(6 * len(names), 4.5), squeeze=False)
    for ax, name in zip(axes[0], names, strict=True):
        r = report["datasets"][name]
        shots = [int(k) for k in r["shots"]]
        for arm in dataset_arms(r, report["settings"]["arms"]):
            ks = [k for k in shots if arm in r["shots"][str(k)]["summary"]]
            m = np.array([r["shots"][str(k)]["summary"][arm]["mean"] for k in ks]) * 100
            h = np.nan_to_num(np.array([r["shots"][str(k)]["summary"][arm]["half_width"] for k in ks]) * 100)
            style = "--" if arm.startswith("probe") else "-"
            line, = ax.plot(ks, m, style, marker="o", label=arm_label(arm))
            ax.fill_between(ks, m - h, m + h, color=line.get_color(), alpha=0.15)
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
    p.add_argument("--datasets", help="comma-separated, from " + ", ".join(DATASETS) + " (default: "
                   + ",".join(DEFAULT_DATASETS) + "; with --regime novel: fashion-novel)")
    p.add_argument("--regime", choices=("standard", "novel"), default="standard",
                   help="novel: Fashion-MNIST 5-way among the classes Pullover, Dress, Shirt, Sneaker, Ankle boot, "
                        "retrieval from the train images of the other five only, with a model trained on those "
                        "five only (default benchmarks/models/fashion-base-tiny; refused otherwise); the same as --datasets fashion-novel")
    p.add_argument("--max-test", type=int, help="evaluate on a seeded subset of this many test images "
                   "(default: all; quick 150), e.g. 2000 for Fashion-MNIST's 10,000")
    p.add_argument("--shots", action="append", default=[], metavar="[DATASET=]K,K",
                   help="shot counts per class (default digits=1,2,5,10 lfw-faces=1,2,5)")
    p.add_argument("--seeds", type=int, help="evaluation seeds (shot draws) per cell (default 10; quick 2)")
    p.add_argument("--first-seed", type=int, default=0,
                   help="the first evaluation seed (default 0): --first-seed 10 --seeds 20 draws 20 fresh shot sets, "
                        "e.g. to replicate a result with --tuning-from its report")
    p.add_argument("--tune-seeds", type=int, help="tuning draws per shot count (default 3; quick 1)")
    p.add_argument("--arms", help="comma-separated subset of: " + ", ".join(ALL_ARMS)
                   + " (default: all but classical+rcg-online)")
    p.add_argument("--steps", type=int, help="classifier steps (default 150; quick 8)")
    p.add_argument("--batch-size", type=int, help="classifier batch (default 32; quick 16)")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--width", type=int, default=16, help="SmallCNN base width")
    p.add_argument("--grid-p", help="RCG tuning grid: probabilities an image is replaced by a variant "
                   "(p = 0, the classical recipe alone, is always a candidate; default 0.25,0.5,0.75; quick 0.5)")
    p.add_argument("--grid-noise", help="RCG tuning grid: noise levels (default 0,0.3,0.6; quick 0.3)")
    p.add_argument("--grid-repaint", help="RCG tuning grid: repaint fractions (default 0.7,1; quick 0.7,1)")
    p.add_argument("--grid-filter", help="RCG tuning grid: label filter off/on (default off,on)")
    p.add_argument("--grid-variants", help="RCG tuning grid: variants per image (default 2,8; quick 1)")
    p.add_argument("--default-p", type=float, default=0.5, help="p of the untuned library-defaults arm")
    p.add_argument("--default-variants", type=int, help="variants per image of the library-defaults arm "
                   "(default 4; quick 1)")
    p.add_argument("--rep-noise", type=float, default=0.3, help="noise_level of RepresentationAugment")
    p.add_argument("--rep-copies", type=int, help="augmented copies of each training rep (default 10; quick 2)")
    p.add_argument("--num-iter", type=int, help="MAGE decoding steps (default: the model's; quick 2)")
    p.add_argument("--rdm-steps", type=int, help="RDM DDIM steps (default: the model's; quick 5)")
    p.add_argument("--cfg", type=float, help="MAGE guidance scale (default: the model's)")
    p.add_argument("--temperature", type=float, help="MAGE temperature (default: the model's)")
    p.add_argument("--token-temperature", type=float,
                   help="temperature of MAGE's draw of each token, > 0 (default: the model's; 1 is the official)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: the CNN's kernels are tiny, and on a shared box more "
                        "threads spin against each other; measured 8x slower with 2 threads at load 10 on 2 cores)")
    p.add_argument("--grid-k", help="real-data grid: nearest pool images per shot of the retrieval arms "
                   "(default 4,8,16; quick 2)")
    p.add_argument("--grid-weight", help="real-data grid: loss weight of a retrieved or pseudo-labelled image, a "
                   "shot's being 1 (default 0.5,1; quick 1)")
    p.add_argument("--grid-share", help="real-data grid: share of the pool each class keeps, most confident first, "
                   "in the pseudo-label arms (default 0.1,0.25,0.5; quick 0.25)")
    p.add_argument("--grid-gen-source", help="retrieval+rcg grid: what RCG images come from, among "
                   + ",".join(GEN_SOURCES) + " (default all)")
    p.add_argument("--grid-gen-weight", help="retrieval+rcg grid: loss weight of a generated image "
                   "(default 0.25,1; quick 1)")
    p.add_argument("--grid-novelty", help="retrieval+rcg grid: drop generated images inside retrieval's coverage, "
                   "off/on (default off,on)")
    p.add_argument("--rr-noise", type=float, default=0.6, help="noise_level of retrieval+rcg's variants (with the "
                   "model's repaint_fraction and the prototype label filter; default 0.6)")
    p.add_argument("--rr-shot-variants", type=int, help="retrieval+rcg: variants per shot (default 8; quick 1)")
    p.add_argument("--rr-retrieved-variants", type=int, default=1, help="retrieval+rcg: variants per retrieved image")
    p.add_argument("--rr-interp", type=int, help="retrieval+rcg: interpolated renders per shot (default 8; quick 1)")
    p.add_argument("--pool-cache", type=Path, help="folder of the pool representations cache (default: "
                   "rcg_augment.retrieval.default_cache_dir())")
    p.add_argument("--out-dir", type=Path, default=DEFAULT_OUT,
                   help=f"where fewshot[_quick].{{md,json,png}} go (default {DEFAULT_OUT}/ under the working "
                        "directory; committed results live in benchmarks/results and are copied there by hand)")
    p.add_argument("--tuning-from", type=Path, help="reuse the tuning (classical recipe, probe C, RCG settings) of "
                   "an earlier run's JSON instead of tuning again, e.g. to add the online arm")
    p.add_argument("--train-split-file", type=Path,
                   help="write the held-out test indices per dataset (JSON) for the model recipe to exclude")
    p.add_argument("--split-only", action="store_true", help="write --train-split-file and exit")
    args = p.parse_args(argv)
    q = args.quick

    default_names = "fashion-novel" if args.regime == "novel" else ",".join(DEFAULT_DATASETS)
    names = [n.strip() for n in (args.datasets or default_names).split(",") if n.strip()]
    for n in names:
        if n not in DATASETS:
            p.error(f"--datasets: unknown dataset {n!r}; choose from {', '.join(DATASETS)}")
    if args.regime == "novel":
        names = ["fashion-novel" if n == "fashion-mnist" else n for n in names]
        if names != ["fashion-novel"]:
            p.error(f"--regime novel is defined on Fashion-MNIST only (fashion-novel), got --datasets {args.datasets!r}")
    regime = "novel" if names == ["fashion-novel"] else "standard"
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
    arms = list(DEFAULT_ARMS) if regime == "standard" else list(NOVEL_ARMS)
    if args.arms:
        chosen = [a.strip() for a in args.arms.split(",") if a.strip()]
        bad = [a for a in chosen if a not in ALL_ARMS]
        if bad:
            p.error(f"--arms: unknown {bad}; choose from {ALL_ARMS}")
        arms = [a for a in ALL_ARMS if a in chosen]
    if "retrieval+classical+rcg-mix" in arms and not {"retrieval+classical", "classical+rcg"} <= set(arms):
        p.error("--arms: retrieval+classical+rcg-mix combines the tuned choices of retrieval+classical and "
                "classical+rcg; name both too")

    def float_list(flag: str, text: str | None, full: str, quick: str, low: float, high: float) -> list[float]:
        text = text if text is not None else (quick if q else full)
        try:
            values = [float(v) for v in text.split(",") if v.strip()]
        except ValueError:
            p.error(f"{flag} {text!r}: expected comma-separated numbers")
        if not values or len(set(values)) != len(values) or any(not low <= v <= high for v in values):
            p.error(f"{flag} must be distinct values in [{low:g}, {high:g}], got {text!r}")
        return values

    grid_p = float_list("--grid-p", args.grid_p, "0.25,0.5,0.75", "0.5", 0.0, 1.0)
    if 0.0 in grid_p:
        p.error("--grid-p: leave 0 out (p = 0, the classical recipe alone, is always a candidate)")
    grid_noise = float_list("--grid-noise", args.grid_noise, "0,0.3,0.6", "0.3", 0.0, 1.0)
    grid_repaint = float_list("--grid-repaint", args.grid_repaint, "0.7,1", "0.7,1", 0.5, 1.0)
    filt_text = args.grid_filter or "off,on"
    filt_words = [w.strip() for w in filt_text.split(",") if w.strip()]
    if not filt_words or any(w not in ("off", "on") for w in filt_words) or len(set(filt_words)) != len(filt_words):
        p.error(f"--grid-filter must be off, on or off,on, got {filt_text!r}")
    grid_filter = [w == "on" for w in filt_words]
    try:
        grid_variants = _int_list(args.grid_variants or ("1" if q else "2,8"))
    except ValueError:
        p.error(f"--grid-variants {args.grid_variants!r}: expected comma-separated integers")
    if not grid_variants or min(grid_variants) < 1:
        p.error(f"--grid-variants must be integers >= 1, got {args.grid_variants!r}")

    def pick(value, full, quick):
        return value if value is not None else (quick if q else full)

    def int_list(flag: str, text: str | None, full: str, quick: str) -> list[int]:
        text = text if text is not None else (quick if q else full)
        try:
            values = _int_list(text)
        except ValueError:
            p.error(f"{flag} {text!r}: expected comma-separated integers")
        if not values or min(values) < 1 or len(set(values)) != len(values):
            p.error(f"{flag} must be distinct integers >= 1, got {text!r}")
        return values

    def onoff(flag: str, text: str | None) -> list[bool]:
        words = [w.strip() for w in (text or "off,on").split(",") if w.strip()]
        if not words or any(w not in ("off", "on") for w in words) or len(set(words)) != len(words):
            p.error(f"{flag} must be off, on or off,on, got {text!r}")
        return [w == "on" for w in words]

    grid_k = int_list("--grid-k", args.grid_k, "4,8,16", "2")
    grid_weight = float_list("--grid-weight", args.grid_weight, "0.5,1", "1", 1e-3, 100.0)
    grid_share = float_list("--grid-share", args.grid_share, "0.1,0.25,0.5", "0.25", 1e-4, 1.0)
    grid_gen_weight = float_list("--grid-gen-weight", args.grid_gen_weight, "0.25,1", "1", 1e-3, 100.0)
    sources = [w.strip() for w in (args.grid_gen_source or ",".join(GEN_SOURCES)).split(",") if w.strip()]
    if not sources or any(w not in GEN_SOURCES for w in sources) or len(set(sources)) != len(sources):
        p.error(f"--grid-gen-source must be distinct values among {','.join(GEN_SOURCES)}, got {args.grid_gen_source!r}")
    if args.max_test is not None and args.max_test < 1:
        p.error(f"--max-test must be >= 1, got {args.max_test}")
    if not 0.0 <= args.rr_noise <= 1.0:
        p.error(f"--rr-noise must be in [0, 1], got {args.rr_noise}")

    s = Settings(
        quick=q, datasets=names, shots=shots, seeds=pick(args.seeds, 10, 2), tune_seeds=pick(args.tune_seeds, 3, 1),
        steps=pick(args.steps, 150, 8), batch_size=pick(args.batch_size, 32, 16), lr=args.lr, width=args.width,
        val_size=100 if q else 300, max_test=pick(args.max_test, None, 150), grid_p=grid_p, grid_noise=grid_noise,
        grid_repaint=grid_repaint, grid_filter=grid_filter, grid_variants=sorted(set(grid_variants)),
        default_p=args.default_p, default_variants=pick(args.default_variants, 4, 1), rep_noise=args.rep_noise,
        rep_copies=pick(args.rep_copies, 10, 2), num_iter=pick(args.num_iter, None, 2),
        rdm_steps=pick(args.rdm_steps, None, 5), cfg=args.cfg, temperature=args.temperature,
        token_temperature=args.token_temperature,
        probe_cs=[0.1, 1.0, 10.0], classical_candidates=list(CLASSICAL_CANDIDATES), arms=arms,
        device=args.device, models=models, tuning_from=str(args.tuning_from) if args.tuning_from else None,
        grid_k=grid_k, grid_weight=grid_weight, grid_share=grid_share, grid_gen_source=sources,
        grid_gen_weight=grid_gen_weight, grid_novelty=onoff("--grid-novelty", args.grid_novelty),
        rr_noise=args.rr_noise, rr_shot_variants=pick(args.rr_shot_variants, 8, 1),
        rr_retrieved_variants=args.rr_retrieved_variants, rr_interp=pick(args.rr_interp, 8, 1),
        pool_cache=str(args.pool_cache) if args.pool_cache else None, regime=regime, first_seed=args.first_seed,
    )
    if not 0 <= s.first_seed <= TUNING_SEED_BASE - s.seeds:
        p.error(f"--first-seed must be in [0, {TUNING_SEED_BASE - s.seeds}] (the tuning draws use seeds from "
                f"{TUNING_SEED_BASE}), got {s.first_seed}")
    if min(s.rr_shot_variants, s.rr_retrieved_variants, s.rr_interp) < 1:
        p.error("--rr-shot-variants, --rr-retrieved-variants and --rr-interp must be >= 1")
    if args.threads < 1:
        p.error(f"--threads must be >= 1, got {args.threads}")
    if s.seeds < 2:
        p.error(f"--seeds must be >= 2 for a confidence interval, got {s.seeds}")
    if s.tune_seeds < 1 or s.steps < 1 or s.batch_size < 1 or s.default_variants < 1 or s.rep_copies < 1:
        p.error("--tune-seeds, --steps, --batch-size, --default-variants and --rep-copies must be >= 1")
    if not 0.0 <= s.default_p <= 1.0:
        p.error(f"--default-p must be in [0, 1], got {s.default_p}")
    if args.split_only and not args.train_split_file:
        p.error("--split-only needs --train-split-file PATH")
    return args, s


def _choices(tuned: dict) -> dict:
    """A tuning record without its wall times: what two runs must share to combine their arms."""
    return {k: v for k, v in tuned.items() if not k.endswith("seconds")}


def combine_arms(a: dict, b: dict) -> dict:
    """Dataset results ``a`` with ``b``'s arms added (``b`` wins for an arm in both); paired
    differences recomputed. Both must come from the same tuning and seeds."""
    out = dict(a, shots={})
    for k, cell_a in a["shots"].items():
        cell_b = b["shots"].get(k)
        if cell_b is None:
            out["shots"][k] = cell_a
            continue
        per = {**cell_a["per_seed"], **cell_b["per_seed"]}
        if len({len(v) for v in [*cell_a["per_seed"].values(), *cell_b["per_seed"].values()]}) > 1:
            raise SystemExit(f"merge: the two runs have different seed counts at {k} shots")
        cell = {"per_seed": per, "summary": {x: t_interval(v) for x, v in per.items()},
                "paired": paired_differences(per, [x for x in ALL_ARMS if x in per])}
        for key in ("seconds_per_run", "generation_seconds_per_run", "filter_acceptance", "real_stats"):
            cell[key] = {**cell_a.get(key, {}), **cell_b.get(key, {})}
        best = a.get("tuning", {}).get(k, {}).get("best_non_generative")
        if best in per:
            cell["vs_best_non_generative"] = vs_best(per, best)
        out["shots"][k] = cell
    return out


_SAME_SETUP = ("test_size", "test_split_size", "pool_size", "retrieval_pool_size", "generation", "default_rcg",
               "grid_points")


def add_shot_counts(a: dict, b: dict) -> dict:
    """Dataset results ``a`` with ``b``'s shot counts added: two runs on the same test images, pool,
    model and grid at disjoint shot counts (each count keeps its own tuning and paired seeds)."""
    if (a.get("provenance") or {}).get("fingerprint") != (b.get("provenance") or {}).get("fingerprint"):
        raise SystemExit("merge: the two runs used different generative models")
    out = dict(a, shots={**a["shots"], **b["shots"]}, tuning={**a["tuning"], **b["tuning"]})
    out["shots"] = dict(sorted(out["shots"].items(), key=lambda kv: int(kv[0])))
    out["tuning"] = dict(sorted(out["tuning"].items(), key=lambda kv: int(kv[0])))
    for key in ("tuning_seconds", "seconds", "pool_encode_seconds"):
        if key in a or key in b:
            out[key] = (a.get(key) or 0.0) + (b.get(key) or 0.0)
    return out


def eval_seeds(d: dict) -> list[int]:
    """A dataset result's evaluation seeds (reports before --first-seed: 0 .. n - 1)."""
    if "eval_seeds" in d:
        return list(d["eval_seeds"])
    cell = next(iter(d["shots"].values()))
    return list(range(len(next(iter(cell["per_seed"].values())))))


def merge_reports(paths: list[Path], out_dir: Path) -> int:
    """One report from the datasets of several result JSONs (e.g. one run per dataset)."""
    reports = [json.loads(Path(p).read_text()) for p in paths]
    merged = dict(reports[0], datasets={}, runs=[])
    for path, r in zip(paths, reports, strict=True):
        if r["settings"]["quick"] != merged["settings"]["quick"]:
            raise SystemExit(f"{path}: cannot merge quick and full results")
        for name, d in r["datasets"].items():
            before = merged["datasets"].get(name)
            if before is not None and eval_seeds(d) != eval_seeds(before):
                raise SystemExit(f"merge: {path} evaluated {name} on other shot draws (seeds {eval_seeds(d)} vs "
                                 f"{eval_seeds(before)}): one report holds one set of draws; keep it separate")
            if before is not None and set(d["shots"]) <= set(before["shots"]) and all(
                    _choices(d["tuning"][k]) == _choices(before["tuning"][k]) for k in d["shots"]):
                merged["datasets"][name] = combine_arms(before, d)  # same choices, same seeds: arms add up
            elif before is not None and not set(d["shots"]) & set(before["shots"]) and all(
                    before.get(key) == d.get(key) for key in _SAME_SETUP):
                merged["datasets"][name] = add_shot_counts(before, d)  # another run's shot counts
            else:
                if before is not None:
                    print(f"merge: {path} tuned {name} differently (or at other shot counts): its results "
                          f"replace the earlier file's", file=sys.stderr)
                merged["datasets"][name] = d  # a later file wins
        merged["settings"] = dict(merged["settings"], arms=[a for a in ALL_ARMS if any(
            a in cell["per_seed"] for d in merged["datasets"].values() for cell in d["shots"].values())])
        merged["runs"].append({"file": str(path), "date": r["date"], "command": r["command"],
                               "datasets": sorted(r["datasets"]), "wall_seconds": r.get("wall_seconds")})
    for d in merged["datasets"].values():  # records written before arm (h)'s key was stored
        for tuned in d["tuning"].values():
            if "rcg_val_accuracy" in tuned:
                tuned.setdefault("rcg_on_key", best_on_key(tuned))
        for k, cell in d["shots"].items():  # derived statistics by this version's rules (idempotent)
            per = cell["per_seed"]
            cell["paired"] = paired_differences(per, [a for a in ALL_ARMS if a in per])
            best = d["tuning"].get(k, {}).get("best_non_generative")
            if best in per:
                cell["vs_best_non_generative"] = vs_best(per, best)
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
        ap.add_argument("--out-dir", type=Path, default=DEFAULT_OUT)
        a = ap.parse_args(argv[1:])
        return merge_reports(a.reports, a.out_dir)
    args, s = parse_args(argv)
    t_start = time.perf_counter()
    torch.set_num_threads(args.threads)

    def log(msg: str) -> None:
        print(msg, flush=True)

    models = {}
    for name in s.datasets:  # before reading any data: the novel regime refuses a model that saw its classes
        models[name] = load_model(name, s)
        if name == "fashion-novel" and models[name][1] is not None:
            check_base_only(models[name][0].config.metadata, models[name][1])
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
    for name, d in data.items():
        pipe, spec = models[name]
        prov = provenance(pipe, spec, d)
        log(f"{name}: {len(d.pool)} pool / {len(d.test_full)} test images "
            f"({len(d.test)} evaluated); shots {s.shots[name]}; {s.seeds} seeds")
        log(f"  generative model: {prov['model']}")
        log(f"  {prov['statement']}")
        r = run_dataset(d, pipe, s, log)
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
