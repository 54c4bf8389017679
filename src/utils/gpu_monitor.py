"""Which GPUs this machine has, how busy they are, and what the machine costs.

Detection asks NVML first (nvidia-ml-py: exact names and memory, no CUDA context, so it
costs no GPU memory) and falls back to ``torch.cuda`` where the NVML library is missing
(some containers ship CUDA without it). With neither, the answer is "no GPU", never an
exception: callers decide what a missing GPU means.

The guardrail exists because a rented box that turns out to be the wrong card wastes
money slowly: a 7B pair that needs 40 GB would crawl or die out-of-memory on a 24 GB
card hours into a sweep. Checking up front refuses in one line instead.

Memory is in decimal gigabytes (1e9 bytes), as cards are sold: an "A100 40GB" shows
42.9 GB in NVML and ~42.3 GB in torch (which hides a reserved slice), so ``>= 40`` holds
with either source, whereas 40 GiB would not hold under torch.

Utilisation (``read_gpu_stats``, ``print_gpu_status``, ``GpuSampler``) comes from NVML only:
torch cannot see utilisation, and NVML reads cost no GPU memory. Without an NVIDIA driver
everything here says so once and carries on; training never depends on it.

Cost: ``get_instance_cost`` for a quick estimate; ``hourly_rate`` is how the trainer learns
the $/h (the configured value, else the Vast.ai instance's own price).
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

BYTES_PER_GB = 1e9
DEFAULT_REQUIRED_NAMES = ("A100", "H100", "H200")
DEFAULT_MIN_MEMORY_GB = 40.0


@dataclass(frozen=True)
class GpuDevice:
    index: int
    name: str
    memory_total_gb: float


@dataclass(frozen=True)
class GpuInventory:
    """What was found; ``source`` is ``nvml``, ``torch`` or ``none``."""

    devices: tuple[GpuDevice, ...] = ()
    source: str = "none"

    @property
    def count(self) -> int:
        return len(self.devices)

    def describe(self) -> str:
        """One human line: ``no GPU`` or ``2 x NVIDIA A100-SXM4-80GB (85.1 GB)``."""
        if not self.devices:
            return "no GPU"
        groups: dict[tuple[str, float], int] = {}
        for device in self.devices:
            key = (device.name, round(device.memory_total_gb, 1))
            groups[key] = groups.get(key, 0) + 1
        return ", ".join(f"{n} x {name} ({gb:.1f} GB)" for (name, gb), n in groups.items())

    def as_dict(self) -> dict[str, object]:
        return {
            "source": self.source,
            "count": self.count,
            "devices": [device.__dict__.copy() for device in self.devices],
        }


@dataclass(frozen=True)
class GpuRequirement:
    """Accept a GPU whose name contains any of ``names`` and has ``min_memory_gb``."""

    names: tuple[str, ...] = DEFAULT_REQUIRED_NAMES
    min_memory_gb: float = DEFAULT_MIN_MEMORY_GB

    def describe(self) -> str:
        return f"{' or '.join(self.names)} with >= {self.min_memory_gb:g} GB"


@dataclass(frozen=True)
class GuardrailResult:
    ok: bool
    message: str
    found: GpuInventory = field(default_factory=GpuInventory)


def visible_indices(physical: Sequence[tuple[int, str]], setting: str | None) -> list[int]:
    """Physical indices that ``CUDA_VISIBLE_DEVICES`` exposes, in CUDA's order.

    ``physical`` holds (index, UUID) pairs. The setting lists indices or UUIDs (or UUID
    prefixes); like CUDA, parsing stops at the first entry that matches nothing. Unset
    means every device.
    """
    if setting is None:
        return [index for index, _ in physical]
    chosen: list[int] = []
    for entry in (part.strip() for part in setting.split(",")):
        if entry.isdigit():
            match = next((index for index, _ in physical if index == int(entry)), None)
        else:
            match = next((i for i, uuid in physical if entry and uuid.startswith(entry)), None)
        if match is None or match in chosen:
            break
        chosen.append(match)
    return chosen


def _detect_nvml() -> GpuInventory | None:
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:  # library missing or driver not loaded: not an NVIDIA box for NVML
        return None
    try:
        handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
        physical = [(i, _text(pynvml.nvmlDeviceGetUUID(h))) for i, h in enumerate(handles)]
        # NVML sees every card; number the visible ones 0..n-1, as CUDA and torch do.
        visible = visible_indices(physical, os.environ.get("CUDA_VISIBLE_DEVICES"))
        devices = []
        for cuda_index, physical_index in enumerate(visible):
            handle = handles[physical_index]
            name = _text(pynvml.nvmlDeviceGetName(handle))
            total = pynvml.nvmlDeviceGetMemoryInfo(handle).total
            devices.append(GpuDevice(cuda_index, name, total / BYTES_PER_GB))
        return GpuInventory(tuple(devices), "nvml")
    except Exception:
        return None
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:
            pass


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _detect_torch() -> GpuInventory | None:
    try:
        import torch

        if not torch.cuda.is_available():
            return None
        devices = []
        for index in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(index)
            devices.append(GpuDevice(index, props.name, props.total_memory / BYTES_PER_GB))
        return GpuInventory(tuple(devices), "torch")
    except Exception:
        return None


def detect_gpus() -> GpuInventory:
    """GPUs visible to this process (``CUDA_VISIBLE_DEVICES`` honoured), numbered as CUDA does."""
    return _detect_nvml() or _detect_torch() or GpuInventory()


def cuda_index(device: str) -> int | None:
    """``cuda:N`` -> N, ``cuda`` -> 0, anything else (``cpu``) -> None."""
    if device == "cuda":
        return 0
    if device.startswith("cuda:") and device[5:].isdigit():
        return int(device[5:])
    return None


def check_guardrail(
    inventory: GpuInventory,
    requirement: GpuRequirement | None = None,
    device_index: int | None = None,
) -> GuardrailResult:
    """OK if the GPU the job will use meets ``requirement``; else a message naming what was found.

    ``device_index`` (the N of ``cuda:N``): only that GPU counts, so a big card elsewhere on
    the box cannot wave a job through onto a small one. None: any visible GPU will do.
    """
    requirement = requirement or GpuRequirement()
    wanted = [name.lower() for name in requirement.names]
    candidates = inventory.devices
    if device_index is not None:
        candidates = tuple(d for d in inventory.devices if d.index == device_index)
    for device in candidates:
        name_ok = not wanted or any(name in device.name.lower() for name in wanted)
        if name_ok and device.memory_total_gb >= requirement.min_memory_gb:
            return GuardrailResult(
                True, f"GPU OK: {device.name} ({device.memory_total_gb:.1f} GB)", inventory
            )
    found = inventory.describe()
    if device_index is not None and inventory.devices:
        chosen = candidates[0] if candidates else None
        which = f"{chosen.name} ({chosen.memory_total_gb:.1f} GB)" if chosen else "no such GPU"
        found = f"{which} as cuda:{device_index} (of {found})"
    return GuardrailResult(
        False,
        f"refusing to start: found {found}, need {requirement.describe()}; "
        "pass --force to run anyway",
        inventory,
    )


def requirement_from(names: Sequence[str], min_memory_gb: float) -> GpuRequirement:
    """Build a requirement from config values (lists from YAML become tuples)."""
    return GpuRequirement(tuple(str(name) for name in names), float(min_memory_gb))


# ----- utilisation ----------------------------------------------------------------------


@dataclass(frozen=True)
class GpuStats:
    """One reading of one GPU. None: this card or driver does not report it."""

    index: int  # as CUDA numbers it (CUDA_VISIBLE_DEVICES honoured)
    name: str
    utilization_percent: float | None
    memory_used_gb: float
    memory_total_gb: float
    temperature_c: float | None
    power_w: float | None
    compute_processes: int | None  # processes holding a CUDA context on it


class NvmlUnavailable(RuntimeError):
    """No NVIDIA driver or NVML library here; the message says which."""


@contextmanager
def nvml_session() -> Iterator[Any]:
    """``pynvml`` initialised for the duration; NvmlUnavailable when it cannot be."""
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception as error:  # ImportError, NVMLError_LibraryNotFound, DriverNotLoaded...
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise NvmlUnavailable(reason) from None
    try:
        yield pynvml
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:
            pass


def visible_handles(nvml: Any) -> list[tuple[int, Any]]:
    """(CUDA index, NVML handle) of the GPUs this process can use, in CUDA's order."""
    handles = [nvml.nvmlDeviceGetHandleByIndex(i) for i in range(nvml.nvmlDeviceGetCount())]
    physical = [(i, _text(nvml.nvmlDeviceGetUUID(h))) for i, h in enumerate(handles)]
    visible = visible_indices(physical, os.environ.get("CUDA_VISIBLE_DEVICES"))
    return [
        (cuda_index, handles[physical_index]) for cuda_index, physical_index in enumerate(visible)
    ]


