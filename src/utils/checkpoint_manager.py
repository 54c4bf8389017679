"""Checkpoints that survive preemption: atomic, checksummed, pruned only when safe.

Layout inside ``checkpoint_dir``::

    step_000000120.pt      torch.save of the full training state
    step_000000120.json    sidecar: step, sha256, size, is_best, ... (the commit marker)

A checkpoint counts only once its sidecar exists and the file's size and sha256
match it. Each write goes temp file -> fsync -> rename -> fsync(dir), the sidecar
last, so a SIGKILL or power loss at any moment leaves either the previous
complete checkpoint or the new one, never a half-written file that gets loaded.

Asynchronous saving: ``save()`` copies the state into one reusable CPU staging
buffer (the only cost the training loop pays; pinned memory on CUDA) and a
background thread serializes, hashes and renames. At most one save is in flight;
a new ``save()`` waits for the previous one, so host memory grows by at most one
copy of the state. ``wait()`` / ``close()`` flush pending writes (also at exit).

S3 mirror (``remote_bucket=``): each committed checkpoint is handed to a
:class:`~src.storage.checkpoint_mirror.CheckpointMirror`, which uploads and verifies it in
the background; ``load_latest()`` takes the newest complete checkpoint across local disk and
the bucket (downloading it first when the bucket's is newer), and pruning never deletes a
local checkpoint before the mirror says it is safe.
"""

from __future__ import annotations

import atexit
import copy
import hashlib
import json
import os
import threading
import time
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import torch

from src.common.atomic_io import atomic_write_bytes, fsync_dir, sha256_file, temp_path_for
from src.common.console import print_note, print_warning

if TYPE_CHECKING:
    from src.storage.checkpoint_mirror import CheckpointMirror, FlushReport

CHECKPOINT_PREFIX = "step_"


@dataclass(frozen=True)
class CheckpointInfo:
    step: int
    path: Path
    sha256: str
    size: int
    is_best: bool
    metadata: dict[str, Any]


class LoadedCheckpoint(NamedTuple):
    """What ``load_latest`` returns: ``state, info = manager.load_latest()`` also works."""

    state: dict[str, Any]
    info: CheckpointInfo


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
    """torch.save via temp file + fsync + rename; returns (sha256, size) of what landed."""
    tmp = temp_path_for(path)
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
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)
    return digest, size


