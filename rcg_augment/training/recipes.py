"""Named training recipes: data, starting point, stages and their hyper-parameters.

``digits-tiny`` trains the whole stack from scratch on sklearn's digits (32 px, 1 channel);
``faces-tiny`` fine-tunes it on every pool image of ``skimage.data.lfw_subset()`` (faces and
non-faces: a model fine-tuned on faces alone paints faces into everything); ``fashion-tiny`` and
``fashion-base-tiny`` fine-tune it on Fashion-MNIST's train split (all ten classes, or five base
classes). Run them with ``rcg-augment train all --recipe NAME --out DIR`` (``finetune --recipe``
for ``faces-tiny``), or :func:`rcg_augment.training.run_recipe`. How the bundled models were made
from them: docs/training.md.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Recipe:
    """A named training run.

    Args:
        name, description: what it is.
        data: the ``open_source`` spec it trains on; ``classes`` keeps only those classes.
        stages: stages to train, in the official order.
        init: None trains from scratch (``preset`` with ``in_channels`` and the ``pipeline``
            config overrides); otherwise a named model or folder to fine-tune.
        common: settings for every stage (TrainConfig fields and stage options).
        per_stage: settings for one stage, on top of ``common``.
        continuation: further runs of a stage on the result, in order, after ``stages``: each a
            ``(stage, settings)`` pair (settings on top of ``common``), trained into the same
            folder under its own checkpoint name ``<stage>-continued-<k>``.
        hold_out_benchmark_test: train on the benchmark pool only: the images of the few-shot
            benchmark's held-out test split (``rcg_augment.data.splits``) are left out, and the
            model's metadata records their fingerprint (``excluded_test_indices_sha256``), which
            ``benchmarks/fewshot.py`` checks. Applies when the recipe trains on its own data.
    """

    name: str
    description: str
    data: str
    stages: tuple[str, ...]
    init: str | None = None
    preset: str = "tiny"
    in_channels: int | None = None
    classes: tuple[str, ...] | None = None
    pipeline: dict = field(default_factory=dict)
    common: dict = field(default_factory=dict)
    per_stage: dict = field(default_factory=dict)
    continuation: tuple[tuple[str, dict], ...] = ()
    hold_out_benchmark_test: bool = True


# digits-tiny: the settings the bundled digits-tiny was trained with. A rerun gives a model of the
# same quality, not the same bytes (CPU sums depend on the thread count).
# Learning rates: at batch 64 the official blr gives lr ~1e-4, far too slow for a few thousand
# steps; the tiny runs use absolute lrs of ~1e-3 (the official large-batch runs use ~2.4e-3).
# Digits are not mirror-symmetric: no flips. MoCo on 1.8k tiny digits: milder crops than
# ImageNet's 0.08.
# Settings shared by the continuation phases (each adds its steps and seed): MAGE at twice its
# first run's learning rate, the encoder 800 more steps on a fresh schedule, the RDM retrained on
# the encoder's new representations.
_MAGE_MORE = {"blr": 3e-3, "ema_decay": 0.999, "crop_scale": (0.8, 1.0), "warmup_steps": 50}
_ENCODER_MORE = {"steps": 800, "blr": 1e-3, "crop_scale": (0.35, 1.0), "max_grad_norm": 1.0}
_RDM_MORE = {"steps": 1200, "blr": 1e-5, "lr_schedule": "cosine", "warmup_steps": 40, "ema_decay": 0.999}

DIGITS_TINY = Recipe(
    name="digits-tiny",
    description="Whole RCG stack (tiny presets, 32 px, 1 channel) from scratch on sklearn digits.",
    data="digits",
    stages=("encoder", "tokenizer", "rdm", "mage"),
    in_channels=1,
    pipeline={"defaults": {"num_iter": 4, "rdm_steps": 10}},  # chosen by benchmarks/speed_quality.py
    common={"batch_size": 64, "seed": 0, "log_every": 25, "checkpoint_every": 250, "hflip": False},
    per_stage={
        "encoder": {"steps": 480, "blr": 1e-3, "crop_scale": (0.35, 1.0), "max_grad_norm": 1.0},
        "tokenizer": {"steps": 600, "blr": 2e-3, "recon_loss": "l1", "max_grad_norm": 1.0},
        "rdm": {"steps": 1200, "blr": 1e-5, "lr_schedule": "cosine", "warmup_steps": 40, "ema_decay": 0.999},
        "mage": {"steps": 1000, "blr": 1.5e-3, "ema_decay": 0.999, "crop_scale": (0.8, 1.0)},
    },
    # After the four stages MAGE barely uses the representation; the continuations train it (and,
    # from phase 4, the encoder it reads) further. Phase k is ``--continuation k``.
    continuation=(
        # 1-3: MAGE, 1,000 + 3,000 + 2,500 more steps (each a fresh cosine schedule), so that it
        # renders an image's own representation in its class.
        ("mage", {**_MAGE_MORE, "steps": 1000, "seed": 1}),
        ("mage", {**_MAGE_MORE, "steps": 3000, "seed": 2}),
        ("mage", {**_MAGE_MORE, "steps": 2500, "seed": 3}),
        # 4-6: the encoder 800 more steps (its 480 left many images' representations between
        # classes, which is where MAGE missed), then the RDM and MAGE again on its representations.
        ("encoder", {**_ENCODER_MORE, "seed": 5}),
        ("rdm", {**_RDM_MORE, "seed": 5}),
        ("mage", {**_MAGE_MORE, "steps": 1000, "seed": 6}),
        # 7: MAGE 2,000 more steps on those representations.
        ("mage", {**_MAGE_MORE, "steps": 2000, "seed": 7}),
        # 8-10: the encoder continued once more (800 steps), then the RDM and MAGE on it.
        ("encoder", {**_ENCODER_MORE, "seed": 9}),
        ("rdm", {**_RDM_MORE, "seed": 9}),
        ("mage", {**_MAGE_MORE, "steps": 3000, "seed": 10}),
        # 11: MAGE with its training representation taken from a second random crop of the image,
        # not from the crop it tokenizes, so that a representation does not pin one framing: more
        # varied variants at the same fidelity.
        ("mage", {**_MAGE_MORE, "steps": 1500, "seed": 11, "rep_crop": "independent"}),
    ),
)

# faces-tiny: fine-tune on every class of the task, unlabelled. A model fine-tuned on faces alone
# painted a face into most non-face images, which made a faces-vs-non-faces classifier worse.
# The bundled faces-tiny was fine-tuned from digits-tiny as it was after continuation 3; rerunning
# this recipe starts from the current digits-tiny.
FACES_TINY = Recipe(
    name="faces-tiny",
    description="digits-tiny fine-tuned on all 140 pool images of skimage.data.lfw_subset() (faces and non-faces; "
                "32 px, 1 channel).",
    data="lfw-faces",
    init="digits-tiny",
    # A digits encoder/tokenizer knows nothing of faces: fine-tune all four (order keeps rdm/mage
    # consistent with the fine-tuned encoder and tokenizer).
    stages=("encoder", "tokenizer", "rdm", "mage"),
    common={"batch_size": 64, "seed": 0, "log_every": 25, "checkpoint_every": 250, "hflip": True},
    # Fine-tuning: fewer steps than digits-tiny; tokenizer and RDM at half its learning rate.
    per_stage={
        "encoder": {"steps": 300, "blr": 2e-3, "crop_scale": (0.35, 1.0), "max_grad_norm": 1.0},
        "tokenizer": {"steps": 500, "blr": 1e-3, "max_grad_norm": 1.0},
        "rdm": {"steps": 800, "blr": 5e-6, "lr_schedule": "cosine", "warmup_steps": 50, "ema_decay": 0.999},
        "mage": {"steps": 800, "blr": 4e-3, "ema_decay": 0.999, "crop_scale": (0.8, 1.0)},
    },
)

# Fashion-MNIST: digits-tiny (same 32 px, 1 channel) fine-tuned on the 60,000 train images; the
# test split is never read. All four stages, since a digits encoder and tokenizer know nothing of
# clothes; MAGE with the representation from its own crop, the setting that moved digits-tiny's
# fidelity/variety curve. Clothes are left-right symmetric: flips on.
_FASHION_COMMON = {"batch_size": 64, "seed": 0, "log_every": 25, "checkpoint_every": 250, "hflip": True}
_FASHION_STAGES = {
    "encoder": {"steps": 1000, "blr": 1e-3, "crop_scale": (0.35, 1.0), "max_grad_norm": 1.0},
    "tokenizer": {"steps": 800, "blr": 1e-3, "recon_loss": "l1", "max_grad_norm": 1.0},
    "rdm": {"steps": 1500, "blr": 1e-5, "lr_schedule": "cosine", "warmup_steps": 40, "ema_decay": 0.999},
    "mage": {**_MAGE_MORE, "steps": 3000, "rep_crop": "independent"},
}
FASHION_TINY = Recipe(
    name="fashion-tiny",
    description="digits-tiny fine-tuned, all four stages, on the 60,000 Fashion-MNIST train images (32 px, 1 channel).",
    data="fashion-mnist",
    init="digits-tiny",
    stages=("encoder", "tokenizer", "rdm", "mage"),
    common=_FASHION_COMMON,
    per_stage=_FASHION_STAGES,
    # 1: the tokenizer's decoder alone, 4,000 more steps (its 800 first steps left textures blurred:
    # the round trip kept 0.88 of a label judge's accuracy on train images). Encoder and codebook
    # frozen, so every image keeps its tokens and MAGE needs no retraining.
    continuation=(
        ("tokenizer", {"train": "decoder", "steps": 4000, "blr": 2e-3, "restart_every": 0, "seed": 1}),
        # 2: MAGE 3,000 more steps on a fresh schedule (its first 3,000 are about 3 epochs).
        ("mage", {**_MAGE_MORE, "steps": 3000, "rep_crop": "independent", "seed": 2}),
        # (A third MAGE phase of 3,000 steps with seed 3 was measured and dropped: label
        # preservation on train images at the defaults 0.841 after it against 0.848 before;
        # docs/results.md.)
        # 3-5: the encoder 4,000 more steps (its first 1,000 are about one epoch; its 1-NN label
        # accuracy bounded what MAGE could keep), then the RDM and MAGE on its representations.
        # Measured (docs/results.md): preservation at the defaults on test images 0.830 -> 0.844.
        ("encoder", {**_FASHION_STAGES["encoder"], "steps": 4000, "seed": 3}),
        ("rdm", {**_FASHION_STAGES["rdm"], "seed": 3}),
        ("mage", {**_MAGE_MORE, "steps": 3000, "rep_crop": "independent", "seed": 4}),
    ),
    hold_out_benchmark_test=False,  # the source's own test split is the benchmark's; training reads train only
)
# The novel-class regime: the same recipe on the train images of five base classes only, so that
# the few-shot benchmark's other five classes are new to every stage.
FASHION_BASE_CLASSES = ("T-shirt/top", "Trouser", "Coat", "Sandal", "Bag")
FASHION_BASE_TINY = Recipe(
    name="fashion-base-tiny",
    description="fashion-tiny's recipe on the Fashion-MNIST train images of the base classes T-shirt/top, Trouser, "
                "Coat, Sandal and Bag only (30,000 images); Pullover, Dress, Shirt, Sneaker and Ankle boot unseen.",
    data="fashion-mnist",
    init="digits-tiny",
    classes=FASHION_BASE_CLASSES,
    stages=("encoder", "tokenizer", "rdm", "mage"),
    common=_FASHION_COMMON,
    per_stage=_FASHION_STAGES,
    hold_out_benchmark_test=False,
)

RECIPES: dict[str, Recipe] = {r.name: r for r in (DIGITS_TINY, FACES_TINY, FASHION_TINY, FASHION_BASE_TINY)}


def get_recipe(name: str) -> Recipe:
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; choose one of {sorted(RECIPES)}")
    return RECIPES[name]


__all__ = ["DIGITS_TINY", "FACES_TINY", "FASHION_BASE_CLASSES", "FASHION_BASE_TINY", "FASHION_TINY", "RECIPES", "Recipe", "get_recipe"]
