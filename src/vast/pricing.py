"""The $/hour the cost tracker uses: the configured value, else the Vast.ai instance's own price.

Inside a Vast.ai container the instance id is in the environment (``CONTAINER_ID``, or
``VAST_CONTAINERLABEL=C.<id>``), so with an API key the trainer can ask for ``dph_total``
itself. This must never stop a training run: every failure becomes one printed line and None.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping

INSTANCE_ID_ENVS = ("CONTAINER_ID", "VAST_CONTAINERLABEL")
# Vast.ai injects a key scoped to the instance; the user's own key works too.
CONTAINER_KEY_ENV = "CONTAINER_API_KEY"


def instance_id_from_env(environ: Mapping[str, str] | None = None) -> int | None:
    """The Vast.ai instance id this process runs in, or None off Vast.ai."""
    environ = os.environ if environ is None else environ
    for name in INSTANCE_ID_ENVS:
        raw = (environ.get(name) or "").strip().removeprefix("C.")
        if raw.isdigit():
            return int(raw)
    return None


def detect_hourly_rate(
    configured: float | None,
    environ: Mapping[str, str] | None = None,
    timeout: float = 5.0,
) -> float | None:
    """``configured`` if set; else the running instance's ``dph_total``; else None. Never raises."""
    if configured is not None:
        return float(configured)
    environ = os.environ if environ is None else environ
    instance_id = instance_id_from_env(environ)
    if instance_id is None:
        return None
    try:
        from src.vast.client import RetryPolicy, VastClient, find_api_key

        key = find_api_key(environ) or (environ.get(CONTAINER_KEY_ENV) or "").strip()
        if not key:
            print(
                f"[cost] on Vast.ai instance {instance_id} but no API key: set "
                "VASTAI_API_KEY or cost.hourly_rate_usd to track cost",
                file=sys.stderr,
            )
            return None
        retry = RetryPolicy(attempts=2, base_delay=0.5, max_delay=1.0)
        with VastClient(key, environ.get("VAST_URL"), timeout=timeout, retry=retry) as client:
            rate = client.get_instance(instance_id).get("dph_total")
        if rate is None:
            raise ValueError("the instance has no dph_total")
        return float(rate)
    except Exception as error:  # noqa: BLE001 - cost tracking is optional, training is not
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        print(
            f"[cost] could not read the hourly rate of instance {instance_id}: {message}; "
            "set cost.hourly_rate_usd to track cost",
            file=sys.stderr,
        )
        return None
