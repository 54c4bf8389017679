"""Vast.ai as a ``src.cloud.provider.Provider``: instances found by SSH address, priced,
stopped, and destroyed through the destroy gate.

An SSH host is only an address; instances are matched by it (the direct ``public_ipaddr`` +
mapped port 22, or the proxy ``ssh_host`` + ``ssh_port``). Each call opens its own short
client: a laptop run may hold the provider for hours of training between two calls.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

from src.cloud.provider import CredentialsMissing, Machine
from src.cloud.retry import RetryPolicy
from src.cloud.vast.client import KEY_ENV, URL_ENV, VastClient, find_api_key
from src.cloud.vast.environment import CONTAINER_KEY_ENV, instance_id_from_env
from src.cloud.vast.instances import find_instance_by_address, ssh_addresses, status_of
from src.storage.destroy_gate import GateResult, check_outputs_downloaded

LAUNCH_VAST = "python scripts/launch_vast.py"
# The account calls (find, stop, destroy) may wait; a cost lookup must not hold a run up.
ACCOUNT_RETRY = RetryPolicy(attempts=3, base_delay=0.5, max_delay=2.0)
RATE_RETRY = RetryPolicy(attempts=2, base_delay=0.5, max_delay=1.0)


def outputs_gate(
    instance: Mapping[str, Any],
    environ: Mapping[str, str] | None = None,
    remote_root: str | None = None,
) -> GateResult:
    """The destroy gate for one instance: its SSH addresses (direct and proxy) checked."""
    instance_id = instance.get("id")
    addresses = ssh_addresses(dict(instance))
    if not addresses:  # said here: only the instance knows its status
        return GateResult(
            False,
            f"instance {instance_id} has no SSH address (status {status_of(dict(instance))}), so "
            f"its outputs cannot be checked: start it and sync, or pass --force",
        )
    return check_outputs_downloaded(addresses, environ, remote_root, f"instance {instance_id}")


def machine_of(instance: Mapping[str, Any]) -> Machine:
    """The provider-neutral view of one instance's JSON."""
    rate = instance.get("dph_total")
    return Machine(
        provider=VastProvider.name,
        kind=VastProvider.machine_kind,
        id=str(instance.get("id")),
        gpu=f"{instance.get('gpu_name') or '?'} x {instance.get('num_gpus') or '?'}",
        hourly_rate_usd=None if rate is None else float(rate),
    )


# The host's own claims on an offer/instance that check_instance measures against.
OFFER_CLAIMS = ("num_gpus", "pcie_bw", "disk_bw", "inet_down", "inet_up", "dlperf")


class VastProvider:
    """One Vast.ai account (an API key), on the laptop or on one of its instances."""

    name = "Vast.ai"
    machine_kind = "instance"

    def __init__(
        self,
        api_key: str,
        base_url: str | None = None,
        this_machine_id: str | None = None,
        timeout_s: float = 20.0,
    ) -> None:
        self._api_key = api_key
        self._base_url = base_url
        self.this_machine_id = this_machine_id
        self.timeout_s = timeout_s

    @classmethod
    def from_settings(cls, settings: Mapping[str, str]) -> VastProvider | None:
        """The account whose key the settings (environment and .env) hold; None without one,
        since not every SSH host is on Vast.ai."""
        key = find_api_key(settings)
        if not key:
            return None
        return cls(key, settings.get(URL_ENV) or None)

    @classmethod
    def of_this_machine(
        cls, environ: Mapping[str, str] | None = None, timeout_s: float = 20.0
    ) -> VastProvider | None:
        """The account that rents this machine; None off Vast.ai; CredentialsMissing on an
        instance with no key (neither the user's nor the one Vast.ai injects)."""
        environ = os.environ if environ is None else environ
        instance_id = instance_id_from_env(environ)
        if instance_id is None:
            return None
        key = find_api_key(environ) or (environ.get(CONTAINER_KEY_ENV) or "").strip()
        if not key:
            raise CredentialsMissing(
                f"on Vast.ai instance {instance_id} but no API key "
                f"({KEY_ENV} in .env or the environment)"
            )
        return cls(key, environ.get(URL_ENV) or None, str(instance_id), timeout_s)

    def _client(self, retry: RetryPolicy = ACCOUNT_RETRY) -> VastClient:
        return VastClient(self._api_key, self._base_url, timeout=self.timeout_s, retry=retry)

    def open_client(self, retry: RetryPolicy = ACCOUNT_RETRY) -> VastClient:
        """A client on this account (``src.cloud.vast.renting`` rents through it)."""
        return self._client(retry)

    def machine_at(self, hostname: str, port: int) -> Machine | None:
        with self._client() as client:
            instance = find_instance_by_address(client.iter_instances(), hostname, port)
        if instance is None or instance.get("id") is None:
            return None
        return machine_of(instance)

    def machine(self, machine_id: str) -> Machine:
        with self._client() as client:
            return machine_of(client.get_instance(int(machine_id)))

    def hourly_rate(self, machine_id: str) -> float | None:
        with self._client(RATE_RETRY) as client:
            rate = client.get_instance(int(machine_id)).get("dph_total")
        return None if rate is None else float(rate)

    def claims(self, machine_id: str) -> dict[str, float | str]:
        with self._client(RATE_RETRY) as client:
            instance = client.get_instance(int(machine_id))
        found: dict[str, float | str] = {
            key: float(instance[key])
            for key in OFFER_CLAIMS
            if isinstance(instance.get(key), int | float)
        }
        if instance.get("gpu_name"):
            found["gpu_name"] = str(instance["gpu_name"])
        return found

    def stop(self, machine_id: str) -> None:
        """PUT state=stopped: the GPU is released, the disk is kept. Never a DELETE."""
        with self._client() as client:
            client.set_state(int(machine_id), "stopped")

    def destroy(
        self,
        machine_id: str,
        remote_roots: Sequence[str],
        environ: Mapping[str, str] | None = None,
    ) -> GateResult:
        with self._client() as client:
            instance = client.get_instance(int(machine_id))
            gate = GateResult(True, "no outputs root to check")
            for root in remote_roots:
                gate = outputs_gate(instance, environ, remote_root=root)
                if not gate.allowed:
                    return gate
            client.destroy_instance(int(machine_id))
        return gate

    def hand_command(self, action: str, machine_id: str | None = None) -> str:
        return f"{LAUNCH_VAST} {action}" + ("" if machine_id is None else f" {machine_id}")
