"""Labelled image sources: an image folder, a Hugging Face dataset (a Hub id, a local folder
``datasets.load_dataset`` reads, or one ``save_to_disk`` wrote), a numpy array, or the datasets
that ship with installed packages (``"digits"``, ``"lfw-faces"``) or with the Debian package
``dataset-fashion-mnist`` (``"fashion-mnist"``).

Every source is a ``torch.utils.data.Dataset`` of ``(PIL.Image, int)`` pairs with ``classes``,
``labels`` and ``skipped`` (files that could not be read, with the reason), so trainers, the
dataset builder and the CLI read data one way.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError
from torch.utils.data import Dataset

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
BUILTIN_SOURCES = ("digits", "lfw-faces", "fashion-mnist")
# A local folder holding files of these kinds, or split sub-folders, is read with datasets.load_dataset.
DATA_FILE_EXTENSIONS = (".parquet", ".arrow", ".csv", ".tsv", ".jsonl", ".json")
SPLIT_FOLDER_NAMES = ("train", "test", "validation", "valid", "val", "dev", "eval")
# "namespace/name" or a bare "name": what a Hub dataset id looks like (tried only when no such path exists).
_HUB_DATASET_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")


class SourceError(ValueError):
    """An input that cannot serve as an image source (empty, missing, unreadable as a whole)."""


# The extra that brings the packages the built-in sources read their images from.
BUILTIN_EXTRA = "examples"


class MissingExtraError(SourceError, ImportError):
    """A built-in source whose package is not installed; the message names the extra to install."""


def _import_for(source: str, module: str, distribution: str):
    """Import ``module`` for the built-in ``source``, or one line naming the extra that brings it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise MissingExtraError(
            f"the built-in source {source!r} needs {distribution}, which is not installed; install it with: "
            f'pip install {distribution} (or, in a clone of rcg-augment: pip install -e ".[{BUILTIN_EXTRA}]")'
        ) from err


def array_to_pil(array: np.ndarray) -> Image.Image:
    """(H, W), (H, W, 1|3|4) uint8, or float in [0, 1] -> PIL image (L, RGB or RGBA)."""
    a = np.asarray(array)
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[-1] not in (3, 4)):
        raise SourceError(f"an image array must be (H, W) or (H, W, 1|3|4), got shape {a.shape}")
    if a.dtype != np.uint8:
        a = np.clip(np.nan_to_num(a.astype(np.float64)), 0.0, 1.0)
        a = np.round(a * 255).astype(np.uint8)
    return Image.fromarray(a)


@dataclass
class ImageSource(Dataset):
    """In-memory or on-disk labelled images. Items are ``(PIL.Image, label)``.

    Build one with :func:`open_source`.
    """

    name: str
    classes: list[str]
    labels: list[int]
    _items: Sequence  # PIL images, file paths, or an indexable of arrays
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.labels)

    def load(self, index: int) -> Image.Image:
        item = self._items[index]
        if isinstance(item, Image.Image):
            return item
        if isinstance(item, (str, Path)):
            return read_image(item)
        return array_to_pil(np.asarray(item))

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        return self.load(index), self.labels[index]

    def subset(self, indices: Sequence[int]) -> ImageSource:
        indices = [int(i) for i in indices]
        return ImageSource(self.name, list(self.classes), [self.labels[i] for i in indices],
                           [self._items[i] for i in indices], list(self.skipped))

    def fingerprint(self) -> str:
        """sha256 over labels and pixel content: detects a changed source."""
        h = hashlib.sha256(repr((self.classes, self.labels)).encode())
        for i in range(len(self)):
            img = self.load(i)
            h.update(f"{img.mode}{img.size}".encode())
            h.update(img.tobytes())
        return h.hexdigest()

    def few_shot(self, shots: int, *, seed: int = 0) -> ImageSource:
        """Keep ``shots`` images per class, drawn with ``seed`` (all of a class if it has fewer)."""
        if shots < 1:
            raise ValueError(f"`shots` must be >= 1, got {shots}")
        rng = np.random.default_rng(seed)
        labels = np.asarray(self.labels)
        keep: list[int] = []
        for c in range(len(self.classes)):
            idx = np.flatnonzero(labels == c)
            keep.extend(sorted(rng.choice(idx, size=min(shots, len(idx)), replace=False).tolist()))
        return self.subset(sorted(keep))


