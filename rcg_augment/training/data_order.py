"""The order the trainer reads images in, and every seed it draws: pure functions of the seed.

The data order is a pure function of (seed, micro-batch index) -- one permutation per epoch,
each process taking its slice of every global batch -- and every random draw of a step comes
from generators seeded by :func:`derive_seed` over (seed, stage, step, micro-batch, process). A
run stopped at step k and resumed therefore reproduces the uninterrupted run (bit for bit on CPU).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, Dataset

from ..data.sources import ImageSource, pil_to_tensor

PRELOAD_LIMIT_BYTES = 1 << 30


def derive_seed(*parts) -> int:
    """A 63-bit seed from any parts (stable across processes and Python runs)."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


class BatchOrder:
    """Which images each process reads for each micro-batch, as a pure function of the seed.

    The stream is one seeded permutation per epoch, concatenated; global micro-batch ``b`` is
    positions ``[b * G, (b + 1) * G)`` of it (G = batch_size * num_processes, so a batch may
    span two epochs and datasets smaller than a batch still work), and process ``r`` takes
    slice ``r`` of it.
    """

    def __init__(self, num_items: int, batch_size: int, num_processes: int, process_index: int, seed: int):
        if num_items < 1:
            raise ValueError("the training data is empty")
        self.n, self.batch_size, self.seed = num_items, batch_size, seed
        self.num_processes, self.process_index = num_processes, process_index
        self._cache: dict[int, torch.Tensor] = {}

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.num_processes

    def permutation(self, epoch: int) -> torch.Tensor:
        if epoch not in self._cache:
            if len(self._cache) > 4:
                self._cache.clear()
            g = torch.Generator().manual_seed(derive_seed(self.seed, "data-order", epoch))
            self._cache[epoch] = torch.randperm(self.n, generator=g)
        return self._cache[epoch]

    def epoch_of(self, batch: int) -> float:
        return batch * self.global_batch / self.n

    def indices(self, batch: int) -> list[int]:
        start = batch * self.global_batch + self.process_index * self.batch_size
        out: list[torch.Tensor] = []
        pos, need = start, self.batch_size
        while need:
            epoch, offset = divmod(pos, self.n)
            take = min(self.n - offset, need)
            out.append(self.permutation(epoch)[offset: offset + take])
            pos, need = pos + take, need - take
        return torch.cat(out).tolist()

    def __call__(self, start: int) -> Iterator[list[int]]:
        batch = start
        while True:
            yield self.indices(batch)
            batch += 1


class _BatchSampler:
    """Infinite batch sampler over a :class:`BatchOrder`, for a DataLoader with workers."""

    def __init__(self, order: BatchOrder, start: int):
        self.order, self.start = order, start

    def __iter__(self):
        return self.order(self.start)


class ImageTensors(Dataset):
    """An :class:`ImageSource` as (C, size, size) float tensors in [0, 1]."""

    def __init__(self, source: ImageSource, size: int, channels: int):
        self.source, self.size, self.channels = source, size, channels

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> torch.Tensor:
        return pil_to_tensor(self.source.load(index), self.size, self.channels)


def image_batches(data: ImageTensors, order: BatchOrder, start: int, num_workers: int, show: bool) -> Iterator[torch.Tensor]:
    nbytes = len(data) * data.channels * data.size**2 * 4
    if nbytes <= PRELOAD_LIMIT_BYTES:
        from tqdm.auto import tqdm

        images = torch.stack([data[i] for i in tqdm(range(len(data)), desc="loading images", disable=not show,
                                                    leave=False)])
        return (images[idx] for idx in order(start))
    loader = DataLoader(data, batch_sampler=_BatchSampler(order, start), num_workers=num_workers,
                        collate_fn=torch.stack, persistent_workers=num_workers > 0)
    return iter(loader)


__all__ = ["BatchOrder", "ImageTensors", "PRELOAD_LIMIT_BYTES", "derive_seed", "image_batches"]
