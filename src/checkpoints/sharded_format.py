"""Sharded checkpoints for FSDP: every rank writes its own shards through
``torch.distributed.checkpoint`` (DCP), asynchronously, and a resume on any number of ranks
reshards them.

Layout inside the checkpoint directory::

    step_000000120/.metadata         DCP's index of every shard (written once all ranks wrote)
    step_000000120/__0_0.distcp      rank 0's shards of the model and optimizer
    step_000000120/__1_0.distcp      rank 1's ...
    step_000000120/trainer.pt        rank 0: everything else (counters, every rank's RNGs,
                                     scheduler, scaler, the epoch's loss shares)
    step_000000120.json              the sidecar: every file with size and sha256 (last)

Asynchronous: ``begin_write`` stages the shards into host memory (the only stall the loop
pays, on every rank) and returns the rest of the work, which the manager's background thread
runs while training goes on: DCP writes the files (its collectives on a gloo group of their
own, so they never meet the training's), then rank 0 writes ``trainer.pt`` and hashes the
folder. The manager commits the sidecar. A kill at any moment leaves a folder without a
sidecar: never listed, removed by ``clean``, and the previous checkpoint is used.

The files must be on a file system every rank sees (one machine, or a shared volume under
Slurm): rank 0 hashes every rank's shards when it saves; on a resume the ranks share the
hashing (``verify_for_load``: each reads every world-th file) and agree on the verdict, so
N ranks read a checkpoint once between them, not N times, before DCP loads it.
"""

from __future__ import annotations

import atexit
import dataclasses
import io
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

# DCP's own staging helpers (what dcp.async_save uses), called directly so that the host
# buffers are made once and reused: async_save allocates them anew at every save.
from torch.distributed._state_dict_utils import (
    CompanionMismatch,
    _copy_state_dict,
    _create_cpu_state_dict,
)

from src.checkpoints.record import CheckpointRecord, folder_record, verify_files
from src.checkpoints.sidecar import (
    CHECKPOINT_PREFIX,
    SIDECAR_SUFFIX,
    checkpoint_stem,
    read_checkpoint_infos,
    sidecar_path,
    write_sidecar,
)
from src.common.atomic_io import atomic_write_bytes, fsync_dir
from src.common.process_groups import leave_process_group

SHARDED_KEYS = ("model", "optimizer")  # written by DCP; the rest goes into TRAINER_FILE
TRAINER_FILE = "trainer.pt"
DCP_METADATA = ".metadata"

FinishWrite = Callable[[], CheckpointRecord | None]


