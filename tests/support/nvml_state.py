"""Drive tests/support/fake_nvml/pynvml.py: write the JSON state it reads on every call."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

FAKE_NVML_DIR = Path(__file__).with_name("fake_nvml")


def gpu(
    util: float | None = 0,
    procs: tuple[int, ...] = (),
    *,
    name: str = "NVIDIA H100 80GB HBM3",
    uuid: str = "GPU-aaaa-1111",
    total: float = 85.0e9,
    used: float = 1.0e9,
    temp: int | None = 40,
    power_mw: int | None = 70_000,
) -> dict[str, Any]:
    return {
        "name": name,
        "uuid": uuid,
        "total": total,
        "used": used,
        "util": util,
        "temp": temp,
        "power_mw": power_mw,
        "procs": list(procs),
    }


def write_state(path: Path, gpus: list[dict[str, Any]], no_driver: bool = False) -> None:
    """Atomic, so a reader in another process never sees half a file."""
    temp = path.with_suffix(".tmp")
    temp.write_text(json.dumps({"gpus": gpus, "no_driver": no_driver}))
    os.replace(temp, path)
