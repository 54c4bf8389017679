"""A Hugging Face Trainer's ``checkpoint-N/`` folders, made trustworthy: durable, recorded,
verified, listed, set aside and pruned.

The Trainer writes a checkpoint's files straight into ``<output_dir>/checkpoint-N/`` and
``resume_from_checkpoint=True`` takes the highest N, complete or not. Here, once the Trainer's
save returns, every file is fsynced and a completeness record is written into the folder last,
atomically (``checkpoint_record.json``: the kit's :class:`CheckpointRecord`, every file with its
size and sha256). A folder without one, or whose files no longer match it, is not a
checkpoint. The record's file names are relative to the output directory
(``checkpoint-40/optimizer.pt``), so the S3 mirror uploads and downloads it as it is.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from src.checkpoints.record import (
    CheckpointRecord,
    folder_record,
    retained_steps,
    verify_files,
)
from src.common.atomic_io import atomic_write_bytes, fsync_dir
from src.common.console import print_note, print_warning
from src.storage.checkpoint_mirror import CheckpointMirror

RECORD_NAME = "checkpoint_record.json"  # written last: the folder is a checkpoint once it exists
CHECKPOINT_DIR = re.compile(r"^checkpoint-(\d+)$")  # transformers' PREFIX_CHECKPOINT_DIR-<step>
SET_ASIDE_SUFFIX = ".incomplete"


def checkpoint_folder(output_dir: Path, step: int) -> Path:
    return Path(output_dir) / f"checkpoint-{step}"


def checkpoint_folders(output_dir: Path) -> list[Path]:
    """The ``checkpoint-N`` folders in ``output_dir``, newest (highest N) first."""
    folders = []
    for path in Path(output_dir).glob("checkpoint-*"):
        match = CHECKPOINT_DIR.match(path.name)
        if match and path.is_dir():
            folders.append((int(match.group(1)), path))
    return [path for _, path in sorted(folders, reverse=True)]


def _files_of(folder: Path) -> list[Path]:
    return sorted(
        path
        for path in folder.rglob("*")
        if path.is_file() and path.name != RECORD_NAME and not path.name.endswith(".tmp")
    )


def make_durable(folder: Path) -> None:
    """fsync every file of ``folder``, its subfolders, itself and its parent: what the Trainer
    wrote survives a power cut before the record says it is there."""
    for path in _files_of(folder):
        with open(path, "rb") as handle:
            os.fsync(handle.fileno())
    for directory in sorted({path.parent for path in folder.rglob("*")} | {folder}):
        fsync_dir(directory)
    fsync_dir(folder.parent)


def build_record(
    folder: Path, *, is_best: bool = False, metadata: Mapping[str, Any] | None = None
) -> CheckpointRecord:
    """The record of ``folder`` as it is now (each file hashed)."""
    step = int(CHECKPOINT_DIR.match(folder.name).group(1))  # type: ignore[union-attr]
    return folder_record(folder, step, _files_of(folder), is_best=is_best, metadata=metadata)


def commit(record: CheckpointRecord) -> None:
    """Write the record into the folder, atomically: from now on it is a checkpoint."""
    data = (json.dumps(record.to_json(), indent=2) + "\n").encode()
    atomic_write_bytes(record.path / RECORD_NAME, data)


def uncommit(folder: Path) -> None:
    """Before the Trainer writes into a folder that holds a checkpoint: it is not one meanwhile."""
    record = folder / RECORD_NAME
    if record.exists():
        record.unlink()
        fsync_dir(folder)


def read_record(folder: Path) -> CheckpointRecord | None:
    """The folder's record, unverified; None without a readable one."""
    try:
        data = json.loads((folder / RECORD_NAME).read_text())
        record = CheckpointRecord.from_json(data, folder.parent)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return record if record.path == folder else None


def committed_records(output_dir: Path) -> list[CheckpointRecord]:
    """Every folder with a record, newest first (content not verified: cheap)."""
    records = (read_record(folder) for folder in checkpoint_folders(output_dir))
    return [record for record in records if record is not None]


def newest_complete(output_dir: Path, *, is_writer: bool = True) -> CheckpointRecord | None:
    """The newest checkpoint whose files match its record. Each newer folder that does not is
    one warning line, and (on the writer) is set aside as ``checkpoint-N.incomplete``: the
    resumed run writes a new ``checkpoint-N`` and must not mix its files with the old ones."""
    for folder in checkpoint_folders(output_dir):
        record = read_record(folder)
        if record is None:
            problem = "no completeness record (its save was cut short, or not by run_interruptible)"
        else:
            problem = verify_files(record)
            if problem is None:
                return record
        aside = folder.with_name(folder.name + SET_ASIDE_SUFFIX)
        where = f"; moved to {aside.name}" if is_writer else ""
        print_warning(f"skipping {folder.name}: {problem}{where}")
        if is_writer:
            shutil.rmtree(aside, ignore_errors=True)
            os.replace(folder, aside)
    return None


def prune(
    output_dir: Path,
    keep_last_n: int | None,
    best_folder: str | None,
    mirror: CheckpointMirror | None,
) -> None:
    """Retention: the newest ``keep_last_n`` checkpoints plus the best stay; an older one goes
    only once the S3 mirror (when on) has it verified. ``keep_last_n`` None: keep all."""
    if not keep_last_n:
        return
    records = {record.step: record for record in committed_records(output_dir)}
    keep = retained_steps(records, keep_last_n)
    for step, record in records.items():
        if step in keep or (best_folder and Path(best_folder).name == record.path.name):
            continue
        if mirror is not None and not mirror.safe_to_delete(step, record.sha256):
            continue  # its only copy: kept until it is verified in S3
        uncommit(record.path)
        shutil.rmtree(record.path, ignore_errors=True)


def download(mirror: CheckpointMirror, record: CheckpointRecord) -> CheckpointRecord:
    """Download a manifest checkpoint into the output directory and commit it there."""
    folder = record.path
    shutil.rmtree(folder, ignore_errors=True)  # no stale file may mix with the download
    mirror.download(record, folder.parent)
    commit(record)
    print_note(f"downloaded {folder.name} from {mirror.url(folder.name)}")
    return record
