"""The "fashion-mnist" source on tiny IDX files the tests write (the real files are not needed)."""

from __future__ import annotations

import gzip
import struct

import numpy as np
import pytest

from rcg_augment.cli import main
from rcg_augment.data import SourceError, open_source
from rcg_augment.data import fashion_mnist as fm


def write_idx(path, array: np.ndarray, *, gz: bool) -> None:
    data = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + b"".join(struct.pack(">I", n) for n in array.shape)
    data += array.astype(np.uint8).tobytes()
    if gz:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(data))
    else:
        path.write_bytes(data)


def write_split(folder, split: str, n: int, *, gz: bool = True, seed: int = 0):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
    labels = np.arange(n) % 10
    stem_images, stem_labels, _ = fm.SPLITS[split]
    write_idx(folder / stem_images, images, gz=gz)
    write_idx(folder / stem_labels, labels, gz=gz)
    return images, labels


@pytest.fixture
def no_default_folders(monkeypatch, tmp_path):
    """Search only what the test names: no env var, no Debian folder, an empty working directory."""
    monkeypatch.delenv(fm.ENV_VAR, raising=False)
    monkeypatch.setattr(fm, "DEBIAN_FOLDER", tmp_path / "no-debian")
    monkeypatch.chdir(tmp_path)


@pytest.mark.parametrize("gz", [True, False])
def test_reads_both_splits_with_the_class_names(tmp_path, no_default_folders, gz):
    train_images, train_labels = write_split(tmp_path / "fm", "train", 20, gz=gz)
    write_split(tmp_path / "fm", "test", 10, gz=gz, seed=1)
    train = open_source("fashion-mnist", data_root=tmp_path / "fm")
    test = open_source("fashion-mnist", split="test", data_root=tmp_path / "fm")
    assert (len(train), len(test)) == (20, 10)
    assert train.classes == list(fm.CLASSES) and train.classes[0] == "T-shirt/top" and len(train.classes) == 10
    image, label = train[3]
    assert image.size == (28, 28) and image.mode == "L" and label == int(train_labels[3])
    assert np.array_equal(np.asarray(image), train_images[3])


def test_search_order_named_folder_torchvision_layout_env_debian(tmp_path, monkeypatch, no_default_folders):
    # torchvision's <root>/FashionMNIST/raw below the named folder
    write_split(tmp_path / "tv" / "FashionMNIST" / "raw", "train", 10, gz=False)
    assert len(open_source("fashion-mnist", data_root=tmp_path / "tv")) == 10
    # the environment variable names the folder when data_root is not given
    write_split(tmp_path / "env", "train", 30)
    monkeypatch.setenv(fm.ENV_VAR, str(tmp_path / "env"))
    assert len(open_source("fashion-mnist")) == 30
    monkeypatch.delenv(fm.ENV_VAR)
    # torchvision's layout under the working directory, before the Debian folder
    write_split(tmp_path / "data" / "FashionMNIST" / "raw", "train", 40)
    write_split(tmp_path / "no-debian", "train", 50)
    assert len(open_source("fashion-mnist")) == 40
    (tmp_path / "data" / "FashionMNIST" / "raw" / "train-images-idx3-ubyte.gz").unlink()
    assert len(open_source("fashion-mnist")) == 50


def test_not_found_is_one_line_saying_how_to_get_it(tmp_path, no_default_folders, capsys):
    with pytest.raises(SourceError) as info:
        open_source("fashion-mnist")
    message = str(info.value)
    assert "\n" not in message and "apt-get install dataset-fashion-mnist" in message and "--data-root" in message
    code = main(["build", "--input", "fashion-mnist", "--out", str(tmp_path / "c"), "--variants", "1"])
    err = capsys.readouterr().err.strip()
    assert code != 0 and len(err.splitlines()) == 1 and "apt-get install dataset-fashion-mnist" in err


@pytest.mark.parametrize("damage", ["truncated", "bad-gzip", "bad-magic", "label-count"])
def test_corrupt_files_give_a_clear_error(tmp_path, no_default_folders, damage):
    folder = tmp_path / "fm"
    write_split(folder, "train", 12)
    images = folder / "train-images-idx3-ubyte.gz"
    raw = gzip.decompress(images.read_bytes())
    if damage == "truncated":
        images.write_bytes(gzip.compress(raw[:-100]))
    elif damage == "bad-gzip":
        images.write_bytes(images.read_bytes()[: len(images.read_bytes()) // 2])
    elif damage == "bad-magic":
        images.write_bytes(gzip.compress(b"\x12\x34" + raw[2:]))
    else:
        write_idx(folder / "train-labels-idx1-ubyte", np.zeros(5, dtype=np.uint8), gz=True)
    with pytest.raises(SourceError) as info:
        open_source("fashion-mnist", data_root=folder)
    message = str(info.value)
    assert "\n" not in message and "Traceback" not in message
    assert {"truncated": "truncated or corrupt", "bad-gzip": "truncated or corrupt", "bad-magic": "not an IDX file",
            "label-count": "holds 12 images but"}[damage] in message


def test_bad_split_and_data_root_misuse(tmp_path, no_default_folders):
    write_split(tmp_path / "fm", "train", 10)
    with pytest.raises(SourceError, match="splits \\['train', 'test'\\]"):
        open_source("fashion-mnist", split="validation", data_root=tmp_path / "fm")
    with pytest.raises(SourceError, match="no such folder"):
        open_source("fashion-mnist", data_root=tmp_path / "missing")
    with pytest.raises(SourceError, match="applies to the 'fashion-mnist' source only"):
        open_source("digits", data_root=tmp_path / "fm")


def test_build_cli_label_names_are_the_class_names(tmp_path, no_default_folders, capsys):
    from rcg_augment.data import SyntheticDataset
    from tests.training.helpers import micro_pipeline

    write_split(tmp_path / "fm", "train", 20)
    model = micro_pipeline().save_pretrained(tmp_path / "model")
    code = main(["build", "--input", "fashion-mnist", "--data-root", str(tmp_path / "fm"), "--model", str(model),
                 "--shots", "1", "--variants", "1", "--out", str(tmp_path / "cache"), "--no-progress",
                 "--num-iter", "2", "--rdm-steps", "2"])
    assert code == 0, capsys.readouterr().err
    ds = SyntheticDataset(tmp_path / "cache")
    assert ds.classes == list(fm.CLASSES) and len(ds) == 10
