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
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import io
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..files import sha256_file
from ..label_filter import DEFAULT_MAX_ATTEMPTS, PrototypeFilter, reconstruct_with_labels
from ..settings import FULL_REPAINT, GenerationSettings
from .sources import BUILTIN_SOURCES, ImageSource, SourceError, open_source, pil_to_tensor

logger = logging.getLogger(__name__)

CACHE_FORMAT = "rcg-augment/synthetic-cache"
CACHE_FORMAT_VERSION = 1
PLAN_NAME = "plan.json"
MANIFEST_NAME = "manifest.json"
SHARD_DIR = "shards"
LOCK_NAME = ".lock"
# Plan keys that must match for a rerun to resume; everything else in the plan is provenance.
SPEC_KEYS = ("format", "format_version", "model", "source", "generation", "seed", "layout",
             "quality_threshold", "versions", "device")
DEFAULT_SHARD_BATCHES = 8  # records_per_shard defaults to 8 batches: little work lost on a kill
_TENSOR_CACHE_BYTES = 256 * 2**20  # keep decoded source tensors in memory below this size
_OWN_NAMES = {PLAN_NAME, MANIFEST_NAME, SHARD_DIR, "contact_sheet.png"}


class StaleCacheError(ValueError):
    """``out_dir`` holds a cache built with a different model, source, setting, seed or version."""


class BuildLockedError(RuntimeError):
    """Another builder holds the lock on ``out_dir``."""


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


