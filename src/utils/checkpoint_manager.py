"""Checkpoints that survive preemption: the checkpointer the training loop talks to.

The manager owns the save policy (every ``every_n_steps`` steps, at each epoch end, at a
stop; the best one marked) and retention (the newest ``keep_last_n`` plus the best, pruned only
when safe). How a checkpoint is written, verified, listed and loaded is its format's business
(:mod:`src.checkpoints`, default :class:`~src.checkpoints.torch_file.TorchFileFormat`: one
``step_<N>.pt`` plus its ``step_<N>.json`` sidecar, the commit marker).

Asynchronous saving: ``save()`` copies the state into one reusable CPU staging buffer (the
only cost the training loop pays) and a background thread writes it
(:mod:`src.checkpoints.staging`). ``wait()`` / ``close()`` flush pending writes (also at exit).

S3 mirror (``remote_bucket=``): each committed checkpoint is handed to a
:class:`~src.storage.checkpoint_mirror.CheckpointMirror`, which uploads and verifies it in
the background; ``load_latest()`` takes the newest complete checkpoint across local disk and
the bucket (downloading it first when the bucket's is newer), and pruning never deletes a
local checkpoint before the mirror says it is safe.

A full disk: the first save (or a resume) warns when ``keep_last_n`` checkpoints will not fit
on the volume. A save that does not fit deletes the oldest local checkpoints already
verified in S3 until it does; with none, it raises DiskFullError (one line: the file, the
room it needed, the room free, the fixes) and the newest complete checkpoint stays valid.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

import torch

from src.checkpoints.disk_space import shortfall_line, state_bytes
from src.checkpoints.format import CheckpointFormat
from src.checkpoints.record import CheckpointRecord, retained_steps
from src.checkpoints.sidecar import CHECKPOINT_PREFIX, read_checkpoint_infos
from src.checkpoints.staging import BackgroundWriter
from src.checkpoints.torch_file import TorchFileFormat, atomic_torch_save
from src.common.console import print_note, print_warning
from src.common.errors import DiskFullError, is_disk_full
from src.storage.checkpoint_mirror import CheckpointMirror, FlushReport
from src.storage.s3 import S3SyncError, error_line

# Names code imported from here before src/checkpoints/ existed.
__all__ = [
    "CHECKPOINT_PREFIX",
    "CheckpointInfo",
    "CheckpointManager",
    "LoadedCheckpoint",
    "atomic_torch_save",
    "read_checkpoint_infos",
]

CheckpointInfo = CheckpointRecord  # the old name of a committed checkpoint's record
# On a full disk, how long a save waits for the S3 uploads in flight before it picks which
# local checkpoints are safe to delete.
ROOM_FLUSH_S = 30.0
T = TypeVar("T")


class LoadedCheckpoint(NamedTuple):
    """What ``load_latest`` returns: ``state, info = manager.load_latest()`` also works."""

    state: dict[str, Any]
    info: CheckpointRecord


class CheckpointManager:
    """Save, prune and load training checkpoints in one directory.

    Only the writer (rank 0 under torchrun) writes, prunes or talks to S3; every rank may
    load. With ``remote_bucket`` (or a ready ``mirror``) the checkpoints are mirrored to
    ``s3://<remote_bucket>/<remote_prefix>/``; the settings are checked by a write probe here,
    so a bad bucket or missing credentials fail before any training.
    """

    def __init__(
        self,
        local_dir: str | os.PathLike[str],
        keep_last_n: int = 3,
        async_save: bool = True,
        is_writer: bool = True,
        *,
        every_n_steps: int = 0,
        checkpoint_format: CheckpointFormat | None = None,
        remote_bucket: str | None = None,
        remote_prefix: str = "checkpoints",
        endpoint_url: str | None = None,
        remote_keep_last_n: int | None = None,
        mirror: CheckpointMirror | None = None,
        progress: bool = True,
    ) -> None:
        if keep_last_n < 1:
            raise ValueError("keep_last_n must be >= 1 (the newest checkpoint is always kept)")
        if every_n_steps < 0:
            raise ValueError("every_n_steps must be >= 0 (0: only at epoch ends and stops)")
        self.checkpoint_dir = Path(local_dir)
        self.keep_last_n = keep_last_n
        self.every_n_steps = every_n_steps
        self.async_save = async_save
        self.is_writer = is_writer
        self.progress = progress
        self.format: CheckpointFormat = checkpoint_format or TorchFileFormat()
        if mirror is None and remote_bucket and is_writer:
            mirror = CheckpointMirror(
                remote_bucket,
                remote_prefix,
                local_dir=self.checkpoint_dir,
                keep_last_n=remote_keep_last_n or keep_last_n,
                endpoint_url=endpoint_url,
            )
            mirror.probe()
        self.mirror = mirror if is_writer else None
        self.last_source = ""  # where load_latest found its checkpoint: a path or an s3:// URL
        self._downloaded: dict[int, str] = {}  # step -> the s3:// URL it came from
        self._writer = BackgroundWriter()
        self._space_checked = False  # warned (or not) about the room keep_last_n needs
        self._checkpoint_bytes = 0  # the newest checkpoint's size, once known
        self._made_room = False  # deleted a local checkpoint verified in S3 for room
        self.last_stall_s = 0.0  # time save() blocked the caller, for benchmarks and logs
        if is_writer:
            self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
            self.format.clean(self.checkpoint_dir)

    # ----- the policy: when to save -------------------------------------------------------

    def due(self, step: int, *, stopping: bool = False, epoch_end: bool = False) -> bool:
        """Should the loop save after ``step``? Always at a stop; every ``every_n_steps``
        steps otherwise, except at an epoch end, whose checkpoint is taken after evaluation
        (one ``save`` with ``is_best``)."""
        if stopping:
            return True
        periodic = self.every_n_steps > 0 and step % self.every_n_steps == 0
        return periodic and not epoch_end

    def save_if_due(
        self,
        step: int,
        state_fn: Callable[[], dict[str, Any]],
        *,
        stopping: bool = False,
        epoch_end: bool = False,
        **save_kwargs: Any,
    ) -> bool:
        """The loop's per-step call: ``save(state_fn(), step)`` when :meth:`due`, blocking at a
        stop (durable before this returns). ``state_fn`` runs on every rank when due (it may
        gather across ranks); returns whether a checkpoint was taken."""
        if not self.due(step, stopping=stopping, epoch_end=epoch_end):
            return False
        self.save(state_fn(), step, blocking=stopping, **save_kwargs)
        return True

    # ----- saving -------------------------------------------------------------------------

    def save(
        self,
        state: dict[str, Any],
        step: int,
        *,
        is_best: bool = False,
        metadata: dict[str, Any] | None = None,
        best_model_path: Path | None = None,
        blocking: bool = False,
    ) -> Path:
        """Checkpoint ``state`` as of ``step``; returns the path it will have when complete.

        ``blocking=True`` (used on SIGTERM) writes straight from ``state`` with no staging
        copy and returns once the checkpoint is durable.

        ``best_model_path``: also write ``state["model"]`` there (atomically), from the
        same snapshot, so best_model.pt never costs the loop a second copy.
        """
        path = self.path_for(step)
        every_rank = getattr(self.format, "every_rank_writes", False)
        if not self.is_writer and not every_rank:
            return path
        started = time.perf_counter()
        self.start_mirror()
        self._writer.wait()
        if every_rank:  # sharded: each rank stages (or writes) its own shards now
            finish = self.format.begin_write(  # type: ignore[attr-defined]
                self.checkpoint_dir,
                step,
                state,
                is_best=is_best,
                metadata=dict(metadata or {}),
                blocking=blocking or not self.async_save,
            )
            job = functools.partial(self._finish_every_rank, finish)
            if self.async_save and not blocking:
                self._writer.start(job, name=f"checkpoint-{step}")
            else:
                job()
            self.last_stall_s = time.perf_counter() - started
            return path
        details = (step, is_best, dict(metadata or {}), best_model_path)
        if self.async_save and not blocking:
            snapshot = self._writer.snapshot(state)
            job = functools.partial(self._write, snapshot, *details)
            self._writer.start(job, name=f"checkpoint-{step}")
        else:  # the caller waits for the write, so nothing can change under it: no copy
            self._write(state, *details)
        self.last_stall_s = time.perf_counter() - started
        return path

    def wait(self) -> None:
        """Block until the in-flight write (if any) is complete; re-raise its error."""
        self._writer.wait()

    def close(self, remote_timeout: float | None = None) -> FlushReport | None:
        """Flush local writes; with S3, wait up to ``remote_timeout`` s for the uploads, stop
        the mirror and release its lease. Returns what the mirror managed (None: no S3)."""
        self.wait()
        if self.mirror is None:
            return None
        report = self.mirror.stop(remote_timeout)
        self._prune()  # now-verified checkpoints may go
        return report

    def path_for(self, step: int) -> Path:
        return self.format.location(self.checkpoint_dir, step)

    def _write(
        self,
        snapshot: dict[str, Any],
        step: int,
        is_best: bool,
        metadata: dict[str, Any],
        best_model_path: Path | None,
    ) -> None:
        try:
            record = self._with_room(
                step,
                lambda: self.format.write(
                    self.checkpoint_dir, step, snapshot, is_best=is_best, metadata=metadata
                ),
            )
        except DiskFullError as error:
            if self._checkpoint_bytes > (error.needed_bytes or 0):  # closer than the tensors
                raise DiskFullError(error.path, self._checkpoint_bytes) from error
            raise
        try:
            # best_model.pt is durable before the sidecar commits the checkpoint that names
            # it: a kill in between leaves the previous checkpoint newest, and the replay
            # rewrites it.
            if best_model_path is not None and "model" in snapshot:
                self._with_room(step, lambda: atomic_torch_save(snapshot["model"], best_model_path))
            self._with_room(step, lambda: self.format.commit(record))
        except DiskFullError as error:
            self.format.delete(record)  # never committed: its room goes back now
            raise DiskFullError(error.path, error.needed_bytes) from error
        if self.mirror is not None:
            self.mirror.enqueue(record)
        self._checkpoint_bytes = record.size
        if not self._space_checked:
            self._check_space(record.size, state_bytes(snapshot.get("model")))
        self._prune()

    def _finish_every_rank(self, finish: Callable[[], CheckpointRecord | None]) -> None:
        """The end of a sharded write: every rank's shards land; rank 0 then commits the
        sidecar (last), mirrors and prunes."""
        record = finish()
        if record is None or not self.is_writer:
            return
        self.format.commit(record)
        if self.mirror is not None:
            self.mirror.enqueue(record)
        self._checkpoint_bytes = record.size
        if not self._space_checked:
            self._check_space(record.size, 0)
        self._prune()

    def save_weights(self, weights: dict[str, Any], path: Path) -> None:
        """``torch.save`` of ``weights`` (final_model.pt) atomically, making room like a
        checkpoint save does when the disk is full."""
        self.save_output(lambda: atomic_torch_save(weights, Path(path)))

    def save_output(self, write: Callable[[], Any]) -> None:
        """Run ``write`` (an atomic write of a run output: final weights, an adapter folder)
        after the pending checkpoint write, making room like a checkpoint save does."""
        self.wait()
        self._with_room(None, write)

    # ----- a full disk --------------------------------------------------------------------

    def _with_room(self, step: int | None, write: Callable[[], T]) -> T:
        """``write()``; on a full disk, delete the oldest local checkpoint that is verified
        in S3 and try again, until it fits or none is left (then DiskFullError)."""
        while True:
            try:
                return write()
            except OSError as error:  # DiskFullError, or ENOSPC from another format
                if not is_disk_full(error):
                    raise
                if not self._delete_one_verified(step):
                    if isinstance(error, DiskFullError):
                        raise
                    where = Path(error.filename or self.checkpoint_dir)
                    raise DiskFullError(where, None) from error

    def _delete_one_verified(self, writing: int | None) -> bool:
        """Make room: delete the oldest local checkpoint S3 holds, verified. Never one that
        is not there (its only copy), and never the one being written."""
        if self.mirror is None or not self.mirror.running:
            return False
        self.mirror.flush(ROOM_FLUSH_S)  # one still uploading may become safe to delete
        for record in reversed(self.list_checkpoints()):  # oldest first
            if record.step != writing and self.mirror.safe_to_delete(record.step, record.sha256):
                self.format.delete(record)
                if not self._made_room:  # once: from then on it is the steady state
                    self._made_room = True
                    print_note(
                        f"disk full: deleted the local {record.path.name} (verified in "
                        f"{self.mirror.url()}) to make room; older local checkpoints already "
                        "in S3 make room like this from now on (a lower checkpoint.keep_last_n "
                        "spares the failed writes)"
                    )
                return True
        return False

    def _check_space(self, checkpoint_bytes: int, weights_bytes: int) -> None:
        """Once per process, when a checkpoint's size is known: warn if keep_last_n of them
        (plus the weights) will not fit on this volume."""
        self._space_checked = True
        used = sum(record.size for record in self.list_checkpoints())
        line = shortfall_line(
            self.checkpoint_dir,
            checkpoint_bytes,
            self.keep_last_n,
            weights_bytes,
            used,
            mirrored=self.mirror is not None,
        )
        if line is not None:
            print_warning(line)

    # ----- S3 --------------------------------------------------------------------------

    def start_mirror(self) -> None:
        """Start the S3 mirror (idempotent): take its lease and queue local checkpoints the
        bucket lacks (what a killed run could not upload)."""
        if self.mirror is not None and not self.mirror.running:  # save() calls this each time
            self.mirror.start(self.list_checkpoints())

    def upload_latest(self, timeout: float | None = None) -> CheckpointRecord | None:
        """Upload the newest local checkpoint and return once it is verified in S3."""
        mirror = self._require_mirror()
        self.wait()
        records = self.list_checkpoints()
        if not records:
            return None
        newest = records[0]
        self.start_mirror()
        mirror.enqueue(newest)
        report = mirror.flush(timeout)
        if newest.step in report.waiting or not mirror.safe_to_delete(newest.step, newest.sha256):
            raise S3SyncError(
                f"{newest.path.name} is not in {mirror.url()} yet: {mirror.last_error}"
            )
        return newest

    def download_latest(self) -> CheckpointRecord | None:
        """Make the bucket's newest complete checkpoint available locally (downloaded with a
        progress bar and verified unless an identical local copy exists); None if S3 has none."""
        mirror = self._require_mirror()
        remote = mirror.remote_checkpoints()
        if not remote:
            return None
        newest = remote[0]
        local = next((r for r in self.list_checkpoints() if r.step == newest.step), None)
        if local is None or local.sha256 != newest.sha256 or self.verify(local) is not None:
            self.wait()
            record = dataclasses.replace(newest, path=self.checkpoint_dir / newest.path.name)
            mirror.download(record, self.checkpoint_dir, progress=self.progress)
            self.format.commit(record)
            url = mirror.url(record.path.name)
            self._downloaded[record.step] = url
            restored = mirror.restore_files()
            print_note(
                f"downloaded {record.path.name} from {url}"
                + (f"; restored {len(restored)} run file(s)" if restored else "")
            )
        return next(r for r in self.list_checkpoints() if r.step == newest.step)

    def fetch_remote(self) -> None:
        """Download the bucket's newest checkpoint if it is newer than every local one.

        S3 failing here with local checkpoints present: a warning, and the local ones are
        used; with none, the error is raised (starting over would lose the run).
        """
        if self.mirror is None:
            return
        local = self.list_checkpoints()
        try:
            remote = self.mirror.remote_checkpoints()
            if remote and (not local or remote[0].step > local[0].step):
                self.download_latest()
        except Exception as error:
            if not local or isinstance(error, DiskFullError):
                raise
            where = self.mirror.url()
            print_warning(f"cannot read {where} ({error_line(error)}); using local ones")

    def _require_mirror(self) -> CheckpointMirror:
        if self.mirror is None:
            raise ValueError("this CheckpointManager has no S3 mirror: pass remote_bucket=")
        return self.mirror

    # ----- listing, retention -------------------------------------------------------------

    def list_checkpoints(self) -> list[CheckpointRecord]:
        """Committed checkpoints, newest first (content not verified here)."""
        return self.format.list_checkpoints(self.checkpoint_dir)

    def _prune(self) -> None:
        records = self.list_checkpoints()
        keep = retained_steps({record.step: record for record in records}, self.keep_last_n)
        for record in records:
            if record.step in keep:
                continue
            if self.mirror is not None and not self.mirror.safe_to_delete(
                record.step, record.sha256
            ):
                continue  # its only copy: kept until it is verified in S3
            self.format.delete(record)

    # ----- loading ------------------------------------------------------------------------

    def verify(self, info: CheckpointRecord) -> str | None:
        """None if the checkpoint's files match its record, else the reason they do not."""
        return self.format.verify(info)

    def latest_path(self) -> Path | None:
        """Path of the newest complete checkpoint (sidecar present), or None."""
        records = self.list_checkpoints()
        return records[0].path if records else None

    def load_latest(self, map_location: str | torch.device = "cpu") -> LoadedCheckpoint | None:
        """Newest checkpoint that verifies and loads; skips bad ones with a warning.

        With S3, the newest complete checkpoint across local disk and the bucket: a newer
        one in the bucket (a fresh machine, or one that ran longer) is downloaded first.
        """
        self.wait()
        self.fetch_remote()
        # A format every rank reads (sharded) has the ranks share the hashing and agree.
        verify = getattr(self.format, "verify_for_load", self.format.verify)
        for record in self.list_checkpoints():
            problem = verify(record)
            if problem is None:
                try:
                    state = self.format.load(record, map_location)
                except Exception as error:  # corrupt zip, pickle error
                    problem = f"cannot load ({type(error).__name__}: {error})"
                else:
                    self.last_source = self._downloaded.get(record.step, str(record.path))
                    self._checkpoint_bytes = record.size
                    if self.is_writer and not self._space_checked:
                        self._check_space(record.size, state_bytes(state.get("model")))
                    return LoadedCheckpoint(state, record)
            print_warning(
                f"skipping checkpoint {record.path.name}: {problem}; trying the previous one"
            )
        return None
