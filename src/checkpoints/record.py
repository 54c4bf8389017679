"""What a committed checkpoint is: its step, its files with sizes and sha256, its metadata.

The same record is the local sidecar (the commit marker) and an entry of the S3 manifest, so
its JSON form is spelled here once. A one-file checkpoint keeps the original flat keys
(``file``, ``sha256``, ``size``); a multi-file one (a folder: sharded or adapter-only) adds
``files``, the list of every file with its own size and sha256.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from src.common.atomic_io import sha256_file


@dataclass(frozen=True)
class CheckpointFile:
    """One file of a checkpoint; ``name`` is relative to the checkpoint directory."""

    name: str  # "/"-separated, so it doubles as the object key under the mirror's prefix
    size: int
    sha256: str


@dataclass(frozen=True)
class CheckpointRecord:
    """A complete checkpoint. ``path`` is its one file, or the folder of a multi-file format;
    ``sha256`` / ``size`` identify the whole content (for one file: that file's)."""

    step: int
    path: Path
    sha256: str
    size: int
    files: tuple[CheckpointFile, ...]  # what to upload, download, verify and delete
    is_best: bool = False
    metadata: dict[str, Any] = field(default_factory=dict)
    created_at: float | None = None

    @property
    def directory(self) -> Path:
        """The checkpoint directory (where the sidecar lives; file names are relative to it)."""
        return self.path.parent

    def to_json(self) -> dict[str, Any]:
        """The sidecar / manifest form (key order kept: existing sidecars are byte-identical)."""
        data: dict[str, Any] = {
            "step": self.step,
            "file": self.path.name,
            "sha256": self.sha256,
            "size": self.size,
        }
        if self.files != (CheckpointFile(self.path.name, self.size, self.sha256),):
            data["files"] = [
                {"name": part.name, "size": part.size, "sha256": part.sha256} for part in self.files
            ]
        data["is_best"] = self.is_best
        if self.created_at is not None:
            data["created_at"] = self.created_at
        data["metadata"] = self.metadata
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any], directory: Path) -> CheckpointRecord:
        """The record of a sidecar or manifest entry, its files located in ``directory``.

        Raises KeyError / ValueError / TypeError on a malformed entry."""
        name, sha256, size = str(data["file"]), str(data["sha256"]), int(data["size"])
        if "files" in data:
            files = tuple(
                CheckpointFile(str(part["name"]), int(part["size"]), str(part["sha256"]))
                for part in data["files"]
            )
        else:
            files = (CheckpointFile(name, size, sha256),)
        created_at = data.get("created_at")
        return cls(
            step=int(data["step"]),
            path=Path(directory) / name,
            sha256=sha256,
            size=size,
            files=files,
            is_best=bool(data.get("is_best", False)),
            metadata=dict(data.get("metadata") or {}),
            created_at=float(created_at) if created_at is not None else None,
        )


def folder_record(
    folder: Path,
    step: int,
    paths: Iterable[Path],
    *,
    is_best: bool = False,
    metadata: Mapping[str, Any] | None = None,
) -> CheckpointRecord:
    """The record of a checkpoint folder's files as they are now (each one hashed), named
    relative to the folder's parent as the sidecar lists them."""
    files = tuple(
        CheckpointFile(
            path.relative_to(folder.parent).as_posix(), path.stat().st_size, sha256_file(path)
        )
        for path in paths
    )
    return CheckpointRecord(
        step=step,
        path=folder,
        sha256=content_digest(files),
        size=sum(part.size for part in files),
        files=files,
        is_best=is_best,
        metadata=dict(metadata or {}),
        created_at=time.time(),
    )


def content_digest(files: Iterable[CheckpointFile]) -> str:
    """One sha256 for a multi-file checkpoint: over its files' names and hashes, in order."""
    digest = hashlib.sha256()
    for part in files:
        digest.update(f"{part.name}\0{part.sha256}\n".encode())
    return digest.hexdigest()


def verify_files(record: CheckpointRecord) -> str | None:
    """None if every file of ``record`` is on disk with its recorded size and sha256, else
    the first reason it is not (named by file when the checkpoint has several)."""
    for part in record.files:
        path = record.directory / part.name
        where = f"{part.name}: " if len(record.files) > 1 else ""
        if not path.is_file():
            return f"{where}file missing"
        actual = path.stat().st_size
        if actual != part.size:
            return f"{where}size {actual} != recorded {part.size}"
        if sha256_file(path) != part.sha256:
            return f"{where}checksum mismatch"
    return None


def retained_steps(records: Mapping[int, CheckpointRecord], keep_last_n: int) -> set[int]:
    """Retention, locally and in the bucket: the newest ``keep_last_n`` steps plus the newest
    best one (the best model must survive however many checkpoints follow it)."""
    steps = sorted(records, reverse=True)
    keep = set(steps[:keep_last_n])
    best = next((step for step in steps if records[step].is_best), None)
    if best is not None:
        keep.add(best)
    return keep
