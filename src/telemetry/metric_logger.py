"""Scalars to TensorBoard and (optionally) W&B, from rank 0 only.

On resume the TensorBoard writer purges events past the resumed step, so curves
have no overlapping tail. W&B (offline by default) continues the same run: its id lives in
the checkpoint, so a resume on another machine or from a moved run directory finds it.
"""

from __future__ import annotations

import os
import queue
import threading
import uuid
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from src.common.errors import DiskFullError, is_disk_full
from src.config import scrub_secret_values, secret_values, to_plain_dict, wandb_enabled
from src.runs.layout import RunLayout


def new_wandb_run_id() -> str:
    """A fresh W&B run id. From os.urandom: Python's ``random`` is part of a resumable run."""
    return uuid.uuid4().hex[:16]


class MetricLogger:
    def __init__(
        self,
        cfg: DictConfig,
        run_dir: Path,
        resume_step: int,
        enabled: bool,
        wandb_run_id: str | None = None,
    ) -> None:
        self._tb = None
        self._tb_dir = RunLayout(run_dir).tensorboard
        self._wandb_run = None
        if not enabled:
            return
        if cfg.logging.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(
                log_dir=str(self._tb_dir),
                # Drop events logged after the checkpoint by the interrupted process.
                purge_step=resume_step + 1 if resume_step > 0 else None,
            )
        if wandb_enabled(cfg):
            self._wandb_run = _init_wandb(cfg, run_dir, wandb_run_id or new_wandb_run_id())
            # W&B's run.log serializes and writes to its service's socket (0.2 to 1 ms a
            # call, more when that process competes for the cores): a thread of its own
            # does it, in order, while the loop goes on.
            self._wandb_queue: queue.SimpleQueue[tuple[dict[str, float], int] | None] = (
                queue.SimpleQueue()
            )
            self._wandb_thread = threading.Thread(
                target=self._wandb_writer, name="wandb-log", daemon=True
            )
            self._wandb_thread.start()

    def _raise_disk_full(self, error: OSError) -> None:
        """TensorBoard's event file did not fit: the one-line DiskFullError, else ``error``."""
        if not is_disk_full(error):
            raise error
        raise DiskFullError(self._tb_dir, None) from error

    def _wandb_writer(self) -> None:
        while (item := self._wandb_queue.get()) is not None:
            metrics, step = item
            try:
                self._wandb_run.log(metrics, step=step)
            except Exception as error:  # a tracker never stops training
                print(f"[trainer] warning: W&B log failed: {error}", flush=True)

    def log(self, metrics: dict[str, float], step: int) -> None:
        if self._tb is not None:
            from tensorboard.compat.proto.summary_pb2 import Summary  # loaded with the writer

            # One event holding every scalar of the step: what add_scalar writes one event
            # per name for, at about a quarter of its cost (a hot path every few steps).
            values = [
                Summary.Value(tag=name, simple_value=value) for name, value in metrics.items()
            ]
            try:
                self._tb._get_file_writer().add_summary(Summary(value=values), step)
            except OSError as error:  # its writer thread's error, surfaced here
                self._raise_disk_full(error)
        if self._wandb_run is not None:
            self._wandb_queue.put((metrics, step))

    def flush(self) -> None:
        """Events on disk now (the S3 mirror uploads the run directory after checkpoints)."""
        if self._tb is not None:
            try:
                self._tb.flush()
            except OSError as error:
                self._raise_disk_full(error)

    def close(self) -> None:
        if self._tb is not None:
            tb, self._tb = self._tb, None
            try:
                tb.close()
            except OSError as error:
                self._raise_disk_full(error)
        if self._wandb_run is not None:
            self._wandb_queue.put(None)  # what was logged goes out first
            self._wandb_thread.join()
            self._wandb_run.finish()
            self._wandb_run = None


def _init_wandb(cfg: DictConfig, run_dir: Path, run_id: str) -> Any:
    import wandb

    os.environ.setdefault("WANDB_SILENT", "true")
    # A project name interpolated from the environment could carry a secret into W&B's files.
    project = scrub_secret_values(cfg.logging.wandb_project, secret_values())
    return wandb.init(
        project=project,
        name=cfg.run_name,
        id=run_id,
        resume="allow",
        mode=cfg.logging.wandb_mode,
        dir=str(run_dir),
        config=to_plain_dict(cfg),  # secrets redacted
    )
