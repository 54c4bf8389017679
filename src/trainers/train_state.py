"""What the trainer counts (``TrainState``, saved in every checkpoint), how a run ends
(``Outcome``) and what ``fit`` returns (``FitResult``)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

import torch

from src.common.signals import EXIT_BUDGET_REACHED, EXIT_INTERRUPTED
from src.trainers.distributed import DistInfo, sum_over_ranks


class Outcome(str, Enum):
    """How a run stands or ended. A ``str``, so ``result.status == "completed"`` holds, and
    a plain string in checkpoints and JSON."""

    RUNNING = "running"  # work left (as a stop request: none)
    COMPLETED = "completed"
    EARLY_STOPPED = "early_stopped"
    PRUNED = "pruned"  # an evaluation hook (a hyperparameter search) asked to stop
    INTERRUPTED = "interrupted"  # a stop signal: checkpoint saved, exit 75
    BUDGET_REACHED = "budget_reached"  # cost.budget_usd spent: checkpoint saved, exit 76
    FAILED = "failed"  # fit raised

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)

    @property
    def finished_early(self) -> bool:
        """Ended before its last epoch on purpose: nothing is left to train."""
        return self in (Outcome.EARLY_STOPPED, Outcome.PRUNED)

    @property
    def stopped(self) -> bool:
        """Stopped early with a checkpoint saved: running the command again resumes."""
        return self in (Outcome.INTERRUPTED, Outcome.BUDGET_REACHED)


# A stop request is reduced over ranks by the max of its place here: a budget stop wins.
STOP_PRECEDENCE = (Outcome.RUNNING, Outcome.INTERRUPTED, Outcome.BUDGET_REACHED)


@dataclass
class TrainState:
    """Counters and early-stopping state; saved in every checkpoint."""

    epoch: int = 0  # epochs fully completed
    global_step: int = 0  # optimizer steps taken
    batch_in_epoch: int = 0  # micro-batches of the current epoch this rank consumed
    # Samples of the current epoch all ranks together consumed: the data position a resume
    # on any number of ranks takes up (None: a checkpoint from before it was recorded).
    samples_in_epoch: int | None = 0
    best_value: float | None = None  # of trainer.monitor
    best_epoch: int = -1
    best_step: int = -1
    epochs_without_improvement: int = 0
    status: Outcome = Outcome.RUNNING  # RUNNING, COMPLETED, EARLY_STOPPED or PRUNED
    # The epoch is trained but a stop cut its validation short: the resume validates first.
    eval_pending: bool = False
    train_seconds: float = 0.0  # inside fit(): what the ETA is based on
    billed_seconds: float = 0.0  # every second of the run's processes: what the machine bills
    cost_usd: float = 0.0  # billed seconds at the rate of the machine they ran on
    wandb_run_id: str | None = None  # the same W&B run after a resume on any machine
    history: list[dict[str, float]] = field(default_factory=list)

    def to_checkpoint(self) -> dict[str, Any]:
        # A plain str: torch.load(weights_only=True) refuses pickled enums.
        return {**dataclasses.asdict(self), "status": self.status.value}

    @classmethod
    def from_checkpoint(cls, saved: dict[str, Any]) -> TrainState:
        known = {f.name for f in dataclasses.fields(cls)}
        state = cls(**{key: value for key, value in saved.items() if key in known})
        if "samples_in_epoch" not in saved:
            state.samples_in_epoch = None
        state.status = Outcome(state.status)
        return state


class EpochLoss:
    """This rank's running sum of the epoch's train loss, kept on the device (no host sync
    per step); each rank's share goes into the checkpoint."""

    def __init__(self, device: torch.device, loss_sum: float = 0.0, samples: int = 0) -> None:
        self.sum = torch.as_tensor(loss_sum, dtype=torch.float64).to(device)
        self.samples = samples

    def add(self, loss: torch.Tensor, samples: int) -> None:
        self.sum.add_(loss.detach(), alpha=samples)  # one op, no host sync
        self.samples += samples

    def mean_over_ranks(self, dist: DistInfo) -> float:
        loss_sum, samples = sum_over_ranks(
            torch.stack([self.sum, self.sum.new_tensor(self.samples)]), dist
        )
        return (loss_sum / max(1.0, samples.item())).item()

    def reset(self) -> None:
        self.sum.zero_()
        self.samples = 0


@dataclass
class FitResult:
    status: Outcome  # COMPLETED, EARLY_STOPPED, PRUNED, INTERRUPTED or BUDGET_REACHED
    global_step: int
    epoch: int
    monitor: str  # e.g. "val/loss"
    best_value: float | None  # best value of ``monitor``
    run_dir: Path
    signal_name: str | None = None
    cost_usd: float | None = None  # None: no hourly rate known

    @property
    def interrupted(self) -> bool:
        """Stopped early with a checkpoint saved: running the command again resumes."""
        return Outcome(self.status).stopped

    @property
    def stopped_by(self) -> str | None:
        """``SIGTERM``, ``SIGINT``... or ``cost.budget_usd``; None if the run was not stopped."""
        return "cost.budget_usd" if self.status == Outcome.BUDGET_REACHED else self.signal_name

    @property
    def exit_code(self) -> int:
        """For scripts: 0, 75 (stopped by a signal) or 76 (budget reached)."""
        if self.status == Outcome.BUDGET_REACHED:
            return EXIT_BUDGET_REACHED
        return EXIT_INTERRUPTED if self.status == Outcome.INTERRUPTED else 0


def test_record(
    state: TrainState,
    metrics: dict[str, float],
    weights: str,
    monitor: str,
    batch_size: int,
    effective_batch_size: int,
) -> dict[str, Any]:
    """test_results.json: the test metrics (``test_<name>``), which weights, the best
    evaluation (``best_val_loss`` by default), how far the run went and its batch."""
    best_key = f"best_{monitor.replace('/', '_')}"
    return {
        **{f"test_{name}": value for name, value in metrics.items()},
        "weights": weights,
        "monitor": monitor,
        best_key: state.best_value,
        "best_epoch": state.best_epoch,
        "best_step": state.best_step,
        "global_step": state.global_step,
        "epochs": state.epoch,
        "train_seconds": round(state.train_seconds, 3),
        "batch_size": batch_size,
        "effective_batch_size": effective_batch_size,
    }
