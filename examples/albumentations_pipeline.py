"""AlbuRCGAugment in an albumentations 2 pipeline: A.Compose with a seed, batches, to_dict/from_dict.

    python examples/albumentations_pipeline.py [--model digits-tiny|DIR]

Runs offline on CPU in well under a minute. Uses the bundled ``digits-tiny`` model when this
installation has it; otherwise it builds a randomly initialised tiny pipeline (its outputs are
noise-like: the point is the plumbing, not the pictures).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import albumentations as A
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from rcg_augment import RCGPipeline
from rcg_augment.albumentations import AlbuRCGAugment  # registers the class for A.from_dict
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


class DigitArrays(Dataset):
    def __init__(self, images: np.ndarray, labels: np.ndarray, transform: A.Compose):
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return torch.from_numpy(self.transform(image=self.images[i])["image"]), int(self.labels[i])


def reseed_worker(worker_id: int) -> None:
    # albumentations 2.0 does not re-seed a Compose per DataLoader worker; without this every
    # worker would repeat the same random stream. info.seed follows torch.manual_seed.
    info = torch.utils.data.get_worker_info()
    info.dataset.transform.set_random_seed(info.seed % 2**32)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="named model or directory (default: digits-tiny if bundled)")
    args = parser.parse_args()

    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.round(digits.images[:96] * (255 / 16)).astype(np.uint8)[..., None]  # (96, 8, 8, 1) HWC uint8
    labels = digits.target[:96]

    with tempfile.TemporaryDirectory() as tmp:
        model = pick_model(args.model, Path(tmp))
        tf = A.Compose([
            A.Affine(rotate=(-10, 10), p=0.5),
            AlbuRCGAugment(noise_level=(0.1, 0.5), model=model, p=0.5, num_iter=4, rdm_steps=10),
            A.ToFloat(max_value=255),
        ], seed=0)
        print(tf)

        out = tf(image=images[0])["image"]
        print(f"one image: {images[0].shape} {images[0].dtype} -> {out.shape} {out.dtype}")

        # The `images` target runs AlbuRCGAugment once for the whole batch, one noise level per image
        # (p then decides for the whole call, so this pipeline always applies it).
        batch_tf = A.Compose([AlbuRCGAugment(noise_level=(0.1, 0.5), model=model, num_iter=4, rdm_steps=10)], seed=0)
        batch_tf(image=images[0])  # loads the model, so the timing below is the call alone
        start = time.perf_counter()
        batch = batch_tf(images=images[:32])["images"]
        changed = np.abs(batch.astype(np.float32) - images[:32]).mean()
        print(f"batch of 32 in one call: {batch.shape} {batch.dtype}, {time.perf_counter() - start:.2f} s, "
              f"mean |change| {changed:.1f} / 255")

        # Serialisation: the model is stored by name/directory (an RCGPipeline object can't be).
        path = Path(tmp) / "augment.json"
        A.save(batch_tf, str(path))
        restored = A.load(str(path))
        print("serialised:", json.loads(path.read_text())["transform"]["transforms"][0])
        batch_tf.set_random_seed(7)
        restored.set_random_seed(7)
        same = np.array_equal(batch_tf(image=images[1])["image"], restored(image=images[1])["image"])
        print(f"restored pipeline gives the same output under the same seed: {same}")

        torch.manual_seed(0)
        loader = DataLoader(DigitArrays(images, labels, tf), batch_size=32, num_workers=2,
                            worker_init_fn=reseed_worker)
        start = time.perf_counter()
        for step, (x, y) in enumerate(loader):
            print(f"loader batch {step}: {tuple(x.shape)} {x.dtype}, labels {y[:8].tolist()}...")
        print(f"DataLoader epoch with 2 workers: {time.perf_counter() - start:.1f} s")
        if not same:
            raise SystemExit("restored pipeline differs from the original")


if __name__ == "__main__":
    main()
