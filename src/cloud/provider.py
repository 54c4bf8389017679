"""What every cloud provider offers this kit, whatever its API looks like.

A provider is one account at one cloud (Vast.ai today; RunPod next). Two places use it:

- the laptop, which knows a machine only by its SSH address (``remote_train.py HOST
  --stop-after``): ``machine_at`` finds it, then ``stop`` or ``destroy``;
- the machine itself, where the environment says which provider rented it
  (``src.cloud.registry.provider_of_this_machine``): ``this_machine_id`` with ``hourly_rate``
  for the trainer's cost, with ``stop`` for the idle autostop.

Destroying goes through the destroy gate (``src.storage.destroy_gate``): a provider turns its
machine into SSH addresses, the gate checks the downloaded outputs of those addresses.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from src.storage.destroy_gate import GateResult


class CloudError(RuntimeError):
    """A provider's API failed or refused: one line saying what to do, never a secret."""


class CredentialsMissing(CloudError):
    """This is a provider's machine, but no API key to ask the provider anything about it."""


@dataclass(frozen=True)
class Machine:
    """One rented machine, as its provider describes it."""

    provider: str  # "Vast.ai"
    kind: str  # what the provider calls a machine: "instance"
    id: str
    gpu: str  # "RTX 4090 x 2"
    hourly_rate_usd: float | None  # None when the provider does not say

    @property
    def name(self) -> str:
        """``instance 101``: how a message names it once the provider is clear."""
        return f"{self.kind} {self.id}"

    @property
    def label(self) -> str:
        """``Vast.ai instance 101``."""
        return f"{self.provider} {self.name}"


class Provider(Protocol):
    """One account at one cloud; every method raises a one-line ``CloudError`` on failure."""

    @property
    def name(self) -> str:
        """How messages name the provider: ``Vast.ai``."""
        ...

    @property
    def machine_kind(self) -> str:
        """What the provider calls a machine: ``instance``."""
        ...

    @property
    def this_machine_id(self) -> str | None:
        """The machine this process runs on, when the environment says it is one of ours."""
        ...

    def machine_at(self, hostname: str, port: int) -> Machine | None:
        """Your machine reachable over SSH at ``hostname:port``; None when none is (any host
        that is not one of yours simply has no machine, and nothing is stopped)."""
        ...

    def machine(self, machine_id: str) -> Machine:
        """Your machine with this id (``--provider runpod --machine ID``); CloudError when
        there is none."""
        ...

    def hourly_rate(self, machine_id: str) -> float | None:
        """What the machine bills per hour now, in USD; None when the provider does not say."""
        ...

    def claims(self, machine_id: str) -> dict[str, float | str]:
        """What the offer promised for this machine, under Vast.ai's names and units
        (``gpu_name`` and ``num_gpus`` as advertised, ``pcie_bw`` GB/s, ``disk_bw`` MB/s,
        ``inet_down``/``inet_up`` Mb/s, ``dlperf``); only those the provider publishes."""
        ...

    def stop(self, machine_id: str) -> None:
        """Release the GPU and keep the disk (which still bills). Never deletes anything."""
        ...

    def destroy(
        self,
        machine_id: str,
        remote_roots: Sequence[str],
        environ: Mapping[str, str] | None = None,
    ) -> GateResult:
        """Delete the machine and its disk once the destroy gate allows every outputs root
        in ``remote_roots``; else delete nothing and return the gate's refusal."""
        ...

    def hand_command(self, action: str, machine_id: str | None = None) -> str:
        """The command a user types to do ``action`` (status, stop, destroy) by hand."""
        ...
