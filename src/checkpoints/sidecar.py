"""The commit marker every format shares, and the one spelling of checkpoint names.

``step_000000120.json`` beside the data (``step_000000120.pt`` for the torch file format) holds
the checkpoint's record. It is written last, atomically: a checkpoint exists once its sidecar
does, so readers list sidecars only and never see half-written data.
"""

from __future__ import annotations

import json
from pathlib import Path

from src.checkpoints.record import CheckpointRecord
from src.common.atomic_io import atomic_write_bytes
from src.common.console import print_warning

CHECKPOINT_PREFIX = "step_"
SIDECAR_SUFFIX = ".json"
SIDECAR_GLOB = f"{CHECKPOINT_PREFIX}*{SIDECAR_SUFFIX}"


def checkpoint_stem(step: int) -> str:
    """``step_000000120``: zero-padded, so names sort by step."""
    return f"{CHECKPOINT_PREFIX}{step:09d}"


def sidecar_path(directory: Path, step: int) -> Path:
    return Path(directory) / f"{checkpoint_stem(step)}{SIDECAR_SUFFIX}"


def write_sidecar(record: CheckpointRecord) -> None:
    """Commit ``record``: its sidecar, atomically (temp, fsync, rename, fsync of the folder)."""
    data = json.dumps(record.to_json(), indent=2).encode()
    atomic_write_bytes(sidecar_path(record.directory, record.step), data)


def read_checkpoint_infos(checkpoint_dir: Path) -> list[CheckpointRecord]:
    """The committed checkpoints (sidecar present) in ``checkpoint_dir``, newest first.

    Reads only the small JSON sidecars: cheap, and safe before any manager exists.
    """
    checkpoint_dir = Path(checkpoint_dir)
    records = []
    for sidecar in checkpoint_dir.glob(SIDECAR_GLOB):
        try:
            data = json.loads(sidecar.read_text())
            records.append(CheckpointRecord.from_json(data, sidecar.parent))
        except (OSError, ValueError, KeyError, TypeError) as error:
            print_warning(f"ignoring unreadable checkpoint sidecar {sidecar.name}: {error}")
    return sorted(records, key=lambda record: record.step, reverse=True)
