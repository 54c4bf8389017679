"""The run's clock and bill: training time (what the ETA is based on) and billed time at the
machine's hourly rate (what the run costs), both kept in ``TrainState`` across resumes.

The machine bills wall time, so every second of the run's processes counts: start-up,
evaluation, checkpointing. ``cost.budget_usd`` stops the run once the bill reaches it.
"""

from __future__ import annotations

import time

from omegaconf import DictConfig

from src.common.errors import ConfigError
from src.config import in_notebook
from src.trainers.progress import fmt_seconds
from src.trainers.train_state import TrainState
from src.utils.gpu_monitor import hourly_rate, process_age_s

_process_start_billed = False


def bill_origin() -> float:
    """``perf_counter`` time the bill starts from: process start for the first trainer of a
    script (interpreter start-up and imports are billed too); trainer creation otherwise (a
    notebook kernel may have sat idle for hours, a second trainer must not bill it twice)."""
    global _process_start_billed
    now = time.perf_counter()
    if _process_start_billed or in_notebook():
        return now
    _process_start_billed = True
    return now - process_age_s()


class CostMeter:
    """Adds elapsed wall time to a ``TrainState``: to its training time at each ``tick``
    since ``restart_training_clock``, and to its bill since ``billing_from``."""

    def __init__(
        self, hourly_rate_usd: float | None, budget_usd: float | None, billing_from: float
    ) -> None:
        self.hourly_rate_usd = hourly_rate_usd  # None: cost not tracked
        self.budget_usd = budget_usd
        self._last_bill_tick = billing_from
        self._last_tick = time.perf_counter()

    @classmethod
    def for_run(cls, cost_cfg: DictConfig, is_main: bool, billing_from: float) -> CostMeter:
        """The ``cost:`` settings' meter. The rate: ``cost.hourly_rate_usd``, else the Vast.ai
        instance's price; known on rank 0 only (it alone logs the cost). A budget with no
        known rate is a ConfigError: it could never stop the run."""
        rate = hourly_rate(cost_cfg.hourly_rate_usd) if is_main else None
        budget = cost_cfg.budget_usd
        if budget is not None and is_main and rate is None:
            raise ConfigError(
                f"cost.budget_usd={budget} needs the machine's price, and none is "
                "known here: set cost.hourly_rate_usd (dollars per hour)"
            )
        return cls(rate, budget, billing_from)

    @property
    def tracked(self) -> bool:
        """The hourly rate is known (on rank 0): the run's cost is logged and reported."""
        return self.hourly_rate_usd is not None

    def restart_training_clock(self) -> None:
        """Training time counts from now (``fit`` starts); the bill runs on regardless."""
        self._last_tick = time.perf_counter()

    def tick(self, state: TrainState) -> None:
        """Add the wall time since the last tick to the training time and to the bill."""
        now = time.perf_counter()
        state.train_seconds += now - self._last_tick
        self._last_tick = now
        billed = now - self._last_bill_tick
        self._last_bill_tick = now
        state.billed_seconds += billed
        if self.hourly_rate_usd is not None:
            state.cost_usd += self.hourly_rate_usd * billed / 3600

    def record(self, state: TrainState) -> dict[str, float | None]:
        """The cost fields of test_results.json."""
        return {
            "billed_seconds": round(state.billed_seconds, 3),
            "hourly_rate_usd": self.hourly_rate_usd,
            "cost_usd": round(state.cost_usd, 4),
        }

    def cost_now(self, state: TrainState) -> float:
        """The run's cost up to this moment, without ticking."""
        if self.hourly_rate_usd is None:
            return 0.0
        unbilled = time.perf_counter() - self._last_bill_tick
        return state.cost_usd + self.hourly_rate_usd * unbilled / 3600

    def budget_spent(self, state: TrainState) -> bool:
        return self.budget_usd is not None and self.cost_now(state) >= self.budget_usd

    def budget_reached_line(self, state: TrainState, setting: str = "cost.budget_usd") -> str:
        """Ticks, then says what the run cost and how to go on (``setting``: what the user
        raises, as they spelled it)."""
        self.tick(state)
        return (
            f"budget reached: this run has cost ${state.cost_usd:.2f} of "
            f"{setting}=${self.budget_usd:.2f} ({fmt_seconds(state.billed_seconds)} "
            f"at ${self.hourly_rate_usd:.2f}/h); checkpoint saved at step "
            f"{state.global_step}; raise {setting} and re-run to resume"
        )
