"""Which GPUs this machine has, and whether they are good enough to start an expensive job.

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

A later issue grows this module into the utilisation and cost monitor; keep the
dataclasses small and the functions pure where possible.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

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


def _detect_nvml() -> GpuInventory | None:
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:  # library missing or driver not loaded: not an NVIDIA box for NVML
        return None
    try:
        devices = []
        for index in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            name = pynvml.nvmlDeviceGetName(handle)
            name = name.decode() if isinstance(name, bytes) else name
            total = pynvml.nvmlDeviceGetMemoryInfo(handle).total
            devices.append(GpuDevice(index, name, total / BYTES_PER_GB))
        return GpuInventory(tuple(devices), "nvml")
    except Exception:
        return None
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:
            pass


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
    """GPUs visible to this process (honours ``CUDA_VISIBLE_DEVICES`` only via torch)."""
    return _detect_nvml() or _detect_torch() or GpuInventory()


def check_guardrail(
    inventory: GpuInventory, requirement: GpuRequirement | None = None
) -> GuardrailResult:
    """OK if any visible GPU meets ``requirement``; else a message naming what was found."""
    requirement = requirement or GpuRequirement()
    wanted = [name.lower() for name in requirement.names]
    for device in inventory.devices:
        name_ok = not wanted or any(name in device.name.lower() for name in wanted)
        if name_ok and device.memory_total_gb >= requirement.min_memory_gb:
            return GuardrailResult(
                True, f"GPU OK: {device.name} ({device.memory_total_gb:.1f} GB)", inventory
            )
    return GuardrailResult(
        False,
        f"refusing to start: found {inventory.describe()}, need {requirement.describe()}; "
        "pass --force to run anyway",
        inventory,
    )


def requirement_from(names: Sequence[str], min_memory_gb: float) -> GpuRequirement:
    """Build a requirement from config values (lists from YAML become tuples)."""
    return GpuRequirement(tuple(str(name) for name in names), float(min_memory_gb))