def _optional(read: Callable[[], Any]) -> Any:
    try:
        return read()
    except Exception:  # NVMLError_NotSupported on some cards (power on consumer GPUs, ...)
        return None


def stats_of(nvml: Any, index: int, handle: Any) -> GpuStats:
    """Read one GPU through an initialised ``nvml`` module."""
    memory = nvml.nvmlDeviceGetMemoryInfo(handle)
    utilization = _optional(lambda: float(nvml.nvmlDeviceGetUtilizationRates(handle).gpu))
    temperature = _optional(
        lambda: float(nvml.nvmlDeviceGetTemperature(handle, nvml.NVML_TEMPERATURE_GPU))
    )
    power = _optional(lambda: nvml.nvmlDeviceGetPowerUsage(handle) / 1000.0)  # milliwatts
    processes = _optional(lambda: len(nvml.nvmlDeviceGetComputeRunningProcesses(handle)))
    return GpuStats(
        index=index,
        name=_text(nvml.nvmlDeviceGetName(handle)),
        utilization_percent=utilization,
        memory_used_gb=memory.used / BYTES_PER_GB,
        memory_total_gb=memory.total / BYTES_PER_GB,
        temperature_c=temperature,
        power_w=power,
        compute_processes=processes,
    )


def read_gpu_stats() -> list[GpuStats]:
    """Every visible GPU, read once. NvmlUnavailable without an NVIDIA driver."""
    with nvml_session() as nvml:
        return [stats_of(nvml, index, handle) for index, handle in visible_handles(nvml)]


