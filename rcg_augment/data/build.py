"""The synthetic-variant cache: K RCG variants of every source image, written as a sharded
Hugging Face ``datasets`` table with a manifest that makes a stale cache detectable.

Layout of ``out_dir``::

    plan.json                 what this cache is (model, source, settings, seed, versions); written first
    shards/shard-00000.arrow  Arrow stream files with the dataset's columns and features
    shards/shard-00000.json   sidecar: sha256, byte size and record count of its shard, written after it
    manifest.json             plan + shard list + counts; present only once every shard is complete
    .lock, .lock-p<i>         flock files (one per process index when distributed)

Determinism: the work is a fixed list of records ``r = 0 .. N*V-1`` (source ``r // V``, variant
``r % V``, where ``V = variants_per_image * len(noise_levels)``), cut into batches of ``batch_size``
consecutive records and shards of ``records_per_shard`` consecutive records. Each batch draws from a
``torch.Generator`` seeded by a hash of ``seed`` and its records, so a resumed, split or distributed
build writes the same bytes as one uninterrupted process (on the same device type and versions).

This module generates the records; :mod:`~rcg_augment.data.cache_files` writes files crash-safely
(atomic writes, the lock, shard sidecars) and :mod:`~rcg_augment.data.cache_manifest` holds what
a cache is (plan, spec, manifest) and detects a stale one.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..cpu_matmul import DEFAULT_CPU_MATMUL, check_cpu_matmul
from ..cpu_matmul import cpu_matmul as _cpu_matmul_mode
from ..label_filter import DEFAULT_MAX_ATTEMPTS, PrototypeFilter, _reconstruct_with_labels
from ..settings import FULL_REPAINT, GenerationSettings
from .cache_files import (
    MANIFEST_NAME,
    PLAN_NAME,
    SHARD_DIR,
    BuildLock,
    BuildLockedError,
    atomic_write,
    check_out_dir,
    clean_shard,
    clear_cache,
    json_bytes,
    read_json,
    shard_complete,
    shard_paths,
)
from .cache_manifest import (
    CACHE_FORMAT,
    CACHE_FORMAT_VERSION,
    StaleCacheError,
    cache_features,
    check_plan,
    finalise,
    hash_spec,
    identity_settings,
    spec_of,
    sum_draws,
    versions,
)
from .sources import BUILTIN_SOURCES, ImageSource, SourceError, open_source, pil_to_tensor

logger = logging.getLogger(__name__)

DEFAULT_SHARD_BATCHES = 8  # records_per_shard defaults to 8 batches: little work lost on a kill
_TENSOR_CACHE_BYTES = 256 * 2**20  # keep decoded source tensors in memory below this size


@dataclass
class BuildSummary:
    """What one :func:`build_synthetic` call did.

    ``records`` and ``dropped`` count the whole cache when ``complete``, else the shards this
    process owns; ``records_written``/``variants_per_second`` count only this call's work.
    """

    out_dir: Path
    complete: bool
    records: int
    records_written: int
    dropped: int
    skipped: list[tuple[str, str]]
    sources_used: int
    sources_total: int
    shards: list[Path]
    shards_resumed: int
    seconds: float
    variants_per_second: float
    manifest_path: Path | None = None
    classes: list[str] = field(default_factory=list)
    # With the label filter: per class name, {"generated": draws, "accepted": kept variants}.
    label_filter: dict[str, dict[str, int]] | None = None
    # Source images used per class name (fewer than `shots` where a class has fewer images).
    sources_per_class: dict[str, int] = field(default_factory=dict)
    retrieved: int = 0  # records retrieved from the pool (counted like `records`)

    def acceptance_by_class(self) -> dict[str, float] | None:
        """Accepted / generated draws per class (label filter on), else None."""
        if self.label_filter is None:
            return None
        return {c: v["accepted"] / v["generated"] if v["generated"] else float("nan")
                for c, v in self.label_filter.items()}


def batch_seed(seed: int, records: np.ndarray) -> int:
    """The generator seed of one batch: a hash of the build seed and the batch's
    ``(source_index, variant_index)`` records (an (n, 2) int array)."""
    h = hashlib.sha256(f"rcg-augment/batch/{int(seed)}/".encode())
    h.update(np.ascontiguousarray(records, dtype="<i8").tobytes())
    return int.from_bytes(h.digest()[:8], "little") & (2**63 - 1)


def _noise_levels(noise_level) -> list[float]:
    values = [noise_level] if isinstance(noise_level, (int, float)) else list(noise_level)
    if not values:
        raise ValueError("`noise_level` must be a float in [0, 1] or a non-empty list of them, got []")
    out = []
    for v in values:
        v = float(v)
        if not 0.0 <= v <= 1.0:
            raise ValueError(f"`noise_level` values must be in [0, 1], got {v}")
        out.append(v)
    if len(set(out)) != len(out):
        raise ValueError(f"`noise_level` lists a value twice: {out}")
    return out


def _resolve_pipeline(pipeline, device):
    from ..pipeline import RCGPipeline

    if isinstance(pipeline, RCGPipeline):
        if device is not None:
            pipeline.to(device)
        return pipeline, "<RCGPipeline object>"
    if isinstance(pipeline, (str, os.PathLike)):
        return RCGPipeline.from_pretrained(pipeline, device=device), str(pipeline)
    raise TypeError(f"`pipeline` must be an RCGPipeline, a saved-pipeline directory or a named model, "
                    f"got {type(pipeline).__name__}")


def _describe_item(source: ImageSource, index: int) -> str:
    item = source._items[index]
    if isinstance(item, (str, os.PathLike)):
        return str(item)
    return f"{source.name}[{index}]"


@dataclass
class _Selection:
    source: ImageSource  # the images used, in record order
    indices: list[int]  # their index in the opened source (the `source_index` column)
    skipped: list[tuple[str, str]]
    total: int
    tensors: list[torch.Tensor] | None  # decoded inputs, when small enough to keep


def _select_sources(source, shots, seed, size, channels) -> _Selection:
    """Open the source, draw the few-shot subset, and drop images that fail to decode."""
    src = open_source(source)
    indices = list(range(len(src)))
    if shots is not None:
        # few_shot() on a source whose items are indices returns the chosen indices.
        drawn = ImageSource(src.name, list(src.classes), list(src.labels), indices).few_shot(int(shots), seed=seed)
        indices = [int(i) for i in drawn._items]
    skipped = list(src.skipped)
    good, tensors = [], []
    keep_tensors = len(indices) * channels * size * size * 4 <= _TENSOR_CACHE_BYTES
    for i in indices:
        try:
            t = pil_to_tensor(src.load(i), size, channels)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:  # PIL decode errors
            skipped.append((_describe_item(src, i), f"{type(err).__name__}: {err}"))
            logger.warning("skipping unreadable image %s (%s)", *skipped[-1])
            continue
        good.append(i)
        if keep_tensors:
            tensors.append(t)
    if not good:
        raise SourceError(f"{src.name}: none of the {len(indices)} selected images could be read")
    return _Selection(src.subset(good), good, skipped, len(src), tensors if keep_tensors else None)


def _encode_table(rows: dict, features) -> bytes:
    import pyarrow as pa

    schema = features.arrow_schema
    table = pa.Table.from_pydict(rows, schema=schema)
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


def _to_png(pixels: np.ndarray) -> bytes:
    img = Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def build_synthetic(
    source, out_dir: str | os.PathLike, *, variants_per_image: int, noise_level: float | Sequence[float],
    pipeline, batch_size: int = 64, seed: int = 0, cfg: float | None = None, temperature: float | None = None,
    num_iter: int | None = None, rdm_steps: int | None = None, repaint_fraction: float | None = None,
    token_temperature: float | None = None, shots: int | None = None, quality_threshold: float | None = None,
    label_filter: bool = False, max_attempts: int = DEFAULT_MAX_ATTEMPTS, pool=None, neighbours: int = 0,
    pool_cache_dir: str | os.PathLike | None = None, refuse_channel_mismatch: bool = False,
    overwrite: bool = False, progress: bool = True, cpu_matmul: str = DEFAULT_CPU_MATMUL,
    process_index: int = 0, num_processes: int = 1, records_per_shard: int | None = None,
    device: str | torch.device | None = None, barrier: Callable[[], None] | None = None,
) -> BuildSummary:
    """Write ``variants_per_image`` RCG variants of every source image (per noise level) to ``out_dir``,
    and, with ``pool``, its ``neighbours`` nearest real images from the pool beside them.

    Args:
        source: anything :func:`~rcg_augment.data.open_source` takes, or an ``ImageSource``.
        out_dir: a new or empty directory, or an existing cache to resume (same arguments).
        variants_per_image: K >= 0 variants per image and noise level (0 only with ``pool``:
            retrieval only).
        noise_level: a float in [0, 1] or a list of them (each image gets K variants per level).
        pipeline: an ``RCGPipeline``, a directory from ``save_pretrained``, or a named model.
        batch_size: records per ``pipeline.reconstruct`` call (part of the cache's identity: a
            different batch size draws different noise).
        seed: seeds the few-shot draw and every generator.
        cfg, temperature, num_iter, rdm_steps, repaint_fraction, token_temperature: generation settings (None: the
            model's defaults; see :class:`~rcg_augment.settings.GenerationSettings`).
        shots: keep this many images per class (drawn with ``seed``); None keeps all. A class with
            fewer images gives all it has (the summary's ``sources_per_class`` says how many).
        quality_threshold: in [-1, 1]; re-encode each variant and drop it when the cosine
            similarity of its representation to its source's is below this. None: keep all.
        label_filter: keep a variant only if its re-encoded representation is nearest to its own
            class's prototype (the mean representation of that class's source images in this
            build); a rejected variant is drawn again, up to ``max_attempts`` draws in all, and
            dropped if none is accepted. Retrieved records are kept only if their representation
            is nearest to their shot's class prototype. Needs a labelled source with >= 2 classes.
            The summary and the manifest report draws and acceptances per class.
        max_attempts: draws per variant with ``label_filter`` (>= 1).
        pool: unlabelled images of the domain (anything ``open_source`` takes; labels are ignored).
            Each source image's ``neighbours`` most similar pool images (cosine, in the pipeline's
            encoder space) are written as records with ``origin`` "retrieved", labelled by the
            source image, with their ``pool_index`` and ``similarity``. The pool is encoded once in
            batches and cached under ``pool_cache_dir`` (default
            :func:`rcg_augment.retrieval.default_cache_dir`), keyed by model and pool fingerprints.
            When ``pool`` is the same source as ``source``, the source images themselves are never
            retrieved.
        neighbours: retrieved records per source image (>= 1 with ``pool``, 0 without).
        refuse_channel_mismatch: colour source images with a single-channel (grey) model are a
            warning (the variants come out grey); True makes it an error.
        overwrite: delete an existing cache in ``out_dir`` first (any settings).
        progress: show a tqdm bar (images/s, ETA).
        cpu_matmul: the library of the CPU's float32 linear layers, ``"default"`` (torch's BLAS) or
            ``"onednn"`` (faster on some CPUs, outputs differ in rounding; see
            :mod:`rcg_augment.cpu_matmul`). Part of the cache's identity when not the default.
        process_index, num_processes: this process's share of a distributed build; shard ``s``
            belongs to process ``s % num_processes``. Each process writes its own shards; the last
            to find all shards complete writes ``manifest.json`` (with ``barrier``: process 0).
        records_per_shard: records per shard file, a multiple of ``batch_size``
            (default ``8 * batch_size``).
        device: run the pipeline here (None: a loaded pipeline stays on the CPU, an
            ``RCGPipeline`` object where it is; a given one is moved).
        barrier: a callable that waits for all processes (``accelerate``'s ``wait_for_everyone``);
            needed for ``overwrite`` with ``num_processes > 1``.

    Returns:
        A :class:`BuildSummary`. Load the cache with :class:`~rcg_augment.data.SyntheticDataset`
        or :func:`~rcg_augment.data.load_synthetic`.

    Raises:
        StaleCacheError: ``out_dir`` holds a cache with different settings (the message names them).
        BuildLockedError: another builder works on ``out_dir``.

    Example::

        build_synthetic("digits", "cache/", variants_per_image=4, noise_level=0.3,
                        pipeline="digits-tiny", shots=5)
        # 1 shot per class, its 8 nearest images of an unlabelled pool and 4 variants:
        build_synthetic("my-labelled/", "cache/", variants_per_image=4, noise_level=0.3,
                        pipeline="digits-tiny", shots=1, pool="my-unlabelled/", neighbours=8)
    """
    start = time.perf_counter()
    _check_arguments(variants_per_image=variants_per_image, batch_size=batch_size, process_index=process_index,
                     num_processes=num_processes, quality_threshold=quality_threshold, max_attempts=max_attempts,
                     shots=shots, overwrite=overwrite, barrier=barrier, pool=pool, neighbours=neighbours)
    if records_per_shard is None:
        records_per_shard = DEFAULT_SHARD_BATCHES * batch_size
    if records_per_shard < batch_size or records_per_shard % batch_size:
        raise ValueError(f"`records_per_shard` must be a positive multiple of `batch_size` ({batch_size}), "
                         f"got {records_per_shard}")
    check_cpu_matmul(cpu_matmul)
    levels = _noise_levels(noise_level)
    out_dir = Path(out_dir)
    for name, folder in (("input", source), ("pool", pool)):
        if isinstance(folder, (str, os.PathLike)) and str(folder) not in BUILTIN_SOURCES and Path(folder).is_dir() \
                and out_dir.resolve().is_relative_to(Path(folder).resolve()):
            raise ValueError(f"`out_dir` {out_dir} is inside the {name} folder {folder}: the next run would read the "
                             "cache as images; choose an output directory outside it")

    pipe, model_name = _resolve_pipeline(pipeline, device)
    requested = {"cfg": cfg, "temperature": temperature, "num_iter": num_iter, "rdm_steps": rdm_steps,
                 "repaint_fraction": repaint_fraction, "token_temperature": token_temperature}
    resolved = pipe.resolve_settings(**requested)  # validated once, defaults resolved
    sel = _select_sources(source, shots, seed, pipe.image_size, pipe.in_channels)
    mismatch = _channel_mismatch(sel, pipe, model_name)
    if mismatch and refuse_channel_mismatch:
        raise ValueError(mismatch)
    if mismatch:
        warnings.warn(mismatch, stacklevel=2)
    layout = _Layout(K=int(variants_per_image), levels=levels, neighbours=int(neighbours))
    was_training = pipe.training
    pipe.eval()
    try:
        # CPU linear layers on the chosen library (the default, or a pipeline off the CPU: nothing changes)
        matmul = cpu_matmul if pipe.device.type == "cpu" else DEFAULT_CPU_MATMUL
        with _cpu_matmul_mode(matmul):
            # Each source is encoded once; the label filter's prototypes and the pool search share it.
            reps = _source_representations(pipe, sel, batch_size) if (label_filter or pool is not None) else None
            prototypes = _prototypes(sel, reps) if label_filter else None
            retrieval = (_retrieve(pipe, sel, reps, source, pool, int(neighbours), prototypes, batch_size=batch_size,
                                   cache_dir=pool_cache_dir, progress=progress) if pool is not None else None)
            plan = _plan(pipe, model_name, sel, layout, resolved, requested, seed=seed, shots=shots,
                         batch_size=batch_size, records_per_shard=records_per_shard, quality_threshold=quality_threshold,
                         label_filter=label_filter, max_attempts=max_attempts, retrieval=retrieval,
                         cpu_matmul=matmul)
            job = _Job(pipe, sel, layout, plan, resolved, seed=int(seed), batch_size=int(batch_size),
                       records_per_shard=int(records_per_shard), quality_threshold=quality_threshold,
                       prototypes=prototypes, max_attempts=int(max_attempts), retrieval=retrieval, source_reps=reps)
            if out_dir.exists():  # refuse a foreign folder before the lock file is made in it
                check_out_dir(out_dir, overwrite=overwrite)
            out_dir.mkdir(parents=True, exist_ok=True)
            lock = BuildLock(out_dir, process_index, num_processes)
            try:
                _prepare_out_dir(out_dir, plan, overwrite=overwrite, process_index=process_index,
                                 num_processes=num_processes, barrier=barrier)
                todo, own_meta = _pending_shards(out_dir, job, process_index, num_processes)
                resumed = len(own_meta)
                written, generated, gen_seconds = _write_shards(out_dir, job, todo, own_meta, progress=progress,
                                                                bar_position=process_index if num_processes > 1 else None)
                metas, complete = _finish(out_dir, job, own_meta, process_index, num_processes, barrier)
            finally:
                lock.release()
    finally:
        pipe.train(was_training)
    classes = list(sel.source.classes)
    return BuildSummary(
        out_dir=out_dir, complete=complete, records=sum(m["records"] for m in metas.values()),
        records_written=written, dropped=sum(m["dropped"] for m in metas.values()), skipped=list(sel.skipped),
        sources_used=len(sel.indices), sources_total=sel.total,
        shards=[out_dir / metas[s]["file"] for s in sorted(metas)], shards_resumed=resumed,
        seconds=time.perf_counter() - start,
        variants_per_second=generated / gen_seconds if gen_seconds > 0 else 0.0,
        manifest_path=out_dir / MANIFEST_NAME if complete else None, classes=classes,
        label_filter=sum_draws(metas.values(), classes) if label_filter else None,
        sources_per_class={c: int(n) for c, n in zip(classes, np.bincount(sel.source.labels, minlength=len(classes)),
                                                     strict=True)},
        retrieved=sum(m.get("retrieved", 0) for m in metas.values()),
    )


_GREY_MODES = {"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F"}


def _channel_mismatch(sel: _Selection, pipe, model_name: str, probe: int = 32) -> str | None:
    """A message when the sources are colour images and the model is grey, else None."""
    if pipe.in_channels != 1:
        return None
    if all(sel.source.load(i).mode in _GREY_MODES for i in range(min(probe, len(sel.indices)))):
        return None
    trained_on = pipe.config.metadata.get("trained_on") or pipe.config.metadata.get("description") or "grey images"
    start = model_name if not model_name.startswith("<") else "<your model folder>"
    return (f"{sel.source.name} holds colour images, but the model {model_name} is single-channel (trained on "
            f"{str(trained_on)[:80]}): its variants would be grey shapes of its own domain. Use a model trained on "
            f"your kind of images (`pipeline`, --model), or fine-tune one: rcg-augment finetune --from {start} "
            f"--data <your images> --out <dir>")


def _check_arguments(*, variants_per_image, batch_size, process_index, num_processes, quality_threshold,
                     max_attempts, shots, overwrite, barrier, pool, neighbours) -> None:
    """Refuse bad arguments before anything is read or written (each error names the argument)."""
    if int(variants_per_image) != variants_per_image or variants_per_image < 0:
        raise ValueError(f"`variants_per_image` must be an integer >= 0, got {variants_per_image}")
    if int(neighbours) != neighbours or neighbours < 0:
        raise ValueError(f"`neighbours` must be an integer >= 0, got {neighbours}")
    if pool is None and neighbours:
        raise ValueError(f"`neighbours` ({neighbours}) needs a `pool` to retrieve from")
    if pool is not None and not neighbours:
        raise ValueError("`pool` needs `neighbours` >= 1 (the pool images retrieved per source image)")
    if variants_per_image == 0 and pool is None:
        raise ValueError("`variants_per_image` must be >= 1 without a `pool` (0 means retrieval only)")
    if int(batch_size) != batch_size or batch_size < 1:
        raise ValueError(f"`batch_size` must be an integer >= 1, got {batch_size}")
    if num_processes < 1 or not 0 <= process_index < num_processes:
        raise ValueError(f"`process_index` must be in [0, num_processes), got {process_index} of {num_processes}")
    if quality_threshold is not None and not -1.0 <= float(quality_threshold) <= 1.0:
        raise ValueError(f"`quality_threshold` must be a cosine similarity in [-1, 1], got {quality_threshold}")
    if int(max_attempts) != max_attempts or max_attempts < 1:
        raise ValueError(f"`max_attempts` must be an integer >= 1, got {max_attempts}")
    if shots is not None and shots < 1:
        raise ValueError(f"`shots` must be >= 1, got {shots}")
    if overwrite and num_processes > 1 and barrier is None:
        raise ValueError("`overwrite=True` with num_processes > 1 needs `barrier` (e.g. accelerate's "
                         "wait_for_everyone) so no process writes before the old cache is gone; or clear "
                         "the directory with a one-process call first")


@dataclass(frozen=True)
class _Layout:
    """Where a record sits: ``per_source = V + neighbours`` records per source image, source-major;
    record ``r`` is source ``r // per_source``; its slot ``j = r % per_source`` is variant ``j``
    (noise level ``levels[j // K]``) for ``j < V``, else retrieved neighbour ``j - V``."""

    K: int
    levels: list[float]
    neighbours: int

    @property
    def V(self) -> int:
        return self.K * len(self.levels)

    @property
    def per_source(self) -> int:
        return self.V + self.neighbours


@dataclass
class _Retrieval:
    """The pool search: per selected source, its neighbours' pool rows and similarities."""

    pool: ImageSource
    fingerprint: str
    index: np.ndarray  # (num_sources, neighbours) int64 pool rows
    similarity: np.ndarray  # (num_sources, neighbours) float
    accepted: np.ndarray | None  # (num_sources, neighbours) bool: the label filter's verdict
    excluded_sources: bool  # the pool is the source: the sources' own rows were excluded


@dataclass
class _Job:
    """Everything the shard writer needs, fixed before the first shard."""

    pipe: object
    sel: _Selection
    layout: _Layout
    plan: dict
    settings: GenerationSettings
    seed: int
    batch_size: int
    records_per_shard: int
    quality_threshold: float | None
    prototypes: PrototypeFilter | None
    max_attempts: int
    retrieval: _Retrieval | None
    source_reps: torch.Tensor | None = None  # (num_sources, rep_dim): encoded once before the shards, if needed there

    @property
    def n_records(self) -> int:
        return len(self.sel.indices) * self.layout.per_source

    @property
    def n_shards(self) -> int:
        return -(-self.n_records // self.records_per_shard)

    @property
    def spec_hash(self) -> str:
        return hash_spec(spec_of(self.plan))


def _same_source(source, pool) -> bool:
    if source is pool:
        return True
    if isinstance(source, (str, os.PathLike)) and isinstance(pool, (str, os.PathLike)):
        a, b = Path(source), Path(pool)
        if a.exists() and b.exists():
            return a.resolve() == b.resolve()
        return str(source) == str(pool)
    return False


def _retrieve(pipe, sel: _Selection, reps: torch.Tensor, source, pool, k: int, prototypes, *, batch_size: int,
              cache_dir, progress: bool) -> _Retrieval:
    from ..retrieval import PoolIndex

    pool_src = open_source(pool)
    index = PoolIndex.from_source(pipe, pool_src, cache_dir=cache_dir, progress=progress,
                                  batch_size=max(batch_size, 256))
    same = _same_source(source, pool)
    exclude = sel.indices if same else None
    similarity, rows = index.search(reps, k, exclude=exclude)
    accepted = None
    if prototypes is not None:
        labels = torch.as_tensor(list(sel.source.labels), dtype=torch.long)
        nearest = prototypes.nearest(index.representations[rows.reshape(-1)]).reshape(rows.shape)
        accepted = (nearest == labels[:, None]).numpy()
    return _Retrieval(pool_src, index.pool_fingerprint, rows.numpy(), similarity.numpy().astype(np.float64),
                      accepted, same)


def _plan(pipe, model_name, sel: _Selection, layout: _Layout, resolved: GenerationSettings, requested: dict, *,
          seed, shots, batch_size, records_per_shard, quality_threshold, label_filter, max_attempts,
          retrieval: _Retrieval | None, cpu_matmul: str = DEFAULT_CPU_MATMUL) -> dict:
    """What the cache is: its identity (the spec keys) and provenance, written as plan.json."""
    n_records = len(sel.indices) * layout.per_source
    order = ("source-major: record r = (source r // V, variant r % V), noise_levels[variant // variants_per_image]"
             if retrieval is None else
             "source-major: record r = source r // (V + neighbours); slot j = r % (V + neighbours) is variant j "
             "(noise_levels[j // variants_per_image]) for j < V, else retrieved neighbour j - V")
    plan = {
        "format": CACHE_FORMAT, "format_version": CACHE_FORMAT_VERSION,
        "model": {"fingerprint": pipe.fingerprint(), "image_size": pipe.image_size, "in_channels": pipe.in_channels},
        "source": {
            "fingerprint": sel.source.fingerprint(), "classes": list(sel.source.classes),
            "num_images": sel.total, "num_used": len(sel.indices), "shots": shots,
            "indices_sha256": hashlib.sha256(np.asarray(sel.indices, dtype="<i8").tobytes()).hexdigest(),
        },
        "generation": {"variants_per_image": layout.K, "noise_levels": layout.levels,
                       **identity_settings(resolved.to_dict()),
                       "requested": identity_settings(requested, requested=True),
                       **({"label_filter": {"prototypes": "mean representation of each class's sources",
                                            "max_attempts": int(max_attempts)}} if label_filter else {})},
        "seed": int(seed),
        "layout": {"batch_size": int(batch_size), "records_per_shard": int(records_per_shard),
                   "num_records": n_records, "num_shards": -(-n_records // records_per_shard),
                   "record_order": order},
        "quality_threshold": None if quality_threshold is None else float(quality_threshold),
        "versions": versions(),
        "device": pipe.device.type,
        "provenance": {"model": model_name, "source": sel.source.name, "skipped": sel.skipped},
    }
    if retrieval is not None:  # absent without a pool, so caches built before pools keep their identity
        plan["pool"] = {"fingerprint": retrieval.fingerprint, "num_images": len(retrieval.pool),
                        "neighbours": int(retrieval.index.shape[1]), "space": "encoder representation, cosine",
                        "sources_excluded": retrieval.excluded_sources,
                        "neighbours_sha256": hashlib.sha256(np.ascontiguousarray(retrieval.index, dtype="<i8")
                                                            .tobytes()).hexdigest()}
        plan["provenance"]["pool"] = retrieval.pool.name
    if cpu_matmul != DEFAULT_CPU_MATMUL:  # absent at the default: older caches resume
        plan["cpu_matmul"] = cpu_matmul
    return plan


def _prepare_out_dir(out_dir: Path, plan: dict, *, overwrite: bool, process_index: int, num_processes: int,
                     barrier) -> None:
    """Clear (``overwrite``), check that ``out_dir`` holds nothing else or this same cache, write the plan."""
    if overwrite and process_index == 0:
        if (out_dir / PLAN_NAME).exists() or (out_dir / MANIFEST_NAME).exists():
            logger.info("overwrite: removing the cache in %s", out_dir)
        clear_cache(out_dir)
    if overwrite and barrier is not None:
        barrier()  # nobody writes before the old cache is gone
    check_out_dir(out_dir)
    check_plan(out_dir, plan)
    if num_processes == 1:  # nobody else is writing: drop temp files of killed runs
        for p in [*out_dir.glob(f"{PLAN_NAME}.tmp.*"), *out_dir.glob(f"{MANIFEST_NAME}.tmp.*")]:
            p.unlink(missing_ok=True)
    (out_dir / SHARD_DIR).mkdir(exist_ok=True)
    if not (out_dir / PLAN_NAME).exists():
        atomic_write(out_dir / PLAN_NAME, json_bytes(plan))


def _pending_shards(out_dir: Path, job: _Job, process_index: int, num_processes: int) -> tuple[list[int], dict]:
    """This process's shards still to write, and the sidecars of those already complete."""
    mine = [s for s in range(job.n_shards) if s % num_processes == process_index]
    todo, done = [], {}
    for s in mine:
        meta = shard_complete(out_dir, s, job.spec_hash, verify=True)
        clean_shard(out_dir, s, temp_only=meta is not None)
        if meta is None:
            todo.append(s)
        else:
            done[s] = meta
    if done:
        logger.info("resuming %s: %d of %d shards already complete", out_dir, len(done), len(mine))
    return todo, done


def _write_shards(out_dir: Path, job: _Job, todo: list[int], metas: dict, *, progress: bool,
                  bar_position: int | None) -> tuple[int, int, float]:
    """Generate and write the shards in ``todo`` (sidecars into ``metas``); returns (records kept,
    variants generated, seconds spent)."""
    from tqdm.auto import tqdm

    features = cache_features(job.sel.source.classes)
    n, per_shard = job.n_records, job.records_per_shard
    total = sum(min(per_shard, n - s * per_shard) for s in todo)
    written = generated = 0
    seconds = 0.0
    bar = tqdm(total=total, unit="img", desc=f"rcg-augment build {out_dir.name}",
               disable=not progress or total == 0, position=bar_position, dynamic_ncols=True)
    try:
        for s in todo:
            t0 = time.perf_counter()
            lo, hi = s * per_shard, min((s + 1) * per_shard, n)
            rows, dropped, draws, counts = _generate_shard(job, lo, hi, bar)
            data = _encode_table(rows, features)
            arrow_path, meta_path = shard_paths(out_dir, s)
            atomic_write(arrow_path, data)
            meta = {"shard": s, "file": f"{SHARD_DIR}/{arrow_path.name}", "record_range": [lo, hi],
                    "records": len(rows["label"]), "dropped": dropped, "bytes": len(data),
                    "sha256": hashlib.sha256(data).hexdigest(), "spec_sha256": job.spec_hash,
                    **({"label_filter": draws} if draws is not None else {}),
                    **({"retrieved": counts["retrieved"]} if job.retrieval is not None else {})}
            atomic_write(meta_path, json_bytes(meta))
            metas[s] = meta
            written += meta["records"]
            generated += counts["generated"]
            seconds += time.perf_counter() - t0
    finally:
        bar.close()
    return written, generated, seconds


def _finish(out_dir: Path, job: _Job, own_meta: dict, process_index: int, num_processes: int,
            barrier) -> tuple[dict, bool]:
    """Write the manifest once every shard is complete; (the sidecars known, complete?)."""
    if barrier is not None and num_processes > 1:
        barrier()  # every shard is written
        if process_index == 0:
            finalise(out_dir, job.plan, job.n_shards, job.spec_hash, own_meta)
        barrier()  # the manifest is written
        manifest = read_json(out_dir / MANIFEST_NAME)
        all_meta = ({sh["shard"]: sh for sh in manifest["shards"]}
                    if isinstance(manifest, dict) and manifest.get("complete") else None)
    else:
        all_meta = finalise(out_dir, job.plan, job.n_shards, job.spec_hash, own_meta)
    if all_meta is None:
        logger.info("%s: this process's %d shards are done; other processes' shards are not all "
                    "complete yet; the last process to finish writes manifest.json", out_dir, len(own_meta))
        return own_meta, False
    return all_meta, True


@torch.inference_mode()
def _generate_shard(job: _Job, lo: int, hi: int, bar) -> tuple[dict, int, dict | None, dict]:
    """Rows of records [lo, hi), the number dropped, (label filter) draws/acceptances per class,
    and counts {"generated": variants rendered, "retrieved": retrieved records kept}."""
    pipe, sel, layout = job.pipe, job.sel, job.layout
    rows = {"image": [], "label": [], "source_index": [], "variant_index": [], "noise_level": [], "seed": [],
            "origin": [], "pool_index": [], "similarity": []}
    dropped = 0
    counts = {"generated": 0, "retrieved": 0}
    n_classes = len(sel.source.classes)
    draws = ({"generated": [0] * n_classes, "accepted": [0] * n_classes} if job.prototypes is not None else None)
    size, channels = pipe.image_size, pipe.in_channels
    indices = np.asarray(sel.indices, dtype=np.int64)
    for b_lo in range(lo, hi, job.batch_size):
        r = np.arange(b_lo, min(b_lo + job.batch_size, hi))
        pos, slot = r // layout.per_source, r % layout.per_source
        out = {}  # record position in the batch -> (uint8 HWC pixels, variant index, noise level, pool row, sim)
        gen = slot < layout.V
        if gen.any():
            g_pos, variant = pos[gen], slot[gen]
            src_index = indices[g_pos]
            unique_pos, inverse = np.unique(g_pos, return_inverse=True)
            if sel.tensors is not None:
                inputs = torch.stack([sel.tensors[p] for p in unique_pos])
            else:
                inputs = torch.stack([pil_to_tensor(sel.source.load(int(p)), size, channels) for p in unique_pos])
            expand = torch.from_numpy(inverse.reshape(-1))
            images = inputs[expand].to(pipe.device)
            # Each source in the batch is encoded (and tokenized) once, whatever its number of
            # variants; the variants, the filters and the draws all share that (same values as
            # encoding every copy: the encoder's rows are batch-size invariant).
            inputs = inputs.to(pipe.device)
            src_reps = (job.source_reps[torch.from_numpy(unique_pos)].to(pipe.device) if job.source_reps is not None
                        else pipe.encode(inputs))
            known = {"representations": src_reps[expand]}
            if job.settings.repaint_fraction < FULL_REPAINT:
                known["source_tokens"] = pipe.tokenize(inputs)[expand]
            levels = [layout.levels[v // layout.K] for v in variant]
            noise = torch.tensor(levels, dtype=torch.float32, device=pipe.device)
            generator = torch.Generator().manual_seed(batch_seed(job.seed, np.stack([src_index, variant], 1)))
            keep = np.ones(len(g_pos), dtype=bool)
            var_reps = None
            if job.prototypes is None:
                rendered = pipe.reconstruct(images, noise, generator=generator, **known, **job.settings.to_dict())
            else:
                labels = torch.as_tensor([sel.source.labels[p] for p in g_pos], dtype=torch.long)
                rendered, accepted, attempts, var_reps = _reconstruct_with_labels(
                    pipe, images, labels, noise, label_filter=job.prototypes, max_attempts=job.max_attempts,
                    generator=generator, quantize=True, **known, **job.settings.to_dict())
                keep = accepted.numpy()
                dropped += int((~keep).sum())
                for lab, n_draws, ok in zip(labels.tolist(), attempts.tolist(), keep.tolist(), strict=False):
                    draws["generated"][lab] += n_draws
                    draws["accepted"][lab] += int(ok)
            pixels = (rendered.float().clamp(0, 1) * 255).round().to(torch.uint8)
            if job.quality_threshold is not None:
                # Judge what is stored (the 8-bit image); the label filter already encoded exactly that.
                rep_src = known["representations"]
                rep_var = var_reps if var_reps is not None else pipe.encode(pixels.float() / 255.0)
                cos = torch.nn.functional.cosine_similarity(rep_src, rep_var, dim=-1).cpu().numpy()
                similar = cos >= float(job.quality_threshold)
                dropped += int((keep & ~similar).sum())
                keep &= similar
            counts["generated"] += len(g_pos)
            pixels = pixels.permute(0, 2, 3, 1).cpu().numpy()
            for j, at in enumerate(np.flatnonzero(gen)):
                if keep[j]:
                    out[int(at)] = (pixels[j], int(variant[j]), levels[j], None, None)
        ret = job.retrieval
        for at in np.flatnonzero(~gen):
            p, n = int(pos[at]), int(slot[at]) - layout.V
            if ret.accepted is not None and not ret.accepted[p, n]:
                dropped += 1
                continue
            row = int(ret.index[p, n])
            t = pil_to_tensor(ret.pool.load(row), size, channels)
            pixels = (t.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
            out[int(at)] = (pixels, n, None, row, float(ret.similarity[p, n]))
            counts["retrieved"] += 1
        for at in sorted(out):  # record order
            pixels, variant_index, level, pool_row, sim = out[at]
            rows["image"].append({"bytes": _to_png(pixels), "path": None})
            rows["label"].append(int(sel.source.labels[pos[at]]))
            rows["source_index"].append(int(indices[pos[at]]))
            rows["variant_index"].append(variant_index)
            rows["noise_level"].append(level)
            rows["seed"].append(job.seed)
            rows["origin"].append("variant" if pool_row is None else "retrieved")
            rows["pool_index"].append(pool_row)
            rows["similarity"].append(sim)
        bar.update(len(r))
    return rows, dropped, draws, counts


def _source_representations(pipe, sel: _Selection, batch_size: int) -> torch.Tensor:
    """The selected sources' representations (N, rep_dim), encoded once in batches."""
    size, channels = pipe.image_size, pipe.in_channels
    reps = []
    with torch.inference_mode():
        for b in range(0, len(sel.indices), batch_size):
            if sel.tensors is not None:
                x = torch.stack(sel.tensors[b:b + batch_size])
            else:
                x = torch.stack([pil_to_tensor(sel.source.load(p), size, channels)
                                 for p in range(b, min(b + batch_size, len(sel.indices)))])
            reps.append(pipe.encode(x.to(pipe.device)).float().cpu())
    return torch.cat(reps)


def _prototypes(sel: _Selection, reps: torch.Tensor) -> PrototypeFilter:
    """Class prototypes from the build's own (selected) source images' representations."""
    if len(sel.source.classes) < 2 or len(set(sel.source.labels)) < 2:
        raise ValueError(f"`label_filter` needs labelled source images of at least 2 classes; {sel.source.name} "
                         f"has classes {list(sel.source.classes)}")
    return PrototypeFilter.from_representations(reps, torch.as_tensor(list(sel.source.labels)),
                                                num_classes=len(sel.source.classes))


__all__ = ["BuildLockedError", "BuildSummary", "CACHE_FORMAT", "MANIFEST_NAME", "StaleCacheError", "batch_seed",
           "build_synthetic"]