def pil_to_tensor(img: Image.Image, size: int, channels: int):
    """PIL image (any mode) -> float tensor (channels, size, size) in [0, 1] (bicubic resize)."""
    import torch

    mode = "L" if channels == 1 else "RGB"
    if img.mode != mode:
        if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
            img = img.convert("RGBA")
            background = Image.new("RGBA", img.size, (0, 0, 0, 255))
            img = Image.alpha_composite(background, img)
        elif img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
            a = np.asarray(img, dtype=np.float64)
            finite = np.isfinite(a)  # float TIFFs may hold NaN/inf: scale by the finite values
            lo, hi = (a[finite].min(), a[finite].max()) if finite.any() else (0.0, 0.0)
            a = np.nan_to_num(a, nan=lo, posinf=hi, neginf=lo)
            span = hi - lo
            img = Image.fromarray(np.round((a - lo) / (span if span > 0 else 1.0) * 255).astype(np.uint8))
        img = img.convert(mode)
    if img.size != (size, size):
        img = img.resize((size, size), Image.Resampling.BICUBIC)
    t = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0)
    return t[None] if t.ndim == 2 else t.permute(2, 0, 1).contiguous()


def read_image(path: str | os.PathLike) -> Image.Image:
    """Open an image file fully (so truncation shows now), applying its EXIF orientation."""
    with Image.open(path) as img:
        img.load()
        img = ImageOps.exif_transpose(img)
        return img.copy()


def _load_digits() -> ImageSource:
    d = _import_for("digits", "sklearn.datasets", "scikit-learn").load_digits()
    images = [Image.fromarray(np.round(x * (255.0 / 16.0)).astype(np.uint8), mode="L") for x in d.images]
    return ImageSource("digits", [str(n) for n in d.target_names], [int(t) for t in d.target], images)


def _load_lfw_faces() -> ImageSource:
    arr = _import_for("lfw-faces", "skimage.data", "scikit-image").lfw_subset()  # (200, 25, 25) float in [0, 1]: 100 faces, then 100 non-faces
    labels = [1] * 100 + [0] * 100
    images = [array_to_pil(a) for a in arr]
    return ImageSource("lfw-faces", ["non-face", "face"], labels, images)


def _load_fashion_mnist(split: str | None, data_root) -> ImageSource:
    from . import fashion_mnist

    split = split or "train"
    try:
        images, labels = fashion_mnist.load(split, data_root)
    except (FileNotFoundError, ValueError) as err:  # not found, corrupt (IDXError), an unknown split
        raise SourceError(str(err)) from err
    return ImageSource(f"fashion-mnist (split {split})", list(fashion_mnist.CLASSES), labels.tolist(), images)


def _inside(path: Path, root: Path) -> bool:
    """Whether ``path`` (symlinks resolved) lies strictly inside ``root``; False for broken links and loops."""
    try:
        target, root = path.resolve(strict=True), root.resolve()
    except (OSError, RuntimeError):  # broken symlinks, symlink loops
        return False
    return target != root and target.is_relative_to(root)


