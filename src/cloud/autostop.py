"""Stop this rented machine once its GPUs have sat idle for a while (``scripts/autostop.py``).

Runs on the machine itself (in tmux, or started by setup/onstart.sh). "Idle" means all
three at every check: no process holds a CUDA context on any GPU, utilisation is under a
threshold on every GPU, and no training run of this repo holds its run lock (a run between
two steps, loading data or uploading its last checkpoint is not idle). Only a whole window
of idle checks stops the machine; one busy check starts the window again.

It stops, never destroys: a stopped instance keeps its disk (billed as storage only) and
starts again with everything on it. Destroying stays a human decision behind the
downloaded-outputs gate (``launch_vast.py destroy``). The provider that rents the machine
(``src.cloud.registry.provider_of_this_machine``: Vast.ai today) does the stopping.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from src.cloud.provider import CredentialsMissing, Provider
from src.cloud.registry import NOT_HERE_HINT, provider_of_this_machine
from src.runs.lock import held_run_locks
from src.telemetry.nvml import GpuStats, read_gpu_stats

DEFAULT_UTIL_PERCENT = 5.0
DEFAULT_INTERVAL_S = 30.0


class AutostopError(RuntimeError):
    """Autostop cannot work here (no provider's machine, no API key, no GPU readings): one line."""


@dataclass(frozen=True)
class Check:
    """One look at the machine: ``busy_reason`` is None when it is idle."""

    busy_reason: str | None

    @property
    def idle(self) -> bool:
        return self.busy_reason is None


def busy_reason(
    gpus: Sequence[GpuStats], locked_runs: Sequence[Path], util_percent: float
) -> str | None:
    """Why the machine is not idle, or None."""
    if locked_runs:
        names = ", ".join(path.name for path in locked_runs)
        return f"run lock held by a live process ({names})"
    for gpu in gpus:
        if gpu.compute_processes:
            return f"GPU {gpu.index} has {gpu.compute_processes} compute process(es)"
        if gpu.utilization_percent is not None and gpu.utilization_percent >= util_percent:
            return f"GPU {gpu.index} at {gpu.utilization_percent:.0f}% utilization"
    return None


@dataclass
class IdleWatch:
    """Turns checks into "idle for how long": the window restarts at every busy check."""

    idle_s: float
    clock: Callable[[], float] = time.monotonic
    idle_since: float | None = None

    def observe(self, check: Check) -> float:
        """Seconds the machine has been idle, counting this check."""
        now = self.clock()
        if not check.idle:
            self.idle_since = None
            return 0.0
        if self.idle_since is None:
            self.idle_since = now
        return now - self.idle_since

    def expired(self, idle_for: float) -> bool:
        return self.idle_since is not None and idle_for >= self.idle_s


def stop_target(environ: Mapping[str, str] | None = None) -> tuple[Provider, str]:
    """(provider, machine id) for stopping this machine; AutostopError anywhere else."""
    try:
        provider = provider_of_this_machine(environ)
    except CredentialsMissing as error:
        raise AutostopError(f"{error}: set it so autostop can stop this machine") from None
    if provider is None or provider.this_machine_id is None:
        raise AutostopError(
            f"{NOT_HERE_HINT}: autostop cannot stop this machine; use your provider's idle "
            "shutdown, or run it on the instance"
        )
    return provider, provider.this_machine_id


def check_machine(outputs_root: Path, util_percent: float) -> Check:
    """Read the GPUs and the run locks now."""
    try:
        gpus = read_gpu_stats()
    except Exception as error:  # NvmlUnavailable: nothing here can be judged idle
        raise AutostopError(f"cannot read the GPUs ({error}); autostop needs NVML") from None
    return Check(busy_reason(gpus, held_run_locks(outputs_root), util_percent))


def watch(
    idle_s: float,
    check: Callable[[], Check],
    stop: Callable[[], None],
    *,
    interval_s: float = DEFAULT_INTERVAL_S,
    echo: Callable[[str], None] = print,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> None:
    """Check every ``interval_s``; call ``stop()`` once idle for ``idle_s``, then return.

    A failing ``stop()`` (the API down) is reported and tried again at the next check.
    """
    watcher = IdleWatch(idle_s, clock)
    last_reason: str | None = "starting"
    while True:
        result = check()
        idle_for = watcher.observe(result)
        if result.busy_reason != last_reason:
            if result.idle:
                echo(f"idle: no GPU work and no run lock; stopping after {idle_s / 60:g} min idle")
            else:
                echo(f"busy: {result.busy_reason}")
            last_reason = result.busy_reason
        if watcher.expired(idle_for):
            try:
                stop()
                return
            except Exception as error:  # noqa: BLE001 - keep watching, try again next time
                echo(
                    f"stop failed ({str(error).splitlines()[0]}); trying again in {interval_s:g} s"
                )
        sleep(interval_s)