# ---------------------------------------------------------------------------------------- helpers
def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that a crash leaves either the old file or the new one.

    A full disk raises ``OSError(ENOSPC)`` naming the file, after removing the partial temp file.
    """
    tmp = path.with_name(f"{path.name}.tmp.{os.getpid()}")
    try:
        # O_NOFOLLOW: a symlink planted at the temp name is refused, never written through
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o644)
        with open(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except OSError as err:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if err.errno in (errno.ENOSPC, errno.EDQUOT):
            raise OSError(err.errno, f"no space left on device while writing {path} ({len(data)} bytes); "
                          "free space and rerun the same command to resume (complete shards are kept)") from err
        raise


def _json_bytes(obj) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode()


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError, RecursionError):
        return None


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


def _versions() -> dict:
    import datasets
    import PIL

    from .. import __version__

    return {"rcg_augment": __version__, "torch": torch.__version__, "datasets": datasets.__version__,
            "pillow": PIL.__version__, "numpy": np.__version__}


def _features(classes: Sequence[str]):
    import datasets

    return datasets.Features({
        "image": datasets.Image(),
        "label": datasets.ClassLabel(names=list(classes)),
        "source_index": datasets.Value("int64"),
        "variant_index": datasets.Value("int64"),
        "noise_level": datasets.Value("float64"),
        "seed": datasets.Value("int64"),
    })


def _describe_differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key, "<absent>"), new.get(key, "<absent>")
        name = f"{prefix}{key}"
        if isinstance(a, dict) and isinstance(b, dict):
            out.extend(_describe_differences(a, b, name + "."))
        elif a != b:
            def show(v):
                s = json.dumps(v)
                return s if len(s) <= 40 else s[:37] + "..."
            out.append(f"{name} (cache {show(a)}, now {show(b)})")
    return out


def _spec_of(plan: dict) -> dict:
    return {k: plan.get(k) for k in SPEC_KEYS}


def _spec_hash(spec: dict) -> str:
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()


# ---------------------------------------------------------------------------------------- locking
def _pids_holding(out_dir: Path) -> list[int]:
    pids = []
    for p in sorted(out_dir.glob(LOCK_NAME + "*")):
        try:
            pid = int(p.read_text().strip() or 0)
        except (OSError, ValueError):
            continue
        if pid <= 0 or pid == os.getpid():
            continue
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            continue
        except PermissionError:
            pass
        pids.append(pid)
    return sorted(set(pids))


class _BuildLock:
    """flock-based: a one-process build holds ``.lock`` exclusively; a distributed process holds
    ``.lock`` shared plus ``.lock-p<index>`` exclusively. Released when the process dies."""

    def __init__(self, out_dir: Path, process_index: int, num_processes: int):
        self.out_dir = out_dir
        self.fds: list[int] = []
        try:
            self._take(out_dir / LOCK_NAME, fcntl.LOCK_EX if num_processes == 1 else fcntl.LOCK_SH,
                       write_pid=num_processes == 1)
            if num_processes > 1:
                self._take(out_dir / f"{LOCK_NAME}-p{process_index}", fcntl.LOCK_EX, write_pid=True)
        except BaseException:
            self.release()
            raise

    def _take(self, path: Path, mode: int, write_pid: bool) -> None:
        try:  # O_NOFOLLOW: never truncate a file that a planted symlink points to
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        except OSError as err:
            if err.errno != errno.ELOOP:
                raise
            raise ValueError(f"{path} is a symlink; remove it (rcg-augment writes its lock there)") from None
        try:
            fcntl.flock(fd, mode | fcntl.LOCK_NB)
        except OSError as err:
            os.close(fd)
            if err.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise
            pids = _pids_holding(self.out_dir)
            who = f"pid {', '.join(map(str, pids))}" if pids else "pid unknown"
            raise BuildLockedError(
                f"another build is running on {self.out_dir} ({who}); wait for it to finish, or "
                "choose another output directory") from None
        self.fds.append(fd)
        if write_pid:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)

    def release(self) -> None:
        for fd in reversed(self.fds):
            with contextlib.suppress(OSError):
                fcntl.flock(fd, fcntl.LOCK_UN)
                os.close(fd)
        self.fds = []


# ---------------------------------------------------------------------------------------- shards
def _shard_paths(out_dir: Path, shard: int) -> tuple[Path, Path]:
    base = out_dir / SHARD_DIR / f"shard-{shard:05d}"
    return base.with_suffix(".arrow"), base.with_suffix(".json")


def _shard_complete(out_dir: Path, shard: int, spec_hash: str, *, verify: bool) -> dict | None:
    """The shard's sidecar if the shard is complete (and, with ``verify``, its bytes match)."""
    arrow_path, meta_path = _shard_paths(out_dir, shard)
    meta = _read_json(meta_path)
    if not isinstance(meta, dict) or meta.get("spec_sha256") != spec_hash or not arrow_path.is_file():
        return None
    if arrow_path.stat().st_size != meta.get("bytes"):
        return None
    if verify and sha256_file(arrow_path) != meta.get("sha256"):
        return None
    return meta


def _clean_shard(out_dir: Path, shard: int, *, temp_only: bool = False) -> None:
    """Remove temp files of a shard left by a killed writer, and (unless ``temp_only``) the shard."""
    arrow_path, meta_path = _shard_paths(out_dir, shard)
    doomed = list(arrow_path.parent.glob(f"{arrow_path.stem}.*.tmp.*"))
    if not temp_only:
        doomed = [meta_path, arrow_path, *doomed]  # sidecar first: never a sidecar without its shard
    for p in doomed:
        with contextlib.suppress(FileNotFoundError):
            p.unlink()


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


# ---------------------------------------------------------------------------------------- builder
def _clear_cache(out_dir: Path) -> None:
    # manifest first: a kill half-way leaves no directory that claims to be complete
    for name in (MANIFEST_NAME, SHARD_DIR, "contact_sheet.png", PLAN_NAME):
        p = out_dir / name
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        elif p.exists() or p.is_symlink():  # a symlink goes, never what it points to
            p.unlink()
    for p in out_dir.glob(f"{PLAN_NAME}.tmp.*"):
        p.unlink()
    for p in out_dir.glob(f"{MANIFEST_NAME}.tmp.*"):
        p.unlink()


