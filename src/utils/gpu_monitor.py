"""GPUs and cost, in one import for experiments and notebooks: which GPUs this machine has,
how busy they are, and what the machine costs.

The implementation lives in ``src.telemetry`` (``gpus``: detection, the guardrail, the status
table; ``nvml``: readings; ``sampler``: the training-time sampler thread; ``cost``). Only
``hourly_rate`` is written here: it is where measuring meets the cloud provider, and utils
sits above both.
"""

from __future__ import annotations

from src.cloud.registry import hourly_rate_here
from src.telemetry.cost import get_instance_cost, process_age_s
from src.telemetry.gpus import (
    DEFAULT_MIN_MEMORY_GB,
    DEFAULT_REQUIRED_NAMES,
    GpuDevice,
    GpuInventory,
    GpuRequirement,
    GuardrailResult,
    check_guardrail,
    cuda_index,
    detect_gpus,
    print_gpu_status,
    requirement_from,
)
from src.telemetry.nvml import (
    BYTES_PER_GB,
    GpuStats,
    NvmlUnavailable,
    nvml_session,
    read_gpu_stats,
    stats_of,
    visible_handles,
    visible_indices,
)
from src.telemetry.sampler import LOW_UTIL_HINTS, GpuSampler, GpuSamplerGroup

__all__ = [
    "BYTES_PER_GB",
    "DEFAULT_MIN_MEMORY_GB",
    "DEFAULT_REQUIRED_NAMES",
    "LOW_UTIL_HINTS",
    "GpuDevice",
    "GpuInventory",
    "GpuRequirement",
    "GpuSampler",
    "GpuSamplerGroup",
    "GpuStats",
    "GuardrailResult",
    "NvmlUnavailable",
    "check_guardrail",
    "cuda_index",
    "detect_gpus",
    "get_instance_cost",
    "hourly_rate",
    "nvml_session",
    "print_gpu_status",
    "process_age_s",
    "read_gpu_stats",
    "requirement_from",
    "stats_of",
    "visible_handles",
    "visible_indices",
]


def hourly_rate(configured: float | None) -> float | None:
    """$/h: ``configured`` if set, else what the provider of this machine bills for it (the
    Vast.ai instance's ``dph_total``), else None. Never raises; a failed lookup is one printed
    line. The trainer's only way to a price: it never imports a cloud client."""
    return hourly_rate_here(configured)
