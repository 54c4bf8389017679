"""The Vast.ai instance behind an SSH address: what it costs, stopping it, and destroying it
through the destroy gate once the outputs are verified home.

An SSH host is only an address; Vast.ai instances are matched by it (the direct
``public_ipaddr`` + mapped port 22, or the proxy ``ssh_host`` + ``ssh_port``), so any host
that is not one of yours simply has no instance and nothing is stopped or destroyed.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from src.remote.stages import StageError
from src.vast.client import RetryPolicy, VastClient, VastError, find_api_key
from src.vast.destroy_gate import check_outputs_downloaded
from src.vast.instances import find_instance_by_address

LAUNCH_VAST = "python scripts/launch_vast.py"


def vast_client(settings: Mapping[str, str]) -> VastClient | None:
    """A client when an API key is configured, else None (not every host is on Vast.ai)."""
    key = find_api_key(settings)
    if not key:
        return None
    retry = RetryPolicy(attempts=3, base_delay=0.5, max_delay=2.0)
    return VastClient(key, settings.get("VAST_URL") or None, timeout=20.0, retry=retry)


def instance_for(client: VastClient, hostname: str, port: int) -> dict[str, Any] | None:
    """Your instance whose SSH address is ``hostname:port``, or None."""
    return find_instance_by_address(client.iter_instances(), hostname, port)


def require_instance(
    settings: Mapping[str, str], hostname: str, port: int, flag: str
) -> tuple[VastClient, int]:
    """For --stop-after/--destroy-after, checked before any training: (client, instance id)."""
    client = vast_client(settings)
    if client is None:
        raise StageError(
            "connect",
            f"{flag} needs a Vast.ai API key (VASTAI_API_KEY in the environment or .env); "
            "set it, or leave the flag out",
        )
    try:
        instance = instance_for(client, hostname, port)
    except VastError as error:
        client.close()
        raise StageError("connect", f"{flag}: {error}") from None
    if instance is None or instance.get("id") is None:
        client.close()
        raise StageError(
            "connect",
            f"{flag}: none of your Vast.ai instances has the SSH address {hostname}:{port}; "
            f"check the host ({LAUNCH_VAST} status), or leave the flag out",
        )
    return client, int(instance["id"])


def price_line(settings: Mapping[str, str], hostname: str, port: int) -> str | None:
    """'instance 101 (...) costs $0.80/h ...' for a Vast.ai host; None for any other host."""
    client = vast_client(settings)
    if client is None:
        return None
    try:
        with client:
            instance = instance_for(client, hostname, port)
    except VastError as error:
        return f"could not look up the Vast.ai instance behind {hostname}:{port} ({error})"
    if instance is None:
        return None
    instance_id, rate = instance.get("id"), instance.get("dph_total")
    gpu = f"{instance.get('gpu_name') or '?'} x {instance.get('num_gpus') or '?'}"
    cost = f"${float(rate):.3f}/h" if rate is not None else "an unknown $/h"
    return (
        f"instance {instance_id} ({gpu}) still runs and costs {cost}: stop it with "
        f"{LAUNCH_VAST} stop {instance_id} (or pass --stop-after / --destroy-after next time)"
    )


def shut_down(
    client: VastClient,
    instance_id: int,
    action: str,
    output_roots: list[str],
    settings: Mapping[str, str],
) -> str:
    """Stop, or destroy once the gate agrees for every outputs root; one line saying what."""
    try:
        if action == "stop":
            client.set_state(instance_id, "stopped")
            return f"stopped instance {instance_id}: the GPU is released, the disk keeps billing"
        instance = client.get_instance(instance_id)
        for root in output_roots:
            gate = check_outputs_downloaded(instance, settings, remote_root=root)
            if not gate.allowed:
                reason = f"not destroying instance {instance_id}: {gate.reason}"
                raise StageError("shutdown", reason)
        client.destroy_instance(instance_id)
    except VastError as error:
        raise StageError("shutdown", str(error)) from None
    return f"destroyed instance {instance_id} (outputs verified: {', '.join(output_roots)})"
