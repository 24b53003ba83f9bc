"""Hostile input folders for open_source / build_synthetic / `rcg-augment build`: every PIL mode,
EXIF rotation, broken and non-image files, decompression bombs, symlinks (loops, outside the
folder), odd class names, a random tree (hypothesis). Each gives a correct output or one clear
error naming the path, and nothing is written outside the output directory."""

from __future__ import annotations

import io
import os
import struct
import tempfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from rcg_augment.data import (
    SourceError,
    SyntheticDataset,
    build_synthetic,
    load_synthetic,
    open_source,
)
from rcg_augment.data.sources import pil_to_tensor, read_image

from .conftest import CLI_FAST, FAST, assert_one_line_error, record_hashes, run_cli, snapshot


def _image(mode: str, size=(14, 10), seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    w, h = size
    rgb = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    if mode == "P+transparency":
        img = rgb.convert("P")
        img.info["transparency"] = 0
        return img
    if mode == "I;16":
        return Image.fromarray(rng.integers(0, 65536, (h, w)).astype(np.uint16))
    if mode == "I":
        return Image.fromarray(rng.integers(-70000, 70000, (h, w)).astype(np.int32))
    if mode == "F":
        return Image.fromarray((rng.random((h, w)) * 1e3 - 5).astype(np.float32))
    return rgb.convert(mode)


# (mode, format, extension): every PIL mode the brief names, in formats that store it.
MODE_FILES = [
    ("P", "PNG", ".png"), ("P+transparency", "PNG", ".png"), ("P+transparency", "GIF", ".gif"),
    ("LA", "PNG", ".png"), ("I;16", "PNG", ".png"), ("I;16", "TIFF", ".tif"), ("I", "TIFF", ".tiff"),
    ("F", "TIFF", ".tif"), ("CMYK", "JPEG", ".jpg"), ("CMYK", "TIFF", ".tif"), ("1", "PNG", ".png"),
    ("1", "BMP", ".bmp"), ("L", "PPM", ".pgm"), ("RGB", "PPM", ".ppm"), ("RGBA", "WEBP", ".webp"),
    ("RGB", "JPEG", ".jpeg"), ("L", "BMP", ".bmp"),
]


def _write(img: Image.Image, path: Path, fmt: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, format=fmt)
    return path


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims ``width`` x ``height`` (8-bit gray) with almost no pixel data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


# ----------------------------------------------------------------------------------- PIL modes
@pytest.mark.parametrize("mode,fmt,ext", MODE_FILES, ids=[f"{m}-{f}" for m, f, _ in MODE_FILES])
def test_every_mode_reads_to_a_valid_tensor(tmp_path, mode, fmt, ext):
    path = _write(_image(mode), tmp_path / f"x{ext}", fmt)
    img = read_image(path)
    assert img.size == (14, 10)
    for channels in (1, 3):
        t = pil_to_tensor(img, 8, channels)
        assert t.shape == (channels, 8, 8) and t.dtype == torch.float32
        assert torch.isfinite(t).all() and 0 <= t.min() and t.max() <= 1
        assert t.max() > t.min()  # random content survives: not a blank image


def test_mode_semantics():
    """Transparency composites over black; 16-bit and float span the 8-bit range; NaN/inf are tamed."""
    p = Image.new("P", (4, 4), 1)
    p.putpalette([0, 0, 0, 255, 255, 255] + [0] * 762)
    p.putpixel((0, 0), 0)
    p.info["transparency"] = 1  # the white pixels are transparent -> black
    assert pil_to_tensor(p, 4, 1).max() == 0
    la = Image.merge("LA", [Image.new("L", (4, 4), 200), Image.new("L", (4, 4), 0)])
    assert pil_to_tensor(la, 4, 1).max() == 0  # fully transparent
    ramp = np.arange(16, dtype=np.uint16).reshape(4, 4) * 4000
    t = pil_to_tensor(Image.fromarray(ramp), 4, 1)
    assert t.min() == 0 and t.max() == 1
    weird = np.array([[np.nan, np.inf, -np.inf, 0.5], [0.0, 1.0, 0.25, 0.75]] * 2, dtype=np.float32)
    with np.errstate(all="raise"):  # no invalid-value casts
        t = pil_to_tensor(Image.fromarray(weird, "F"), 4, 1)
    assert torch.isfinite(t).all() and t.min() == 0 and t.max() == 1
    t = pil_to_tensor(Image.fromarray(np.full((4, 4), np.nan, np.float32), "F"), 4, 1)
    assert torch.equal(t, torch.zeros(1, 4, 4))


def test_every_mode_builds(tmp_path, pipeline):
    root = tmp_path / "in"
    for i, (mode, fmt, ext) in enumerate(MODE_FILES):
        _write(_image(mode, seed=i), root / ("a" if i % 2 else "b") / f"{i}{ext}", fmt)
    before = snapshot(tmp_path, exclude=tmp_path / "out")
    s = build_synthetic(root, tmp_path / "out", variants_per_image=1, noise_level=0.5, pipeline=pipeline,
                        batch_size=8, progress=False, **FAST)
    assert s.complete and s.skipped == [] and s.records == s.sources_used == len(MODE_FILES)
    assert snapshot(tmp_path, exclude=tmp_path / "out") == before


# ----------------------------------------------------------------------------------- EXIF
def test_exif_rotation_is_applied(tmp_path, pipeline):
    """A 20x10 JPEG tagged "rotate 90" is read 10x20, and builds the same records as the same
    pixels stored upright in a PNG."""
    img = _image("RGB", size=(20, 10))
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 CW to display
    jpg = tmp_path / "tagged" / "c" / "0.jpg"
    jpg.parent.mkdir(parents=True)
    img.save(jpg, format="JPEG", exif=exif, quality=95)
    with Image.open(jpg) as raw:
        assert raw.size == (20, 10)
        upright = raw.convert("RGB").transpose(Image.Transpose.ROTATE_270)
    _write(upright, tmp_path / "upright" / "c" / "0.png", "PNG")

    src = open_source(tmp_path / "tagged")
    assert src[0][0].size == (10, 20)
    assert np.array_equal(np.asarray(src[0][0].convert("RGB")), np.asarray(upright))
    for name in ("tagged", "upright"):
        build_synthetic(tmp_path / name, tmp_path / f"out-{name}", variants_per_image=2, noise_level=0.3,
                        pipeline=pipeline, progress=False, **FAST)
    assert record_hashes(tmp_path / "out-tagged") == record_hashes(tmp_path / "out-upright")


# ----------------------------------------------------------------------------------- broken files
def test_broken_and_fake_files_are_skipped_with_reasons(tmp_path, capsys, model_dir):
    root = tmp_path / "in"
    _write(_image("L"), root / "a" / "good.png", "PNG")
    _write(_image("RGB"), root / "b" / "good.jpg", "JPEG")
    png = (root / "a" / "good.png").read_bytes()
    jpg = (root / "b" / "good.jpg").read_bytes()
    bad = {
        "a/truncated.png": png[: len(png) // 2],
        "b/truncated.jpg": jpg[: len(jpg) // 2],
        "a/zero.png": b"",
        "b/zero.jpg": b"",
        "a/page.png": b"<!doctype html><html><body>not an image</body></html>",
        "b/archive.tiff": zlib.compress(b"x" * 1000),
        "a/bomb.png": _png_header_only(100_000, 100_000),  # 1e10 px claimed: refused before decoding
        "b/header-lies.png": _png_header_only(4000, 3000),  # plausible size, no data
    }
    for rel, data in bad.items():
        (root / rel).write_bytes(data)
    (root / "a" / "folder.png").mkdir()  # a directory with an image name is not a file: ignored
    out = tmp_path / "out"
    before = snapshot(tmp_path, exclude=out)
    code, text, err = run_cli(capsys, "--input", root, "--out", out, "--variants", 1, "--noise-level", 0.5,
                              "--model", model_dir, *CLI_FAST)
    assert code == 0, err
    assert "skipped files  8" in text
    skipped = dict(SyntheticDataset(out).manifest["skipped_sources"])
    assert set(skipped) == {str(root / rel) for rel in bad}
    assert "DecompressionBombError" in skipped[str(root / "a" / "bomb.png")]
    assert load_synthetic(out)["label"] == [0, 1]
    assert snapshot(tmp_path, exclude=out) == before


def test_nothing_readable_is_one_clear_error(tmp_path, capsys, model_dir):
    root = tmp_path / "in"
    (root / "a").mkdir(parents=True)
    (root / "a" / "bomb.png").write_bytes(_png_header_only(100_000, 100_000))
    (root / "a" / "zero.jpg").write_bytes(b"")
    code, _, err = run_cli(capsys, "--input", root, "--out", tmp_path / "out", "--variants", 1,
                           "--noise-level", 0.5, "--model", model_dir, *CLI_FAST)
    assert_one_line_error(code, err, str(root / "a"), "none of the 2 files of class 'a' could be read")
    with pytest.raises(SourceError, match="could be read"):
        open_source(root)
    for spec, needle in ((tmp_path / "missing", "no such folder"), (root / "a" / "zero.jpg", "expected a folder")):
        code, _, err = run_cli(capsys, "--input", spec, "--out", tmp_path / "out2", "--variants", 1,
                               "--noise-level", 0.5, "--model", model_dir, *CLI_FAST)
        assert_one_line_error(code, err, str(spec), needle)
    assert not (tmp_path / "out2").exists()


# ----------------------------------------------------------------------------------- symlinks
def test_symlinks_are_followed_only_inside_the_folder(tmp_path, pipeline):
    root, outside = tmp_path / "in", tmp_path / "private"
    _write(_image("L", seed=1), root / "a" / "0.png", "PNG")
    _write(_image("L", seed=2), root / "b" / "0.png", "PNG")
    _write(_image("L", seed=3), outside / "secret.png", "PNG")
    links = {
        "a/inside.png": root / "b" / "0.png",  # inside: followed
        "a/outside.png": outside / "secret.png",  # a file outside: not followed
        "a/dangling.png": root / "a" / "gone.png",
        "a/loop1.png": root / "a" / "loop2.png",
        "a/loop2.png": root / "a" / "loop1.png",
        "a/self.png": root,  # a directory under an image name
        "outside-class": outside,  # a class folder outside: not followed
        "root-again": root,  # the input folder itself: a loop
        "parent": tmp_path,
    }
    for rel, target in links.items():
        os.symlink(target, root / rel)
    os.symlink(root / "b", root / "c")  # a class folder inside: followed

    src = open_source(root)
    assert src.classes == ["a", "b", "c"]
    items = [str(p) for p in src._items]
    assert items == [str(root / n) for n in ("a/0.png", "a/inside.png", "b/0.png", "c/0.png")]
    not_followed = {str(root / rel) for rel in links} - {str(root / "a" / "inside.png")}
    assert {p for p, _ in src.skipped} == not_followed
    assert all("not followed" in reason for _, reason in src.skipped)
    assert not any("private" in p or "secret" in p for p in items)

    out = tmp_path / "out"
    before = snapshot(tmp_path, exclude=out)
    s = build_synthetic(root, out, variants_per_image=1, noise_level=0.5, pipeline=pipeline, progress=False, **FAST)
    assert s.complete and s.records == 4 and len(s.skipped) == len(not_followed)
    assert snapshot(tmp_path, exclude=out) == before


# ----------------------------------------------------------------------------------- class names
ODD_NAMES = ["with space", "ünïcödé", "日本語", "x..y", "-rf", "a∕b", "a／b", "tab\there", "new\nline", "'quote\"",
             "$HOME", "%s{}"]


def test_odd_class_names_round_trip(tmp_path, capsys, model_dir):
    root = tmp_path / "in"
    for i, name in enumerate(ODD_NAMES):
        _write(_image("L", seed=i), root / name / "0.png", "PNG")
    _write(_image("L"), root / ".hidden" / "0.png", "PNG")  # ignored
    _write(_image("L"), root / "..." / "0.png", "PNG")  # only dots: a hidden name, ignored
    os.mkdir(os.fsencode(root) + b"/bad-\xff-utf8")  # not valid UTF-8: Python's surrogate escapes
    _write(_image("L"), Path(os.fsdecode(os.fsencode(root) + b"/bad-\xff-utf8/0.png")), "PNG")
    out = tmp_path / "out"
    before = snapshot(tmp_path, exclude=out)
    code, text, err = run_cli(capsys, "--input", root, "--out", out, "--variants", 1, "--noise-level", 0.5,
                              "--model", model_dir, "--contact-sheet", *CLI_FAST)
    assert code == 0, err
    expected = sorted([*ODD_NAMES, os.fsdecode(b"bad-\xff-utf8")])
    ds = SyntheticDataset(out)
    assert ds.classes == expected and sorted(ds.labels) == list(range(len(expected)))
    assert (out / "contact_sheet.png").is_file()
    assert snapshot(tmp_path, exclude=out) == before


def test_only_hidden_folders_is_a_clear_error(tmp_path):
    _write(_image("L"), tmp_path / "in" / "..." / "0.png", "PNG")
    _write(_image("L"), tmp_path / "in" / ".git" / "0.png", "PNG")
    with pytest.raises(SourceError, match=r"no class sub-folders \(names starting with '\.' are ignored\)"):
        open_source(tmp_path / "in")


# ----------------------------------------------------------------------------------- output confinement
def test_output_inside_the_input_folder_is_refused(tmp_path, capsys, model_dir):
    root = tmp_path / "in"
    _write(_image("L"), root / "a" / "0.png", "PNG")
    for out in (root / "cache", root, root / "a" / "deeper"):
        code, _, err = run_cli(capsys, "--input", root, "--out", out, "--variants", 1, "--noise-level", 0.5,
                               "--model", model_dir, *CLI_FAST)
        assert_one_line_error(code, err, "is inside the input folder", str(out))
    assert sorted(p.name for p in root.rglob("*")) == ["0.png", "a"]


@pytest.mark.parametrize("planted", [".lock", "shards", "contact_sheet.png", "plan.json.tmp.1"])
def test_planted_symlinks_in_out_dir_are_never_written_through(tmp_path, capsys, model_dir, planted):
    root, out, victim = tmp_path / "in", tmp_path / "out", tmp_path / "victim"
    _write(_image("L"), root / "a" / "0.png", "PNG")
    victim.mkdir()
    (victim / "precious.txt").write_text("keep me")
    out.mkdir()
    target = victim if planted == "shards" else victim / "precious.txt"
    os.symlink(target, out / planted)
    before = snapshot(victim)
    code, text, err = run_cli(capsys, "--input", root, "--out", out, "--variants", 1, "--noise-level", 0.5,
                              "--model", model_dir, "--contact-sheet", *CLI_FAST)
    if planted == "plan.json.tmp.1":  # a stale temp name: removed, the build goes on
        assert code == 0, err
        assert not (out / planted).exists()
    else:
        assert_one_line_error(code, err, str(out), planted)
    assert snapshot(victim) == before and (victim / "precious.txt").read_text() == "keep me"
    if planted in ("shards", "contact_sheet.png"):  # --overwrite removes the link, never its target
        code, _, err = run_cli(capsys, "--input", root, "--out", out, "--variants", 1, "--noise-level", 0.5,
                               "--model", model_dir, "--contact-sheet", "--overwrite", *CLI_FAST)
        assert code == 0, err
        assert not (out / planted).is_symlink() and snapshot(victim) == before


def test_large_photo_keeps_the_contact_sheet_small(tmp_path, capsys, model_dir):
    root = tmp_path / "in"
    ramp = np.linspace(0, 255, 3000, dtype=np.float64)[None, :].repeat(2000, 0).astype(np.uint8)
    _write(Image.fromarray(ramp), root / "a" / "photo.png", "PNG")
    code, _, err = run_cli(capsys, "--input", root, "--out", tmp_path / "out", "--variants", 2, "--noise-level",
                           0.5, "--model", model_dir, "--contact-sheet", *CLI_FAST)
    assert code == 0, err
    with Image.open(tmp_path / "out" / "contact_sheet.png") as sheet:
        assert max(sheet.size) <= 3 * (256 + 4) + 4  # one row: source + 2 variants, cells at most 256 px


# ----------------------------------------------------------------------------------- random trees
GOOD = [("L", "PNG", ".png"), ("RGB", "JPEG", ".jpg"), ("P", "GIF", ".gif"), ("RGBA", "PNG", ".png"),
        ("LA", "PNG", ".png"), ("I;16", "PNG", ".png"), ("1", "BMP", ".bmp"), ("CMYK", "TIFF", ".tif"),
        ("F", "TIFF", ".tiff"), ("I", "TIFF", ".tif"), ("P+transparency", "PNG", ".png"), ("RGB", "WEBP", ".webp"),
        ("L", "PPM", ".pgm")]
BAD = ["zero", "text", "truncated"]
names = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="/\x00"), min_size=1,
                max_size=10).filter(lambda s: s not in (".", ".."))
files = st.one_of(
    st.tuples(st.just("good"), st.sampled_from(GOOD), st.integers(1, 40), st.integers(1, 40)),
    st.tuples(st.just("bad"), st.sampled_from(BAD), st.sampled_from([".png", ".jpg", ".tif", ".gif"]), st.just(0)),
)
trees = st.one_of(
    st.lists(files, min_size=1, max_size=4).map(lambda fs: {None: fs}),  # a flat folder
    st.dictionaries(names, st.lists(files, min_size=0, max_size=3), min_size=1, max_size=3),
)


def _materialise(root: Path, tree: dict) -> tuple[dict[str, int], int]:
    """Write ``tree``; returns readable images per visible class and the count of bad files."""
    readable, bad = {}, 0
    for cls, entries in tree.items():
        folder = root if cls is None else root / cls
        folder.mkdir(parents=True, exist_ok=True)
        visible = cls is None or not cls.startswith(".")
        n_good = 0
        for i, entry in enumerate(entries):
            if entry[0] == "good":
                (mode, fmt, ext), w, h = entry[1], entry[2], entry[3]
                _write(_image(mode, size=(w, h), seed=i), folder / f"{i}{ext}", fmt)
                n_good += 1
            else:
                kind, ext = entry[1], entry[2]
                data = {"zero": b"", "text": "{é} not an image".encode()}.get(kind)
                if data is None:
                    buf = io.BytesIO()
                    _image("RGB", (16, 16), seed=i).save(buf, format="PNG")
                    data = buf.getvalue()[:40]
                (folder / f"{i}{ext}").write_bytes(data)
                bad += visible
        if visible:
            readable[cls or root.name] = n_good
    return readable, bad


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tree=trees)
def test_random_trees_build_or_fail_clearly(pipeline, tree):
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        root, out = tmp / "in", tmp / "out"
        readable, bad = _materialise(root, tree)
        if None not in tree and not readable:  # only hidden class folders: the root is a flat folder
            readable = {"in": 0}
        before = snapshot(tmp, exclude=out)
        expect_error = any(n == 0 for n in readable.values())
        try:
            s = build_synthetic(root, out, variants_per_image=1, noise_level=0.5, pipeline=pipeline,
                                batch_size=4, progress=False, **FAST)
        except SourceError as err:
            assert expect_error, err
            assert str(root) in str(err)
        else:
            assert not expect_error
            assert s.complete and s.classes == sorted(readable)
            assert s.records == s.sources_used == sum(readable.values())
            assert len(s.skipped) == bad
            assert sorted(set(load_synthetic(out)["label"])) == list(range(len(readable)))
        assert snapshot(tmp, exclude=out) == before
