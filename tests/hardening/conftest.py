"""Fixtures for the hardening tests: a random tiny grayscale pipeline (saved and loaded), one
thread, and helpers to snapshot a directory tree and run the CLI."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from rcg_augment import RCGPipeline
from rcg_augment.cli import main
from tests import cache_records

# The smallest generation settings: every build here is about a second.
FAST = {"num_iter": 1, "rdm_steps": 1}
CLI_FAST = ["--num-iter", "1", "--rdm-steps", "1", "--no-progress"]


@pytest.fixture(autouse=True)
def one_thread(one_torch_thread):
    """Intra-op threads thrash on a shared 2-core box; results do not depend on them."""


@pytest.fixture(scope="session")
def model_dir(gray_dir) -> Path:
    return Path(gray_dir)


@pytest.fixture(scope="session")
def pipeline(model_dir) -> RCGPipeline:
    return RCGPipeline.from_pretrained(model_dir)


def snapshot(root: Path, exclude: Path | None = None) -> dict[str, tuple]:
    """Every entry under ``root`` (symlinks not followed) -> (kind, size, mtime_ns, link target)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            if exclude is not None and (p == exclude or exclude in p.parents):
                continue
            st = p.lstat()
            link = os.readlink(p) if p.is_symlink() else None
            kind = "link" if link is not None else ("dir" if p.is_dir() else "file")
            out[str(p.relative_to(root))] = (kind, None if kind == "dir" else st.st_size,
                                             None if kind == "dir" else st.st_mtime_ns, link)
    return out


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    """``rcg-augment build ARGV`` in-process: (exit code, stdout, stderr). An exception the CLI
    does not turn into a one-line error fails the calling test with its traceback."""
    code = main(["build", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code: int, err: str, *needles: str) -> None:
    assert code == 1, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert "Traceback" not in err
    errors = [ln for ln in lines if ln.startswith("rcg-augment build: error:")]
    assert len(errors) == 1, err
    for needle in needles:
        assert needle in errors[0], (needle, errors[0])


def record_hashes(out_dir) -> list[str]:
    """:func:`tests.cache_records.record_hashes`, with the shards checked against the manifest."""
    return cache_records.record_hashes(out_dir, verify=True)
