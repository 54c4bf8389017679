"""GPU detection and the guardrail: real detection on this machine, rules on known cards."""

from __future__ import annotations

import pytest
import torch

from src.utils.gpu_monitor import (
    GpuDevice,
    GpuInventory,
    GpuRequirement,
    check_guardrail,
    detect_gpus,
    requirement_from,
)

A100_40 = GpuDevice(0, "NVIDIA A100-SXM4-40GB", 42.9)
A100_80 = GpuDevice(0, "NVIDIA A100-SXM4-80GB", 85.1)
RTX_4090 = GpuDevice(0, "NVIDIA GeForce RTX 4090", 25.4)


def test_detect_gpus_matches_torch_and_describes_itself() -> None:
    inventory = detect_gpus()
    assert inventory.count == (torch.cuda.device_count() if torch.cuda.is_available() else 0)
    if inventory.count == 0:
        assert inventory.describe() == "no GPU"
        assert inventory.source == "none"
        assert inventory.as_dict() == {"source": "none", "count": 0, "devices": []}
    else:
        assert all(device.memory_total_gb > 0 for device in inventory.devices)


def test_guardrail_refuses_without_gpu_and_says_how_to_override() -> None:
    result = check_guardrail(GpuInventory())
    assert not result.ok
    assert "found no GPU" in result.message and "--force" in result.message
    assert "A100" in result.message and "40 GB" in result.message


def test_guardrail_default_accepts_a100_40_and_80_gb() -> None:
    assert check_guardrail(GpuInventory((A100_40,), "nvml")).ok
    assert check_guardrail(GpuInventory((A100_80,), "torch")).ok


def test_guardrail_refuses_wrong_card_or_too_little_memory() -> None:
    small = check_guardrail(GpuInventory((RTX_4090,), "nvml"))
    assert not small.ok and "RTX 4090 (25.4 GB)" in small.message
    strict = check_guardrail(GpuInventory((A100_40,), "nvml"), GpuRequirement(("A100",), 80))
    assert not strict.ok and ">= 80 GB" in strict.message


def test_guardrail_is_configurable() -> None:
    requirement = requirement_from(["4090"], 24)
    assert requirement == GpuRequirement(("4090",), 24.0)
    assert check_guardrail(GpuInventory((RTX_4090,), "nvml"), requirement).ok
    # Any one matching GPU is enough on a mixed box.
    mixed = GpuInventory((RTX_4090, GpuDevice(1, A100_80.name, 85.1)), "nvml")
    assert check_guardrail(mixed).ok
    assert (
        mixed.describe()
        == "1 x NVIDIA GeForce RTX 4090 (25.4 GB), 1 x NVIDIA A100-SXM4-80GB (85.1 GB)"
    )


@pytest.mark.gpu
def test_detect_gpus_on_a_gpu_machine() -> None:
    inventory = detect_gpus()
    assert inventory.source in {"nvml", "torch"}
    assert inventory.devices[0].name == torch.cuda.get_device_name(0)
