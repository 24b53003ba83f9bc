"""SyntheticDataset, FewShotAugmentedDataset and contact sheets over a built cache."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, Subset

from rcg_augment.data import (
    FewShotAugmentedDataset,
    SyntheticDataset,
    build_synthetic,
    cache_contact_sheet,
    contact_sheet,
    open_source,
)

from .conftest import FAST


@pytest.fixture(scope="module")
def cache(tmp_path_factory, tiny_pipeline_dir):
    from .conftest import make_image_folder

    root = tmp_path_factory.mktemp("ds")
    folder = make_image_folder(root / "imgs", per_class=3, classes=("ant", "bee", "cat"))
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    build_synthetic(folder, root / "cache", variants_per_image=2, noise_level=0.5, pipeline=tiny_pipeline_dir,
                    batch_size=6, progress=False, **FAST)
    torch.set_num_threads(before)
    return folder, root / "cache"


def test_synthetic_dataset_items_and_transform(cache):
    _, out = cache
    ds = SyntheticDataset(out)
    assert len(ds) == 18 and ds.classes == ["ant", "bee", "cat"]
    assert ds.manifest["records"] == 18 and ds.labels == [0] * 6 + [1] * 6 + [2] * 6
    img, label = ds[7]
    assert isinstance(img, Image.Image) and img.mode == "L" and label == 1
    t = SyntheticDataset(out, transform=lambda im: torch.from_numpy(np.array(im)).float())
    x, _ = t[7]
    assert x.shape == (32, 32) and torch.equal(x, torch.from_numpy(np.array(img)).float())
    assert "records=18" in repr(ds)


def test_few_shot_mix_length_labels_and_epochs(cache):
    folder, out = cache
    real = open_source(folder)
    synth = SyntheticDataset(out)
    mix = FewShotAugmentedDataset(real, synth, synthetic_ratio=0.75, seed=3)
    assert len(mix) == round(9 / 0.25) == 36 and mix.num_real == 9 and mix.num_synthetic == 27
    assert [mix[i][1] for i in range(9)] == real.labels
    # synthetic items carry their cache labels (same class names here)
    draw0 = mix._draw.copy()
    assert all(mix[9 + j][1] == synth.labels[draw0[j]] for j in range(27))
    # 27 > 18 records: every record used once before any repeats
    assert sorted(draw0[:18].tolist()) == list(range(18))
    mix.set_epoch(1)
    draw1 = mix._draw.copy()
    assert not np.array_equal(draw0, draw1)
    again = FewShotAugmentedDataset(real, synth, synthetic_ratio=0.75, seed=3)
    again.set_epoch(1)
    assert np.array_equal(again._draw, draw1)
    assert mix.is_synthetic(9) and not mix.is_synthetic(8)
    with pytest.raises(IndexError):
        mix[36]


def test_few_shot_label_mapping_by_class_name(cache):
    _, out = cache
    synth = SyntheticDataset(out)

    class Real(torch.utils.data.Dataset):
        classes = ["cat", "bee", "ant", "dog"]  # other order, one extra class

        def __len__(self):
            return 4

        def __getitem__(self, i):
            return Image.new("L", (8, 8)), i

    mix = FewShotAugmentedDataset(Subset(Real(), [0, 1]), synth, synthetic_ratio=0.5)
    assert mix.classes == Real.classes and len(mix) == 4
    for j in range(2):
        _, label = mix[2 + j]
        assert Real.classes[label] == synth.classes[synth.labels[mix._draw[j]]]

    class Other(Real):
        classes = ["ant", "bee"]

    with pytest.raises(ValueError, match=r"classes \['cat'\] that `real` lacks"):
        FewShotAugmentedDataset(Other(), synth)
    with pytest.raises(ValueError, match="synthetic_ratio"):
        FewShotAugmentedDataset(Real(), synth, synthetic_ratio=1.0)


def test_few_shot_with_transform_in_a_dataloader(cache):
    folder, out = cache

    def to_tensor(im):
        im = im.convert("L").resize((32, 32))
        return torch.from_numpy(np.asarray(im, dtype=np.float32) / 255)[None]

    mix = FewShotAugmentedDataset(open_source(folder), out, synthetic_ratio=0.5, transform=to_tensor)
    batches = list(DataLoader(mix, batch_size=6, shuffle=True, generator=torch.Generator().manual_seed(0)))
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    expected = [0, 1, 2] * 3 + [mix[i][1] for i in range(9, 18)]
    assert x.shape == (18, 1, 32, 32) and sorted(y.tolist()) == sorted(expected)


def test_contact_sheet_layout(tmp_path):
    sources = [Image.new("L", (8, 8), 255), Image.new("RGB", (25, 25), (0, 255, 0))]
    variants = [[Image.new("L", (32, 32), 0)] * 3, [Image.new("L", (32, 32), 128)]]
    path = contact_sheet(sources, variants, tmp_path / "sheet" / "s.png", row_labels=["one", "two"])
    sheet = Image.open(path)
    assert sheet.mode == "RGB"
    cell = 64  # 32 px doubled: tiny images are enlarged (nearest) to >= 64
    assert sheet.size[0] == 4 + 4 * (cell + 4)
    # the first source (white 8x8) fills its whole cell after nearest upscaling
    px = np.asarray(sheet)
    y0 = 4 + 12
    assert (px[y0:y0 + cell, 4:4 + cell] == 255).all()
    # second row: a grey variant in column 1, empty cells after it
    y1 = y0 + cell + 12 + 4
    assert (px[y1 + 5, 4 + cell + 4 + 5] == 128).all()
    with pytest.raises(ValueError, match="rows"):
        contact_sheet(sources, variants[:1], tmp_path / "x.png")


def test_cache_contact_sheet(cache, tmp_path):
    folder, out = cache
    path = cache_contact_sheet(out, folder, tmp_path / "cs.png", max_rows=3, max_variants=2)
    sheet = Image.open(path)
    # one row per class first: 3 rows of source + 2 variants; tiny sources are upscaled
    assert sheet.size[0] == 4 + 3 * (64 + 4)
    assert sheet.size[1] == 4 + 12 + 3 * (64 + 12 + 4)