class _StagingBuffer:
    """Reusable CPU copies of every tensor in a nested state, keyed by position."""

    def __init__(self) -> None:
        self._buffers: dict[tuple, torch.Tensor] = {}
        self._source_devices: set[torch.device] = set()

    def take_source_devices(self) -> list[torch.device]:
        """CUDA devices copied from since the last call (each needs a synchronize)."""
        devices, self._source_devices = sorted(self._source_devices, key=str), set()
        return devices

    def stage(self, value: Any, key: tuple = ()) -> Any:
        if isinstance(value, torch.Tensor):
            return self._stage_tensor(value, key)
        if isinstance(value, dict):
            return {name: self.stage(item, (*key, name)) for name, item in value.items()}
        if isinstance(value, (list, tuple)):
            staged = [self.stage(item, (*key, index)) for index, item in enumerate(value)]
            return type(value)(staged) if isinstance(value, tuple) else staged
        return copy.deepcopy(value)

    def _stage_tensor(self, tensor: torch.Tensor, key: tuple) -> torch.Tensor:
        tensor = tensor.detach()
        buffer = self._buffers.get(key)
        if buffer is None or buffer.shape != tensor.shape or buffer.dtype != tensor.dtype:
            pin = tensor.is_cuda and torch.cuda.is_available()
            buffer = torch.empty(tensor.shape, dtype=tensor.dtype, device="cpu", pin_memory=pin)
            self._buffers[key] = buffer
        buffer.copy_(tensor, non_blocking=tensor.is_cuda)
        if tensor.is_cuda:
            self._source_devices.add(tensor.device)
        return buffer


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
        remote_bucket: str | None = None,
        remote_prefix: str = "checkpoints",
        endpoint_url: str | None = None,
        remote_keep_last_n: int | None = None,
        mirror: CheckpointMirror | None = None,
        progress: bool = True,
    ) -> None:
        if keep_last_n < 1:
            raise ValueError("keep_last_n must be >= 1 (the newest checkpoint is always kept)")
        self.checkpoint_dir = Path(local_dir)
        self.keep_last_n = keep_last_n
        self.async_save = async_save
        self.is_writer = is_writer
        self.progress = progress
        if mirror is None and remote_bucket and is_writer:
            from src.storage.checkpoint_mirror import CheckpointMirror

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
        self._staging = _StagingBuffer()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self.last_stall_s = 0.0  # time save() blocked the caller, for benchmarks and logs
        if is_writer:
            self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
            self._remove_leftovers()
        # Flush a pending write if the interpreter exits without close().
        atexit.register(_flush_at_exit, weakref.ref(self))

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
        if not self.is_writer:
            return path
        started = time.perf_counter()
        self.start_mirror()
        self.wait()
        background = self.async_save and not blocking
        if background:
            snapshot = self._staging.stage(state)
            # The non_blocking copies into pinned memory must land: synchronize each device
            # they came from (under torchrun that is this rank's GPU, not GPU 0).
            for device in self._staging.take_source_devices():
                torch.cuda.synchronize(device)
        else:
            snapshot = state  # the caller waits for the write, so nothing can change under it
        job_args = (snapshot, step, is_best, dict(metadata or {}), best_model_path)
        if background:
            self._thread = threading.Thread(
                target=self._write_job, args=job_args, name=f"checkpoint-{step}", daemon=True
            )
            self._thread.start()
        else:
            self._write(*job_args)
        self.last_stall_s = time.perf_counter() - started
        return path

    def wait(self) -> None:
        """Block until the in-flight write (if any) is complete; re-raise its error."""
        thread = self._thread
        if thread is not None:
            thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise RuntimeError(f"background checkpoint write failed: {error}") from error

    def close(self, remote_timeout: float | None = None) -> FlushReport | None:
        """Flush local writes; with S3, wait up to ``remote_timeout`` s for the uploads, stop
        the mirror and release its lease. Returns what the mirror managed (None: no S3)."""
        self.wait()
        if self.mirror is None:
            return None
        report = self.mirror.stop(remote_timeout)
        self._prune()  # now-verified checkpoints may go
        return report

    # ----- S3 --------------------------------------------------------------------------

    def start_mirror(self) -> None:
        """Start the S3 mirror (idempotent): take its lease and queue local checkpoints the
        bucket lacks (what a killed run could not upload)."""
        if self.mirror is not None and not self.mirror.running:  # save() calls this each time
            self.mirror.start([_record_of(info) for info in self.list_checkpoints()])

    def upload_latest(self, timeout: float | None = None) -> CheckpointInfo | None:
        """Upload the newest local checkpoint and return once it is verified in S3."""
        from src.storage.s3 import S3SyncError

        mirror = self._require_mirror()
        self.wait()
        infos = self.list_checkpoints()
        if not infos:
            return None
        self.start_mirror()
        mirror.enqueue(_record_of(infos[0]))
        report = mirror.flush(timeout)
        if infos[0].step in report.waiting or not mirror.safe_to_delete(
            infos[0].step, infos[0].sha256
        ):
            raise S3SyncError(
                f"{infos[0].path.name} is not in {mirror.url()} yet: {mirror.last_error}"
            )
        return infos[0]

    def download_latest(self) -> CheckpointInfo | None:
        """Make the bucket's newest complete checkpoint available locally (downloaded with a
        progress bar and verified unless an identical local copy exists); None if S3 has none."""
        mirror = self._require_mirror()
        records = mirror.remote_records()
        if not records:
            return None
        record = records[0]
        local = next((i for i in self.list_checkpoints() if i.step == int(record["step"])), None)
        if local is None or local.sha256 != record["sha256"] or self.verify(local) is not None:
            self.wait()
            path = self.checkpoint_dir / record["file"]
            mirror.download(record, path, progress=self.progress)
            atomic_write_bytes(path.with_suffix(".json"), json.dumps(record, indent=2).encode())
            self._downloaded[int(record["step"])] = mirror.url(record["file"])
            restored = mirror.restore_files()
            print_note(
                f"downloaded {record['file']} from {mirror.url(record['file'])}"
                + (f"; restored {len(restored)} run file(s)" if restored else "")
            )
        return next(i for i in self.list_checkpoints() if i.step == int(record["step"]))

    def _require_mirror(self) -> CheckpointMirror:
        if self.mirror is None:
            raise ValueError("this CheckpointManager has no S3 mirror: pass remote_bucket=")
        return self.mirror

    def path_for(self, step: int) -> Path:
        return self.checkpoint_dir / f"{CHECKPOINT_PREFIX}{step:09d}.pt"

    def _write_job(self, *args: Any) -> None:
        try:
            self._write(*args)
        except BaseException as error:  # surfaced by the next wait()/save()
            self._error = error

    def _write(
        self,
        snapshot: dict[str, Any],
        step: int,
        is_best: bool,
        metadata: dict[str, Any],
        best_model_path: Path | None,
    ) -> None:
        path = self.path_for(step)
        sidecar = path.with_suffix(".json")
        sidecar.unlink(missing_ok=True)  # re-saving a step: invalidate the old one first
        digest, size = atomic_torch_save(snapshot, path)
        # best_model.pt is durable before the sidecar commits the checkpoint that names it:
        # a kill in between leaves the previous checkpoint newest, and the replay rewrites it.
        if best_model_path is not None and "model" in snapshot:
            atomic_torch_save(snapshot["model"], Path(best_model_path))
        record = {
            "step": step,
            "file": path.name,
            "sha256": digest,
            "size": size,
            "is_best": is_best,
            "created_at": time.time(),
            "metadata": metadata,
        }
        atomic_write_bytes(sidecar, json.dumps(record, indent=2).encode())
        if self.mirror is not None:
            self.mirror.enqueue(record)
        self._prune()

    # ----- listing, pruning ---------------------------------------------------------------

    def list_checkpoints(self) -> list[CheckpointInfo]:
        """Checkpoints whose sidecar exists, newest first (content not verified here)."""
        return read_checkpoint_infos(self.checkpoint_dir)

    def _prune(self) -> None:
        infos = self.list_checkpoints()
        keep = {info.path for info in infos[: self.keep_last_n]}
        best = next((info for info in infos if info.is_best), None)
        if best is not None:
            keep.add(best.path)
        for info in infos:
            if info.path in keep:
                continue
            if self.mirror is not None and not self.mirror.safe_to_delete(info.step, info.sha256):
                continue  # its only copy: kept until it is verified in S3
            info.path.with_suffix(".json").unlink(missing_ok=True)  # un-commit first
            info.path.unlink(missing_ok=True)

    def _remove_leftovers(self) -> None:
        """Temp files of an interrupted write, and data files whose sidecar never landed."""
        for tmp in self.checkpoint_dir.glob(".*.tmp"):
            tmp.unlink(missing_ok=True)
        for data in self.checkpoint_dir.glob(f"{CHECKPOINT_PREFIX}*.pt"):
            if not data.with_suffix(".json").exists():
                data.unlink(missing_ok=True)

    # ----- loading ------------------------------------------------------------------------

    def verify(self, info: CheckpointInfo) -> str | None:
        """None if the file matches its sidecar, else the reason it does not."""
        if not info.path.is_file():
            return "file missing"
        if info.path.stat().st_size != info.size:
            return f"size {info.path.stat().st_size} != recorded {info.size}"
        if sha256_file(info.path) != info.sha256:
            return "checksum mismatch"
        return None

    def latest_path(self) -> Path | None:
        """Path of the newest complete checkpoint (sidecar present), or None."""
        infos = self.list_checkpoints()
        return infos[0].path if infos else None

    def load_latest(self, map_location: str | torch.device = "cpu") -> LoadedCheckpoint | None:
        """Newest checkpoint that verifies and loads; skips bad ones with a warning.

        With S3, the newest complete checkpoint across local disk and the bucket: a newer
        one in the bucket (a fresh machine, or one that ran longer) is downloaded first.
        """
        self.wait()
        self.fetch_remote()
        for info in self.list_checkpoints():
            problem = self.verify(info)
            if problem is None:
                try:
                    state = torch.load(info.path, map_location=map_location, weights_only=True)
                    self.last_source = self._downloaded.get(info.step, str(info.path))
                    return LoadedCheckpoint(state, info)
                except Exception as error:  # corrupt zip, pickle error
                    problem = f"cannot load ({type(error).__name__}: {error})"
            print_warning(
                f"skipping checkpoint {info.path.name}: {problem}; trying the previous one"
            )
        return None

    def fetch_remote(self) -> None:
        """Download the bucket's newest checkpoint if it is newer than every local one.

        S3 failing here with local checkpoints present: a warning, and the local ones are
        used; with none, the error is raised (starting over would lose the run).
        """
        if self.mirror is None:
            return
        local = self.list_checkpoints()
        try:
            records = self.mirror.remote_records()
            if records and (not local or int(records[0]["step"]) > local[0].step):
                self.download_latest()
        except Exception as error:
            if not local:
                raise
            from src.storage.s3 import error_line

            where = self.mirror.url()
            print_warning(f"cannot read {where} ({error_line(error)}); using local ones")


