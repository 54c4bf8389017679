"""File primitives every writer here shares: atomic replace and sha256, without torch.

Kept torch-free so laptop-side tools (sync, manifests, S3) import it cheaply. A write that
does not fit raises DiskFullError (which file, how much, how much is free), its temp gone.
"""

from __future__ import annotations

import hashlib
import os
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
