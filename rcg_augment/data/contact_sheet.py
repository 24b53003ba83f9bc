"""Contact sheets: each row a source image beside its synthetic variants, as one PNG."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

_PAD = 4
_TEXT_H = 12
_BACKGROUND = (255, 255, 255)
_INK = (0, 0, 0)
_SOURCE_FRAME = (200, 40, 40)
_RETRIEVED_FRAME = (40, 90, 220)


def _fit(img: Image.Image, cell: int) -> Image.Image:
    """``img`` scaled to fit a ``cell`` square: nearest-neighbour when enlarging (tiny images stay crisp)."""
    img = img.convert("RGB")
    w, h = img.size
    scale = cell / max(w, h)
    new = (max(1, round(w * scale)), max(1, round(h * scale)))
    if new != img.size:
        resample = Image.Resampling.NEAREST if scale >= 1 else Image.Resampling.BICUBIC
        img = img.resize(new, resample)
    canvas = Image.new("RGB", (cell, cell), _BACKGROUND)
    canvas.paste(img, ((cell - new[0]) // 2, (cell - new[1]) // 2))
    return canvas


def contact_sheet(
    sources: Sequence[Image.Image], variants: Sequence[Sequence[Image.Image]], path: str | os.PathLike, *,
    row_labels: Sequence[str] | None = None, cell_size: int | None = None,
    retrieved: Sequence[Sequence[bool]] | None = None,
) -> Path:
    """Write a PNG grid: row ``i`` is ``sources[i]`` (framed red) followed by ``variants[i]``;
    cells marked in ``retrieved`` (real pool images rather than generated ones) are framed blue.

    Args:
        sources: one PIL image per row.
        variants: per row, a list of PIL images (rows may differ in length).
        path: where to write the PNG (parent folders are created).
        row_labels: text under each source (e.g. the class name); default "source i".
        cell_size: pixels per cell; default: the largest image side (at most 256), enlarged to at least 64.
        retrieved: per row, one bool per variant cell: True frames it blue and captions it "pool".

    Example::

        contact_sheet([img], [[v1, v2, v3]], "sheet.png", row_labels=["cat"])
    """
    if len(sources) != len(variants):
        raise ValueError(f"`sources` has {len(sources)} images but `variants` has {len(variants)} rows")
    if not sources:
        raise ValueError("`sources` is empty; a contact sheet needs at least one row")
    if row_labels is not None and len(row_labels) != len(sources):
        raise ValueError(f"`row_labels` has {len(row_labels)} entries for {len(sources)} rows")
    if retrieved is not None and [len(r) for r in retrieved] != [len(r) for r in variants]:
        raise ValueError("`retrieved` must hold one flag per variant cell, row by row")
    labels = list(row_labels) if row_labels is not None else [f"source {i}" for i in range(len(sources))]
    all_images = list(sources) + [v for row in variants for v in row]
    if cell_size is None:
        largest = min(max(max(im.size) for im in all_images), 256)  # photos shrink: bounded sheet memory
        cell_size = largest * max(1, -(-64 // largest))  # integer upscale of tiny images
    cell = int(cell_size)
    columns = 1 + max((len(row) for row in variants), default=0)
    width = _PAD + columns * (cell + _PAD)
    row_h = cell + _TEXT_H + _PAD
    height = _PAD + _TEXT_H + len(sources) * row_h
    sheet = Image.new("RGB", (width, height), _BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default()
    draw.text((_PAD, 1), "source", fill=_INK, font=font)
    any_retrieved = retrieved is not None and any(any(r) for r in retrieved)
    if columns > 1:
        header = "variants (blue frame: retrieved from the pool)" if any_retrieved else "variants"
        draw.text((_PAD + (cell + _PAD), 1), header, fill=_INK, font=font)
    for i, (src, row) in enumerate(zip(sources, variants, strict=True)):
        y = _PAD + _TEXT_H + i * row_h
        sheet.paste(_fit(src, cell), (_PAD, y))
        draw.rectangle([_PAD - 1, y - 1, _PAD + cell, y + cell], outline=_SOURCE_FRAME)
        # the label may run on under the first variant unless that cell carries its own "pool" tag
        room = cell if (retrieved is not None and row and retrieved[i][0]) or not row else 2 * cell + _PAD
        draw.text((_PAD, y + cell + 1), str(labels[i])[: max(4, room // 6)], fill=_INK, font=font)
        for j, v in enumerate(row):
            x = _PAD + (j + 1) * (cell + _PAD)
            sheet.paste(_fit(v, cell), (x, y))
            if retrieved is not None and retrieved[i][j]:
                draw.rectangle([x - 1, y - 1, x + cell, y + cell], outline=_RETRIEVED_FRAME, width=2)
                draw.text((x, y + cell + 1), "pool", fill=_RETRIEVED_FRAME, font=font)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path, format="PNG")
    return path


def cache_contact_sheet(out_dir: str | os.PathLike, source, path: str | os.PathLike | None = None, *,
                        max_rows: int = 10, max_variants: int = 8) -> Path:
    """A contact sheet of a built cache: up to ``max_rows`` source images (the first of each class,
    then more by index) beside up to ``max_variants`` of their records (variants first, then
    retrieved pool images, framed blue). ``source`` is what the cache was built from
    (anything :func:`~rcg_augment.data.open_source` takes). Default path: ``out_dir/contact_sheet.png``.
    """
    from .datasets import load_synthetic
    from .sources import open_source

    out_dir = Path(out_dir)
    ds = load_synthetic(out_dir)
    src = open_source(source)
    if len(ds) == 0:
        raise ValueError(f"{out_dir} holds no records; nothing to show in a contact sheet")
    classes = ds.features["label"].names
    by_source: dict[int, list[int]] = {}
    label_of: dict[int, int] = {}
    for row, (s, label) in enumerate(zip(ds["source_index"], ds["label"], strict=True)):
        by_source.setdefault(int(s), []).append(row)
        label_of[int(s)] = int(label)
    first_of_class: dict[int, int] = {}
    for s in sorted(by_source):
        first_of_class.setdefault(label_of[s], s)
    chosen = [first_of_class[c] for c in sorted(first_of_class)][:max_rows]  # one row per class first
    for s in sorted(by_source):  # then more sources while rows remain
        if len(chosen) >= max_rows:
            break
        if s not in chosen:
            chosen.append(s)
    chosen = sorted(chosen, key=lambda s: (label_of[s], s))
    sources = [src.load(s) for s in chosen]
    origin = ds["origin"] if "origin" in ds.column_names else ["variant"] * len(ds)
    rows = []
    for s in chosen:
        generated = [r for r in by_source[s] if origin[r] != "retrieved"]
        pooled = [r for r in by_source[s] if origin[r] == "retrieved"]
        if generated and pooled:  # both kinds on the row: half of the cells each, the rest to whichever has more
            n_gen = min(len(generated), max(max_variants - len(pooled), -(-max_variants // 2)))
        else:
            n_gen = min(len(generated), max_variants)
        rows.append(generated[:n_gen] + pooled[:max_variants - n_gen])
    variants = [[ds[r]["image"] for r in row] for row in rows]
    flags = [[origin[r] == "retrieved" for r in row] for row in rows]
    row_labels = [f"{classes[label_of[s]]} #{s}" for s in chosen]
    return contact_sheet(sources, variants, path or out_dir / "contact_sheet.png", row_labels=row_labels,
                         retrieved=flags)


__all__ = ["cache_contact_sheet", "contact_sheet"]