def _record_of(info: CheckpointInfo) -> dict[str, Any]:
    """The sidecar record of a local checkpoint (what the S3 manifest lists)."""
    return json.loads(info.path.with_suffix(".json").read_text())


def read_checkpoint_infos(checkpoint_dir: Path) -> list[CheckpointInfo]:
    """The committed checkpoints (sidecar present) in ``checkpoint_dir``, newest first.

    Reads only the small JSON sidecars: cheap, and safe before any manager exists.
    """
    infos = []
    for sidecar in Path(checkpoint_dir).glob(f"{CHECKPOINT_PREFIX}*.json"):
        try:
            record = json.loads(sidecar.read_text())
            infos.append(
                CheckpointInfo(
                    step=int(record["step"]),
                    path=sidecar.parent / record["file"],
                    sha256=record["sha256"],
                    size=int(record["size"]),
                    is_best=bool(record.get("is_best", False)),
                    metadata=record.get("metadata", {}),
                )
            )
        except (OSError, ValueError, KeyError, TypeError) as error:
            print_warning(f"ignoring unreadable checkpoint sidecar {sidecar.name}: {error}")
    return sorted(infos, key=lambda info: info.step, reverse=True)


def _flush_at_exit(manager_ref: weakref.ref) -> None:
    manager = manager_ref()
    if manager is not None:
        try:
            manager.wait()
        except RuntimeError as error:
            print_warning(str(error))
