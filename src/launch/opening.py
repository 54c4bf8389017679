"""Opening a run directory for training: may this process train into it, and what does it
already hold?

In order, before anything is written:

1. the newest local checkpoint's sidecar: its resume settings must match the config, and
   the frozen base it names (a LoRA run's) must be the model's given now;
2. the lock: a live process that owns the run directory is an error. ``lock="probe"`` takes
   it and lets go at once (the trainer holds it only while ``fit`` runs, so a notebook that
   builds a new trainer never blocks itself), ``"hold"`` keeps it for the caller;
3. with ``mirror=True`` and ``checkpoint.s3_bucket`` set: the S3 prefix is probed (a bad
   bucket or missing credentials fail now, not after an epoch), its lease checked, and the
   bucket's newest checkpoint, when newer than the local one, passes the same checks.

The sidecars and the bucket's manifest are each read once; ``OpenedRun`` hands on what they
said (the recorded batch size, whether S3 holds a newer checkpoint).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from omegaconf import DictConfig

from src.launch.resume_guard import require_same_base, require_same_settings
from src.runs.files import run_dir_for
from src.runs.layout import RunLayout
from src.runs.lock import RunLock, acquire_run_lock
from src.storage.checkpoint_mirror import CheckpointMirror, mirror_for_run
from src.utils.checkpoint_manager import CheckpointInfo, read_checkpoint_infos

LockMode = Literal["probe", "hold", "none"]


@dataclass(frozen=True)
class ModelBase:
    """What a resume checks of the model itself: the identity of its frozen part
    (``src.checkpoints.frozen_base``), None when nothing of it is frozen."""

    frozen_base: dict[str, Any] | None


@dataclass
class OpenedRun:
    """What opening a run directory found, for the trainer to build on."""

    layout: RunLayout
    local_checkpoints: list[CheckpointInfo]  # committed ones (sidecar present), newest first
    mirror: CheckpointMirror | None = None  # probed, lease checked, not started
    remote_newest: dict[str, Any] | None = None  # the manifest record, if newer than local
    lock: RunLock | None = None  # held only with lock="hold"

    @property
    def run_dir(self) -> Path:
        return self.layout.root

    @property
    def resume_metadata(self) -> dict[str, Any]:
        """The sidecar metadata of the checkpoint a resume starts from (the bucket's newer
        one, else the newest local one), with its ``step``; empty for a new run."""
        record = self.remote_newest or (
            self.local_checkpoints[0].to_json() if self.local_checkpoints else None
        )
        if not record:
            return {}
        return {**(record.get("metadata") or {}), "step": int(record["step"])}

    @property
    def recorded_resume_settings(self) -> dict[str, Any] | None:
        """The resume settings of the checkpoint a resume starts from."""
        saved = self.resume_metadata.get("resume_settings")
        return {"world_size": 1, **saved} if isinstance(saved, dict) else None

    @property
    def recorded_batch_size(self) -> int | None:
        """The size ``data.batch_size=auto`` found earlier in this run (the newest local
        checkpoint's, else the bucket's newer one's): a resume must not measure again."""
        local = self.local_checkpoints[0].metadata if self.local_checkpoints else None
        remote = self.remote_newest.get("metadata") if self.remote_newest else None
        for saved in (local, remote):
            if saved and saved.get("batch_size"):
                return int(saved["batch_size"])
        return None


def open_run(
    cfg: DictConfig,
    world_size: int = 1,
    *,
    lock: LockMode = "probe",
    mirror: bool = False,
    model_base: ModelBase | None = None,
) -> OpenedRun:
    """Check that this process may train ``cfg``'s run directory; writes nothing in it but
    the lock file (the directory is created for it).

    ``open_run(cfg, world_size)`` is the guard and the lock probe alone (what a config loader
    needs). The trainer passes ``lock="none"`` on ranks other than 0 and ``mirror=True`` on
    rank 0. ``model_base``: the model about to train (the trainer's; a config loader has
    none): a checkpoint that names a frozen base must name its. Raises ConfigError
    (RunInUseError, S3SettingError...) with a one-line message.
    """
    layout = RunLayout(run_dir_for(cfg))
    local = read_checkpoint_infos(layout.checkpoints)
    if local:
        require_same_settings(cfg, world_size, local[0].metadata.get("resume_settings"))
        if model_base is not None:
            require_same_base(cfg, local[0].metadata, model_base.frozen_base)
    held = None
    if lock != "none":
        held = acquire_run_lock(layout.root)
        if lock == "probe":
            held.release()
            held = None
    opened = OpenedRun(layout, local, lock=held)
    if mirror and cfg.checkpoint.s3_bucket:
        opened.mirror = mirror_for_run(cfg.checkpoint, cfg.run_name, layout.root)
        records = opened.mirror.remote_records()
        if records and (not local or int(records[0]["step"]) > local[0].step):
            saved = records[0].get("metadata", {})
            where = opened.mirror.url()
            require_same_settings(cfg, world_size, saved.get("resume_settings"), where=where)
            if model_base is not None:
                require_same_base(cfg, saved, model_base.frozen_base, where=where)
            opened.remote_newest = records[0]
    return opened
