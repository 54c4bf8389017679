"""What a run costs: the arithmetic, and how long this process has been billed for.

Where the $/h comes from (the config, or the provider of this machine) is decided above
telemetry, in ``src.utils.gpu_monitor.hourly_rate``: measuring never asks a cloud API.
"""

from __future__ import annotations

import os
from pathlib import Path


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
