"""A full disk mid-build: the build stops with one clear error, leaves no partial files, and a
rerun after space is freed completes with records identical to an uninterrupted build.

Two ways to fill the disk: ``os.fsync`` made to fail with ENOSPC once K shards are written
(everywhere), and a real 256 KiB tmpfs filled with a ballast file (root only; skipped otherwise).
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from rcg_augment.data import SyntheticDataset, build_synthetic

from .conftest import CLI_FAST, FAST, assert_one_line_error, record_hashes, run_cli

KW = dict(variants_per_image=4, noise_level=[0.3, 0.7], batch_size=4, records_per_shard=4, progress=False, **FAST)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("disk-full-in")
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (root / c).mkdir()
        for i in range(2):
            Image.fromarray(rng.integers(0, 256, (12, 12), dtype=np.uint8)).save(root / c / f"{i}.png")
    return root  # 4 images x 8 variants = 32 records in 8 shards


@pytest.fixture(scope="module")
def reference(folder, tmp_path_factory, pipeline):
    out = tmp_path_factory.mktemp("disk-full-ref") / "cache"
    build_synthetic(folder, out, pipeline=pipeline, **KW)
    return out


def _shard_bytes(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((out / "shards").iterdir())}


class _Disk:
    """Makes ``os.fsync`` fail with ENOSPC for files under ``out`` once ``free_shards`` more shard
    files have been written (or at once for files whose name starts with ``fail_on``)."""

    def __init__(self, monkeypatch, out: Path, *, free_shards: int, fail_on: str = ""):
        self.out, self.free, self.fail_on, self.refused = str(out), free_shards, fail_on, []
        real = os.fsync

        def fsync(fd):
            path = os.readlink(f"/proc/self/fd/{fd}")
            if path.startswith(self.out):
                name = os.path.basename(path)
                full = (self.fail_on and name.startswith(self.fail_on)) or (
                    not self.fail_on and ".arrow.tmp." in name and self.free <= 0)
                if full:
                    self.refused.append(path)
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                if ".arrow.tmp." in name:
                    self.free -= 1
            return real(fd)

        monkeypatch.setattr(os, "fsync", fsync)


pytestmark = pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc/self/fd (Linux)")


def test_full_disk_stops_cleanly_and_resumes(folder, reference, tmp_path, pipeline, monkeypatch, capsys, model_dir):
    out = tmp_path / "cache"
    # 1. Python API: the third shard does not fit.
    with monkeypatch.context() as m:
        disk = _Disk(m, out, free_shards=2)
        with pytest.raises(OSError, match="no space left on device while writing") as info:
            build_synthetic(folder, out, pipeline=pipeline, **KW)
    assert info.value.errno == errno.ENOSPC and len(disk.refused) == 1
    msg = str(info.value)
    assert str(out / "shards" / "shard-00002.arrow") in msg and "free space and rerun" in msg
    assert sorted(p.name for p in (out / "shards").iterdir()) == [
        "shard-00000.arrow", "shard-00000.json", "shard-00001.arrow", "shard-00001.json"]
    assert not (out / "manifest.json").exists()
    assert not list(out.rglob("*.tmp.*"))  # the partial temp file was removed: its space is free again

    # 2. The CLI, still short of space, two shards later: one line, exit code 1, no traceback.
    with monkeypatch.context() as m:
        _Disk(m, out, free_shards=2)
        code, _, err = run_cli(capsys, "--input", folder, "--out", out, "--variants", 4, "--noise-level", "0.3,0.7",
                               "--model", model_dir, "--batch-size", 4, "--records-per-shard", 4, *CLI_FAST)
    assert_one_line_error(code, err, "no space left on device while writing", "shard-00004.arrow",
                          "free space and rerun")

    # 3. Space freed: the rerun writes only what is missing and matches the uninterrupted build.
    s = build_synthetic(folder, out, pipeline=pipeline, **KW)
    assert s.complete and s.shards_resumed == 4 and s.records_written == 16
    assert record_hashes(out) == record_hashes(reference)
    assert _shard_bytes(out) == _shard_bytes(reference)


@pytest.mark.parametrize("fail_on", ["plan.json", "manifest.json", "shard-00000.json"])
def test_full_disk_on_plan_manifest_or_sidecar(folder, reference, tmp_path, pipeline, monkeypatch, fail_on):
    out = tmp_path / "cache"
    with monkeypatch.context() as m:
        _Disk(m, out, free_shards=99, fail_on=fail_on)
        with pytest.raises(OSError, match=f"no space left on device while writing {out}.*{fail_on}"):
            build_synthetic(folder, out, pipeline=pipeline, **KW)
    assert not list(out.rglob("*.tmp.*")) and not (out / "manifest.json").exists()
    s = build_synthetic(folder, out, pipeline=pipeline, **KW)
    assert s.complete and SyntheticDataset(out).manifest["records"] == 32
    assert record_hashes(out) == record_hashes(reference)


def _mount_tmpfs(where: Path, size: str) -> bool:
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    where.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                          capture_output=True, text=True)
    return proc.returncode == 0


def test_real_full_tmpfs(folder, reference, tmp_path, capsys, model_dir):
    disk = tmp_path / "disk"
    if not _mount_tmpfs(disk, "256k"):
        pytest.skip("mounting a tmpfs needs root (the fsync test above covers the logic)")
    try:
        out = disk / "cache"
        ballast = disk / "ballast"
        stat = os.statvfs(disk)
        with open(ballast, "wb") as fh:  # leave room for the plan, the lock and about two shards
            fh.write(b"\0" * (stat.f_bavail * stat.f_frsize - 40 * 1024))
        args = ["--input", folder, "--out", out, "--variants", 4, "--noise-level", "0.3,0.7", "--model", model_dir,
                "--batch-size", 4, "--records-per-shard", 4, *CLI_FAST]
        code, _, err = run_cli(capsys, *args)
        assert_one_line_error(code, err, "no space left on device while writing", str(out), "free space and rerun")
        assert not list(out.rglob("*.tmp.*")) and not (out / "manifest.json").exists()
        ballast.unlink()  # free space
        code, text, err = run_cli(capsys, *args)
        assert code == 0, err
        assert "shards were already complete" in text
        assert record_hashes(out) == record_hashes(reference)
        assert _shard_bytes(out) == _shard_bytes(reference)
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)
