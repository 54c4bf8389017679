"""The job's GPU, read about once a second in a daemon thread while training runs.

The trainer pulls averaged ``gpu/*`` scalars at its logging steps and a one-time warning
when the GPU sits mostly idle during training (usually a data-loading bottleneck).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from src.telemetry.nvml import (
    GpuStats,
    NvmlUnavailable,
    format_optional,
    nvml_session,
    stats_of,
    visible_handles,
)

LOW_UTIL_HINTS = (
    "the GPU is waiting for data or for Python. Try more DataLoader workers "
    "(data.num_workers), a bigger batch (data.batch_size, or auto), mixed precision "
    "(trainer.precision=bf16), torch.compile (trainer.compile=true); pinned memory is "
    "already on for CUDA"
)


class GpuSampler:
    """Reads the job's GPU about once a second in a daemon thread.

    NVML averages utilisation over 1/6 s to 1 s, so sampling faster buys nothing. The
    thread only reads NVML and updates a few floats (never Python's ``random``: a
    resumable run saves that RNG). The training loop pulls ``metrics()`` at its logging
    steps and ``take_warning()`` once: the low-utilisation warning fires once per run when
    utilisation stays under ``low_util_percent`` for ``low_util_s`` while training.
    """

    def __init__(
        self,
        index: int,
        interval_s: float = 1.0,
        low_util_percent: float = 30.0,
        low_util_s: float = 300.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.index = index
        self.interval_s = interval_s
        self.low_util_percent = low_util_percent
        self.low_util_s = low_util_s
        self._clock = clock
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._util_sum = 0.0
        self._util_count = 0
        self._latest: GpuStats | None = None
        self._last_reading: float | None = None
        self._training = False
        self._low_s = 0.0  # training time under the threshold since the last busy reading
        self._low_sum = 0.0
        self._low_count = 0
        self._warned = False
        self._warning: str | None = None
        self.unavailable_reason: str | None = None

    def start(self) -> bool:
        """Begin sampling; False (and ``unavailable_reason`` set) when NVML cannot read it."""
        ready = threading.Event()
        self._thread = threading.Thread(
            target=self._run, args=(ready,), name="gpu-sampler", daemon=True
        )
        self._thread.start()
        ready.wait(10.0)
        return self.unavailable_reason is None

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5.0)
            self._thread = None

    def set_training(self, training: bool) -> None:
        """Only time spent training counts towards the low-utilisation warning; evaluation
        and checkpointing pause the count without resetting it."""
        self._training = training

    def metrics(self) -> dict[str, float]:
        """Mean utilisation since the last call and the latest memory, as ``gpu/*`` scalars."""
        with self._lock:
            latest, count, total = self._latest, self._util_count, self._util_sum
            self._util_sum, self._util_count = 0.0, 0
        if latest is None:
            return {}
        result = {"gpu/memory_used_gb": latest.memory_used_gb}
        if count:
            result["gpu/utilization_percent"] = total / count
        elif latest.utilization_percent is not None:
            result["gpu/utilization_percent"] = latest.utilization_percent
        if latest.power_w is not None:
            result["gpu/power_w"] = latest.power_w
        return result

    def summary(self) -> str:
        """``gpu 87% 12.3/80.0 GB`` for the epoch line; "" before the first reading."""
        with self._lock:
            latest = self._latest
        if latest is None:
            return ""
        util = format_optional(latest.utilization_percent, "{:.0f}%")
        return f"gpu {util} {latest.memory_used_gb:.1f}/{latest.memory_total_gb:.1f} GB"

    def take_warning(self) -> str | None:
        with self._lock:
            warning, self._warning = self._warning, None
        return warning

    def record(self, stats: GpuStats) -> None:
        """Fold one reading in (the thread calls this; tests may too)."""
        now = self._clock()
        with self._lock:
            elapsed = 0.0 if self._last_reading is None else now - self._last_reading
            self._last_reading = now
            self._latest = stats
            util = stats.utilization_percent
            if util is None:
                return
            self._util_sum += util
            self._util_count += 1
            if not self._training:
                return
            if util >= self.low_util_percent:
                self._low_s, self._low_sum, self._low_count = 0.0, 0.0, 0
                return
            self._low_s += elapsed
            self._low_sum += util
            self._low_count += 1
            if not self._warned and self._low_s >= self.low_util_s:
                self._warned = True
                self._warning = (
                    f"GPU {self.index} utilization has stayed under {self.low_util_percent:g}% "
                    f"for {self._low_s / 60:.1f} min of training (mean "
                    f"{self._low_sum / self._low_count:.0f}%): {LOW_UTIL_HINTS}"
                )

    def _run(self, ready: threading.Event) -> None:
        try:
            with nvml_session() as nvml:
                handle = dict(visible_handles(nvml)).get(self.index)
                if handle is None:
                    raise NvmlUnavailable(f"NVML sees no GPU {self.index}")
                ready.set()
                while not self._stop.is_set():
                    try:
                        self.record(stats_of(nvml, self.index, handle))
                    except Exception:  # a transient NVML error: skip this reading
                        pass
                    self._stop.wait(self.interval_s)
        except NvmlUnavailable as error:
            self.unavailable_reason = str(error)
        finally:
            ready.set()


class GpuSamplerGroup:
    """The GPUs one process drives (a model spread over them by ``device_map``), read like one.

    ``metrics()``: the mean utilisation and the total memory as the usual ``gpu/*`` scalars,
    and each GPU's as ``gpu<index>/*``; ``summary()`` lists each GPU; the low-utilisation
    warning comes from any of them.
    """

    def __init__(self, samplers: list[GpuSampler]) -> None:
        self.samplers = samplers

    def start(self) -> bool:
        started = [sampler.start() for sampler in self.samplers]
        return all(started)

    @property
    def unavailable_reason(self) -> str | None:
        reasons = [s.unavailable_reason for s in self.samplers if s.unavailable_reason]
        return reasons[0] if reasons else None

    def stop(self) -> None:
        for sampler in self.samplers:
            sampler.stop()

    def set_training(self, training: bool) -> None:
        for sampler in self.samplers:
            sampler.set_training(training)

    def metrics(self) -> dict[str, float]:
        result: dict[str, float] = {}
        utils: list[float] = []
        memory = 0.0
        for sampler in self.samplers:
            own = sampler.metrics()
            for key, value in own.items():
                result[key.replace("gpu/", f"gpu{sampler.index}/", 1)] = value
            if "gpu/utilization_percent" in own:
                utils.append(own["gpu/utilization_percent"])
            memory += own.get("gpu/memory_used_gb", 0.0)
        if utils:
            result["gpu/utilization_percent"] = sum(utils) / len(utils)
        if result:
            result["gpu/memory_used_gb"] = memory
        return result

    def summary(self) -> str:
        parts = [f"{s.index}: {s.summary()}" for s in self.samplers if s.summary()]
        return " | ".join(parts)

    def take_warning(self) -> str | None:
        warnings = [w for w in (s.take_warning() for s in self.samplers) if w]
        return warnings[0] if warnings else None
