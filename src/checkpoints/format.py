"""The seam beneath the checkpoint manager: what every on-disk checkpoint format does.

A format writes a snapshot's files (durably but not yet visible), then commits them (the
sidecar, written last). Everything else reads records, so the manager's policy and the S3
mirror work unchanged for a one-file ``torch.save``, an adapter-only folder or a sharded
``torch.distributed.checkpoint`` folder: the record lists the files.

A format whose every rank writes (``every_rank_writes = True``, the sharded one in
``sharded_format.py``) also has ``begin_write(directory, step, state, *, is_best, metadata,
blocking)``: the manager calls it on every rank; it stages (or, blocking, writes) that rank's
part and returns the call that finishes the write, which returns the record on rank 0 (None
elsewhere). Rank 0 alone commits, mirrors and prunes. Its ``verify_for_load(record)``, called
on every rank before a load, lets the ranks share the hashing and agree on the verdict.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

import torch

from src.checkpoints.record import CheckpointRecord


class CheckpointFormat(Protocol):
    def location(self, directory: Path, step: int) -> Path:
        """Where the checkpoint of ``step`` lives once complete: its file or its folder."""
        ...

    def write(
        self,
        directory: Path,
        step: int,
        state: Mapping[str, Any],
        *,
        is_best: bool = False,
        metadata: Mapping[str, Any] | None = None,
    ) -> CheckpointRecord:
        """Write ``state`` durably (temp + fsync + rename) and return its record, not yet
        committed: invisible to ``list_checkpoints`` until ``commit``. A step saved before
        is un-committed first, so a kill mid-write never leaves the old record on new bytes."""
        ...

    def commit(self, record: CheckpointRecord) -> None:
        """Make files already in place (just written, or downloaded) a complete checkpoint."""
        ...

    def verify(self, record: CheckpointRecord) -> str | None:
        """None if the files match the record, else the reason they do not."""
        ...

    def list_checkpoints(self, directory: Path) -> list[CheckpointRecord]:
        """The committed checkpoints in ``directory``, newest first (content not verified)."""
        ...

    def load(
        self, record: CheckpointRecord, map_location: str | torch.device = "cpu"
    ) -> dict[str, Any]:
        """The state ``write`` was given."""
        ...

    def delete(self, record: CheckpointRecord) -> None:
        """Remove a checkpoint: un-commit first, then its files."""
        ...

    def clean(self, directory: Path) -> None:
        """Remove what an interrupted write left: temp files, files never committed."""
        ...
