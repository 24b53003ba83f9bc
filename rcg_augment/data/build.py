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
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..label_filter import DEFAULT_MAX_ATTEMPTS, PrototypeFilter, reconstruct_with_labels
from ..settings import GenerationSettings
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
    token_temperature: float | None = None, shots: int | None = None, quality_threshold: float | None = None, label_filter: bool = False,
    max_attempts: int = DEFAULT_MAX_ATTEMPTS, overwrite: bool = False, progress: bool = True,
    process_index: int = 0, num_processes: int = 1, records_per_shard: int | None = None,
    device: str | torch.device | None = None, barrier: Callable[[], None] | None = None,
) -> BuildSummary:
    """Write ``variants_per_image`` RCG variants of every source image (per noise level) to ``out_dir``.

    Args:
        source: anything :func:`~rcg_augment.data.open_source` takes, or an ``ImageSource``.
        out_dir: a new or empty directory, or an existing cache to resume (same arguments).
        variants_per_image: K >= 1 variants per image and noise level.
        noise_level: a float in [0, 1] or a list of them (each image gets K variants per level).
        pipeline: an ``RCGPipeline``, a directory from ``save_pretrained``, or a named model.
        batch_size: records per ``pipeline.reconstruct`` call (part of the cache's identity: a
            different batch size draws different noise).
        seed: seeds the few-shot draw and every generator.
        cfg, temperature, num_iter, rdm_steps, repaint_fraction, token_temperature: generation settings (None: the
            model's defaults; see :class:`~rcg_augment.settings.GenerationSettings`).
        shots: keep this many images per class (drawn with ``seed``); None keeps all.
        quality_threshold: in [-1, 1]; re-encode each variant and drop it when the cosine
            similarity of its representation to its source's is below this. None: keep all.
        label_filter: keep a variant only if its re-encoded representation is nearest to its own
            class's prototype (the mean representation of that class's source images in this
            build); a rejected variant is drawn again, up to ``max_attempts`` draws in all, and
            dropped if none is accepted. Needs a labelled source with >= 2 classes. The summary
            and the manifest report draws and acceptances per class.
        max_attempts: draws per variant with ``label_filter`` (>= 1).
        overwrite: delete an existing cache in ``out_dir`` first (any settings).
        progress: show a tqdm bar (images/s, ETA).
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
    """
    start = time.perf_counter()
    if int(variants_per_image) != variants_per_image or variants_per_image < 1:
        raise ValueError(f"`variants_per_image` must be an integer >= 1, got {variants_per_image}")
    if int(batch_size) != batch_size or batch_size < 1:
        raise ValueError(f"`batch_size` must be an integer >= 1, got {batch_size}")
    if num_processes < 1 or not 0 <= process_index < num_processes:
        raise ValueError(f"`process_index` must be in [0, num_processes), got {process_index} of {num_processes}")
    if records_per_shard is None:
        records_per_shard = DEFAULT_SHARD_BATCHES * batch_size
    if records_per_shard < batch_size or records_per_shard % batch_size:
        raise ValueError(f"`records_per_shard` must be a positive multiple of `batch_size` ({batch_size}), "
                         f"got {records_per_shard}")
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
    levels = _noise_levels(noise_level)
    K, V = int(variants_per_image), int(variants_per_image) * len(levels)
    out_dir = Path(out_dir)
    if isinstance(source, (str, os.PathLike)) and str(source) not in BUILTIN_SOURCES and Path(source).is_dir() \
            and out_dir.resolve().is_relative_to(Path(source).resolve()):
        raise ValueError(f"`out_dir` {out_dir} is inside the input folder {source}: the next run would read the "
                         "cache as images; choose an output directory outside it")

    pipe, model_name = _resolve_pipeline(pipeline, device)
    resolved = pipe.resolve_settings(cfg=cfg, temperature=temperature, num_iter=num_iter, rdm_steps=rdm_steps,
                                     repaint_fraction=repaint_fraction,
                                     token_temperature=token_temperature)  # validated, defaults resolved
    settings = identity_settings(resolved.to_dict())
    size, channels = pipe.image_size, pipe.in_channels
    sel = _select_sources(source, shots, seed, size, channels)
    prototypes = _prototypes(pipe, sel, batch_size) if label_filter else None
    n_records = len(sel.indices) * V
    n_shards = -(-n_records // records_per_shard)
    plan = {
        "format": CACHE_FORMAT, "format_version": CACHE_FORMAT_VERSION,
        "model": {"fingerprint": pipe.fingerprint(), "image_size": size, "in_channels": channels},
        "source": {
            "fingerprint": sel.source.fingerprint(), "classes": list(sel.source.classes),
            "num_images": sel.total, "num_used": len(sel.indices), "shots": shots,
            "indices_sha256": hashlib.sha256(np.asarray(sel.indices, dtype="<i8").tobytes()).hexdigest(),
        },
        "generation": {"variants_per_image": K, "noise_levels": levels, **settings,
                       "requested": identity_settings({
                           "cfg": cfg, "temperature": temperature, "num_iter": num_iter, "rdm_steps": rdm_steps,
                           "repaint_fraction": repaint_fraction, "token_temperature": token_temperature},
                           requested=True),
                       **({"label_filter": {"prototypes": "mean representation of each class's sources",
                                            "max_attempts": int(max_attempts)}} if label_filter else {})},
        "seed": int(seed),
        "layout": {"batch_size": int(batch_size), "records_per_shard": int(records_per_shard),
                   "num_records": n_records, "num_shards": n_shards,
                   "record_order": "source-major: record r = (source r // V, variant r % V), "
                                   "noise_levels[variant // variants_per_image]"},
        "quality_threshold": None if quality_threshold is None else float(quality_threshold),
        "versions": versions(),
        "device": pipe.device.type,
        "provenance": {"model": model_name, "source": sel.source.name, "skipped": sel.skipped},
    }
    spec_hash = hash_spec(spec_of(plan))

    out_dir.mkdir(parents=True, exist_ok=True)
    lock = BuildLock(out_dir, process_index, num_processes)
    try:
        if overwrite and process_index == 0:
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

        mine = [s for s in range(n_shards) if s % num_processes == process_index]
        todo, resumed, own_meta = [], 0, {}
        for s in mine:
            meta = shard_complete(out_dir, s, spec_hash, verify=True)
            clean_shard(out_dir, s, temp_only=meta is not None)
            if meta is None:
                todo.append(s)
            else:
                resumed += 1
                own_meta[s] = meta
        if resumed:
            logger.info("resuming %s: %d of %d shards already complete", out_dir, resumed, len(mine))

        features = cache_features(sel.source.classes)
        total_todo = sum(min(records_per_shard, n_records - s * records_per_shard) for s in todo)
        written = generated = 0
        gen_seconds = 0.0
        was_training = pipe.training
        pipe.eval()
        from tqdm.auto import tqdm

        bar = tqdm(total=total_todo, unit="img", desc=f"rcg-augment build {out_dir.name}",
                   disable=not progress or total_todo == 0, position=process_index if num_processes > 1 else None,
                   dynamic_ncols=True)
        try:
            for s in todo:
                t0 = time.perf_counter()
                lo, hi = s * records_per_shard, min((s + 1) * records_per_shard, n_records)
                rows, dropped, draws = _generate_shard(
                    pipe, sel, lo, hi, K=K, V=V, levels=levels, seed=seed, batch_size=batch_size,
                    settings=resolved, quality_threshold=quality_threshold, prototypes=prototypes,
                    max_attempts=int(max_attempts), bar=bar)
                data = _encode_table(rows, features)
                arrow_path, meta_path = shard_paths(out_dir, s)
                atomic_write(arrow_path, data)
                meta = {"shard": s, "file": f"{SHARD_DIR}/{arrow_path.name}", "record_range": [lo, hi],
                        "records": len(rows["label"]), "dropped": dropped, "bytes": len(data),
                        "sha256": hashlib.sha256(data).hexdigest(), "spec_sha256": spec_hash,
                        **({"label_filter": draws} if draws is not None else {})}
                atomic_write(meta_path, json_bytes(meta))
                own_meta[s] = meta
                written += meta["records"]
                generated += hi - lo
                gen_seconds += time.perf_counter() - t0
        finally:
            bar.close()
            pipe.train(was_training)

        if barrier is not None and num_processes > 1:
            barrier()  # every shard is written
            if process_index == 0:
                finalise(out_dir, plan, n_shards, spec_hash, own_meta)
            barrier()  # the manifest is written
            manifest = read_json(out_dir / MANIFEST_NAME)
            all_meta = ({sh["shard"]: sh for sh in manifest["shards"]}
                        if isinstance(manifest, dict) and manifest.get("complete") else None)
        else:
            all_meta = finalise(out_dir, plan, n_shards, spec_hash, own_meta)
        manifest_path = None
        complete = all_meta is not None
        metas = all_meta if complete else own_meta
        if complete:
            manifest_path = out_dir / MANIFEST_NAME
        else:
            logger.info("%s: this process's %d shards are done; other processes' shards are not all "
                        "complete yet; the last process to finish writes manifest.json", out_dir, len(own_meta))
    finally:
        lock.release()
    seconds = time.perf_counter() - start
    return BuildSummary(
        out_dir=out_dir, complete=complete, records=sum(m["records"] for m in metas.values()),
        records_written=written, dropped=sum(m["dropped"] for m in metas.values()), skipped=list(sel.skipped),
        sources_used=len(sel.indices), sources_total=sel.total,
        shards=[out_dir / metas[s]["file"] for s in sorted(metas)], shards_resumed=resumed, seconds=seconds,
        variants_per_second=generated / gen_seconds if gen_seconds > 0 else 0.0, manifest_path=manifest_path,
        classes=list(sel.source.classes),
        label_filter=sum_draws(metas.values(), sel.source.classes) if label_filter else None,
    )


@torch.inference_mode()
def _generate_shard(pipe, sel: _Selection, lo: int, hi: int, *, K: int, V: int, levels: list[float], seed: int,
                    batch_size: int, settings: GenerationSettings, quality_threshold, prototypes, max_attempts: int,
                    bar) -> tuple[dict, int, dict | None]:
    """Rows of records [lo, hi), the number dropped, and (label filter) draws/acceptances per class."""
    rows = {"image": [], "label": [], "source_index": [], "variant_index": [], "noise_level": [], "seed": []}
    dropped = 0
    n_classes = len(sel.source.classes)
    draws = ({"generated": [0] * n_classes, "accepted": [0] * n_classes} if prototypes is not None else None)
    size, channels = pipe.image_size, pipe.in_channels
    for b_lo in range(lo, hi, batch_size):
        r = np.arange(b_lo, min(b_lo + batch_size, hi))
        pos, variant = r // V, r % V  # position in the selection, variant index
        src_index = np.asarray(sel.indices, dtype=np.int64)[pos]
        unique_pos, inverse = np.unique(pos, return_inverse=True)
        if sel.tensors is not None:
            inputs = torch.stack([sel.tensors[p] for p in unique_pos])
        else:
            inputs = torch.stack([pil_to_tensor(sel.source.load(int(p)), size, channels) for p in unique_pos])
        images = inputs[torch.from_numpy(inverse.reshape(-1))].to(pipe.device)
        noise = torch.tensor([levels[v // K] for v in variant], dtype=torch.float32, device=pipe.device)
        generator = torch.Generator().manual_seed(batch_seed(seed, np.stack([src_index, variant], 1)))
        keep = np.ones(len(r), dtype=bool)
        if prototypes is None:
            out = pipe.reconstruct(images, noise, generator=generator, **settings.to_dict())
        else:
            labels = torch.as_tensor([sel.source.labels[p] for p in pos], dtype=torch.long)
            out, accepted, attempts = reconstruct_with_labels(
                pipe, images, labels, noise, label_filter=prototypes, max_attempts=max_attempts,
                generator=generator, quantize=True, **settings.to_dict())
            keep = accepted.numpy()
            dropped += int((~keep).sum())
            for lab, n_draws, ok in zip(labels.tolist(), attempts.tolist(), keep.tolist(), strict=False):
                draws["generated"][lab] += n_draws
                draws["accepted"][lab] += int(ok)
        pixels = (out.float().clamp(0, 1) * 255).round().to(torch.uint8)
        if quality_threshold is not None:
            # Re-encode what is stored (the 8-bit image), so the filter judges the cache's bytes.
            rep_src = pipe.encode(images)
            rep_var = pipe.encode(pixels.float() / 255.0)
            cos = torch.nn.functional.cosine_similarity(rep_src, rep_var, dim=-1).cpu().numpy()
            similar = cos >= float(quality_threshold)
            dropped += int((keep & ~similar).sum())
            keep &= similar
        pixels = pixels.permute(0, 2, 3, 1).cpu().numpy()
        for j in np.flatnonzero(keep):
            rows["image"].append({"bytes": _to_png(pixels[j]), "path": None})
            rows["label"].append(int(sel.source.labels[pos[j]]))
            rows["source_index"].append(int(src_index[j]))
            rows["variant_index"].append(int(variant[j]))
            rows["noise_level"].append(levels[variant[j] // K])
            rows["seed"].append(int(seed))
        bar.update(len(r))
    return rows, dropped, draws


def _prototypes(pipe, sel: _Selection, batch_size: int) -> PrototypeFilter:
    """Class prototypes from the build's own (selected) source images."""
    if len(sel.source.classes) < 2 or len(set(sel.source.labels)) < 2:
        raise ValueError(f"`label_filter` needs labelled source images of at least 2 classes; {sel.source.name} "
                         f"has classes {list(sel.source.classes)}")
    size, channels = pipe.image_size, pipe.in_channels
    reps = []
    for b in range(0, len(sel.indices), batch_size):
        if sel.tensors is not None:
            x = torch.stack(sel.tensors[b:b + batch_size])
        else:
            x = torch.stack([pil_to_tensor(sel.source.load(p), size, channels)
                             for p in range(b, min(b + batch_size, len(sel.indices)))])
        reps.append(pipe.encode(x.to(pipe.device)))
    return PrototypeFilter.from_representations(torch.cat(reps), torch.as_tensor(list(sel.source.labels)),
                                                num_classes=len(sel.source.classes))


__all__ = ["BuildLockedError", "BuildSummary", "CACHE_FORMAT", "MANIFEST_NAME", "StaleCacheError", "batch_seed",
           "build_synthetic"]
