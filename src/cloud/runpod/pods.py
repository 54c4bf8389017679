"""What `status` shows about a pod, from API fields that may be missing, null or strings.

A pod's SSH address over exposed TCP is its ``publicIp`` plus the public port that
``portMappings`` maps to 22 (``{"22": 10341}``): present only while the pod runs, on a
machine with a public IP, and when ``22/tcp`` was among the pod's ports.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from src.cloud.machines import SshAddress, format_duration

ACTIVE_STATUS = "RUNNING"
# Only /workspace (the volume) survives a stop; the container disk is reset.
STOP_WARNING = (
    "the container disk is lost when a pod stops: only the volume (/workspace) is kept, "
    "and it keeps billing as storage"
)
TABLE_COLUMNS = ["id", "name", "status", "GPU", "$/h", "uptime", "cost so far", "volume", "SSH"]


def _float(value: Any) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _int(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def status_of(pod: dict[str, Any]) -> str:
    return str(pod.get("desiredStatus") or "unknown").upper()


def is_active(pod: dict[str, Any]) -> bool:
    return status_of(pod) == ACTIVE_STATUS


def hourly_rate_of(pod: dict[str, Any]) -> float | None:
    """$/h: ``adjustedCostPerHr`` (savings plans applied) when given, else ``costPerHr``."""
    adjusted = _float(pod.get("adjustedCostPerHr"))
    if adjusted is not None and adjusted > 0:
        return adjusted
    return _float(pod.get("costPerHr"))


def ssh_address(pod: dict[str, Any]) -> SshAddress | None:
    """Public IP + the port mapped to 22, or None (not running, no public IP, 22 not exposed)."""
    mappings = pod.get("portMappings") if isinstance(pod.get("portMappings"), dict) else {}
    port = _int(mappings.get("22"))
    host = str(pod.get("publicIp") or "").strip()
    if not host or not port:
        return None
    return SshAddress("direct", host, port)


def gpu_of(pod: dict[str, Any]) -> str:
    gpu = pod.get("gpu") if isinstance(pod.get("gpu"), dict) else {}
    machine = pod.get("machine") if isinstance(pod.get("machine"), dict) else {}
    name = (
        gpu.get("displayName")
        or machine.get("gpuDisplayName")
        or gpu.get("id")
        or pod.get("gpuTypeId")
        or "?"
    )
    count = _int(gpu.get("count")) or _int(pod.get("gpuCount"))
    return f"{name} x {count}" if count else str(name)


def started_at(pod: dict[str, Any]) -> float | None:
    raw = str(pod.get("lastStartedAt") or "").strip()
    if not raw:
        return None
    try:
        return datetime.fromisoformat(raw.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def find_pod_by_address(pods: list[dict[str, Any]], hostname: str, port: int) -> dict | None:
    for pod in pods:
        address = ssh_address(pod)
        if address is not None and address.host == hostname and address.port == int(port):
            return pod
    return None


@dataclass
class PodView:
    """One row of `status`: computed once, so the table and --json agree."""

    id: str
    name: str
    status: str
    gpu: str
    hourly_usd: float | None
    uptime_s: float | None
    cost_so_far_usd: float | None
    volume_gb: int | None
    container_disk_gb: int | None
    interruptible: bool
    ssh: list[SshAddress] = field(default_factory=list)

    def table_row(self) -> list[str]:
        price = "-" if self.hourly_usd is None else f"{self.hourly_usd:.3f}"
        if self.interruptible and self.hourly_usd is not None:
            price += " (spot)"
        cost = "-" if self.cost_so_far_usd is None else f"${self.cost_so_far_usd:.2f}"
        volume = "-" if self.volume_gb is None else f"{self.volume_gb} GB"
        if self.status != ACTIVE_STATUS:
            ssh = "(not running)"
        else:
            ssh = "\n".join(a.command() for a in self.ssh) or "(no public SSH port)"
        return [
            self.id,
            self.name or "-",
            self.status,
            self.gpu,
            price,
            format_duration(self.uptime_s),
            cost,
            volume,
            ssh,
        ]

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "status": self.status,
            "gpu": self.gpu,
            "hourly_usd": self.hourly_usd,
            "uptime_s": self.uptime_s,
            "cost_so_far_usd": self.cost_so_far_usd,
            "volume_gb": self.volume_gb,
            "container_disk_gb": self.container_disk_gb,
            "interruptible": self.interruptible,
            "ssh": [{"host": a.host, "port": a.port, "command": a.command()} for a in self.ssh],
        }


def view_of(pod: dict[str, Any], now: float | None = None) -> PodView:
    """Uptime and cost count from ``lastStartedAt`` at the pod's $/h (this start only)."""
    now = time.time() if now is None else now
    active = is_active(pod)
    start = started_at(pod) if active else None
    uptime = max(0.0, now - start) if start is not None else None
    rate = hourly_rate_of(pod)
    cost = rate * uptime / 3600 if rate is not None and uptime is not None else None
    address = ssh_address(pod) if active else None
    return PodView(
        id=str(pod.get("id") or "-"),
        name=str(pod.get("name") or ""),
        status=status_of(pod),
        gpu=gpu_of(pod),
        hourly_usd=rate,
        uptime_s=uptime,
        cost_so_far_usd=cost,
        volume_gb=_int(pod.get("volumeInGb")),
        container_disk_gb=_int(pod.get("containerDiskInGb")),
        interruptible=bool(pod.get("interruptible")),
        ssh=[address] if address else [],
    )
