"""File primitives every writer here shares: atomic replace and sha256, without torch.

Kept torch-free so laptop-side tools (sync, manifests, S3) import it cheaply. A write that
does not fit raises DiskFullError (which file, how much, how much is free), its temp gone.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Callable
from pathlib import Path

from src.common.errors import DiskFullError, is_disk_full
from src.common.signals import writing_file

HASH_CHUNK_BYTES = 8 * 1024 * 1024


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(HASH_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def fsync_dir(directory: Path) -> None:
    """Make a rename inside ``directory`` durable (the new entry survives power loss)."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temp_path_for(path: Path) -> Path:
    """A hidden sibling temp name: same filesystem (so rename is atomic), unique per process."""
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` so that ``path`` holds either the old content or all of the new."""
    tmp = temp_path_for(path)
    with writing_file():  # a stop signal after training lets this write end first
        try:
            with open(tmp, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, path)
        except OSError as error:
            tmp.unlink(missing_ok=True)
            if is_disk_full(error):
                raise DiskFullError(path, len(data)) from error
            raise
        finally:
            tmp.unlink(missing_ok=True)
        fsync_dir(path.parent)


def atomic_write_dir(path: Path, fill: Callable[[Path], None]) -> None:
    """Make ``path`` a directory holding what ``fill(temp_dir)`` writes, all of it durable,
    replacing the old one (a PEFT ``save_pretrained`` folder, say).

    The new folder is written and fsynced under a hidden temp name, the old one renamed aside,
    the new one renamed into place, the old one deleted. A kill between the two renames
    leaves only the old folder aside: the next write puts it back first.
    """
    path = Path(path)
    old = path.with_name(f".{path.name}.old")
    if old.exists() and not path.exists():
        os.replace(old, path)  # an earlier write was killed between its renames
    shutil.rmtree(old, ignore_errors=True)
    tmp = temp_path_for(path)
    shutil.rmtree(tmp, ignore_errors=True)
    with writing_file():
        try:
            tmp.mkdir(parents=True)
            fill(tmp)
            for file in sorted(tmp.rglob("*")):
                if file.is_file():
                    with open(file, "rb") as handle:
                        os.fsync(handle.fileno())
            for folder in sorted({file.parent for file in tmp.rglob("*")} | {tmp}):
                fsync_dir(folder)
            if path.exists():
                os.replace(path, old)
            os.replace(tmp, path)
            fsync_dir(path.parent)
        except OSError as error:
            shutil.rmtree(tmp, ignore_errors=True)  # first: the free room reported is real
            if is_disk_full(error):
                raise DiskFullError(path, None) from error
            raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
