"""The errors a script reports as one line, and the exit codes they end with."""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

EXIT_FAILED = 1  # a crash (a traceback), or GPU out of memory (one line said what to change)
EXIT_CONFIG_ERROR = 2  # bad input: one line said what to fix; nothing was written
# EX_IOERR from sysexits.h. Not 1: a disk-full run is not a crash and not worth a requeue;
# once there is room the same command resumes from the newest complete checkpoint.
EXIT_DISK_FULL = 74

DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
DISK_FIXES = (
    "lower checkpoint.keep_last_n, use a bigger disk, or mirror to S3 (checkpoint.s3_bucket; "
    "checkpoint.remote_keep_last_n keeps older ones there, not here)"
)


class ConfigError(ValueError):
    """A config problem, worded as one line that says what is wrong and how to fix it."""

    label = "config error"  # how a script prints it: "<label>: <message>", then exit 2

    @property
    def line(self) -> str:
        """The one line a script prints before exiting with EXIT_CONFIG_ERROR."""
        return f"{self.label}: {self}"


# scripts/check_instance.py --min-gpu-efficiency: a GPU delivers less than that share of its
# peak (remote_train --check reads it from the host to refuse training there).
EXIT_BELOW_EFFICIENCY = 3


def human_bytes(count: float) -> str:
    """``512 B``, ``275.5 kB``, ``13.0 MB``, ``1.2 GB`` (decimal units, as disks are sold)."""
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if count >= size:
            return f"{count / size:.1f} {unit}"
    return f"{count:.0f} B"


def free_bytes(path: Path) -> int:
    """Free bytes on the filesystem that holds ``path`` (or would: its nearest existing
    parent), for an unprivileged writer."""
    path = Path(os.path.abspath(path))
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


def is_disk_full(error: BaseException | None) -> bool:
    """Did ``error`` (or what it was raised from) come from a full disk or quota?"""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in DISK_FULL_ERRNOS:
            return True
        error = error.__cause__ or error.__context__
    return False


class DiskFullError(OSError):
    """A write that did not fit: which file, how much it needed, how much is free.

    Raised after the temp file is gone, so the free space is what a retry would have.
    Scripts print :attr:`line` and exit EXIT_DISK_FULL."""

    exit_code = EXIT_DISK_FULL

    def __init__(self, path: Path, needed_bytes: int | None) -> None:
        self.path = Path(path)
        self.needed_bytes = needed_bytes
        self.free_bytes = free_bytes(self.path)
        needs = "needs more room" if not needed_bytes else f"needs ~{human_bytes(needed_bytes)}"
        message = (
            f"writing {self.path} {needs}, {human_bytes(self.free_bytes)} free there; the "
            f"newest complete checkpoint is kept. Make room and re-run the same command to "
            f"resume: {DISK_FIXES}"
        )
        super().__init__(errno.ENOSPC, message, str(self.path))

    def __str__(self) -> str:
        return str(self.strerror)

    @property
    def line(self) -> str:
        return f"disk full: {self}"


class GpuOutOfMemoryError(RuntimeError):
    """``torch.cuda.OutOfMemoryError`` worded with the batch size, the model size and the
    fixes (the trainer builds the message). Scripts print :attr:`line` and exit 1."""

    exit_code = EXIT_FAILED

    @property
    def line(self) -> str:
        return f"GPU out of memory: {self}"


# What a script reports as its one line and exit code (a traceback only when debugging).
ONE_LINE_ERRORS = (DiskFullError, GpuOutOfMemoryError)
