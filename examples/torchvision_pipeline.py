"""RCGAugment in a torchvision training pipeline: Compose, a Dataset, a DataLoader with workers.

    python examples/torchvision_pipeline.py [--model digits-tiny|DIR] [--num-images 128]

Runs offline on CPU in well under a minute. Uses the bundled ``digits-tiny`` model when this
installation has it; otherwise it builds a randomly initialised tiny pipeline (its outputs are
noise-like: the point is the plumbing, not the pictures).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

from rcg_augment import RCGAugment, RCGPipeline
from rcg_augment.data.sources import open_source
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


class Augmented(Dataset):
    """(PIL image, label) pairs from an rcg_augment source, passed through ``transform``."""

    def __init__(self, source, transform):
        self.source, self.transform = source, transform

    def __len__(self):
        return len(self.source)

    def __getitem__(self, index):
        image, label = self.source[index]
        return self.transform(image), label


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="named model or directory (default: digits-tiny if bundled)")
    parser.add_argument("--num-images", type=int, default=128)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        model = pick_model(args.model, Path(tmp))
        digits = open_source("digits").subset(range(args.num_images))  # 8x8 grayscale PIL images

        # Per-sample augmentation. The model loads lazily, once per worker; names/directories
        # keep the transform small to pickle. Fewer decoding/DDIM steps trade quality for speed.
        train_tf = v2.Compose([
            v2.RandomHorizontalFlip(p=0.5),
            RCGAugment(noise_level=(0.1, 0.5), model=model, p=0.5, num_iter=4, rdm_steps=10),
            v2.ToImage(), v2.ToDtype(torch.float32, scale=True),  # v2's ToTensor
        ])
        print(train_tf)

        torch.manual_seed(0)  # seeds the workers' RNGs, hence the augmentations
        loader = DataLoader(Augmented(digits, train_tf), batch_size=32, shuffle=True, num_workers=2)
        start = time.perf_counter()
        for step, (images, labels) in enumerate(loader):
            print(f"batch {step}: images {tuple(images.shape)} {images.dtype} "
                  f"range [{images.min():.2f}, {images.max():.2f}], labels {labels[:8].tolist()}...")
        print(f"one epoch of {len(digits)} images with 2 workers: {time.perf_counter() - start:.1f} s")

        # Batched use (e.g. on the GPU after collation): one pipeline call for the whole batch,
        # with a noise level drawn per image.
        batch_aug = RCGAugment(noise_level=(0.1, 0.5), model=model, seed=0, num_iter=4, rdm_steps=10)
        batch = torch.stack([v2.functional.pil_to_tensor(digits[i][0]) for i in range(32)])  # (32, 1, 8, 8) uint8
        _ = batch_aug.pipeline  # load now so the timing below is the call alone
        start = time.perf_counter()
        out = batch_aug(batch)
        print(f"batched call: {tuple(out.shape)} {out.dtype} in {time.perf_counter() - start:.2f} s; "
              f"mean |change| {(out.float() - batch.float()).abs().mean():.1f} / 255")


if __name__ == "__main__":
    main()