def _from_folder(root: Path) -> ImageSource:
    """``root/<class>/<image>`` (labels from sub-folders) or a flat folder of images (one class).

    Names starting with "." are ignored. A symlink (class folder or image) is followed only when
    its target lies inside ``root``; others are listed in ``skipped`` and never opened.
    """
    skipped: list[tuple[str, str]] = []

    def followable(p: Path) -> bool:
        if p.is_symlink() and not _inside(p, root):
            skipped.append((str(p), "symlink to a target outside the input folder (or broken, or a loop); "
                                    "not followed"))
            return False
        return True

    subdirs = sorted(p for p in root.iterdir()
                     if not p.name.startswith(".") and p.is_dir() and followable(p))

    def images_in(folder: Path) -> list[Path]:
        return sorted(p for p in folder.iterdir()
                      if p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".") and followable(p)
                      and p.is_file())

    groups = [(d.name, d) for d in subdirs] if subdirs else [(root.name or "images", root)]
    classes, labels, items = [], [], []
    for name, folder in groups:
        files = images_in(folder)
        if not files:
            hint = "" if subdirs else " and no class sub-folders (names starting with '.' are ignored)"
            raise SourceError(f"{folder}: the class folder '{name}' holds no images ({', '.join(IMAGE_EXTENSIONS)})"
                              + hint)
        good = []
        for f in files:
            try:
                with Image.open(f) as img:
                    img.verify()
                good.append(f)
            except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
                skipped.append((str(f), f"{type(err).__name__}: {err}"))
        if not good:
            raise SourceError(f"{folder}: none of the {len(files)} files of class '{name}' could be read")
        classes.append(name)
        labels.extend([len(classes) - 1] * len(good))
        items.extend(good)
    for path, reason in skipped:
        logger.warning("skipping %s (%s)", path, reason)
    return ImageSource(str(root), classes, labels, items, skipped)


class _Column:
    """One column of a ``datasets.Dataset``, decoded row by row when read (not all up front)."""

    def __init__(self, ds, column: str):
        self._ds = ds.select_columns([column])
        self._column = column

    def __len__(self) -> int:
        return len(self._ds)

    def __getitem__(self, index: int):
        value = self._ds[int(index)][self._column]
        return value if isinstance(value, Image.Image) else np.asarray(value)


def _from_hf(ds, name: str, image_column: str | None, label_column: str | None) -> ImageSource:
    """An ImageSource over a ``datasets.Dataset``; class names from a ClassLabel feature (or the
    sorted distinct values of a string label column)."""
    columns = list(ds.column_names)
    for flag, given in (("image_column", image_column), ("label_column", label_column)):
        if given is not None and given not in columns:
            raise SourceError(f"{name}: `{flag}` {given!r} is not a column; the columns are {columns}")
    image_column = image_column or next((c for c in ("image", "img", "pixel_values") if c in columns), None)
    class_labels = [c for c in columns if getattr(ds.features.get(c), "names", None)]
    label_column = label_column or next((c for c in ("label", "labels") if c in columns), None) or (
        class_labels[0] if len(class_labels) == 1 else None)
    if image_column is None:
        raise SourceError(f"{name}: no image column (looked for image/img/pixel_values) among {columns}; "
                          "name it with `image_column` (--image-column)")
    if len(ds) == 0:
        raise SourceError(f"{name}: the dataset is empty")
    feature = ds.features.get(label_column) if label_column else None
    if label_column is None:
        labels, classes = [0] * len(ds), ["images"]
    else:
        values = list(ds[label_column])
        names = getattr(feature, "names", None)
        if names:
            labels, classes = [int(v) for v in values], list(names)
        elif all(isinstance(v, str) for v in values):
            classes = sorted(set(values))
            index = {c: i for i, c in enumerate(classes)}
            labels = [index[v] for v in values]
        else:
            try:
                labels = [int(v) for v in values]
            except (TypeError, ValueError) as err:
                raise SourceError(f"{name}: the label column {label_column!r} holds values that are neither class "
                                  f"indices nor names ({err}); choose another with `label_column`") from err
            if min(labels) < 0:
                raise SourceError(f"{name}: the label column {label_column!r} holds negative labels (unlabelled "
                                  "rows?); choose a labelled split")
            classes = [str(i) for i in range(max(labels) + 1)]
    return ImageSource(name, classes, labels, _Column(ds, image_column))


