"""Stand-in for nvidia-ml-py's ``pynvml`` module (no NVIDIA driver on the test machines).

Put this folder first on ``sys.path`` / PYTHONPATH. Every call reads the JSON file named by
``FAKE_NVML_STATE``, so a test switches phases (busy, idle, no driver) by rewriting it,
even for a subprocess. Only what src/telemetry/ calls is here, with NVML's shapes:
bytes names (old bindings), memory in bytes, power in milliwatts, NotSupported errors.

    {"no_driver": false, "gpus": [{"name": "NVIDIA H100 80GB HBM3", "uuid": "GPU-aaaa",
      "total": 85e9, "used": 1e9, "util": 97, "temp": 61, "power_mw": 310000, "procs": [4242]}]}
"""

from __future__ import annotations

import json
import os
from types import SimpleNamespace

NVML_TEMPERATURE_GPU = 0


class NVMLError(Exception):
    pass


class NVMLError_NotSupported(NVMLError):  # noqa: N801 - the real module's name
    pass


def _state() -> dict:
    with open(os.environ["FAKE_NVML_STATE"]) as handle:
        return json.load(handle)


def _gpu(handle: int) -> dict:
    return _state()["gpus"][handle]


def _maybe(handle: int, key: str):
    value = _gpu(handle).get(key)
    if value is None:
        raise NVMLError_NotSupported("Not Supported")
    return value


def nvmlInit() -> None:
    if _state().get("no_driver"):
        raise NVMLError("Driver Not Loaded")


def nvmlShutdown() -> None:
    pass


def nvmlDeviceGetCount() -> int:
    return len(_state()["gpus"])


def nvmlDeviceGetHandleByIndex(index: int) -> int:
    return index


def nvmlDeviceGetName(handle: int) -> bytes:
    return _gpu(handle)["name"].encode()


def nvmlDeviceGetUUID(handle: int) -> str:
    return _gpu(handle)["uuid"]


def nvmlDeviceGetMemoryInfo(handle: int) -> SimpleNamespace:
    gpu = _gpu(handle)
    return SimpleNamespace(total=int(gpu["total"]), used=int(gpu["used"]), free=0)


def nvmlDeviceGetUtilizationRates(handle: int) -> SimpleNamespace:
    return SimpleNamespace(gpu=_maybe(handle, "util"), memory=0)


def nvmlDeviceGetTemperature(handle: int, sensor: int) -> int:
    return _maybe(handle, "temp")


def nvmlDeviceGetPowerUsage(handle: int) -> int:
    return _maybe(handle, "power_mw")


def nvmlDeviceGetComputeRunningProcesses(handle: int) -> list:
    return [SimpleNamespace(pid=pid, usedGpuMemory=None) for pid in _gpu(handle).get("procs", [])]
