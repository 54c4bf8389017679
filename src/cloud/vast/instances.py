"""What `status` shows about an instance, computed from API fields that may be missing or null.

Every field of the instance JSON is optional in practice (``actual_status`` is null while
provisioning, ``ports`` exists only while running, the port is a string), so each accessor
here tolerates absence instead of crashing the whole table for one odd instance.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from src.cloud.machines import SshAddress, format_duration

INACTIVE_STATUSES = {"stopped", "exited", "offline"}


def _int_or_none(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _float_or_none(value: Any) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def ssh_addresses(instance: dict[str, Any]) -> list[SshAddress]:
    """Direct address first when port 22 is mapped, then the proxy; empty while provisioning."""
    addresses: list[SshAddress] = []
    ports = instance.get("ports") if isinstance(instance.get("ports"), dict) else {}
    mappings = ports.get("22/tcp") or []
    host_port = None
    if isinstance(mappings, list) and mappings and isinstance(mappings[0], dict):
        host_port = _int_or_none(mappings[0].get("HostPort"))
    public_ip = str(instance.get("public_ipaddr") or "").strip()
    if public_ip and host_port:
        addresses.append(SshAddress("direct", public_ip, host_port))
    proxy_host = str(instance.get("ssh_host") or "").strip()
    proxy_port = _int_or_none(instance.get("ssh_port"))
    if proxy_host and proxy_port:
        addresses.append(SshAddress("proxy", proxy_host, proxy_port))
    return addresses


def find_instance_by_address(
    instances: Iterable[dict[str, Any]], hostname: str, port: int
) -> dict[str, Any] | None:
    """The instance reachable over SSH at ``hostname:port`` (direct or proxy), or None.

    How a tool that was only given an SSH host (remote_train) finds the instance to price,
    stop or destroy."""
    for instance in instances:
        if any(a.host == hostname and a.port == int(port) for a in ssh_addresses(instance)):
            return instance
    return None


def status_of(instance: dict[str, Any]) -> str:
    actual = instance.get("actual_status")
    if actual:
        return str(actual)
    intended = instance.get("intended_status")
    return "provisioning" if intended in (None, "running") else f"-> {intended}"


def is_active(instance: dict[str, Any]) -> bool:
    """False for stopped/exited ones: `status` hides those unless --all (they still bill disk)."""
    return status_of(instance) not in INACTIVE_STATUSES and instance.get("intended_status") != (
        "stopped"
    )


@dataclass
class InstanceView:
    """One row of `status`: everything already computed, so the table and --json agree."""

    id: int | None
    label: str
    status: str
    gpu: str
    dph_total: float | None
    uptime_s: float | None
    cost_so_far_usd: float | None
    is_bid: bool
    ssh: list[SshAddress] = field(default_factory=list)
    status_msg: str = ""
    active: bool = True  # False: stopped/exited/offline, so no SSH command to copy

    def ssh_commands(self) -> list[str]:
        return [address.command() for address in self.ssh]

    def table_row(self) -> list[str]:
        price = "-" if self.dph_total is None else f"{self.dph_total:.3f}"
        if self.is_bid and self.dph_total is not None:
            price += " (bid)"
        cost = "-" if self.cost_so_far_usd is None else f"${self.cost_so_far_usd:.2f}"
        ssh = "\n".join(f"{a.kind}: {a.command()}" for a in self.ssh) or "-"
        if not self.active:
            ssh = "(not running)"
        return [
            "-" if self.id is None else str(self.id),
            self.label or "-",
            self.status,
            self.gpu,
            price,
            format_duration(self.uptime_s),
            cost,
            ssh,
        ]

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "label": self.label,
            "status": self.status,
            "gpu": self.gpu,
            "dph_total": self.dph_total,
            "is_bid": self.is_bid,
            "uptime_s": self.uptime_s,
            "cost_so_far_usd": self.cost_so_far_usd,
            "ssh": [
                {"kind": a.kind, "host": a.host, "port": a.port, "user": a.user, "command": c}
                for a, c in zip(self.ssh, self.ssh_commands(), strict=True)
            ],
            "status_msg": self.status_msg,
        }


TABLE_COLUMNS = ["id", "label", "status", "GPU", "$/h", "uptime", "cost so far", "SSH"]


def view_of(instance: dict[str, Any], now: float | None = None) -> InstanceView:
    """Build the row; uptime and cost count from ``start_date`` (epoch s) at ``dph_total``."""
    now = time.time() if now is None else now
    start = _float_or_none(instance.get("start_date"))
    uptime = max(0.0, now - start) if start else None
    dph = _float_or_none(instance.get("dph_total"))
    cost = dph * uptime / 3600 if dph is not None and uptime is not None else None
    count = _int_or_none(instance.get("num_gpus"))
    gpu_name = str(instance.get("gpu_name") or "?")
    return InstanceView(
        id=_int_or_none(instance.get("id")),
        label=str(instance.get("label") or ""),
        status=status_of(instance),
        gpu=f"{gpu_name} x {count}" if count else gpu_name,
        dph_total=dph,
        uptime_s=uptime,
        cost_so_far_usd=cost,
        is_bid=bool(instance.get("is_bid")),
        # A stopped instance keeps its last address, but nothing answers there.
        ssh=ssh_addresses(instance) if is_active(instance) else [],
        status_msg=str(instance.get("status_msg") or "").strip(),
        active=is_active(instance),
    )