def _check_out_dir(out_dir: Path) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"`out_dir` {out_dir} exists and is not a directory; choose a directory path")
    links = sorted(name for name in _OWN_NAMES if (out_dir / name).is_symlink())
    if links:  # writing through them would write outside out_dir
        raise ValueError(f"`out_dir` {out_dir} holds symlinks where the cache writes ({', '.join(links)}); "
                         "remove them or choose a new directory")
    if (out_dir / PLAN_NAME).exists() or (out_dir / MANIFEST_NAME).exists():
        return
    foreign = sorted(p.name for p in out_dir.iterdir()
                     if p.name not in _OWN_NAMES and not p.name.startswith((LOCK_NAME, PLAN_NAME)))
    if foreign:
        raise ValueError(f"`out_dir` {out_dir} is not empty and holds no rcg-augment cache "
                         f"(found {', '.join(foreign[:5])}); choose a new or empty directory")


def _check_plan(out_dir: Path, plan: dict) -> None:
    """Refuse a directory built with a different spec."""
    for name in (MANIFEST_NAME, PLAN_NAME):
        existing = _read_json(out_dir / name)
        if existing is None:
            if (out_dir / name).exists():
                raise StaleCacheError(f"{out_dir / name} is unreadable; rebuild with overwrite=True (--overwrite)")
            continue
        diffs = _describe_differences(_spec_of(existing), _spec_of(plan))
        if diffs:
            raise StaleCacheError(
                f"{out_dir} holds a cache built with different settings: " + "; ".join(diffs)
                + ". Rebuild it with overwrite=True (--overwrite) or choose another output directory")
        return


def build_synthetic(
    source, out_dir: str | os.PathLike, *, variants_per_image: int, noise_level: float | Sequence[float],
    pipeline, batch_size: int = 64, seed: int = 0, cfg: float | None = None, temperature: float | None = None,
    num_iter: int | None = None, rdm_steps: int | None = None, repaint_fraction: float | None = None,
    shots: int | None = None, quality_threshold: float | None = None, label_filter: bool = False,
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
        cfg, temperature, num_iter, rdm_steps, repaint_fraction: generation settings (None: the
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
                                     repaint_fraction=repaint_fraction)  # validated, defaults resolved
    settings = _identity_settings(resolved)
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
                       "requested": {"cfg": cfg, "temperature": temperature, "num_iter": num_iter,
                                     "rdm_steps": rdm_steps,
                                     **({"repaint_fraction": repaint_fraction}
                                        if repaint_fraction not in (None, FULL_REPAINT) else {})},
                       **({"label_filter": {"prototypes": "mean representation of each class's sources",
                                            "max_attempts": int(max_attempts)}} if label_filter else {})},
        "seed": int(seed),
        "layout": {"batch_size": int(batch_size), "records_per_shard": int(records_per_shard),
                   "num_records": n_records, "num_shards": n_shards,
                   "record_order": "source-major: record r = (source r // V, variant r % V), "
                                   "noise_levels[variant // variants_per_image]"},
        "quality_threshold": None if quality_threshold is None else float(quality_threshold),
        "versions": _versions(),
        "device": pipe.device.type,
        "provenance": {"model": model_name, "source": sel.source.name, "skipped": sel.skipped},
    }
    spec_hash = _spec_hash(_spec_of(plan))

    out_dir.mkdir(parents=True, exist_ok=True)
    lock = _BuildLock(out_dir, process_index, num_processes)
    try:
        if overwrite and process_index == 0:
            logger.info("overwrite: removing the cache in %s", out_dir)
            _clear_cache(out_dir)
        if overwrite and barrier is not None:
            barrier()  # nobody writes before the old cache is gone
        _check_out_dir(out_dir)
        _check_plan(out_dir, plan)
        if num_processes == 1:  # nobody else is writing: drop temp files of killed runs
            for p in [*out_dir.glob(f"{PLAN_NAME}.tmp.*"), *out_dir.glob(f"{MANIFEST_NAME}.tmp.*")]:
                p.unlink(missing_ok=True)
        (out_dir / SHARD_DIR).mkdir(exist_ok=True)
        if not (out_dir / PLAN_NAME).exists():
            _atomic_write(out_dir / PLAN_NAME, _json_bytes(plan))

        mine = [s for s in range(n_shards) if s % num_processes == process_index]
        todo, resumed, own_meta = [], 0, {}
        for s in mine:
            meta = _shard_complete(out_dir, s, spec_hash, verify=True)
            _clean_shard(out_dir, s, temp_only=meta is not None)
            if meta is None:
                todo.append(s)
            else:
                resumed += 1
                own_meta[s] = meta
        if resumed:
            logger.info("resuming %s: %d of %d shards already complete", out_dir, resumed, len(mine))

        features = _features(sel.source.classes)
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
                arrow_path, meta_path = _shard_paths(out_dir, s)
                _atomic_write(arrow_path, data)
                meta = {"shard": s, "file": f"{SHARD_DIR}/{arrow_path.name}", "record_range": [lo, hi],
                        "records": len(rows["label"]), "dropped": dropped, "bytes": len(data),
                        "sha256": hashlib.sha256(data).hexdigest(), "spec_sha256": spec_hash,
                        **({"label_filter": draws} if draws is not None else {})}
                _atomic_write(meta_path, _json_bytes(meta))
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
                _finalise(out_dir, plan, n_shards, spec_hash, own_meta)
            barrier()  # the manifest is written
            manifest = _read_json(out_dir / MANIFEST_NAME)
            all_meta = ({sh["shard"]: sh for sh in manifest["shards"]}
                        if isinstance(manifest, dict) and manifest.get("complete") else None)
        else:
            all_meta = _finalise(out_dir, plan, n_shards, spec_hash, own_meta)
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
        label_filter=_sum_draws(metas.values(), sel.source.classes) if label_filter else None,
    )


