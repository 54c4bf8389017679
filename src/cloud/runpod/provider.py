"""RunPod as a ``src.cloud.provider.Provider``: pods found by SSH address, priced, stopped,
and terminated only through the destroy gate.

Inside a pod RunPod sets ``RUNPOD_POD_ID`` (and injects a pod-scoped ``RUNPOD_API_KEY``), so
the trainer's hourly rate and autostop find the pod without configuration. Each call opens
its own short client: a laptop run may hold the provider for hours between two calls.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from src.cloud.provider import CredentialsMissing, Machine
from src.cloud.retry import RetryPolicy
from src.cloud.runpod.client import (
    GRAPHQL_URL_ENV,
    KEY_ENV,
    URL_ENV,
    RunPodClient,
    find_api_key,
)
from src.cloud.runpod.pods import (
    STOP_WARNING,
    find_pod_by_address,
    gpu_of,
    hourly_rate_of,
    ssh_address,
    status_of,
)
from src.storage.destroy_gate import GateResult, check_outputs_downloaded

POD_ID_ENV = "RUNPOD_POD_ID"
LAUNCH = "python scripts/launch.py --provider runpod"
ACCOUNT_RETRY = RetryPolicy(attempts=3, base_delay=0.5, max_delay=2.0)
RATE_RETRY = RetryPolicy(attempts=2, base_delay=0.5, max_delay=1.0)
# The machine's own claims, renamed to the names and units check_instance compares with.
CLAIM_FIELDS = {
    "diskThroughputMBps": "disk_bw",
    "maxDownloadSpeedMbps": "inet_down",
    "maxUploadSpeedMbps": "inet_up",
}


def pod_id_from_env(environ: Mapping[str, str] | None = None) -> str | None:
    environ = os.environ if environ is None else environ
    return (environ.get(POD_ID_ENV) or "").strip() or None


def outputs_gate(
    pod: Mapping[str, Any],
    environ: Mapping[str, str] | None = None,
    remote_root: str | None = None,
) -> GateResult:
    """The destroy gate for one pod: its public SSH address checked."""
    pod_id = pod.get("id")
    address = ssh_address(dict(pod)) if status_of(dict(pod)) == "RUNNING" else None
    if address is None:
        return GateResult(
            False,
            f"pod {pod_id} has no public SSH port (status {status_of(dict(pod))}), so its "
            "outputs cannot be checked: start it, sync, then terminate",
        )
    return check_outputs_downloaded([address], environ, remote_root, f"pod {pod_id}")


def machine_of(pod: Mapping[str, Any]) -> Machine:
    return Machine(
        provider=RunPodProvider.name,
        kind=RunPodProvider.machine_kind,
        id=str(pod.get("id")),
        gpu=gpu_of(dict(pod)),
        hourly_rate_usd=hourly_rate_of(dict(pod)),
    )


class RunPodProvider:
    """One RunPod account (an API key), on the laptop or inside one of its pods."""

    name = "RunPod"
    machine_kind = "pod"

    def __init__(
        self,
        api_key: str,
        base_url: str | None = None,
        graphql_url: str | None = None,
        this_machine_id: str | None = None,
        timeout_s: float = 20.0,
    ) -> None:
        self._api_key = api_key
        self._base_url = base_url
        self._graphql_url = graphql_url
        self.this_machine_id = this_machine_id
        self.timeout_s = timeout_s

    @classmethod
    def from_settings(cls, settings: Mapping[str, str]) -> RunPodProvider | None:
        """The account whose key the settings hold; None without one."""
        key = find_api_key(settings)
        if not key:
            return None
        return cls(key, settings.get(URL_ENV) or None, settings.get(GRAPHQL_URL_ENV) or None)

    @classmethod
    def of_this_machine(
        cls, environ: Mapping[str, str] | None = None, timeout_s: float = 20.0
    ) -> RunPodProvider | None:
        """The account that rents this pod; None off RunPod; CredentialsMissing in a pod
        without a key."""
        environ = os.environ if environ is None else environ
        pod_id = pod_id_from_env(environ)
        if pod_id is None:
            return None
        key = find_api_key(environ)
        if not key:
            raise CredentialsMissing(
                f"on RunPod pod {pod_id} but no API key ({KEY_ENV} in .env or the environment)"
            )
        return cls(
            key,
            environ.get(URL_ENV) or None,
            environ.get(GRAPHQL_URL_ENV) or None,
            pod_id,
            timeout_s,
        )

    def _client(self, retry: RetryPolicy = ACCOUNT_RETRY) -> RunPodClient:
        return RunPodClient(
            self._api_key,
            self._base_url,
            self._graphql_url,
            timeout=self.timeout_s,
            retry=retry,
        )

    def open_client(self, retry: RetryPolicy = ACCOUNT_RETRY) -> RunPodClient:
        """A client on this account (``src.cloud.runpod.renting`` rents through it)."""
        return self._client(retry)

    def machine_at(self, hostname: str, port: int) -> Machine | None:
        with self._client() as client:
            pod = find_pod_by_address(client.list_pods(), hostname, port)
        return None if pod is None or not pod.get("id") else machine_of(pod)

    def machine(self, machine_id: str) -> Machine:
        with self._client() as client:
            return machine_of(client.get_pod(machine_id))

    def hourly_rate(self, machine_id: str) -> float | None:
        with self._client(RATE_RETRY) as client:
            return hourly_rate_of(client.get_pod(machine_id))

    def claims(self, machine_id: str) -> dict[str, float | str]:
        with self._client(RATE_RETRY) as client:
            pod = client.get_pod(machine_id, include_machine=True)
        machine = pod.get("machine") if isinstance(pod.get("machine"), dict) else {}
        found: dict[str, float | str] = {
            ours: float(machine[theirs])
            for theirs, ours in CLAIM_FIELDS.items()
            if isinstance(machine.get(theirs), int | float) and machine[theirs] > 0
        }
        gpu = pod.get("gpu") if isinstance(pod.get("gpu"), dict) else {}
        name = gpu.get("displayName") or machine.get("gpuDisplayName") or gpu.get("id")
        if name:
            found["gpu_name"] = str(name)
        if isinstance(gpu.get("count"), int):
            found["num_gpus"] = float(gpu["count"])
        return found

    def stop(self, machine_id: str) -> None:
        """POST /pods/{id}/stop: the GPU is released, the volume kept. Never a DELETE."""
        print(f"[runpod] stopping pod {machine_id}: {STOP_WARNING}", file=sys.stderr)
        with self._client() as client:
            client.stop_pod(machine_id)

    def destroy(
        self,
        machine_id: str,
        remote_roots: Sequence[str],
        environ: Mapping[str, str] | None = None,
    ) -> GateResult:
        with self._client() as client:
            pod = client.get_pod(machine_id)
            gate = GateResult(True, "no outputs root to check")
            for root in remote_roots:
                gate = outputs_gate(pod, environ, remote_root=root)
                if not gate.allowed:
                    return gate
            client.terminate_pod(machine_id)
        return gate

    def hand_command(self, action: str, machine_id: str | None = None) -> str:
        command = "terminate" if action == "destroy" else action
        return f"{LAUNCH} {command}" + ("" if machine_id is None else f" {machine_id}")
