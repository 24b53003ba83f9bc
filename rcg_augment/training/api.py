"""Python API of the trainers: one stage, the whole stack, fine-tuning, named recipes.

Example::

    from rcg_augment.training import train_all, train_stage

    train_stage("tokenizer", "digits", "runs/digits", steps=200, batch_size=64)
    results = train_all("digits", "runs/digits", per_stage={"encoder": {"steps": 300}})
    pipe = results["mage"].pipeline   # or RCGPipeline.from_pretrained("runs/digits")
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from ..config import NETWORKS
from ..data.sources import ImageSource, open_source
from ..pipeline import CONFIG_NAME, PipelineConfig, RCGPipeline
from ..presets import SECTIONS, preset_config
from .data_order import derive_seed
from .loop import run_training
from .recipes import RECIPES, Recipe, get_recipe
from .registry import STAGES, stage_class
from .stage import Stage, TrainConfig, TrainResult

logger = logging.getLogger(__name__)

# The registry's stages (in training order) and their classes.
STAGE_CLASSES: dict[str, type[Stage]] = {name: stage_class(name) for name in STAGES}
_CONFIG_FIELDS = {f.name for f in dataclasses.fields(TrainConfig)}


class SettingError(TypeError, ValueError):
    """A keyword setting no stage or loop knows (a TypeError for Python callers, a ValueError for the CLI)."""


def _check_stage(name: str) -> str:
    if name not in STAGE_CLASSES:
        raise ValueError(f"unknown stage {name!r}; choose one of {list(STAGES)}")
    return name


def split_options(stage: str, kwargs: Mapping) -> tuple[dict, dict]:
    """Split keyword arguments into :class:`TrainConfig` fields and the stage's options."""
    klass = STAGE_CLASSES[_check_stage(stage)]
    option_names = {f.name for f in dataclasses.fields(klass)}
    config, options = {}, {}
    for key, value in kwargs.items():
        if key in _CONFIG_FIELDS:
            config[key] = value
        elif key in option_names:
            options[key] = value
        else:
            raise SettingError(
                f"unknown setting {key!r} for stage {stage!r}; loop settings: {sorted(_CONFIG_FIELDS)}; "
                f"{stage} options: {sorted(option_names)}"
            )
    return config, options


def distribute_settings(common: Mapping, per_stage: Mapping[str, Mapping] | None, stages: Sequence[str]) -> dict:
    """Per-stage settings: loop settings in ``common`` go to every stage, a stage option in
    ``common`` to the stages that have it; ``per_stage[name]`` on top."""
    out: dict[str, dict] = {name: {} for name in stages}
    for key, value in common.items():
        owners = [s for s in stages if key in _CONFIG_FIELDS
                  or key in {f.name for f in dataclasses.fields(STAGE_CLASSES[s])}]
        if not owners:
            raise SettingError(f"unknown setting {key!r}: not a loop setting ({sorted(_CONFIG_FIELDS)}) nor an option "
                            f"of the stages {list(stages)}")
        for name in owners:
            out[name][key] = value
    for name, values in (per_stage or {}).items():
        if name in out:
            out[name].update(values)
    return out


def make_stage(stage: str, **options) -> Stage:
    """A stage object with its options, e.g. ``make_stage("tokenizer", recon_loss="mse")``."""
    return STAGE_CLASSES[_check_stage(stage)](**options)


def open_data(data, classes: Sequence[str] | None = None) -> ImageSource:
    """``open_source(data)``, keeping only the images of ``classes`` (names) if given."""
    source = open_source(data)
    if classes:
        unknown = sorted(set(classes) - set(source.classes))
        if unknown:
            raise ValueError(f"`classes` {unknown} are not in {source.name}; it has {source.classes}")
        wanted = {source.classes.index(c) for c in classes}
        source = source.subset([i for i, label in enumerate(source.labels) if label in wanted])
    if len(source) == 0:
        raise ValueError(f"the training data {source.name!r} holds no images")
    return source