class ShardedFormat:
    """:class:`~src.checkpoints.format.CheckpointFormat` for FSDP's sharded state.

    ``state_template()`` returns ``{"model": ..., "optimizer": ...}`` as sharded state dicts
    of the live objects (``get_state_dict``): ``load`` fills them in place, resharded for the
    ranks there are now. ``every_rank_writes``: the manager calls ``begin_write`` on every rank.
    """

    every_rank_writes = True

    def __init__(self, state_template: Callable[[], dict[str, Any]], rank: int = 0) -> None:
        self.state_template = state_template
        self.rank = rank
        # DCP's collectives run on the background thread: a group of their own (gloo: the
        # plans are CPU objects), never interleaved with the training's on the default group.
        self.group = dist.new_group(backend="gloo") if dist.is_initialized() else None
        if self.group is not None:
            # Before the default group goes (atexit runs last-registered first): a gloo group
            # left to the interpreter's teardown can abort the process on its way out.
            atexit.register(leave_process_group, self.group)
        self._host_buffers: dict[str, Any] | None = None  # the staging copy, reused

    def _stage(self, sharded: dict[str, Any]) -> dict[str, Any]:
        """This rank's shards copied into the reusable host buffers (pinned for CUDA): the
        stall. DTensors stay DTensors (their local shard on the CPU), so DCP writes them as
        shards; plain values are taken as they are now."""
        if self._host_buffers is not None:
            try:
                return _copy_state_dict(sharded, self._host_buffers)
            except (CompanionMismatch, ValueError, TypeError, RuntimeError):  # another layout
                self._host_buffers = None
        on_cuda = any(
            isinstance(value, torch.Tensor) and value.is_cuda
            for part in sharded.values()
            for value in _tensors(part)
        )
        self._host_buffers = _create_cpu_state_dict(sharded, pin_memory=on_cuda)
        return _copy_state_dict(sharded, self._host_buffers)

    def location(self, directory: Path, step: int) -> Path:
        return Path(directory) / checkpoint_stem(step)

    def begin_write(
        self,
        directory: Path,
        step: int,
        state: Mapping[str, Any],
        *,
        is_best: bool = False,
        metadata: Mapping[str, Any] | None = None,
        blocking: bool = False,
    ) -> FinishWrite:
        """Every rank: stage (``blocking=False``) or write (``True``) this rank's shards now;
        the returned call finishes the write and, on rank 0, returns the uncommitted record."""
        folder = self.location(directory, step)
        if self.rank == 0:  # re-saving a step: the old one off, its shards too (another world
            # size leaves others). Before DCP's collectives, so no rank writes in it yet.
            sidecar_path(directory, step).unlink(missing_ok=True)
            shutil.rmtree(folder, ignore_errors=True)
        sharded = {key: state[key] for key in SHARDED_KEYS}
        rest = io.BytesIO()
        if self.rank == 0:  # serialized now: the loop goes on changing these objects
            torch.save({k: v for k, v in state.items() if k not in SHARDED_KEYS}, rest)
        if blocking:  # the caller waits: nothing changes under the write, no copy
            dcp.save(sharded, checkpoint_id=folder, process_group=self.group)
        else:
            staged = self._stage(sharded)

        def finish() -> CheckpointRecord | None:
            if not blocking:  # on the manager's thread; the next save waits for it
                # Returns on rank 0 once every rank's shards and .metadata are on disk.
                dcp.save(staged, checkpoint_id=folder, process_group=self.group)
            if self.rank != 0:
                return None
            atomic_write_bytes(folder / TRAINER_FILE, rest.getvalue())
            fsync_dir(folder)
            files = sorted(path for path in folder.iterdir() if path.is_file())
            return folder_record(folder, step, files, is_best=is_best, metadata=metadata)

        return finish

    def write(
        self,
        directory: Path,
        step: int,
        state: Mapping[str, Any],
        *,
        is_best: bool = False,
        metadata: Mapping[str, Any] | None = None,
    ) -> CheckpointRecord:
        """The protocol's blocking write (every rank calls it; rank 0's record is complete)."""
        finish = self.begin_write(
            directory, step, state, is_best=is_best, metadata=metadata, blocking=True
        )
        record = finish()
        if record is None:  # another rank: the record is rank 0's business
            folder = self.location(directory, step)
            return CheckpointRecord(step, folder, "", 0, (), is_best, dict(metadata or {}))
        return record

    def commit(self, record: CheckpointRecord) -> None:
        write_sidecar(record)

    def verify(self, record: CheckpointRecord) -> str | None:
        return _missing_metadata(record) or verify_files(record)

    def verify_for_load(self, record: CheckpointRecord) -> str | None:
        """Every rank, before ``load``: each hashes its share of the files and all take the
        first problem any rank found (the same verdict everywhere, so all skip together)."""
        if self.group is None:
            return self.verify(record)
        world, rank = dist.get_world_size(self.group), dist.get_rank(self.group)
        problem = _missing_metadata(record) or verify_files(
            dataclasses.replace(record, files=share(record.files, rank, world))
        )
        found: list[str | None] = [None] * world
        dist.all_gather_object(found, problem, group=self.group)
        return next((reason for reason in found if reason), None)

    def list_checkpoints(self, directory: Path) -> list[CheckpointRecord]:
        return [record for record in read_checkpoint_infos(directory) if record.path.suffix == ""]

    def load(
        self, record: CheckpointRecord, map_location: str | torch.device = "cpu"
    ) -> dict[str, Any]:
        """Every rank: the model and optimizer shards for this rank now (resharded when the
        checkpoint was written by another number of ranks), and the rest as saved."""
        sharded = self.state_template()
        dcp.load(sharded, checkpoint_id=record.path, process_group=self.group)
        rest = torch.load(record.path / TRAINER_FILE, map_location=map_location, weights_only=True)
        return {**rest, **sharded}

    def delete(self, record: CheckpointRecord) -> None:
        sidecar_path(record.directory, record.step).unlink(missing_ok=True)  # un-commit first
        shutil.rmtree(record.path, ignore_errors=True)

    def clean(self, directory: Path) -> None:
        """Rank 0, before any write: folders never committed (a kill mid-save) and temp files."""
        directory = Path(directory)
        for tmp in directory.glob(".*.tmp"):
            tmp.unlink(missing_ok=True)
        for folder in directory.glob(f"{CHECKPOINT_PREFIX}*"):
            if folder.is_dir() and not folder.with_suffix(SIDECAR_SUFFIX).exists():
                shutil.rmtree(folder, ignore_errors=True)


def _missing_metadata(record: CheckpointRecord) -> str | None:
    if not any(part.name.endswith(f"/{DCP_METADATA}") for part in record.files):
        return f"no {DCP_METADATA}: an incomplete sharded checkpoint"
    return None


def share(files: tuple[Any, ...], rank: int, world: int) -> tuple[Any, ...]:
    """Rank ``rank``'s part of ``files`` when ``world`` ranks split them: every world-th one."""
    return files[rank::world]


def _tensors(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        return [tensor for item in value.values() for tensor in _tensors(item)]
    if isinstance(value, (list, tuple)):
        return [tensor for item in value for tensor in _tensors(item)]
    return []
