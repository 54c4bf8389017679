"""The providers this kit knows, and which of them applies: to an SSH host (those whose key
is configured) or to this machine (the one the environment names).

Kept apart from ``provider.py`` because it imports every implementation, and each
implementation imports the protocol: one module holding both would be a cycle.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping

from src.cloud.provider import CredentialsMissing, Provider
from src.cloud.renting import Renter
from src.cloud.runpod.client import KEY_ENV as RUNPOD_KEY_ENV
from src.cloud.runpod.provider import POD_ID_ENV, RunPodProvider
from src.cloud.runpod.renting import RunPodRenter
from src.cloud.runpod.renting import parse_query as parse_runpod_query
from src.cloud.vast.client import KEY_ENV
from src.cloud.vast.environment import INSTANCE_ID_ENVS
from src.cloud.vast.provider import VastProvider
from src.cloud.vast.renting import VastRenter
from src.cloud.vast.renting import parse_query as parse_vast_query

# One line per provider: how to give it a key, and how a process knows it runs on it.
CREDENTIALS_HINT = (
    f"a Vast.ai API key ({KEY_ENV}) or a RunPod API key ({RUNPOD_KEY_ENV}) "
    "in the environment or .env"
)
NOT_HERE_HINT = (
    f"not on a Vast.ai instance (no {' or '.join(INSTANCE_ID_ENVS)} in the environment) "
    f"nor on a RunPod pod (no {POD_ID_ENV})"
)


# `--provider NAME` on the command line: the name each provider answers to.
PROVIDER_KEYS = {"vast": "Vast.ai", "runpod": "RunPod"}


def configured_provider(key: str, settings: Mapping[str, str]) -> Provider:
    """The provider ``--provider KEY`` names; CredentialsMissing without its API key."""
    for provider in configured_providers(settings):
        if provider.name == PROVIDER_KEYS[key]:
            return provider
    keys = {
        "vast": f"a Vast.ai API key ({KEY_ENV})",
        "runpod": f"a RunPod API key ({RUNPOD_KEY_ENV})",
    }
    raise CredentialsMissing(f"--provider {key} needs {keys[key]} in the environment or .env")


# The providers `remote_train --rent` can rent from, and how each reads its search filter.
RENT_QUERIES = {"vast": parse_vast_query, "runpod": parse_runpod_query}


def parse_rent_query(key: str, tokens: list[str]) -> tuple[object, list[str]]:
    """The provider's search filter flags taken out of ``tokens``: (query, the rest);
    RentQueryError on a bad value. Needs no API key (bad input fails before anything)."""
    return RENT_QUERIES[key](tokens)


def configured_renter(key: str, settings: Mapping[str, str]) -> Renter:
    """The market ``--rent --provider KEY`` rents from; CredentialsMissing without its key."""
    provider = configured_provider(key, settings)
    if isinstance(provider, RunPodProvider):
        return RunPodRenter(provider)
    assert isinstance(provider, VastProvider)
    return VastRenter(provider)


def configured_providers(settings: Mapping[str, str]) -> list[Provider]:
    """The accounts whose API keys the settings (environment and .env) hold; maybe none."""
    found: list[Provider] = []
    vast = VastProvider.from_settings(settings)
    if vast is not None:
        found.append(vast)
    runpod = RunPodProvider.from_settings(settings)
    if runpod is not None:
        found.append(runpod)
    return found


def provider_of_this_machine(
    environ: Mapping[str, str] | None = None, timeout_s: float = 20.0
) -> Provider | None:
    """The provider that rents the machine this process runs on (its ``this_machine_id`` set);
    None off any provider's machine. CredentialsMissing when on one without its API key."""
    environ = os.environ if environ is None else environ
    vast = VastProvider.of_this_machine(environ, timeout_s)
    if vast is not None:
        return vast
    return RunPodProvider.of_this_machine(environ, timeout_s)


def hourly_rate_here(
    configured: float | None = None,
    environ: Mapping[str, str] | None = None,
    timeout_s: float = 5.0,
) -> float | None:
    """$/h: ``configured`` if set; else what the provider of this machine bills for it; else
    None. Never raises: cost tracking is optional, training is not, so a failed lookup is one
    printed line."""
    if configured is not None:
        return float(configured)
    machine = "this machine"
    try:
        provider = provider_of_this_machine(environ, timeout_s)
        if provider is None or provider.this_machine_id is None:
            return None
        machine = f"{provider.machine_kind} {provider.this_machine_id}"
        rate = provider.hourly_rate(provider.this_machine_id)
        if rate is None:
            raise ValueError(f"the {provider.machine_kind} has no hourly price")
        return rate
    except CredentialsMissing as error:
        print(f"[cost] {error}: set it, or cost.hourly_rate_usd, to track cost", file=sys.stderr)
        return None
    except Exception as error:  # noqa: BLE001 - cost tracking is optional, training is not
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        print(
            f"[cost] could not read the hourly rate of {machine}: {message}; "
            "set cost.hourly_rate_usd to track cost",
            file=sys.stderr,
        )
        return None


def offer_claims_here(environ: Mapping[str, str] | None = None) -> dict[str, float]:
    """The offer's claims for the machine this process runs on; {} off a provider's machine
    or when the lookup fails (a check reports what it measured either way)."""
    try:
        provider = provider_of_this_machine(environ, timeout_s=10.0)
        if provider is None or provider.this_machine_id is None:
            return {}
        return provider.claims(provider.this_machine_id)
    except Exception as error:  # noqa: BLE001 - the claims are a comparison, not the check
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        print(f"[check] the offer's claims are not available: {message}", file=sys.stderr)
        return {}
