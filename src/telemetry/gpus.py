"""Which GPUs this machine has, whether they are the ones the job needs, and a status table.

Detection asks NVML first (exact names and memory, no CUDA context, so it costs no GPU
memory) and falls back to ``torch.cuda`` where the NVML library is missing (some containers
ship CUDA without it). With neither, the answer is "no GPU", never an exception: callers
decide what a missing GPU means.

The guardrail exists because a rented box that turns out to be the wrong card wastes
money slowly: a 7B pair that needs 40 GB would crawl or die out-of-memory on a 24 GB
card hours into a sweep. Checking up front refuses in one line instead.

Memory is in decimal gigabytes (1e9 bytes), as cards are sold: an "A100 40GB" shows
42.9 GB in NVML and ~42.3 GB in torch (which hides a reserved slice), so ``>= 40`` holds
with either source, whereas 40 GiB would not hold under torch.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TextIO

from src.telemetry.nvml import (
    BYTES_PER_GB,
    GpuStats,
    NvmlUnavailable,
    format_optional,
    nvml_session,
    nvml_text,
    read_gpu_stats,
    visible_handles,
)

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


def _detect_nvml() -> GpuInventory | None:
    try:
        with nvml_session() as nvml:
            devices = [
                GpuDevice(
                    index,
                    nvml_text(nvml.nvmlDeviceGetName(handle)),
                    nvml.nvmlDeviceGetMemoryInfo(handle).total / BYTES_PER_GB,
                )
                for index, handle in visible_handles(nvml)
            ]
        return GpuInventory(tuple(devices), "nvml")
    except Exception:  # library missing or driver not loaded: not an NVIDIA box for NVML
        return None


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
            format_optional(gpu.utilization_percent, "{:.0f} %"),
            f"{gpu.memory_used_gb:.1f} / {gpu.memory_total_gb:.1f} GB",
            format_optional(gpu.temperature_c, "{:.0f} C"),
            format_optional(gpu.power_w, "{:.0f} W"),
            format_optional(gpu.compute_processes, "{}"),
        )
    console.print(table)
    return readings
