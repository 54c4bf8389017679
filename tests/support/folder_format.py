"""A multi-file checkpoint format for tests: one torch file per top-level key, in a folder.

Shows that the CheckpointFormat protocol fits a folder checkpoint (the coming sharded and
adapter-only formats): the record lists the files, the sidecar beside the folder commits it.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from src.checkpoints.record import CheckpointFile, CheckpointRecord, content_digest, verify_files
from src.checkpoints.sidecar import (
    CHECKPOINT_PREFIX,
    SIDECAR_SUFFIX,
    checkpoint_stem,
    read_checkpoint_infos,
    sidecar_path,
    write_sidecar,
)
from src.checkpoints.torch_file import atomic_torch_save


class FolderFormat:
    def location(self, directory: Path, step: int) -> Path:
        return Path(directory) / checkpoint_stem(step)

    def write(
        self,
        directory: Path,
        step: int,
        state: Mapping[str, Any],
        *,
        is_best: bool = False,
        metadata: Mapping[str, Any] | None = None,
    ) -> CheckpointRecord:
        folder = self.location(directory, step)
        sidecar_path(directory, step).unlink(missing_ok=True)
        folder.mkdir(parents=True, exist_ok=True)
        files = []
        for key, value in state.items():
            digest, size = atomic_torch_save(value, folder / f"{key}.pt")
            files.append(CheckpointFile(f"{folder.name}/{key}.pt", size, digest))
        return CheckpointRecord(
            step=step,
            path=folder,
            sha256=content_digest(files),
            size=sum(part.size for part in files),
            files=tuple(files),
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

    def load(self, record: CheckpointRecord, map_location: Any = "cpu") -> dict[str, Any]:
        return {
            Path(part.name).stem: torch.load(
                record.directory / part.name, map_location=map_location, weights_only=True
            )
            for part in record.files
        }

    def delete(self, record: CheckpointRecord) -> None:
        sidecar_path(record.directory, record.step).unlink(missing_ok=True)
        shutil.rmtree(record.path, ignore_errors=True)

    def clean(self, directory: Path) -> None:
        for folder in Path(directory).glob(f"{CHECKPOINT_PREFIX}*"):
            if folder.is_dir() and not folder.with_suffix(SIDECAR_SUFFIX).exists():
                shutil.rmtree(folder)
