"""Named models: what ships inside the package, with license and source; and the one resolver
that turns a model name into a folder for every entry point (``RCGPipeline.from_pretrained``,
``RCGAugment``, ``AlbuRCGAugment``, ``RepresentationAugment``, ``build --model``, ``train --init``,
``finetune --from``).

A named model is a directory under ``rcg_augment/weights/<name>`` written by
``RCGPipeline.save_pretrained``; bundled names never touch the network.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

WEIGHTS_DIR = Path(__file__).parent / "weights"


@dataclass(frozen=True)
class ModelCard:
    name: str
    description: str
    license: str
    source: str
    recipe: str


MODEL_CARDS: dict[str, ModelCard] = {
    "digits-tiny": ModelCard(
        name="digits-tiny",
        description="Whole RCG stack (tiny presets, 32 px, 1 channel) trained from scratch on sklearn digits.",
        license="MIT (trained by this project; sklearn's digits are public domain UCI data)",
        source="rcg-augment recipe `digits-tiny`",
        recipe="rcg-augment train all --recipe digits-tiny",
    ),
    "faces-tiny": ModelCard(
        name="faces-tiny",
        description="digits-tiny fine-tuned on the faces of skimage.data.lfw_subset().",
        license="MIT (trained by this project); LFW images: see the LFW terms",
        source="rcg-augment recipe `faces-tiny`",
        recipe="rcg-augment finetune --recipe faces-tiny",
    ),
    "fashion-tiny": ModelCard(
        name="fashion-tiny",
        description="digits-tiny with all four stages fine-tuned on the 60,000 Fashion-MNIST train images "
                    "(weights stored as float16, computed in float32).",
        license="MIT (trained by this project); Fashion-MNIST images: MIT (Zalando Research)",
        source="rcg-augment recipe `fashion-tiny`",
        recipe="rcg-augment train all --recipe fashion-tiny",
    ),
}


def available_models() -> list[str]:
    """Named models whose weights are present in this installation."""
    return sorted(n for n in MODEL_CARDS if (WEIGHTS_DIR / n / "config.json").is_file())


def resolve_model_dir(
    name_or_path: str | os.PathLike, *, revision: str | None = None, cache_dir: str | os.PathLike | None = None,
    local_files_only: bool = False, token: str | bool | None = None,
) -> Path:
    """The folder of a saved pipeline, looked up in this order:

    1. a bundled name (``"digits-tiny"``; see :data:`MODEL_CARDS`): the packaged folder, no network;
    2. an existing local directory;
    3. a Hugging Face Hub model id ``"namespace/name"`` (or ``"namespace/name@revision"``):
       downloaded into the Hub cache with ``huggingface_hub`` (``HF_HUB_OFFLINE=1`` or
       ``local_files_only=True`` reads the cache only); ``revision`` pins a branch, tag or commit.

    Raises ``FileNotFoundError`` naming what was tried and the fix.
    """
    name = os.fspath(name_or_path)
    if name in MODEL_CARDS:
        directory = WEIGHTS_DIR / name
        if (directory / "config.json").is_file():
            return directory
        raise FileNotFoundError(
            f"the named model {name!r} is not bundled in this installation; train it with "
            f"`{MODEL_CARDS[name].recipe}` or pass a directory. Bundled: {available_models() or 'none'}"
        )
    path = Path(name)
    if path.is_dir():
        return path
    from .hub import download_model, parse_hub_id

    hub_id = parse_hub_id(name) if isinstance(name_or_path, str) else None
    if hub_id is None:
        raise FileNotFoundError(
            f"{name!r} is neither a directory nor a named model ({', '.join(sorted(MODEL_CARDS))}), nor a Hugging "
            "Face Hub id 'namespace/name'; pass one of those"
        )
    repo_id, pinned = hub_id
    if pinned is not None and revision is not None and pinned != revision:
        raise ValueError(f"{name!r} pins revision {pinned!r} but `revision` is {revision!r}; give one of them")
    return download_model(repo_id, revision=pinned or revision, cache_dir=cache_dir,
                          local_files_only=local_files_only, token=token)


__all__ = ["MODEL_CARDS", "ModelCard", "available_models", "resolve_model_dir"]
