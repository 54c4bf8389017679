"""Today's checkpoint format: one ``torch.save`` file per checkpoint, plus its sidecar.

Layout inside the checkpoint directory::

    step_000000120.pt      torch.save of the full training state
    step_000000120.json    sidecar: step, sha256, size, is_best, ... (the commit marker)

A checkpoint counts only once its sidecar exists and the file's size and sha256 match it.
Each write goes temp file -> fsync -> rename -> fsync(dir), the sidecar last, so a SIGKILL or
power loss at any moment leaves either the previous complete checkpoint or the new one,
never a half-written file that gets loaded. A write that does not fit raises DiskFullError.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from src.checkpoints.disk_space import is_torch_short_write, state_bytes
from src.checkpoints.record import CheckpointFile, CheckpointRecord, verify_files
from src.checkpoints.sidecar import (
    CHECKPOINT_PREFIX,
    SIDECAR_SUFFIX,
    checkpoint_stem,
    read_checkpoint_infos,
    sidecar_path,
    write_sidecar,
)
from src.common.atomic_io import fsync_dir, temp_path_for
from src.common.errors import DiskFullError, free_bytes, is_disk_full
from src.common.signals import writing_file

TORCH_FILE_SUFFIX = ".pt"
TORCH_FILE_GLOB = f"{CHECKPOINT_PREFIX}*{TORCH_FILE_SUFFIX}"


class _HashingWriter:
    """File wrapper that hashes bytes as torch.save writes them: no second read pass."""

    def __init__(self, handle: Any) -> None:
        self._handle = handle
        self.digest = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self.digest.update(data)
        self.size += len(data)
        return self._handle.write(data)

    def flush(self) -> None:
        self._handle.flush()


def atomic_torch_save(obj: Any, path: Path) -> tuple[str, int]:
    """torch.save via temp file + fsync + rename; returns (sha256, size) of what landed.

    A full disk raises DiskFullError (the temp file removed first, so the free space it
    reports is what a retry has)."""
    tmp = temp_path_for(path)
    with writing_file():  # a stop signal after training lets this write end first
        try:
            with open(tmp, "wb") as handle:
                writer = _HashingWriter(handle)
                torch.save(obj, writer)
                handle.flush()
                os.fsync(handle.fileno())
            if writer.size != tmp.stat().st_size:  # torch.save seeked instead of streaming
                raise OSError(f"wrote {writer.size} bytes but {tmp.name} has {tmp.stat().st_size}")
            digest, size = writer.digest.hexdigest(), writer.size
            os.replace(tmp, path)
        except (OSError, RuntimeError) as error:
            tmp.unlink(missing_ok=True)
            needed = state_bytes(obj)
            # torch's zip writer reports a short write as a RuntimeError ("unexpected pos"),
            # with the ENOSPC in its context only when the bytes went through Python.
            if is_disk_full(error) or (
                is_torch_short_write(error) and free_bytes(path.parent) < needed
            ):
                raise DiskFullError(path, needed) from error
            raise
        finally:
            tmp.unlink(missing_ok=True)
        fsync_dir(path.parent)
    return digest, size


class TorchFileFormat:
    """:class:`~src.checkpoints.format.CheckpointFormat` for one ``step_<N>.pt`` per step.

    Loads with ``weights_only=True``: the state must hold tensors, containers and plain values.
    """

    def location(self, directory: Path, step: int) -> Path:
        return Path(directory) / f"{checkpoint_stem(step)}{TORCH_FILE_SUFFIX}"

    def write(
        self,
        directory: Path,
        step: int,
        state: Mapping[str, Any],
        *,
        is_best: bool = False,
        metadata: Mapping[str, Any] | None = None,
    ) -> CheckpointRecord:
        path = self.location(directory, step)
        sidecar_path(directory, step).unlink(missing_ok=True)  # re-saving a step: old one off
        digest, size = atomic_torch_save(state, path)
        return CheckpointRecord(
            step=step,
            path=path,
            sha256=digest,
            size=size,
            files=(CheckpointFile(path.name, size, digest),),
            is_best=is_best,
            metadata=dict(metadata or {}),
            created_at=time.time(),
        )

    def commit(self, record: CheckpointRecord) -> None:
        write_sidecar(record)

    def verify(self, record: CheckpointRecord) -> str | None:
        return verify_files(record)

    def list_checkpoints(self, directory: Path) -> list[CheckpointRecord]:
        return read_checkpoint_infos(directory)

    def load(
        self, record: CheckpointRecord, map_location: str | torch.device = "cpu"
    ) -> dict[str, Any]:
        return torch.load(record.path, map_location=map_location, weights_only=True)

    def delete(self, record: CheckpointRecord) -> None:
        sidecar_path(record.directory, record.step).unlink(missing_ok=True)  # un-commit first
        for part in record.files:
            (record.directory / part.name).unlink(missing_ok=True)

    def clean(self, directory: Path) -> None:
        directory = Path(directory)
        for tmp in directory.glob(".*.tmp"):  # src.common.atomic_io.temp_path_for's names
            tmp.unlink(missing_ok=True)
        for data in directory.glob(TORCH_FILE_GLOB):
            if not data.with_suffix(SIDECAR_SUFFIX).exists():
                data.unlink(missing_ok=True)
