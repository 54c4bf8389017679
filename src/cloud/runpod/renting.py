"""RunPod as a ``src.cloud.renting.Renter``: `launch.py --provider runpod search`'s filter,
its create payload (the kit's onstart), a pod's boot state, and terminating one that never
trained.

RunPod sells GPU types per cloud (secure, community), not hosts: an offer here is one GPU
type in one cloud, and the "host" a failure is recorded against is that pair, so a type
that failed is not rented again within ``--skip-bad-hours``. The disk is the pod's volume
(at /workspace), any size asked.
"""

from __future__ import annotations

import argparse

from src.cloud.renting import BootState, MaybeRented, Offer, parse_filter
from src.cloud.retry import RetryPolicy
from src.cloud.runpod.cli import (
    DEFAULT_IMAGE,
    add_search_arguments,
    check_search_args,
    create_payload,
    matching_gpus,
)
from src.cloud.runpod.client import RunPodClient, RunPodMaybeDone, RunPodNotFound
from src.cloud.runpod.pods import ACTIVE_STATUS, ssh_address, status_of
from src.cloud.runpod.provider import ACCOUNT_RETRY, RunPodProvider

POLL_RETRY = RetryPolicy(attempts=3, base_delay=0.5, max_delay=2.0)
CONTAINER_DISK_GB = 30
UNLIMITED_DISK_GB = 10_000.0  # a volume of any size: never the reason to skip an offer


def parse_query(tokens: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """`launch.py --provider runpod search`'s filter flags out of ``tokens``: (query, rest)."""
    return parse_filter(
        tokens, add_search_arguments, check_search_args, "launch.py --provider runpod search"
    )


class RunPodRenter:
    """One RunPod account as a market (its ``provider`` does the gated terminate)."""

    def __init__(self, provider: RunPodProvider, image: str = DEFAULT_IMAGE) -> None:
        self._provider = provider
        self.image = image
        self._spot = False

    @property
    def provider(self) -> RunPodProvider:
        return self._provider

    def _client(self, retry: RetryPolicy = ACCOUNT_RETRY) -> RunPodClient:
        return self._provider.open_client(retry)

    def offers(self, query: object) -> list[Offer]:
        assert isinstance(query, argparse.Namespace)
        self._spot = query.spot
        with self._client() as client:
            rows = matching_gpus(client.gpu_types(), query)
        return [
            Offer(
                id=f"{gpu.get('id')}@{cloud}",
                host_id=f"{gpu.get('id')}@{cloud}",
                gpu=f"{gpu.get('displayName') or gpu.get('id')} x 1",
                hourly_rate_usd=price,
                disk_gb=UNLIMITED_DISK_GB,
                where=f"{cloud} cloud",
            )
            for price, cloud, gpu in rows
        ]

    def create(self, offer: Offer, disk_gb: float, label: str) -> str:
        gpu_type, _, cloud = offer.id.rpartition("@")
        args = argparse.Namespace(
            name=None,
            image=self.image,
            gpu_type=gpu_type,
            gpu_count=1,
            cloud=cloud,
            spot=self._spot,
            container_disk_gb=CONTAINER_DISK_GB,
            volume_gb=max(1, round(disk_gb)),
            repo_dir=None,
            autostop=None,
        )
        payload = create_payload(args)
        payload["name"] = f"{label}-{payload['name'].rsplit('-', 1)[-1]}"
        try:
            with self._client() as client:
                return str(client.create_pod(payload)["id"])
        except RunPodMaybeDone as error:
            raise MaybeRented(str(error)) from None

    def boot_state(self, machine_id: str) -> BootState:
        try:
            with self._client(POLL_RETRY) as client:
                pod = client.get_pod(machine_id)
        except RunPodNotFound:
            return BootState("gone", gone=True)
        status = status_of(pod)
        if status == "TERMINATED":
            return BootState(status, gone=True)
        address = ssh_address(pod) if status == ACTIVE_STATUS else None
        return BootState(status, "" if address else "no SSH port yet", address)

    def release_unused(self, machine_id: str) -> None:
        try:
            with self._client() as client:
                client.terminate_pod(machine_id)
        except RunPodNotFound:
            pass
