"""How a process knows it runs on a Vast.ai instance, and which key it may use there.

Inside a Vast.ai container the instance id is in the environment (``CONTAINER_ID``, or
``VAST_CONTAINERLABEL=C.<id>``), and Vast.ai injects a key scoped to the instance
(``CONTAINER_API_KEY``); the user's own key works too.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

INSTANCE_ID_ENVS = ("CONTAINER_ID", "VAST_CONTAINERLABEL")
CONTAINER_KEY_ENV = "CONTAINER_API_KEY"


def instance_id_from_env(environ: Mapping[str, str] | None = None) -> int | None:
    """The Vast.ai instance id this process runs in, or None off Vast.ai."""
    environ = os.environ if environ is None else environ
    for name in INSTANCE_ID_ENVS:
        raw = (environ.get(name) or "").strip().removeprefix("C.")
        if raw.isdigit():
            return int(raw)
    return None
