"""Nearest real neighbours from an unlabelled pool, in a pipeline's encoder space.

Where unlabelled images of the domain are at hand, the images nearest to a labelled shot are a
strong augmentation of their own (Burg et al., TMLR 2023; Geng et al., NeurIPS 2024), and
``rcg-augment build --pool`` writes them beside the generated variants. This module holds the two
pieces that path and the benchmarks share:

- :class:`PoolIndex`: a pool's normalised representations, encoded once in batches (the pool is
  read image by image, never held in memory as pixels) and cached on disk under a key made of the
  model's and the pool's fingerprints;
- :meth:`PoolIndex.search`: cosine top-k in chunks of the pool, so a 60,000-image pool costs one
  (queries x chunk) similarity block at a time.

Example::

    from rcg_augment import RCGPipeline
    from rcg_augment.data import open_source
    from rcg_augment.retrieval import PoolIndex

    pipe = RCGPipeline.from_pretrained("digits-tiny")
    index = PoolIndex.from_source(pipe, open_source("digits"))
    similarity, pool_index = index.search(pipe.encode(shots), k=8)
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

CACHE_ENV = "RCG_AUGMENT_CACHE"


def default_cache_dir() -> Path:
    """``$RCG_AUGMENT_CACHE/pools``, else ``$XDG_CACHE_HOME/rcg-augment/pools`` (``~/.cache``)."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]) / "pools"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "rcg-augment" / "pools"


@torch.inference_mode()
def encode_source(pipe, source, *, indices: Sequence[int] | None = None, batch_size: int = 256,
                  progress: bool = True, desc: str = "encoding the pool") -> torch.Tensor:
    """The normalised representations (N, rep_dim), float32 on CPU, of ``source``'s images
    (all, or ``indices``), read and encoded ``batch_size`` at a time."""
    from tqdm.auto import tqdm

    from .data.sources import pil_to_tensor

    if batch_size < 1:
        raise ValueError(f"`batch_size` must be >= 1, got {batch_size}")
    order = list(range(len(source))) if indices is None else [int(i) for i in indices]
    size, channels = pipe.image_size, pipe.in_channels
    out = torch.empty(len(order), pipe.config.encoder.rep_dim)
    bar = tqdm(total=len(order), desc=desc, unit="img", disable=not progress or len(order) <= batch_size)
    for lo in range(0, len(order), batch_size):
        chunk = order[lo:lo + batch_size]
        images = torch.stack([pil_to_tensor(source.load(i), size, channels) for i in chunk])
        out[lo:lo + len(chunk)] = F.normalize(pipe.encode(images.to(pipe.device)).float(), dim=-1).cpu()
        bar.update(len(chunk))
    bar.close()
    return out


@dataclass
class PoolIndex:
    """A pool's representations for nearest-neighbour search.

    Attributes:
        representations: (N, rep_dim) float32, unit norm; row ``i`` is pool image ``i``.
        model_fingerprint, pool_fingerprint: what they were computed from (the cache key).
    """

    representations: torch.Tensor
    model_fingerprint: str = ""
    pool_fingerprint: str = ""

    def __len__(self) -> int:
        return self.representations.shape[0]

    @property
    def key(self) -> str:
        return f"{self.model_fingerprint[:16]}-{self.pool_fingerprint[:16]}"

    @classmethod
    def from_source(cls, pipe, source, *, cache_dir: str | os.PathLike | None = None, use_cache: bool = True,
                    batch_size: int = 256, progress: bool = True, model_fingerprint: str | None = None,
                    pool_fingerprint: str | None = None) -> PoolIndex:
        """Encode ``source`` (an ``ImageSource``) with ``pipe``, or load the cached encoding.

        The cache file is ``cache_dir/<model fp>-<pool fp>.safetensors`` (default
        :func:`default_cache_dir`); ``use_cache=False`` neither reads nor writes it. Pass
        fingerprints already computed to skip hashing again.
        """
        from safetensors.torch import load_file, save_file

        model_fp = model_fingerprint or pipe.fingerprint()
        pool_fp = pool_fingerprint or source.fingerprint()
        index = cls(torch.empty(0), model_fp, pool_fp)
        path = Path(cache_dir if cache_dir is not None else default_cache_dir()) / f"{index.key}.safetensors"
        if use_cache and path.is_file():
            try:
                reps = load_file(str(path))["representations"]
                if reps.shape == (len(source), pipe.config.encoder.rep_dim):
                    logger.info("pool representations read from %s", path)
                    index.representations = reps.float()
                    return index
                logger.warning("ignoring %s: shape %s does not fit the pool", path, tuple(reps.shape))
            except Exception as err:  # a damaged cache file is re-encoded, never trusted
                logger.warning("ignoring the unreadable pool cache %s (%s)", path, err)
        index.representations = encode_source(pipe, source, batch_size=batch_size, progress=progress)
        if use_cache:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".tmp-{os.getpid()}")
            save_file({"representations": index.representations.contiguous()}, str(tmp),
                      metadata={"model_fingerprint": model_fp, "pool_fingerprint": pool_fp})
            os.replace(tmp, path)
        return index

    def search(self, queries: torch.Tensor, k: int, *, chunk: int = 8192,
               exclude: Sequence[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``k`` most cosine-similar pool rows of each query: ``(similarity, index)``, both
        (Q, k), most similar first (ties: the lower pool index). ``exclude`` lists pool rows never
        returned (e.g. the shots themselves when the pool is the labelled source)."""
        if queries.ndim != 2 or queries.shape[1] != self.representations.shape[1]:
            raise ValueError(f"`queries` must have shape (Q, {self.representations.shape[1]}), got "
                             f"{tuple(queries.shape)}")
        allowed = len(self) - len(set(int(i) for i in exclude or ()))
        if not 1 <= k <= allowed:
            raise ValueError(f"`k` must be in [1, {allowed}] (the pool's searchable images), got {k}")
        if chunk < 1:
            raise ValueError(f"`chunk` must be >= 1, got {chunk}")
        q = F.normalize(queries.detach().float().cpu(), dim=-1)
        banned = torch.zeros(len(self), dtype=torch.bool)
        if exclude:
            banned[torch.as_tensor(list(exclude), dtype=torch.long)] = True
        best_sim = torch.full((q.shape[0], 0), float("-inf"))
        best_idx = torch.zeros((q.shape[0], 0), dtype=torch.long)
        for lo in range(0, len(self), chunk):
            sim = q @ self.representations[lo:lo + chunk].t()
            sim = sim.masked_fill(banned[lo:lo + chunk][None], float("-inf"))
            idx = torch.arange(lo, lo + sim.shape[1]).expand_as(sim)
            # Running top-k over (kept so far, this chunk); a stable sort keeps lower indices first on ties.
            sims, idxs = torch.cat([best_sim, sim], dim=1), torch.cat([best_idx, idx], dim=1)
            order = torch.sort(sims, dim=1, descending=True, stable=True).indices[:, :k]
            best_sim, best_idx = sims.gather(1, order), idxs.gather(1, order)
        return best_sim, best_idx


__all__ = ["CACHE_ENV", "PoolIndex", "default_cache_dir", "encode_source"]
