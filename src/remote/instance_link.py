"""The cloud instance behind the SSH host: the one place on remote_train's laptop side that
talks to a provider (today Vast.ai, through ``src.remote.vast_link``).

``--stop-after`` / ``--destroy-after`` find the instance before any training
(``InstanceLink.require``) and stop or destroy it once the outputs are verified home
(``InstanceLink.shut_down``); without them, ``running_cost_line`` says what the instance
still costs. A host that is no instance of yours has no link, and nothing is touched.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from src.remote import vast_link
from src.vast.client import VastClient

PROVIDER = "Vast.ai"


@dataclass
class InstanceLink:
    """An instance found by its SSH address, with the open client that found it."""

    client: VastClient
    instance_id: int

    @classmethod
    def require(
        cls, settings: Mapping[str, str], hostname: str, port: int, flag: str
    ) -> InstanceLink:
        """The instance at ``hostname:port``, or StageError("connect") naming ``flag``."""
        client, instance_id = vast_link.require_instance(settings, hostname, port, flag)
        return cls(client, instance_id)

    def describe(self) -> str:
        return f"{PROVIDER} instance {self.instance_id}"

    def manual_command(self, action: str) -> str:
        """What the user runs to ``stop`` or ``destroy`` the instance themselves."""
        return f"{vast_link.LAUNCH_VAST} {action} {self.instance_id}"

    def shut_down(self, action: str, output_roots: list[str], settings: Mapping[str, str]) -> str:
        """Stop, or destroy through the destroy gate; one line saying what was done."""
        return vast_link.shut_down(self.client, self.instance_id, action, output_roots, settings)

    def close(self) -> None:
        self.client.close()


def running_cost_line(settings: Mapping[str, str], hostname: str, port: int) -> str | None:
    """'instance 101 (...) costs $0.80/h ...' for a provider's host; None for any other."""
    return vast_link.price_line(settings, hostname, port)
