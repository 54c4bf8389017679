"""GPU detection, the guardrail, utilisation and cost: real detection on this machine, a stand-in
NVML module for the cards this machine does not have."""

from __future__ import annotations

import io
import sys
import time
import types
from pathlib import Path

import pytest
import torch

from src.utils.gpu_monitor import (
    GpuDevice,
    GpuInventory,
    GpuRequirement,
    GpuSampler,
    check_guardrail,
    cuda_index,
    detect_gpus,
    get_instance_cost,
    print_gpu_status,
    requirement_from,
    visible_indices,
)
from tests.support.nvml_state import FAKE_NVML_DIR, gpu, write_state

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


# ----- utilisation, the table, the sampler, cost (through the stand-in pynvml module) -----


@pytest.fixture
def nvml(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The stand-in pynvml module importable as ``pynvml``; returns its state file."""
    state = tmp_path / "nvml.json"
    write_state(state, [gpu()])
    monkeypatch.setenv("FAKE_NVML_STATE", str(state))
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.syspath_prepend(str(FAKE_NVML_DIR))
    monkeypatch.delitem(sys.modules, "pynvml", raising=False)
    return state


def test_print_gpu_status_table_reads_every_field(nvml: Path) -> None:
    write_state(
        nvml,
        [
            gpu(97, (11, 12), used=61.2e9, temp=71, power_mw=612_000),
            gpu(
                None,
                name="NVIDIA GeForce RTX 4090",
                uuid="GPU-bbbb",
                total=25.4e9,
                temp=None,
                power_mw=None,
            ),
        ],
    )
    out = io.StringIO()
    readings = print_gpu_status(file=out)
    text = out.getvalue()
    assert [r.name for r in readings] == ["NVIDIA H100 80GB HBM3", "NVIDIA GeForce RTX 4090"]
    first = readings[0]
    assert (first.utilization_percent, first.temperature_c, first.power_w) == (97, 71, 612.0)
    assert first.compute_processes == 2 and first.memory_used_gb == pytest.approx(61.2)
    for cell in ("97 %", "61.2 / 85.0 GB", "71 C", "612 W", "RTX 4090", "n/a"):
        assert cell in text, (cell, text)
    assert readings[1].utilization_percent is None  # NotSupported: shown, never raised


def test_print_gpu_status_follows_cuda_visible_devices(
    nvml: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_state(nvml, [gpu(10), gpu(80, name="NVIDIA A100-SXM4-80GB", uuid="GPU-bbbb")])
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    readings = print_gpu_status(file=io.StringIO())
    assert [(r.index, r.name, r.utilization_percent) for r in readings] == [
        (0, "NVIDIA A100-SXM4-80GB", 80)
    ]


def test_print_gpu_status_without_a_driver_is_one_line(nvml: Path) -> None:
    write_state(nvml, [], no_driver=True)
    out = io.StringIO()
    assert print_gpu_status(file=out) == []
    assert out.getvalue().count("\n") == 1 and "Driver Not Loaded" in out.getvalue()


def test_print_gpu_status_on_this_machine_never_raises() -> None:
    out = io.StringIO()
    readings = print_gpu_status(file=out)  # the real pynvml: no driver here, a table on a GPU box
    assert out.getvalue().strip()
    assert len(readings) == (torch.cuda.device_count() if torch.cuda.is_available() else 0)


def test_sampler_averages_and_warns_once_about_low_utilization(nvml: Path) -> None:
    write_state(nvml, [gpu(90, used=30e9)])
    sampler = GpuSampler(0, interval_s=0.01, low_util_percent=30, low_util_s=0.3)
    assert sampler.start(), sampler.unavailable_reason
    try:
        sampler.set_training(True)
        time.sleep(0.2)
        metrics = sampler.metrics()
        assert metrics["gpu/utilization_percent"] == 90
        assert metrics["gpu/memory_used_gb"] == pytest.approx(30.0)
        assert sampler.summary() == "gpu 90% 30.0/85.0 GB"
        write_state(nvml, [gpu(12)])  # the data loader starves the GPU
        time.sleep(0.15)
        assert sampler.take_warning() is None  # not for long enough yet
        time.sleep(0.5)
        warning = sampler.take_warning()
        assert warning is not None and "under 30%" in warning and "data.num_workers" in warning
        assert "mean 12%" in warning and "trainer.precision=bf16" in warning
        time.sleep(0.5)
        assert sampler.take_warning() is None  # once per run, not once per sample
    finally:
        sampler.stop()


def test_sampler_ignores_low_utilization_outside_training(nvml: Path) -> None:
    write_state(nvml, [gpu(0)])
    sampler = GpuSampler(0, interval_s=0.01, low_util_percent=30, low_util_s=0.1)
    assert sampler.start()
    try:
        sampler.set_training(False)  # evaluating, checkpointing
        time.sleep(0.3)
        assert sampler.take_warning() is None
        sampler.set_training(True)
        time.sleep(0.05)
        write_state(nvml, [gpu(95)])  # busy again before the window closed: no warning
        time.sleep(0.3)
        assert sampler.take_warning() is None
    finally:
        sampler.stop()


def test_sampler_without_a_driver_says_why(nvml: Path) -> None:
    write_state(nvml, [], no_driver=True)
    sampler = GpuSampler(0, interval_s=0.01)
    assert not sampler.start()
    assert "Driver Not Loaded" in (sampler.unavailable_reason or "")
    assert sampler.metrics() == {} and sampler.summary() == ""


def test_get_instance_cost() -> None:
    assert get_instance_cost(hourly_rate=0.5, runtime_hours=10) == {
        "hourly_rate_usd": 0.5,
        "runtime_hours": 10.0,
        "total_cost_usd": 5.0,
    }
    assert get_instance_cost(2.4, 0.25)["total_cost_usd"] == pytest.approx(0.6)
    with pytest.raises(ValueError, match="must be >= 0"):
        get_instance_cost(-1, 1)
