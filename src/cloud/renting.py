"""Renting a machine, whatever the provider: offers, create, boot state, release.

The seam ``remote_train --rent`` (``src/remote/rent.py``) drives: a ``Renter`` searches
offers (cheapest first) with the provider's own search filter, creates a machine from one
with the kit's onstart, says how far it has booted (the provider's own words, its SSH
address once mapped, or that it is gone), and releases one that never trained. A machine
that trained is destroyed only through its ``Provider``'s destroy gate (``renter.provider``).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass
from typing import NoReturn, Protocol

from src.cloud.machines import SshAddress
from src.cloud.provider import CloudError, Provider


class RentQueryError(CloudError):
    """The search filter (QUERY) is bad input: one line, exit 2."""


class MaybeRented(CloudError):
    """A create whose answer was lost: the machine may exist and bill. Any other CloudError
    from ``create`` means surely nothing was rented (the next offer may be tried)."""


@dataclass(frozen=True)
class Offer:
    """One rentable machine, as the provider advertises it."""

    id: str
    host_id: str  # the physical host behind it: a bad host is skipped whatever its offers
    gpu: str  # "RTX 4090 x 1"
    hourly_rate_usd: float
    disk_gb: float  # the most disk it can give
    where: str = ""

    def describe(self) -> str:
        where = f", {self.where}" if self.where else ""
        return (
            f"offer {self.id} (host {self.host_id}, {self.gpu}, "
            f"${self.hourly_rate_usd:.3f}/h, {self.disk_gb:.0f} GB{where})"
        )


@dataclass(frozen=True)
class BootState:
    """How far a new machine has come: the provider's status and message, its SSH address
    once one is mapped, or ``gone`` when the provider no longer lists it."""

    status: str
    message: str = ""
    ssh: SshAddress | None = None
    gone: bool = False

    def describe(self) -> str:
        if self.gone:
            return "gone (the provider no longer lists it)"
        return f"{self.status} {self.message}".strip()


class Renter(Protocol):
    """One provider account, seen as a market. Every call raises a one-line ``CloudError``."""

    @property
    def provider(self) -> Provider:
        """The same account as a ``Provider``: the gated destroy, stop, hand commands."""
        ...

    def offers(self, query: object) -> list[Offer]:
        """The offers that match, cheapest first."""
        ...

    def create(self, offer: Offer, disk_gb: float, label: str) -> str:
        """Rent ``offer`` with the kit's onstart and ``disk_gb`` of disk; the machine id."""
        ...

    def boot_state(self, machine_id: str) -> BootState:
        """Where the machine stands now (``gone`` when the provider lost it)."""
        ...

    def release_unused(self, machine_id: str) -> None:
        """Destroy a machine nothing has trained on (boot failed, check failed): there is
        nothing to download, so no gate. A machine already gone is no error."""
        ...


def parse_filter(
    tokens: list[str],
    add_arguments: Callable[[argparse.ArgumentParser], None],
    check: Callable[[argparse.Namespace], None],
    source: str,
) -> tuple[argparse.Namespace, list[str]]:
    """The filter flags ``add_arguments`` defines (a provider's `search`), taken out of
    ``tokens``: (the query, the rest). A bad value (``check`` raises ValueError) is a
    one-line RentQueryError naming ``source``, the command whose filter it is."""

    class Parser(argparse.ArgumentParser):
        def error(self, message: str) -> NoReturn:
            raise RentQueryError(f"--rent QUERY: {message} (it takes {source}'s filter)")

    parser = Parser(prog="--rent", add_help=False, allow_abbrev=False)
    add_arguments(parser)
    query, rest = parser.parse_known_args(tokens)
    try:
        check(query)
    except ValueError as error:
        raise RentQueryError(f"--rent QUERY: {error}") from None
    return query, rest
