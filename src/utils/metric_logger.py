"""Scalars to TensorBoard and (optionally) W&B, from rank 0 only.

On resume the TensorBoard writer purges events past the resumed step, so curves
have no overlapping tail. W&B (offline by default) continues the same run: its id lives in
the checkpoint, so a resume on another machine or from a moved run directory finds it.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from src.config import scrub_secret_values, secret_values, to_plain_dict, wandb_enabled


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
        self._wandb_run = None
        if not enabled:
            return
        if cfg.logging.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(
                log_dir=str(run_dir / "tensorboard"),
                # Drop events logged after the checkpoint by the interrupted process.
                purge_step=resume_step + 1 if resume_step > 0 else None,
            )
        if wandb_enabled(cfg):
            self._wandb_run = _init_wandb(cfg, run_dir, wandb_run_id or new_wandb_run_id())

    def log(self, metrics: dict[str, float], step: int) -> None:
        if self._tb is not None:
            for name, value in metrics.items():
                self._tb.add_scalar(name, value, step)
        if self._wandb_run is not None:
            self._wandb_run.log(metrics, step=step)

    def flush(self) -> None:
        """Events on disk now (the S3 mirror uploads the run directory after checkpoints)."""
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wandb_run is not None:
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