def _pick_split(names, split: str | None, where: str) -> str:
    names = list(names)
    if split is not None:
        if split not in names:
            raise SourceError(f"{where} has no split {split!r}; its splits are {names} (choose with `split`, --split)")
        return split
    if "train" in names:
        return "train"
    if len(names) == 1:
        return names[0]
    raise SourceError(f"{where} has the splits {names} and none is 'train'; choose one with `split` (--split)")


def _loadable_folder(path: Path) -> bool:
    """Whether ``path`` is laid out for ``datasets.load_dataset`` (data files, or split folders)
    rather than as ``root/<class>/<image>``. Symlinks do not count (the folder reader decides
    whether to follow them)."""
    entries = [p for p in path.iterdir() if not p.is_symlink()]
    if any(p.suffix.lower() in DATA_FILE_EXTENSIONS for p in entries if p.is_file()):
        return True
    subdirs = [p for p in entries if p.is_dir() and not p.name.startswith(".")]
    if subdirs and all(p.name.lower() in SPLIT_FOLDER_NAMES for p in subdirs):
        return True
    data = path / "data"
    return data.is_dir() and any(p.suffix.lower() in DATA_FILE_EXTENSIONS for p in data.rglob("*"))


def _load_dataset(spec: str, split: str | None, image_column, label_column, *, hub: bool) -> ImageSource:
    """``datasets.load_dataset(spec, split=...)`` as an ImageSource; one SourceError on failure."""
    import datasets

    where = f"the Hugging Face Hub dataset {spec!r}" if hub else str(spec)
    try:
        if split is None:  # every split is prepared either way; pick one once they are known
            loaded = datasets.load_dataset(spec)
            chosen = _pick_split(list(loaded), None, where)
            ds = loaded[chosen]
        else:
            chosen, ds = split, datasets.load_dataset(spec, split=split)
    except SourceError:
        raise
    except Exception as err:  # datasets and the Hub raise many kinds; the message says which
        first = str(err).splitlines()[0] if str(err) else ""
        if split is not None and isinstance(err, ValueError) and "split" in first.lower():
            raise SourceError(f"{where} has no split {split!r} ({first}); choose another with `split` "
                              "(--split)") from err
        what = f" (split {split!r})" if split is not None else ""
        if hub:
            raise SourceError(
                f"{spec}: cannot load it as a Hugging Face Hub dataset{what} ({type(err).__name__}: {first}); it "
                f"is not a local folder or a built-in source ({', '.join(BUILTIN_SOURCES)}) either. Offline "
                "(HF_HUB_OFFLINE=1), a Hub dataset must already be in the datasets cache") from err
        raise SourceError(f"{spec}: datasets.load_dataset cannot read this folder{what} ({type(err).__name__}: "
                          f"{first}); use root/<class>/<image> sub-folders, or data files (parquet, csv, jsonl) "
                          "it understands") from err
    if isinstance(ds, datasets.IterableDataset):  # pragma: no cover - not asked for (no streaming)
        raise SourceError(f"{where}: a streaming dataset is not supported")
    return _from_hf(ds, f"{spec} (split {chosen})", image_column, label_column)


