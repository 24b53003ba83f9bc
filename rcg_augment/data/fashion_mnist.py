"""Fashion-MNIST (Xiao et al. 2017; MIT licence) from its four IDX files, read locally.

Nothing is downloaded. The files are looked for, in order, in

1. the folder the caller names (``root=``, ``--data-root``, or the environment variable
   ``RCG_AUGMENT_FASHION_MNIST``): the files themselves, or torchvision's
   ``<root>/FashionMNIST/raw`` layout below it;
2. torchvision's layout under the working directory (``./data/FashionMNIST/raw``);
3. the Debian package's folder, ``/usr/share/datasets/fashion-mnist``
   (``apt-get install dataset-fashion-mnist``).

Each file may be gzipped (``*.gz``, as the Debian package and the original site ship them) or
plain (as torchvision extracts them).
"""

from __future__ import annotations

import gzip
import os
import zlib
from pathlib import Path

import numpy as np

CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
           "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
SPLITS = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", 60_000),
          "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte", 10_000)}
ENV_VAR = "RCG_AUGMENT_FASHION_MNIST"
DEBIAN_FOLDER = Path("/usr/share/datasets/fashion-mnist")
HOW_TO_GET = ("Fashion-MNIST's IDX files were not found; install them with `apt-get install "
              "dataset-fashion-mnist` (Debian/Ubuntu) or pass the folder that holds "
              "train-images-idx3-ubyte[.gz] and the other three files (--data-root DIR, "
              f"root=DIR, or {ENV_VAR}=DIR)")

# IDX type byte 0x08: unsigned byte, the only type Fashion-MNIST uses.
_UBYTE = 0x08


class IDXError(ValueError):
    """An IDX file that is truncated, corrupt or not the kind expected."""


def candidate_folders(root: str | os.PathLike | None = None) -> list[Path]:
    """The folders searched, in order (see the module docstring)."""
    named = root if root is not None else os.environ.get(ENV_VAR) or None
    folders: list[Path] = []
    if named is not None:
        folders += [Path(named), Path(named) / "FashionMNIST" / "raw"]
    folders += [Path("data") / "FashionMNIST" / "raw", DEBIAN_FOLDER]
    return folders


def _file_in(folder: Path, stem: str) -> Path | None:
    for name in (stem, stem + ".gz"):
        if (folder / name).is_file():
            return folder / name
    return None


def locate(split: str = "train", root: str | os.PathLike | None = None) -> tuple[Path, Path]:
    """The (images, labels) files of ``split``; FileNotFoundError (one line, how to get them) if none."""
    if split not in SPLITS:
        raise ValueError(f"Fashion-MNIST has the splits {list(SPLITS)}; got `split` {split!r}")
    images, labels, _ = SPLITS[split]
    folders = candidate_folders(root)
    if root is not None and not Path(root).is_dir():
        raise FileNotFoundError(f"{root}: no such folder (the Fashion-MNIST folder named)")
    for folder in folders:
        found = _file_in(folder, images), _file_in(folder, labels)
        if all(found):
            return found  # type: ignore[return-value]
    raise FileNotFoundError(HOW_TO_GET + f" (looked in: {', '.join(str(f) for f in folders)})")


def read_idx(path: str | os.PathLike, *, ndim: int) -> np.ndarray:
    """An IDX file of unsigned bytes as a numpy array of ``ndim`` dimensions (gzip or plain)."""
    path = Path(path)
    try:
        with (gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")) as f:
            data = f.read()
    except (OSError, EOFError, zlib.error) as err:  # gzip raises these on truncation/corruption
        raise IDXError(f"{path}: cannot read it ({type(err).__name__}: {err}); the file is truncated or corrupt, "
                       "reinstall or download it again") from err
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise IDXError(f"{path}: not an IDX file (bad magic number)")
    if data[2] != _UBYTE or data[3] != ndim:
        raise IDXError(f"{path}: expected an IDX file of unsigned bytes with {ndim} dimension(s), got type "
                       f"0x{data[2]:02x} with {data[3]}")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise IDXError(f"{path}: truncated header ({len(data)} bytes)")
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    expected = header + int(np.prod(shape))
    if len(data) != expected:
        raise IDXError(f"{path}: its header says shape {shape} ({expected} bytes) but the file holds {len(data)} "
                       "bytes; the file is truncated or corrupt")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


def load(split: str = "train", root: str | os.PathLike | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(images (N, 28, 28) uint8, labels (N,) int64)`` of ``split``, checked against each other."""
    images_path, labels_path = locate(split, root)
    images = read_idx(images_path, ndim=3)
    labels = read_idx(labels_path, ndim=1).astype(np.int64)
    if len(images) != len(labels):
        raise IDXError(f"{images_path} holds {len(images)} images but {labels_path} {len(labels)} labels")
    if labels.size and labels.max() >= len(CLASSES):
        raise IDXError(f"{labels_path}: label {int(labels.max())} is not one of the {len(CLASSES)} classes")
    return images, labels


__all__ = ["CLASSES", "ENV_VAR", "HOW_TO_GET", "IDXError", "SPLITS", "candidate_folders", "load", "locate",
           "read_idx"]
