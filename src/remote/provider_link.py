"""The rented machine behind an SSH address: what it costs, stopping it, and destroying it
through the destroy gate once the outputs are verified home.

An SSH host is only an address; each configured provider (``src.cloud.registry``: Vast.ai
today) is asked whether one of its machines answers there, so any host that is not one of
yours simply has no machine and nothing is stopped or destroyed.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from src.cloud.provider import CloudError, Machine, Provider
from src.cloud.registry import CREDENTIALS_HINT, configured_provider, configured_providers
from src.remote.stages import StageError


def named_machine(
    settings: Mapping[str, str], provider_key: str, machine_id: str
) -> tuple[Provider, Machine]:
    """``--provider KEY --machine ID``: that machine, for a host whose SSH address its
    provider does not list (RunPod's SSH proxy, a tunnel); StageError("connect") otherwise."""
    try:
        provider = configured_provider(provider_key, settings)
        return provider, provider.machine(machine_id)
    except CloudError as error:
        reason = f"--provider {provider_key} --machine {machine_id}: {error}"
        raise StageError("connect", reason) from None


def require_machine(
    settings: Mapping[str, str],
    hostname: str,
    port: int,
    flag: str,
    named: tuple[str, str] | None = None,
) -> tuple[Provider, Machine]:
    """For --stop-after/--destroy-after, checked before any training: the machine at
    ``hostname:port`` (or the one ``named`` (provider key, id) gives) and its provider;
    StageError("connect") when there is none."""
    if named is not None:
        return named_machine(settings, *named)
    providers = configured_providers(settings)
    if not providers:
        raise StageError(
            "connect", f"{flag} needs {CREDENTIALS_HINT}; set it, or leave the flag out"
        )
    for provider in providers:
        try:
            machine = provider.machine_at(hostname, port)
        except CloudError as error:
            raise StageError("connect", f"{flag}: {error}") from None
        if machine is not None:
            return provider, machine
    provider = providers[0]
    raise StageError(
        "connect",
        f"{flag}: none of your {provider.name} {provider.machine_kind}s has the SSH address "
        f"{hostname}:{port}; check the host ({provider.hand_command('status')}), "
        "or leave the flag out",
    )


def price_line(
    settings: Mapping[str, str], hostname: str, port: int, named: tuple[str, str] | None = None
) -> str | None:
    """'instance 101 (...) costs $0.80/h ...' for a rented host; None for any other host."""
    if named is not None:
        try:
            provider, machine = named_machine(settings, *named)
        except StageError as error:
            return f"could not look up {named[1]}: {error.reason}"
        return running_line(provider, machine)
    for provider in configured_providers(settings):
        try:
            machine = provider.machine_at(hostname, port)
        except CloudError as error:
            return (
                f"could not look up the {provider.name} {provider.machine_kind} behind "
                f"{hostname}:{port} ({error})"
            )
        if machine is None:
            continue
        return running_line(provider, machine)
    return None


def running_line(provider: Provider, machine: Machine) -> str:
    rate = machine.hourly_rate_usd
    cost = f"${rate:.3f}/h" if rate is not None else "an unknown $/h"
    return (
        f"{machine.name} ({machine.gpu}) still runs and costs {cost}: stop it with "
        f"{provider.hand_command('stop', machine.id)} "
        "(or pass --stop-after / --destroy-after next time)"
    )


def shut_down(
    provider: Provider,
    machine: Machine,
    action: str,
    output_roots: list[str],
    settings: Mapping[str, str],
) -> str:
    """Stop, or destroy once the gate agrees for every outputs root; one line saying what."""
    try:
        if action == "stop":
            provider.stop(machine.id)
            return f"stopped {machine.name}: the GPU is released, the disk keeps billing"
        gate = provider.destroy(machine.id, output_roots, settings)
    except CloudError as error:
        raise StageError("shutdown", str(error)) from None
    if not gate.allowed:
        raise StageError("shutdown", f"not destroying {machine.name}: {gate.reason}")
    return f"destroyed {machine.name} (outputs verified: {', '.join(output_roots)})"


@dataclass(frozen=True)
class InstanceLink:
    """The machine found behind the SSH host for --stop-after / --destroy-after."""

    provider: Provider
    machine: Machine

    @classmethod
    def require(
        cls,
        settings: Mapping[str, str],
        hostname: str,
        port: int,
        flag: str,
        named: tuple[str, str] | None = None,
    ) -> InstanceLink:
        """The machine at ``hostname:port`` (or ``named``), or StageError("connect")."""
        return cls(*require_machine(settings, hostname, port, flag, named))

    def describe(self) -> str:
        return self.machine.label

    def manual_command(self, action: str) -> str:
        """What the user runs to ``stop`` or ``destroy`` the machine themselves."""
        return self.provider.hand_command(action, self.machine.id)

    def shut_down(self, action: str, output_roots: list[str], settings: Mapping[str, str]) -> str:
        """Stop, or destroy through the destroy gate; one line saying what was done."""
        return shut_down(self.provider, self.machine, action, output_roots, settings)