def open_source(
    spec, *, labels: Sequence[int] | None = None, classes: Sequence[str] | None = None,
    image_column: str | None = None, label_column: str | None = None, split: str | None = None,
    data_root: str | os.PathLike | None = None,
) -> ImageSource:
    """Open a labelled image source.

    ``spec`` may be:
      - ``"digits"``: sklearn's 1,797 8x8 digits (grayscale, 10 classes);
      - ``"lfw-faces"``: skimage's ``lfw_subset()``: 100 faces (label 1) and 100 non-faces (0), 25x25
        (both need scikit-learn / scikit-image: ``pip install -e ".[examples]"`` in a clone);
      - ``"fashion-mnist"``: Fashion-MNIST's 28x28 grey images, ``split`` ``"train"`` (60,000,
        the default) or ``"test"`` (10,000), read from its IDX files in ``data_root``, the folder
        in ``$RCG_AUGMENT_FASHION_MNIST``, ``./data/FashionMNIST/raw`` or the Debian package's
        folder (``apt-get install dataset-fashion-mnist``); see ``rcg_augment.data.fashion_mnist``;
      - a folder: ``root/<class>/<image>`` or a flat folder of images; unreadable files are
        skipped and listed in ``.skipped``;
      - a folder ``datasets.load_dataset`` reads: data files (parquet, csv, jsonl, arrow) or split
        sub-folders (``train/<class>/<image>``, imagefolder);
      - a folder written by ``datasets.Dataset.save_to_disk`` or a ``datasets.Dataset``;
      - a Hugging Face Hub dataset id (``"namespace/name"``), when no such path exists;
      - a numpy array (N, H, W) or (N, H, W, C), uint8 or float in [0, 1], with ``labels``.

    For datasets: ``split`` (default ``"train"``, or the only split), ``image_column`` (default
    image/img/pixel_values) and ``label_column`` (default label/labels, else the only ClassLabel
    column; none: one class). Class
    names come from a ClassLabel feature, or the distinct values of a string label column.

    Example::

        src = open_source("my-org/pets", split="test", image_column="photo", label_column="breed")
    """
    if isinstance(spec, ImageSource):
        return spec
    if isinstance(spec, np.ndarray):
        if spec.ndim not in (3, 4) or len(spec) == 0:
            raise SourceError(f"a numpy source must be a non-empty (N, H, W[, C]) array, got shape {spec.shape}")
        labels = [0] * len(spec) if labels is None else [int(v) for v in labels]
        if len(labels) != len(spec):
            raise SourceError(f"{len(labels)} labels for {len(spec)} images")
        classes = list(classes) if classes is not None else [str(i) for i in range(max(labels) + 1)]
        return ImageSource("array", classes, labels, spec)
    try:
        import datasets as hf

        if isinstance(spec, hf.Dataset):
            return _from_hf(spec, "dataset", image_column, label_column)
    except ImportError:  # pragma: no cover - datasets is a dependency
        hf = None
    if data_root is not None and spec != "fashion-mnist":
        raise SourceError(f"`data_root` (--data-root) applies to the 'fashion-mnist' source only, not {spec!r}")
    if isinstance(spec, str) and spec == "fashion-mnist":
        return _load_fashion_mnist(split, data_root)
    if isinstance(spec, str) and spec in BUILTIN_SOURCES:
        if split is not None:
            raise SourceError(f"the built-in source {spec!r} has no splits; drop `split` ({split!r})")
        return _load_digits() if spec == "digits" else _load_lfw_faces()
    path = Path(spec)
    if not path.exists():
        if isinstance(spec, str) and _HUB_DATASET_ID.match(spec):
            return _load_dataset(spec, split, image_column, label_column, hub=True)
        raise SourceError(f"{spec}: no such folder, and not a built-in source ({', '.join(BUILTIN_SOURCES)})")
    if not path.is_dir():
        raise SourceError(f"{spec}: expected a folder of images or a saved Hugging Face dataset")
    if (path / "dataset_info.json").is_file() or (path / "state.json").is_file() or (path / "dataset_dict.json").is_file():
        loaded = hf.load_from_disk(str(path))
        if isinstance(loaded, hf.DatasetDict):
            loaded = loaded[_pick_split(loaded, split, str(path))]
        elif split is not None:
            raise SourceError(f"{path} holds a single dataset, not splits; drop `split` ({split!r})")
        return _from_hf(loaded, str(path), image_column, label_column)
    if not any(path.iterdir()):
        raise SourceError(f"{spec}: the folder is empty")
    if split is not None or _loadable_folder(path):
        return _load_dataset(str(path), split, image_column, label_column, hub=False)
    return _from_folder(path)


__all__ = ["BUILTIN_EXTRA", "BUILTIN_SOURCES", "DATA_FILE_EXTENSIONS", "IMAGE_EXTENSIONS", "ImageSource",
           "MissingExtraError", "SourceError", "array_to_pil", "open_source", "pil_to_tensor", "read_image"]
