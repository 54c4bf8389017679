"""The monitored validation metric (``trainer.monitor``): is it known, did it improve, has
it stopped improving for ``trainer.early_stopping_patience`` epochs."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from omegaconf import DictConfig

from src.common.errors import ConfigError
from src.trainers.train_state import TrainState


@dataclass(frozen=True)
class EarlyStopping:
    monitor: str  # "val/<metric>"
    mode: str  # "min" or "max"
    min_delta: float
    patience: int  # 0: never stop early

    @classmethod
    def from_config(cls, trainer_cfg: DictConfig) -> EarlyStopping:
        return cls(
            monitor=trainer_cfg.monitor,
            mode=trainer_cfg.monitor_mode,
            min_delta=trainer_cfg.early_stopping_min_delta,
            patience=trainer_cfg.early_stopping_patience,
        )

    def value_in(self, val: Mapping[str, float]) -> float:
        """The monitored value among the validation metrics (names without ``val/``)."""
        name = self.monitor.split("/", 1)[1]
        if name not in val:
            known = ", ".join(f"val/{key}" for key in val)
            raise ConfigError(
                f"trainer.monitor={self.monitor!r} is not a validation metric (this run has "
                f"{known}): set trainer.monitor to one of them"
            )
        return val[name]

    def improves(self, value: float, best: float | None) -> bool:
        if math.isnan(value):
            return False
        if best is None:
            return True
        if self.mode == "max":
            return value > best + self.min_delta
        return value < best - self.min_delta

    def record(self, state: TrainState, value: float, epoch_done: bool) -> tuple[bool, bool]:
        """Update the best value and the patience count; returns (improved, stop now).

        ``epoch_done`` False (an evaluation at max_steps mid-epoch): it does not count
        towards the patience."""
        improved = self.improves(value, state.best_value)
        if improved:
            state.best_value, state.best_epoch, state.best_step = (
                value,
                state.epoch,
                state.global_step,
            )
        if epoch_done:
            state.epochs_without_improvement = (
                0 if improved else state.epochs_without_improvement + 1
            )
        stop = self.patience > 0 and state.epochs_without_improvement >= self.patience
        return improved, stop