def _fmt(value: float | None, template: str) -> str:
    return "n/a" if value is None else template.format(value)


def print_gpu_status(file: TextIO | None = None) -> list[GpuStats]:
    """Print a table (GPU, util %, memory used/total, temperature, power); return the readings.

    Without an NVIDIA driver: one line saying so, and an empty list.
    """
    from rich.console import Console
    from rich.table import Table

    stream = file or sys.stdout
    # A log file or pipe gets full rows; a terminal its own width.
    width = None if stream.isatty() else 200
    console = Console(file=stream, width=width, highlight=False, soft_wrap=True)
    try:
        readings = read_gpu_stats()
    except NvmlUnavailable as error:
        console.print(f"no NVIDIA GPU status: NVML is not available here ({error})")
        return []
    if not readings:
        console.print("no NVIDIA GPU visible to this process (check CUDA_VISIBLE_DEVICES)")
        return []
    table = Table("GPU", "name", "util", "memory used / total", "temp", "power", "procs")
    for gpu in readings:
        table.add_row(
            str(gpu.index),
            gpu.name,
            _fmt(gpu.utilization_percent, "{:.0f} %"),
            f"{gpu.memory_used_gb:.1f} / {gpu.memory_total_gb:.1f} GB",
            _fmt(gpu.temperature_c, "{:.0f} C"),
            _fmt(gpu.power_w, "{:.0f} W"),
            _fmt(gpu.compute_processes, "{}"),
        )
    console.print(table)
    return readings


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
        util = _fmt(latest.utilization_percent, "{:.0f}%")
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


# ----- cost -------------------------------------------------------------------------------


def get_instance_cost(hourly_rate: float, runtime_hours: float) -> dict[str, float]:
    """What ``runtime_hours`` on a machine billed at ``hourly_rate`` $/h costs."""
    if hourly_rate < 0 or runtime_hours < 0:
        raise ValueError(
            f"hourly_rate ({hourly_rate}) and runtime_hours ({runtime_hours}) must be >= 0"
        )
    return {
        "hourly_rate_usd": float(hourly_rate),
        "runtime_hours": float(runtime_hours),
        "total_cost_usd": float(hourly_rate) * float(runtime_hours),
    }


def hourly_rate(configured: float | None) -> float | None:
    """$/h: ``configured`` if set, else the Vast.ai instance's ``dph_total`` (src/vast/pricing.py),
    else None. Never raises; a failed lookup is one printed line."""
    if configured is not None:
        return float(configured)
    from src.vast.pricing import detect_hourly_rate

    return detect_hourly_rate(None)


def process_age_s() -> float:
    """Seconds since this process started (interpreter start-up and imports are billed too).

    Linux: from /proc; elsewhere 0, so the count starts when the trainer does.
    """
    try:
        start_ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return 0.0
