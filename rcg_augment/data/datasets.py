"""Reading the synthetic-variant cache, and mixing it with real images for few-shot training."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import numpy as np
from torch.utils.data import Dataset

from ..files import sha256_file
from .cache_files import MANIFEST_NAME
from .cache_manifest import CACHE_FORMAT

logger = logging.getLogger(__name__)


def read_manifest(out_dir: str | os.PathLike) -> dict:
    """The manifest of a complete cache; a clear error for anything else."""
    out_dir = Path(out_dir)
    path = out_dir / MANIFEST_NAME
    if not path.is_file():
        hint = (" (a build is incomplete or still running: rerun `rcg-augment build` with the same arguments "
                "to finish it)" if (out_dir / "plan.json").is_file() else "")
        raise FileNotFoundError(f"{out_dir} is not a complete synthetic cache: {MANIFEST_NAME} is missing{hint}")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError) as err:
        raise ValueError(f"{path}: unreadable manifest ({err}); rebuild the cache with --overwrite") from err
    if not isinstance(manifest, dict) or manifest.get("format") != CACHE_FORMAT or not manifest.get("complete"):
        raise ValueError(f"{path} is not a complete {CACHE_FORMAT} manifest; rebuild the cache with --overwrite")
    return manifest


def load_synthetic(out_dir: str | os.PathLike, *, verify: bool = False):
    """The cache as one ``datasets.Dataset`` (memory-mapped shards concatenated in record order).

    Columns: ``image`` (PNG, decoded to PIL), ``label`` (ClassLabel with the source's classes),
    ``source_index``, ``variant_index``, ``noise_level``, ``seed``, ``origin`` ("variant" or
    "retrieved"), and for retrieved records ``pool_index`` (the record's index in the pool as read)
    and ``similarity`` (cosine to its source in the encoder space; both null for variants).
    ``variant_index`` of a retrieved record is its neighbour rank (0: nearest). ``verify``
    re-hashes every shard against the manifest.
    """
    import datasets

    out_dir = Path(out_dir)
    manifest = read_manifest(out_dir)
    parts = []
    for shard in manifest["shards"]:
        path = out_dir / shard["file"]
        if not path.is_file() or path.stat().st_size != shard["bytes"]:
            raise ValueError(f"{path}: missing or of the wrong size; rebuild the cache with --overwrite")
        if verify:
            if sha256_file(path) != shard["sha256"]:
                raise ValueError(f"{path}: sha256 does not match the manifest; rebuild the cache with --overwrite")
        parts.append(datasets.Dataset.from_file(str(path)))
    ds = datasets.concatenate_datasets(parts)
    if len(ds) != manifest["records"]:
        raise ValueError(f"{out_dir}: the shards hold {len(ds)} records, the manifest says {manifest['records']}")
    return ds


class SyntheticDataset(Dataset):
    """A built cache as a torch Dataset of ``(PIL.Image, label)``, like torchvision datasets.

    Args:
        out_dir: a directory written by :func:`~rcg_augment.data.build_synthetic` (complete).
        transform: applied to the image when given.

    Attributes: ``classes`` (names, index = label), ``labels``, ``origin`` ("variant" or
    "retrieved" per record), ``manifest``, ``hf_dataset``.

    Example::

        ds = SyntheticDataset("cache/", transform=torchvision.transforms.ToTensor())
        image, label = ds[0]
    """

    def __init__(self, out_dir: str | os.PathLike, transform=None, *, verify: bool = False):
        self.out_dir = Path(out_dir)
        self.hf_dataset = load_synthetic(self.out_dir, verify=verify)
        self.manifest = read_manifest(self.out_dir)
        self.classes = list(self.manifest["source"]["classes"])
        self.labels = [int(x) for x in self.hf_dataset["label"]]
        self.origin = (list(self.hf_dataset["origin"]) if "origin" in self.hf_dataset.column_names
                       else ["variant"] * len(self.hf_dataset))
        self.transform = transform
        if len(self.hf_dataset) == 0:
            logger.warning("%s holds no records (the quality filter dropped all of them?)", self.out_dir)

    def __len__(self) -> int:
        return len(self.hf_dataset)

    def __getitem__(self, index: int):
        row = self.hf_dataset[int(index)]
        image = row["image"]
        if self.transform is not None:
            image = self.transform(image)
        return image, int(row["label"])

    def __repr__(self) -> str:
        return f"SyntheticDataset({str(self.out_dir)!r}, records={len(self)}, classes={len(self.classes)})"


def _classes_of(dataset) -> list[str] | None:
    seen = 0
    while dataset is not None and seen < 8:  # look through torch Subset wrappers
        classes = getattr(dataset, "classes", None)
        if classes is not None:
            return [str(c) for c in classes]
        dataset, seen = getattr(dataset, "dataset", None), seen + 1
    return None


def _map_labels(real, synthetic: SyntheticDataset) -> tuple[list[str], np.ndarray]:
    """The real side's class names and, per cache label, its index among them."""
    real_classes = _classes_of(real)
    if real_classes is None:
        logger.warning("`real` has no `classes`; assuming its label indices match the cache's %s",
                       synthetic.classes)
        return list(synthetic.classes), np.arange(len(synthetic.classes))
    missing = [c for c in synthetic.classes if c not in real_classes]
    if missing:
        raise ValueError(f"the synthetic cache has classes {missing} that `real` lacks "
                         f"(real classes: {real_classes}); build the cache from the same source")
    return real_classes, np.asarray([real_classes.index(c) for c in synthetic.classes], dtype=np.int64)


class FewShotAugmentedDataset(Dataset):
    """Real images plus a fresh draw of synthetic variants each epoch, labels in the real
    dataset's class indices.

    Length: ``round(len(real) / (1 - synthetic_ratio))``; the first ``len(real)`` indices are
    the real images, the rest are synthetic records drawn without replacement (reusing records
    only when the epoch needs more than the cache holds). Shuffle with the DataLoader;
    :meth:`set_epoch` changes the synthetic draw (deterministic in ``seed`` and the epoch).

    Args:
        real: a dataset of ``(image, label)`` (ImageSource, torchvision dataset, Subset, ...).
        synthetic: a :class:`SyntheticDataset` (or a cache directory).
        synthetic_ratio: fraction of each epoch that is synthetic, in [0, 1).
        seed: seeds the synthetic draws.
        transform: applied to every image (real and synthetic).

    With DataLoader workers, call :meth:`set_epoch` before iterating and leave
    ``persistent_workers`` off, so the workers receive each epoch's draw.

    Labels: when both sides have ``classes``, synthetic labels are mapped by class name and an
    unknown synthetic class is an error; without names on the real side, indices must agree.
    """

    def __init__(self, real, synthetic, synthetic_ratio: float = 0.5, *, seed: int = 0, transform=None):
        if not 0.0 <= float(synthetic_ratio) < 1.0:
            raise ValueError(f"`synthetic_ratio` must be in [0, 1), got {synthetic_ratio}")
        if not isinstance(synthetic, SyntheticDataset):
            synthetic = SyntheticDataset(synthetic)
        if len(real) == 0:
            raise ValueError("`real` is empty; FewShotAugmentedDataset needs at least one real image")
        self.real, self.synthetic = real, synthetic
        self.synthetic_ratio = float(synthetic_ratio)
        self.seed = int(seed)
        self.transform = transform
        self.classes, self._label_map = _map_labels(real, synthetic)
        self.num_real = len(real)
        self.num_synthetic = int(round(self.num_real / (1.0 - self.synthetic_ratio))) - self.num_real
        if self.num_synthetic > 0 and len(synthetic) == 0:
            raise ValueError(f"{synthetic.out_dir} holds no records; use synthetic_ratio=0 or rebuild the cache")
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        """Draw this epoch's synthetic records (a function of ``seed`` and ``epoch`` only)."""
        self.epoch = int(epoch)
        rng = np.random.default_rng([self.seed, self.epoch])
        n, draws = len(self.synthetic), []
        while sum(map(len, draws)) < self.num_synthetic:
            draws.append(rng.permutation(n))
        self._draw = np.concatenate(draws)[: self.num_synthetic] if draws else np.zeros(0, dtype=np.int64)

    def __len__(self) -> int:
        return self.num_real + self.num_synthetic

    def __getitem__(self, index: int):
        index = int(index)
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} items")
        if index < self.num_real:
            image, label = self.real[index]
        else:
            image, label = self.synthetic[int(self._draw[index - self.num_real])]
            label = int(self._label_map[label])
        if self.transform is not None:
            image = self.transform(image)
        return image, int(label)

    def is_synthetic(self, index: int) -> bool:
        return int(index) >= self.num_real


def record_hashes(out_dir: str | os.PathLike, *, verify: bool = False) -> list[str]:
    """One sha256 per record of a cache, in record order, over its PNG bytes and every other
    column: two caches hold the same records exactly when these lists are equal (how resumed,
    killed and distributed builds are checked against an uninterrupted one). ``verify`` checks
    the shards against the manifest first."""
    import datasets

    ds = load_synthetic(out_dir, verify=verify).cast_column("image", datasets.Image(decode=False))
    out = []
    for row in ds:
        h = hashlib.sha256(row["image"]["bytes"])
        h.update(json.dumps({k: row[k] for k in sorted(row) if k != "image"}, sort_keys=True).encode())
        out.append(h.hexdigest())
    return out


class ShotVariantDataset(Dataset):
    """The labelled images a cache was built from, each replaced by one of its own cached variants
    with probability ``p``, plus the cache's retrieved records: RCG as an augmentation of the shots
    beside retrieval (the benchmark's arm (o), ``benchmarks/fewshot.py``).

    Items: first the sources the cache holds records of (by its ``source_index`` column, in index
    order), then, with ``include_retrieved``, every retrieved record (``origin == "retrieved"``,
    labelled by its shot). For a source, each epoch draws (from ``seed``, the epoch and the item
    only) whether it comes as itself or as one of its variants, and which; a source without
    variants (``--variants 0``, or all dropped by a filter) always comes as itself.

    Args:
        real: the source the cache was built from, indexed as the build read it (e.g.
            ``open_source("fashion-mnist", split="train")`` for ``--input fashion-mnist``).
        synthetic: a :class:`SyntheticDataset` (or a cache directory) built from ``real``.
        p: probability of a variant in place of its source, in [0, 1].
        seed: seeds the draws; :meth:`set_epoch` changes them.
        include_retrieved: also serve the cache's retrieved records.
        transform: applied to every image.

    Labels follow ``real``'s class indices (mapped by class name, as in
    :class:`FewShotAugmentedDataset`).

    Example::

        cache = SyntheticDataset("cache/")     # rcg-augment build --pool ... --neighbours 8 --variants 8
        train = ShotVariantDataset(open_source("my-images/"), cache, p=0.5, transform=ToTensor())
    """

    def __init__(self, real, synthetic, p: float = 0.5, *, seed: int = 0, include_retrieved: bool = True,
                 transform=None):
        if not 0.0 <= float(p) <= 1.0:
            raise ValueError(f"`p` must be in [0, 1], got {p}")
        if not isinstance(synthetic, SyntheticDataset):
            synthetic = SyntheticDataset(synthetic)
        columns = synthetic.hf_dataset.column_names
        if "source_index" not in columns:
            raise ValueError(f"{synthetic.out_dir} has no `source_index` column; rebuild it with this version")
        self.real, self.synthetic, self.p, self.seed = real, synthetic, float(p), int(seed)
        self.transform = transform
        self.classes, self._label_map = _map_labels(real, synthetic)
        source_index = np.asarray(synthetic.hf_dataset["source_index"], dtype=np.int64)
        origin = np.asarray(synthetic.origin)
        if len(source_index) and source_index.max() >= len(real):
            raise ValueError(f"the cache refers to source image {int(source_index.max())}, `real` has {len(real)} "
                             "images: pass the source the cache was built from")
        self.sources = np.unique(source_index)
        self._variants = {int(s): np.flatnonzero((source_index == s) & (origin == "variant")) for s in self.sources}
        self.retrieved = np.flatnonzero(origin == "retrieved") if include_retrieved else np.zeros(0, dtype=np.int64)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Change the draws (a function of ``seed``, ``epoch`` and the item only)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.sources) + len(self.retrieved)

    def variant_record(self, index: int) -> int | None:
        """The cache record item ``index`` serves this epoch, or None for the source itself."""
        index = self._check(index)
        if index >= len(self.sources):
            return int(self.retrieved[index - len(self.sources)])
        variants = self._variants[int(self.sources[index])]
        if not len(variants) or self.p == 0.0:
            return None
        rng = np.random.default_rng([self.seed, self.epoch, index])
        if rng.random() >= self.p:
            return None
        return int(variants[rng.integers(len(variants))])

    def _check(self, index: int) -> int:
        index = int(index)
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} items")
        return index

    def __getitem__(self, index: int):
        index = self._check(index)
        record = self.variant_record(index)
        if record is None:
            image, label = self.real[int(self.sources[index])]
        else:
            image, label = self.synthetic[record]
            label = int(self._label_map[label])
        if self.transform is not None:
            image = self.transform(image)
        return image, int(label)


__all__ = ["FewShotAugmentedDataset", "ShotVariantDataset", "SyntheticDataset", "load_synthetic", "read_manifest",
           "record_hashes"]
