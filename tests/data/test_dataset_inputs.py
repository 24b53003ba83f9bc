"""Dataset inputs of open_source: folders datasets.load_dataset reads (parquet, imagefolder
splits), saved datasets with splits, Hub dataset ids, column and split choice, label names."""

from __future__ import annotations

import datasets
import numpy as np
import pytest
from PIL import Image

from rcg_augment.data import SourceError, open_source


def _images(n, seed=0, size=10):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size, size), dtype=np.uint8)) for _ in range(n)]


def make_parquet_dataset(root, *, names=("ant", "bee", "cat"), splits=("train", "test")):
    """A folder in the Hub's parquet layout: data/<split>-00000-of-00001.parquet, ClassLabel kept."""
    features = datasets.Features({"photo": datasets.Image(), "kind": datasets.ClassLabel(names=list(names))})
    (root / "data").mkdir(parents=True)
    for k, split in enumerate(splits):
        n = 6 if split == "train" else 3
        ds = datasets.Dataset.from_dict({"photo": _images(n, seed=k), "kind": [i % len(names) for i in range(n)]},
                                        features=features)
        ds.to_parquet(str(root / "data" / f"{split}-00000-of-00001.parquet"))
    return root


def make_imagefolder_dataset(root, *, classes=("left", "right"), splits=("train", "test")):
    """datasets' imagefolder layout with split folders: <split>/<class>/<image>."""
    for k, split in enumerate(splits):
        for c in classes:
            (root / split / c).mkdir(parents=True)
            for i, img in enumerate(_images(2 if split == "train" else 1, seed=10 * k + len(c))):
                img.save(root / split / c / f"{i}.png")
    return root


def test_parquet_folder_with_columns_split_and_class_names(tmp_path):
    root = make_parquet_dataset(tmp_path / "pq")
    with pytest.raises(SourceError, match="no image column.*--image-column"):
        open_source(root)
    src = open_source(root, image_column="photo")
    assert len(src) == 6 and src.classes == ["ant", "bee", "cat"] and src.labels == [0, 1, 2, 0, 1, 2]
    assert "split train" in src.name
    image, label = src[4]
    assert isinstance(image, Image.Image) and image.size == (10, 10) and label == 1
    test = open_source(root, split="test", image_column="photo", label_column="kind")
    assert len(test) == 3 and test.classes == ["ant", "bee", "cat"]
    with pytest.raises(SourceError, match=r"`label_column` 'species' is not a column; the columns are \['photo', 'kind'\]"):
        open_source(root, image_column="photo", label_column="species")
    with pytest.raises(SourceError, match="split 'nope'"):
        open_source(root, split="nope", image_column="photo")


def test_imagefolder_with_split_folders(tmp_path):
    root = make_imagefolder_dataset(tmp_path / "imgs")
    src = open_source(root)
    assert src.classes == ["left", "right"] and len(src) == 4
    assert len(open_source(root, split="test")) == 2
    subset = src.subset([1, 2])  # decoded only when read
    assert [subset[i][1] for i in range(2)] == [src.labels[1], src.labels[2]]


def test_string_labels_become_sorted_class_names(tmp_path):
    root = tmp_path / "strings"
    root.mkdir()
    ds = datasets.Dataset.from_dict({"image": _images(4), "label": ["zebra", "ant", "zebra", "ant"]},
                                    features=datasets.Features({"image": datasets.Image(),
                                                                "label": datasets.Value("string")}))
    ds.to_parquet(str(root / "train.parquet"))
    src = open_source(root)
    assert src.classes == ["ant", "zebra"] and src.labels == [1, 0, 1, 0]


def test_saved_dataset_dict_split_choice(tmp_path):
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["x", "y"])})

    def part(n):
        return datasets.Dataset.from_dict({"image": _images(n), "label": [i % 2 for i in range(n)]}, features=features)

    datasets.DatasetDict({"validation": part(2), "test": part(4)}).save_to_disk(str(tmp_path / "saved"))
    with pytest.raises(SourceError, match=r"has the splits \['validation', 'test'\] and none is 'train'.*--split"):
        open_source(tmp_path / "saved")
    assert len(open_source(tmp_path / "saved", split="test")) == 4
    with pytest.raises(SourceError, match="no split 'train'"):
        open_source(tmp_path / "saved", split="train")


def test_plain_class_folders_still_use_the_folder_reader(tmp_path):
    for c in ("a", "b"):
        (tmp_path / "f" / c).mkdir(parents=True)
        _images(1)[0].save(tmp_path / "f" / c / "0.png")
    (tmp_path / "f" / "a" / "broken.png").write_bytes(b"not an image")
    src = open_source(tmp_path / "f")
    assert src.classes == ["a", "b"] and len(src.skipped) == 1  # the folder reader's skip list


def test_a_symlinked_data_file_does_not_turn_a_class_folder_into_a_dataset(tmp_path):
    outside = tmp_path / "outside.csv"
    outside.write_text("image,label\n/etc/passwd,0\n")
    for c in ("a", "b"):
        (tmp_path / "f" / c).mkdir(parents=True)
        _images(1)[0].save(tmp_path / "f" / c / "0.png")
    (tmp_path / "f" / "rows.csv").symlink_to(outside)
    src = open_source(tmp_path / "f")
    assert src.name == str(tmp_path / "f")  # the folder reader's, not "... (split train)" of load_dataset
    assert src.classes == ["a", "b"] and len(src) == 2


def test_hub_dataset_id_goes_to_load_dataset_with_the_split(monkeypatch, tmp_path):
    local = make_parquet_dataset(tmp_path / "pq")
    calls = []
    real = datasets.load_dataset

    def fake_load_dataset(path, *args, **kwargs):
        calls.append((path, kwargs.get("split")))
        assert path == "some-org/pets"
        return real(str(local), *args, **kwargs)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    src = open_source("some-org/pets", split="test", image_column="photo")
    assert calls == [("some-org/pets", "test")]
    assert src.name == "some-org/pets (split test)" and src.classes == ["ant", "bee", "cat"] and len(src) == 3


def test_uncached_hub_dataset_offline_is_one_clear_error():
    with pytest.raises(SourceError, match=r"some-org/absent: cannot load it as a Hugging Face Hub dataset.*not a "
                                          r"local folder or a built-in source.*HF_HUB_OFFLINE"):
        open_source("some-org/absent")
