"""Putting a checked export in place: a staged file or directory renamed over its target.

A format writes each target to a hidden temp sibling (``.<name>.<pid>.tmp``, same filesystem).
Once every check passed, ``commit`` makes it durable (every file and directory fsynced) and
renames it into place in one step: a file with ``os.replace``; a directory with ``os.rename``
when there is none yet, and over an older export with Linux's ``renameat2(RENAME_EXCHANGE)``
(the old one then sits at the temp name and is deleted), so a reader sees the old export or
the new one, never a mix. Where the exchange is not available (not Linux, a filesystem
without it), the old directory is moved aside first: a crash in that instant leaves no
export at the target and the old one at a hidden name.

Imports no torch.
"""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
from pathlib import Path
from typing import Any

from src.common.atomic_io import fsync_dir, sha256_file

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2
_NOT_SUPPORTED = {errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV}


def tree_files(directory: Path) -> dict[str, dict[str, Any]]:
    """Every file under ``directory``: relative path (``/``-separated, sorted) -> its sha256
    and size, as a directory export's sidecar lists them."""
    files = sorted(path for path in directory.rglob("*") if path.is_file())
    return {
        path.relative_to(directory).as_posix(): {
            "sha256": sha256_file(path),
            "size_bytes": path.stat().st_size,
        }
        for path in files
    }


def fsync_tree(path: Path) -> None:
    """Every file and directory under ``path`` (a file: itself) on disk."""
    if path.is_file():
        with open(path, "rb") as handle:
            os.fsync(handle.fileno())
        return
    for folder, _, names in os.walk(path, topdown=False):
        for name in names:
            with open(Path(folder) / name, "rb") as handle:
                os.fsync(handle.fileno())
        fsync_dir(Path(folder))


def _exchange(first: Path, second: Path) -> bool:
    """Swap two paths atomically (``renameat2(RENAME_EXCHANGE)``); False where unsupported."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # not glibc/Linux
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p]
    renameat2.argtypes += [ctypes.c_uint]
    done = renameat2(
        _AT_FDCWD, os.fsencode(first), _AT_FDCWD, os.fsencode(second), _RENAME_EXCHANGE
    )
    if done == 0:
        return True
    code = ctypes.get_errno()
    if code in _NOT_SUPPORTED:
        return False
    raise OSError(code, os.strerror(code), str(second))


def commit(staged: Path, target: Path) -> None:
    """Rename the checked ``staged`` file or directory into place at ``target``, durably."""
    fsync_tree(staged)
    if staged.is_dir() and target.exists():
        if not _exchange(staged, target):
            aside = target.with_name(f".{target.name}.{os.getpid()}.old")
            os.rename(target, aside)
            os.rename(staged, target)
            staged = aside
        fsync_dir(target.parent)
        remove(staged)  # the older export, now at a temp name
        return
    os.replace(staged, target)
    fsync_dir(target.parent)


def remove(path: Path) -> None:
    """Delete a staged (or replaced) file or directory, if there."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def remove_stale(target: Path) -> None:
    """Temp files and directories an export killed mid-way left beside ``target`` (any pid);
    called under the run lock, so no other export is writing them."""
    for leftover in target.parent.glob(f".{target.name}.*.tmp"):
        remove(leftover)
    for leftover in target.parent.glob(f".{target.name}.*.old"):
        remove(leftover)