def infer_channels(source: ImageSource, probe: int = 32) -> int:
    """1 if the first ``probe`` images are all single-channel, else 3."""
    gray = {"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F"}
    n = min(probe, len(source))
    return 1 if all(source.load(i).mode in gray for i in range(n)) else 3


def new_pipeline(preset: str = "tiny", *, in_channels: int = 3, overrides: Mapping | None = None,
                 seed: int = 0) -> RCGPipeline:
    """A freshly initialised pipeline (seeded) from a preset, with config fields overridden per
    section, e.g. ``overrides={"mage": {"depth": 2}}``."""
    base = preset_config(preset, in_channels=in_channels).to_dict()
    for section, values in (overrides or {}).items():
        if section not in SECTIONS:
            raise ValueError(f"unknown pipeline section {section!r} in overrides")
        base[section] = {**base[section], **dict(values)}
    config = PipelineConfig.from_dict(base, source=f"preset {preset!r} with overrides")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(seed, "pipeline-init"))
        return RCGPipeline(config)


def reinitialise(pipe: RCGPipeline, stages: Sequence[str], overrides: Mapping | None = None, *,
                 seed: int = 0) -> RCGPipeline:
    """``pipe`` with the networks of ``stages`` freshly initialised (seeded), their config sections
    (and ``defaults``) updated by ``overrides``; the other networks keep their weights.

    Use it to retrain one stage with another configuration on top of trained ones, e.g. a MAGE
    with ``{"mage": {"depth": 6}}`` over a trained encoder and tokenizer.
    """
    networks = {STAGE_CLASSES[_check_stage(name)].network or name for name in stages}
    data = pipe.config.to_dict()
    for section, values in (overrides or {}).items():
        if section in networks or section == "defaults":
            data[section] = {**data[section], **dict(values)}
    config = PipelineConfig.from_dict(data, source=f"re-initialised {list(stages)}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(seed, "pipeline-init"))
        fresh = RCGPipeline(config)
    for name in NETWORKS:
        if name not in networks:
            getattr(fresh, name).load_state_dict(getattr(pipe, name).state_dict())
    return fresh.to(pipe.device)


# Metadata that names and describes one trained model: a model trained from it is another model,
# so these move under "init_model" (the license stays: weights derived from licensed weights).
IDENTITY_KEYS = ("name", "source", "trained_on", "excluded_test_indices_sha256", "defaults_chosen_by")


def _as_start(pipe: RCGPipeline) -> RCGPipeline:
    meta = pipe.config.metadata
    moved = {k: meta.pop(k) for k in IDENTITY_KEYS if k in meta}
    if moved:
        meta["init_model"] = moved
    return pipe


def resolve_init(init, out_dir: Path, source: ImageSource, *, preset: str = "tiny", in_channels: int | None = None,
                 overrides: Mapping | None = None, seed: int = 0) -> tuple[RCGPipeline, str]:
    """The starting pipeline and a description of it.

    ``init``: a pipeline object (trained in place), a folder / named model, a dict of official
    files (``RCGPipeline.from_official``), or None: the pipeline already in ``out_dir`` if there
    is one, else a new one from ``preset`` (channels inferred from the data).
    """
    if isinstance(init, RCGPipeline):
        return init, "pipeline object"
    if isinstance(init, Mapping):
        return _as_start(RCGPipeline.from_official(**dict(init))), "official files"
    if init is not None:
        return _as_start(RCGPipeline.from_pretrained(init)), str(init)
    if (out_dir / CONFIG_NAME).is_file():
        logger.info("continuing the pipeline already in %s", out_dir)
        return RCGPipeline.from_pretrained(out_dir), str(out_dir)
    channels = in_channels or infer_channels(source)
    return new_pipeline(preset, in_channels=channels, overrides=overrides, seed=seed), f"preset {preset}"


def train_stage(
    stage: str, data, out_dir: str | os.PathLike, *, init=None, preset: str = "tiny", in_channels: int | None = None,
    classes: Sequence[str] | None = None, pipeline_overrides: Mapping | None = None, metadata: Mapping | None = None,
    **kwargs,
) -> TrainResult:
    """Train one stage and write the whole pipeline to ``out_dir``.

    Args:
        stage: ``"encoder"``, ``"tokenizer"``, ``"rdm"`` or ``"mage"``.
        data: anything :func:`rcg_augment.data.open_source` takes ("digits", "lfw-faces", an image
            folder, a saved HF dataset, a numpy array) or an ``ImageSource``.
        out_dir: output folder; afterwards ``RCGPipeline.from_pretrained(out_dir)`` loads it.
        init: starting pipeline (see :func:`resolve_init`); default: the pipeline already in
            ``out_dir``, else a new ``preset`` pipeline.
        classes: train on these classes only (names from the source's ``classes``).
        **kwargs: :class:`~rcg_augment.training.loop.TrainConfig` fields (``steps``,
            ``batch_size``, ``lr``/``blr``, ``seed``, ``max_time``, ``resume``...) and the stage's
            options (e.g. ``hflip``, ``crop_scale``, ``recon_loss``).

    Example::

        result = train_stage("rdm", "digits", "runs/d", steps=300, batch_size=64, blr=2e-5)
        print(result.final_loss)
    """
    config_kw, options = split_options(stage, kwargs)
    config = TrainConfig(**config_kw)
    out_dir = Path(out_dir)
    source = open_data(data, classes)
    pipe, described = resolve_init(init, out_dir, source, preset=preset, in_channels=in_channels,
                                   overrides=pipeline_overrides, seed=config.seed)
    return run_training(make_stage(stage, **options), pipe, source, out_dir, config,
                        metadata={"init": described, **dict(metadata or {})})


def train_all(
    data, out_dir: str | os.PathLike, *, stages: Sequence[str] = STAGES, init=None, preset: str = "tiny",
    in_channels: int | None = None, classes: Sequence[str] | None = None, pipeline_overrides: Mapping | None = None,
    per_stage: Mapping[str, Mapping] | None = None, max_time: float | None = None, metadata: Mapping | None = None,
    reinit: Sequence[str] = (), **common,
) -> dict[str, TrainResult]:
    """Train several stages in the official order (encoder -> tokenizer -> rdm -> mage) into one
    pipeline folder.

    ``common`` settings apply to every stage, ``per_stage[name]`` ones to that stage only (both:
    TrainConfig fields and stage options). ``reinit`` names stages whose networks start afresh
    from the starting pipeline's config with ``pipeline_overrides`` applied (see
    :func:`reinitialise`) instead of from ``init``'s weights. ``max_time`` (seconds) is the budget of the whole
    call. A killed run resumes where it stopped when called again with the same arguments:
    finished stages are skipped, the interrupted one continues from its last checkpoint.

    Example::

        train_all("digits", "runs/digits", batch_size=64,
                  per_stage={"encoder": {"steps": 800}, "mage": {"steps": 1500, "blr": 1e-3}})
    """
    per_stage = dict(per_stage or {})
    for name in list(stages) + list(per_stage):
        _check_stage(name)
    order = [s for s in STAGES if s in set(stages)]
    if not order:
        raise ValueError(f"`stages` must name at least one of {list(STAGES)}, got {list(stages)}")
    out_dir = Path(out_dir)
    settings_by_stage = distribute_settings(common, per_stage, order)
    for name in order:  # validate every stage's settings before reading data or training
        config_kw, options = split_options(name, settings_by_stage[name])
        TrainConfig(**config_kw)
        make_stage(name, **options)
    source = open_data(data, classes)
    seed = int(settings_by_stage[order[0]].get("seed", 0))
    pipe, described = resolve_init(init, out_dir, source, preset=preset, in_channels=in_channels,
                                   overrides=pipeline_overrides, seed=seed)
    if reinit and init is not None:  # a folder being resumed already holds the re-initialised networks
        pipe = reinitialise(pipe, reinit, pipeline_overrides, seed=seed)
        described += f" ({', '.join(reinit)} re-initialised)"
    results: dict[str, TrainResult] = {}
    t0 = time.monotonic()
    for name in order:
        settings = dict(settings_by_stage[name])
        if max_time is not None:
            left = max_time - (time.monotonic() - t0)
            if left <= 0:
                logger.warning("time budget spent before stage %s; stopping (run again to continue)", name)
                break
            settings["max_time"] = min(left, settings.get("max_time") or left)
        config_kw, options = split_options(name, settings)
        result = run_training(make_stage(name, **options), pipe, source, out_dir, TrainConfig(**config_kw),
                              metadata={"init": described, **dict(metadata or {})})
        results[name] = result
        pipe, described = result.pipeline, str(out_dir)
        if not result.completed:
            logger.warning("stage %s stopped at step %d of %d; run again to continue", name, result.steps_done,
                           result.total_steps)
            break
    return results


def finetune(
    from_, data, out_dir: str | os.PathLike, *, stages: Sequence[str] = ("rdm", "mage"), **kwargs,
) -> dict[str, TrainResult]:
    """Fine-tune a trained pipeline on new data; write the result to ``out_dir``.

    ``from_``: a pipeline folder, a named model ("digits-tiny"), an ``RCGPipeline``, or a dict of
    official files for :meth:`RCGPipeline.from_official` (``{"rdm": ..., "mage": ..., "arch": "base"}``).
    Other arguments as :func:`train_all`. When ``out_dir`` already holds a partly fine-tuned
    pipeline (a resumed run), training continues from it.
    """
    if from_ is None:
        raise ValueError("`from_` must name the pipeline to fine-tune (a folder, a named model or official files)")
    out_dir = Path(out_dir)
    described = "official files" if isinstance(from_, Mapping) else (
        "pipeline object" if isinstance(from_, RCGPipeline) else str(from_))
    resume = kwargs.get("resume", True) and all(v.get("resume", True) for v in (kwargs.get("per_stage") or {}).values())
    init = None if (out_dir / CONFIG_NAME).is_file() and resume else from_
    metadata = {"finetuned_from": described, **dict(kwargs.pop("metadata", None) or {})}
    if init is None:
        logger.info("continuing the fine-tuning already in %s", out_dir)
    return train_all(data, out_dir, stages=stages, init=init, metadata=metadata, **kwargs)


def _benchmark_pool(spec: str, classes: Sequence[str] | None) -> tuple[ImageSource, dict]:
    """The benchmark pool of ``spec`` (its held-out test split removed), restricted to ``classes``,
    and the metadata that proves which images were held out."""
    from ..data.splits import benchmark_split, indices_sha256

    full = open_source(spec)
    pool, test = benchmark_split(full)
    if classes:
        open_data(spec, classes)  # validates the class names with the usual error
        wanted = {full.classes.index(c) for c in classes}
        pool = [i for i in pool if full.labels[i] in wanted]
    note = f"{spec} benchmark pool: {len(pool)} images; the {len(test)} benchmark test images held out"
    return full.subset(pool), {"trained_on": note, "excluded_test_indices_sha256": indices_sha256(test)}


def run_recipe(
    recipe: str | Recipe, out_dir: str | os.PathLike, *, data=None, init=None, stages: Sequence[str] | None = None,
    steps_scale: float = 1.0, per_stage: Mapping[str, Mapping] | None = None, max_time: float | None = None,
    reinit: Sequence[str] = (), from_continuation: int | None = None, continuations: bool = True, **overrides,
) -> dict[str, TrainResult]:
    """Run a named recipe (see :data:`RECIPES`), optionally on other data / a subset of stages.

    ``steps_scale`` multiplies every stage's step count (e.g. 0.1 for a quick trial);
    ``overrides`` (any TrainConfig field or stage option) apply to every stage on top of the
    recipe, ``per_stage`` to one stage. ``reinit`` (with ``init``): start these stages' networks
    afresh with the recipe's ``pipeline`` config overrides, e.g. to retrain the recipe's MAGE on
    top of another run's encoder, tokenizer and RDM. ``from_continuation=k`` skips the stages and
    the continuations before the k-th: ``init`` (or ``out_dir``'s pipeline) must be a model that
    has finished them, e.g. the bundled ``digits-tiny`` to rerun its latest continuation.
    ``continuations=False`` trains the recipe's stages and stops before its continuation phases.
    """
    r = get_recipe(recipe) if isinstance(recipe, str) else recipe
    if from_continuation is not None:
        if not 1 <= from_continuation <= len(r.continuation):
            raise ValueError(f"recipe {r.name!r} has {len(r.continuation)} continuation(s); "
                             f"`from_continuation` must be in [1, {len(r.continuation)}], got {from_continuation}")
        if init is None and not (Path(out_dir) / CONFIG_NAME).is_file():
            raise ValueError("`from_continuation` needs `init`: a model that finished the recipe's earlier runs")
        if reinit:
            raise ValueError("`reinit` cannot be combined with `from_continuation`")
        if not continuations:
            raise ValueError("`continuations=False` cannot be combined with `from_continuation`")
    if steps_scale <= 0:
        raise ValueError(f"`steps_scale` must be > 0, got {steps_scale}")
    chosen = list(stages) if stages else list(r.stages)
    for name in chosen:
        _check_stage(name)
    user_settings = distribute_settings(overrides, per_stage, chosen)

    def settings_for(name: str, recipe_part: Mapping) -> dict:
        """The recipe's settings for one run of ``name`` (steps scaled), then the caller's."""
        settings = distribute_settings(r.common, {name: recipe_part}, chosen)[name]
        settings["steps"] = max(1, round(settings.get("steps", TrainConfig.steps) * steps_scale))
        if "warmup_steps" in settings:
            settings["warmup_steps"] = round(settings["warmup_steps"] * steps_scale)
        return {**settings, **user_settings[name]}

    per = {name: settings_for(name, r.per_stage.get(name, {})) for name in chosen}
    metadata = {"recipe": r.name, **({"steps_scale": steps_scale} if steps_scale != 1 else {})}
    classes = None if data is not None else r.classes
    if data is None and r.hold_out_benchmark_test:
        data, held_out = _benchmark_pool(r.data, r.classes)
        classes = None
        metadata.update(held_out)
    elif data is None:
        data = r.data
        metadata["trained_on"] = f"{r.data}" + (f", classes {list(r.classes)}" if r.classes else "") + \
            " (its train split; the test split is not read)"
    common = dict(data=data, stages=chosen, classes=classes, per_stage=per, max_time=max_time, metadata=metadata)
    t0 = time.monotonic()
    if from_continuation is not None:
        results: dict[str, TrainResult] = {}
    elif r.init is not None:
        results = finetune(r.init if init is None else init, out_dir=out_dir, **common)
    else:
        results = train_all(out_dir=out_dir, init=init, preset=r.preset, in_channels=r.in_channels,
                            pipeline_overrides=r.pipeline, reinit=reinit, **common)
    if from_continuation is None and (not all(res.completed for res in results.values()) or len(results) < len(chosen)):
        return results  # stopped early (time budget): a rerun finishes the stages, then continues
    for k, (name, extra) in enumerate(r.continuation if continuations else (), start=1):
        if name not in chosen or k < (from_continuation or 1):
            continue
        key = f"{name}-continued-{k}"
        settings = {**settings_for(name, extra), "run_name": key}
        start, described = None, None
        if k == from_continuation and not (Path(out_dir) / CONFIG_NAME).is_file():
            start, described = resolve_init(init, Path(out_dir), None)
        if max_time is not None:
            left = max_time - (time.monotonic() - t0)
            if left <= 0:
                logger.warning("time budget spent before continuation %d (%s); run again to continue", k, name)
                break
            settings["max_time"] = min(left, settings.get("max_time") or left)
        results[key] = train_stage(name, data, out_dir, init=start, classes=classes,
                                   metadata={**metadata, "continuation": k,
                                             **({"init": described} if described else {})}, **settings)
        if not results[key].completed:
            break
    return results


__all__ = [
    "RECIPES", "STAGES", "STAGE_CLASSES", "SettingError", "distribute_settings", "finetune", "infer_channels", "make_stage", "new_pipeline", "open_data", "reinitialise",
    "resolve_init", "run_recipe", "split_options", "train_all", "train_stage",
]
