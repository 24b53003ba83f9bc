"""RCGAugment on a Hugging Face ``datasets.Dataset`` via ``with_transform`` (batched, on the fly).

    python examples/hf_datasets_with_transform.py [--model digits-tiny|DIR]

``with_transform`` runs a function on every batch that is read, so each epoch sees fresh
augmentations and nothing is written to disk. The function below stacks the batch's images into
one tensor, so RCGAugment reconstructs the whole batch in a single pipeline call.

Runs offline on CPU in well under a minute. Uses the bundled ``digits-tiny`` model when this
installation has it; otherwise it builds a randomly initialised tiny pipeline (its outputs are
noise-like: the point is the plumbing, not the pictures).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import datasets
import numpy as np
import torch
from torch.utils.data import DataLoader
from torchvision.transforms import v2

from rcg_augment import RCGAugment, RCGPipeline
from rcg_augment.zoo import available_models


def pick_model(requested: str | None, workdir: Path) -> str:
    if requested:
        return requested
    if "digits-tiny" in available_models():
        return "digits-tiny"
    print("note: the trained 'digits-tiny' weights are not bundled in this installation; "
          "using a randomly initialised tiny pipeline instead")
    torch.manual_seed(0)
    return str(RCGPipeline.from_preset("tiny", in_channels=1).save_pretrained(workdir / "tiny-random"))


def digits_dataset(n: int) -> datasets.Dataset:
    from sklearn.datasets import load_digits

    d = load_digits()
    images = [np.round(x * (255 / 16)).astype(np.uint8) for x in d.images[:n]]
    features = datasets.Features({"image": datasets.Image(),
                                  "label": datasets.ClassLabel(names=[str(i) for i in range(10)])})
    return datasets.Dataset.from_dict({"image": images, "label": d.target[:n].tolist()}, features=features)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="named model or directory (default: digits-tiny if bundled)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        model = pick_model(args.model, Path(tmp))
        ds = digits_dataset(128)
        print(ds)

        augment = RCGAugment(noise_level=(0.1, 0.5), model=model, p=0.5, seed=0, num_iter=4, rdm_steps=10)
        to_tensor = v2.PILToTensor()

        def train_transform(batch: dict) -> dict:
            images = torch.stack([to_tensor(img.convert("L")) for img in batch["image"]])  # (B, 1, 8, 8) uint8
            images = augment(images)  # one pipeline call, a noise level and a coin flip per image
            return {"pixel_values": images.float() / 255.0, "label": batch["label"]}

        train = ds.with_transform(train_transform)
        example = train[0]
        print(f"train[0]: pixel_values {tuple(example['pixel_values'].shape)}, label {example['label']}")

        # Reading a slice runs the transform once for the slice: the batched path.
        start = time.perf_counter()
        sliced = train[:32]
        print(f"train[:32] in one call: {tuple(sliced['pixel_values'].shape)}, {time.perf_counter() - start:.2f} s")

        # A DataLoader fetches each batch with Dataset.__getitems__, so the transform (and
        # RCGAugment) also runs once per batch here.
        loader = DataLoader(train, batch_size=32, shuffle=True)
        start = time.perf_counter()
        for step, batch in enumerate(loader):
            print(f"loader batch {step}: {tuple(batch['pixel_values'].shape)}, labels {batch['label'][:8].tolist()}...")
        print(f"epoch of {len(train)} images: {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