def _finalise(out_dir: Path, plan: dict, n_shards: int, spec_hash: str, known: dict) -> dict | None:
    """Write manifest.json if every shard is complete; returns all sidecars, or None."""
    metas = {}
    for s in range(n_shards):
        meta = _shard_complete(out_dir, s, spec_hash, verify=s not in known)
        if meta is None:
            return None
        metas[s] = meta
    manifest = dict(plan)
    if "label_filter" in plan["generation"]:
        manifest["label_filter_draws"] = _sum_draws(metas.values(), plan["source"]["classes"])
    manifest.update({
        "complete": True,
        "records": sum(m["records"] for m in metas.values()),
        "dropped": sum(m["dropped"] for m in metas.values()),
        "skipped_sources": [list(x) for x in plan["provenance"]["skipped"]],
        "shards": [{k: metas[s][k] for k in ("shard", "file", "record_range", "records", "dropped", "bytes",
                                              "sha256", "label_filter") if k in metas[s]} for s in range(n_shards)],
    })
    _atomic_write(out_dir / MANIFEST_NAME, _json_bytes(manifest))
    return metas


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


def _identity_settings(settings: GenerationSettings) -> dict:
    """Resolved settings as a cache records them. ``repaint_fraction`` at its official 1.0 is
    left out, so caches built before the knob existed keep their identity."""
    out = settings.to_dict()
    if out["repaint_fraction"] == FULL_REPAINT:
        del out["repaint_fraction"]
    return out


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


def _sum_draws(metas, classes) -> dict[str, dict[str, int]]:
    """Per class name: draws generated and variants accepted by the label filter, over shards."""
    total = {c: {"generated": 0, "accepted": 0} for c in classes}
    for m in metas:
        d = m.get("label_filter")
        if d is None:
            continue
        for k, c in enumerate(classes):
            total[c]["generated"] += d["generated"][k]
            total[c]["accepted"] += d["accepted"][k]
    return total


__all__ = ["BuildLockedError", "BuildSummary", "CACHE_FORMAT", "MANIFEST_NAME", "StaleCacheError", "batch_seed",
           "build_synthetic"]
