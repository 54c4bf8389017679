"""GPU detection and the guardrail: real detection on this machine, rules on known cards."""

from __future__ import annotations

import sys
import types

import pytest
import torch

from src.utils.gpu_monitor import (
    GpuDevice,
    GpuInventory,
    GpuRequirement,
    check_guardrail,
    cuda_index,
    detect_gpus,
    requirement_from,
    visible_indices,
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


def test_guardrail_checks_the_gpu_the_job_will_use() -> None:
    mixed = GpuInventory((RTX_4090, GpuDevice(1, A100_80.name, 85.1)), "nvml")
    assert check_guardrail(mixed, device_index=1).ok
    refused = check_guardrail(mixed, device_index=0)  # a big card elsewhere does not count
    assert not refused.ok
    assert "found NVIDIA GeForce RTX 4090 (25.4 GB) as cuda:0 (of 1 x" in refused.message
    assert "no such GPU as cuda:5" in check_guardrail(mixed, device_index=5).message
    assert [cuda_index(d) for d in ("cuda", "cuda:3", "cpu")] == [0, 3, None]


def test_visible_indices_follow_cuda_visible_devices() -> None:
    physical = [(0, "GPU-aaaa-1111"), (1, "GPU-bbbb-2222"), (2, "GPU-cccc-3333")]
    assert visible_indices(physical, None) == [0, 1, 2]
    assert visible_indices(physical, "2,0") == [2, 0]
    assert visible_indices(physical, "GPU-bbbb,0") == [1, 0]  # UUID prefixes, as CUDA takes
    assert visible_indices(physical, "1,7,2") == [1]  # CUDA stops at the first invalid entry
    assert visible_indices(physical, "") == [] and visible_indices(physical, "-1") == []


def fake_pynvml(cards: list[tuple[bytes | str, int, str]], init_error: bool = False):
    """Stand-in for the NVML bindings (no NVIDIA driver here): names, memory bytes, UUIDs."""

    def init() -> None:
        if init_error:
            raise RuntimeError("NVML Shared Library Not Found")

    return types.SimpleNamespace(
        nvmlInit=init,
        nvmlShutdown=lambda: None,
        nvmlDeviceGetCount=lambda: len(cards),
        nvmlDeviceGetHandleByIndex=lambda i: i,
        nvmlDeviceGetName=lambda h: cards[h][0],
        nvmlDeviceGetMemoryInfo=lambda h: types.SimpleNamespace(total=cards[h][1]),
        nvmlDeviceGetUUID=lambda h: cards[h][2],
    )


def test_nvml_names_memory_and_visible_devices(monkeypatch: pytest.MonkeyPatch) -> None:
    cards = [
        (b"NVIDIA GeForce RTX 4090", 25_393_692_672, "GPU-aaaa"),  # old bindings return bytes
        ("NVIDIA A100-SXM4-80GB", 85_899_345_920, "GPU-bbbb"),
    ]
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml(cards))
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    found = detect_gpus()
    assert found.source == "nvml"
    assert [(d.index, d.name) for d in found.devices] == [
        (0, "NVIDIA GeForce RTX 4090"),
        (1, "NVIDIA A100-SXM4-80GB"),
    ]
    assert found.devices[1].memory_total_gb == pytest.approx(85.9, abs=0.01)  # decimal GB
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    only = detect_gpus()
    assert [(d.index, d.name) for d in only.devices] == [(0, "NVIDIA A100-SXM4-80GB")]


def test_nvml_failure_falls_back_to_torch_then_to_no_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml([], init_error=True))
    found = detect_gpus()
    if torch.cuda.is_available():
        assert found.source == "torch" and found.count == torch.cuda.device_count()
    else:
        assert found == GpuInventory()


@pytest.mark.gpu
def test_detect_gpus_on_a_gpu_machine() -> None:
    inventory = detect_gpus()
    assert inventory.source in {"nvml", "torch"}
    assert inventory.devices[0].name == torch.cuda.get_device_name(0)
