"""Vast.ai as a ``src.cloud.renting.Renter``: `launch_vast.py search`'s filter, its create
payload (the kit's onstart), an instance's boot state, and releasing one that never trained.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from typing import Any

from src.cloud.renting import BootState, MaybeRented, Offer, parse_filter
from src.cloud.retry import RetryPolicy
from src.cloud.vast.cli import (
    DEFAULT_IMAGE,
    add_search_arguments,
    build_offer_query,
    check_search_args,
    create_payload,
    offer_price,
)
from src.cloud.vast.client import VastClient, VastError, VastNotFound
from src.cloud.vast.instances import ssh_addresses, status_of
from src.cloud.vast.provider import ACCOUNT_RETRY, VastProvider

# Boot polls come every few seconds for minutes: one failed poll is retried, not fatal.
POLL_RETRY = RetryPolicy(attempts=3, base_delay=0.5, max_delay=2.0)


def parse_query(tokens: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """`launch_vast.py search`'s filter flags out of ``tokens``: (the query, the rest)."""
    return parse_filter(tokens, add_search_arguments, check_search_args, "launch_vast.py search")


def offer_of(offer: Mapping[str, Any], interruptible: bool) -> Offer:
    count = offer.get("num_gpus") or "?"
    return Offer(
        id=str(offer.get("id")),
        host_id=str(offer.get("host_id") or offer.get("machine_id") or offer.get("id")),
        gpu=f"{offer.get('gpu_name') or '?'} x {count}",
        hourly_rate_usd=offer_price(dict(offer), interruptible),
        disk_gb=float(offer.get("disk_space") or 0.0),
        where=str(offer.get("geolocation") or ""),
    )


class VastRenter:
    """One Vast.ai account as a market (its ``provider`` does the gated destroy)."""

    def __init__(self, provider: VastProvider, image: str = DEFAULT_IMAGE) -> None:
        self._provider = provider
        self.image = image
        self._interruptible = False

    @property
    def provider(self) -> VastProvider:
        return self._provider

    def _client(self, retry: RetryPolicy = ACCOUNT_RETRY) -> VastClient:
        return self._provider.open_client(retry)

    def offers(self, query: object) -> list[Offer]:
        assert isinstance(query, argparse.Namespace)
        self._interruptible = query.interruptible
        with self._client() as client:
            found = client.search_offers(build_offer_query(query))
        offers = [offer_of(offer, query.interruptible) for offer in found if offer.get("id")]
        return sorted(offers, key=lambda offer: offer.hourly_rate_usd)

    def create(self, offer: Offer, disk_gb: float, label: str) -> str:
        args = argparse.Namespace(
            image=self.image,
            disk=disk_gb,
            label=label,
            repo_dir=None,
            autostop=None,
            bid=offer.hourly_rate_usd if self._interruptible else None,
        )
        try:
            with self._client() as client:
                return str(client.create_instance(int(offer.id), create_payload(args)))
        except VastError as error:
            if "may have gone through" in str(error) or "check `status`" in str(error):
                raise MaybeRented(str(error)) from None
            raise

    def boot_state(self, machine_id: str) -> BootState:
        try:
            with self._client(POLL_RETRY) as client:
                instance = client.get_instance(int(machine_id))
        except VastNotFound:
            return BootState("gone", gone=True)
        status = status_of(instance)
        addresses = ssh_addresses(instance) if status == "running" else []
        message = str(instance.get("status_msg") or "").strip()
        return BootState(status, message, addresses[0] if addresses else None)

    def release_unused(self, machine_id: str) -> None:
        try:
            with self._client() as client:
                client.destroy_instance(int(machine_id))
        except VastNotFound:
            pass
