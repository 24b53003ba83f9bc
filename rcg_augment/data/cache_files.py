"""The crash-safe file layer of the synthetic cache: atomic writes, the build lock, shard files.

Every file of a cache is written to a temporary name, fsynced and renamed, so a kill at any
moment leaves either the old file or the new one; a shard's sidecar (sha256, size, record count)
is written after its shard, so a sidecar never vouches for a partial shard. What the files hold
(plan, manifest) is :mod:`rcg_augment.data.cache_manifest`; generating the records is
:mod:`rcg_augment.data.build`.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shutil
from pathlib import Path

from ..files import sha256_file

PLAN_NAME = "plan.json"
MANIFEST_NAME = "manifest.json"
SHARD_DIR = "shards"
LOCK_NAME = ".lock"
OWN_NAMES = {PLAN_NAME, MANIFEST_NAME, SHARD_DIR, "contact_sheet.png"}


class BuildLockedError(RuntimeError):
    """Another builder holds the lock on ``out_dir``."""


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes) -> None:
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
        fsync_dir(path.parent)
    except OSError as err:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if err.errno in (errno.ENOSPC, errno.EDQUOT):
            raise OSError(err.errno, f"no space left on device while writing {path} ({len(data)} bytes); "
                          "free space and rerun the same command to resume (complete shards are kept)") from err
        raise


def json_bytes(obj) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode()


def read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError, RecursionError):
        return None


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


class BuildLock:
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


def shard_paths(out_dir: Path, shard: int) -> tuple[Path, Path]:
    base = out_dir / SHARD_DIR / f"shard-{shard:05d}"
    return base.with_suffix(".arrow"), base.with_suffix(".json")


def shard_complete(out_dir: Path, shard: int, spec_hash: str, *, verify: bool) -> dict | None:
    """The shard's sidecar if the shard is complete (and, with ``verify``, its bytes match)."""
    arrow_path, meta_path = shard_paths(out_dir, shard)
    meta = read_json(meta_path)
    if not isinstance(meta, dict) or meta.get("spec_sha256") != spec_hash or not arrow_path.is_file():
        return None
    if arrow_path.stat().st_size != meta.get("bytes"):
        return None
    if verify and sha256_file(arrow_path) != meta.get("sha256"):
        return None
    return meta


def clean_shard(out_dir: Path, shard: int, *, temp_only: bool = False) -> None:
    """Remove temp files of a shard left by a killed writer, and (unless ``temp_only``) the shard."""
    arrow_path, meta_path = shard_paths(out_dir, shard)
    doomed = list(arrow_path.parent.glob(f"{arrow_path.stem}.*.tmp.*"))
    if not temp_only:
        doomed = [meta_path, arrow_path, *doomed]  # sidecar first: never a sidecar without its shard
    for p in doomed:
        with contextlib.suppress(FileNotFoundError):
            p.unlink()


def clear_cache(out_dir: Path) -> None:
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


def check_out_dir(out_dir: Path, *, overwrite: bool = False) -> None:
    """Refuse an ``out_dir`` that is a file, holds symlinks where the cache writes, or holds foreign files.

    With ``overwrite`` the symlinks are not refused: ``clear_cache`` removes them (never their targets).
    """
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"`out_dir` {out_dir} exists and is not a directory; choose a directory path")
    links = sorted(name for name in OWN_NAMES if (out_dir / name).is_symlink())
    if links and not overwrite:  # writing through them would write outside out_dir
        raise ValueError(f"`out_dir` {out_dir} holds symlinks where the cache writes ({', '.join(links)}); "
                         "remove them or choose a new directory")
    if (out_dir / PLAN_NAME).exists() or (out_dir / MANIFEST_NAME).exists():
        return
    foreign = sorted(p.name for p in out_dir.iterdir()
                     if p.name not in OWN_NAMES and not p.name.startswith((LOCK_NAME, PLAN_NAME)))
    if foreign:
        raise ValueError(f"`out_dir` {out_dir} is not empty and holds no rcg-augment cache "
                         f"(found {', '.join(foreign[:5])}); choose a new or empty directory")


__all__ = ["BuildLock", "BuildLockedError", "LOCK_NAME", "MANIFEST_NAME", "OWN_NAMES", "PLAN_NAME", "SHARD_DIR",
           "atomic_write", "check_out_dir", "clean_shard", "clear_cache", "fsync_dir", "json_bytes", "read_json",
           "shard_complete", "shard_paths"]
