"""Reading NVIDIA GPUs through NVML: which ones this process may use, and how busy they are.

NVML (nvidia-ml-py) reads cost no GPU memory and need no CUDA context, and it is the only
source of utilisation (torch cannot see it). Without an NVIDIA driver or the library,
``nvml_session`` raises ``NvmlUnavailable`` with one line saying which: callers say so once
and carry on, since training never depends on these readings.

Memory is in decimal gigabytes (1e9 bytes), as cards are sold (see ``src.telemetry.gpus``).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

BYTES_PER_GB = 1e9


class NvmlUnavailable(RuntimeError):
    """No NVIDIA driver or NVML library here; the message says which."""


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


def nvml_text(value: str | bytes) -> str:
    """Older nvidia-ml-py versions answer bytes where newer ones answer str."""
    return value.decode() if isinstance(value, bytes) else value


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
    """(CUDA index, NVML handle) of the GPUs this process can use, in CUDA's order.

    NVML sees every card; the visible ones are numbered 0..n-1, as CUDA and torch do.
    """
    handles = [nvml.nvmlDeviceGetHandleByIndex(i) for i in range(nvml.nvmlDeviceGetCount())]
    physical = [(i, nvml_text(nvml.nvmlDeviceGetUUID(h))) for i, h in enumerate(handles)]
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
        name=nvml_text(nvml.nvmlDeviceGetName(handle)),
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


def format_optional(value: float | None, template: str) -> str:
    """``template`` filled with ``value``, or ``n/a`` where the card does not report it."""
    return "n/a" if value is None else template.format(value)
