"""Named models: what ships inside the package, with license and source.

A named model is a directory under ``rcg_augment/weights/<name>`` written by
``RCGPipeline.save_pretrained``; nothing is ever downloaded.
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
}


def available_models() -> list[str]:
    """Named models whose weights are present in this installation."""
    return sorted(n for n in MODEL_CARDS if (WEIGHTS_DIR / n / "config.json").is_file())


def resolve_model_dir(name_or_path: str | os.PathLike) -> Path:
    """A directory path, or a named model's packaged directory; a clear error otherwise."""
    path = Path(name_or_path)
    if path.is_dir():
        return path
    name = str(name_or_path)
    if name in MODEL_CARDS:
        directory = WEIGHTS_DIR / name
        if (directory / "config.json").is_file():
            return directory
        raise FileNotFoundError(
            f"the named model {name!r} is not bundled in this installation; train it with "
            f"`{MODEL_CARDS[name].recipe}` or pass a directory. Bundled: {available_models() or 'none'}"
        )
    raise FileNotFoundError(
        f"{name!r} is neither a directory nor a named model; named models: {sorted(MODEL_CARDS)}"
    )


__all__ = ["MODEL_CARDS", "ModelCard", "available_models", "resolve_model_dir"]
