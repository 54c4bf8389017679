"""``remote_train --rent``'s memory on the laptop: one JSON file (``--state-file``, else
``RENT_STATE_FILE``, else ``~/.config/gpu-train-kit/rented.json``).

- ``machines``: every machine this command created, from just *before* the create call (a
  "creating" entry naming the offer) until it is destroyed, so a laptop crash at any moment
  leaves no machine the file does not list; ``remote_train --rented`` prints them with cost.
- ``bad_hosts``: hosts that failed to boot, failed the check or vanished mid-run, with the
  reason and the time; skipped by later rents for ``--skip-bad-hours``.

Every change rewrites the whole file atomically (it is small), so a crash mid-write leaves
the previous version.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from src.common.atomic_io import atomic_write_bytes

STATE_ENV = "RENT_STATE_FILE"
DEFAULT_STATE_FILE = Path("~/.config/gpu-train-kit/rented.json")


def state_path(explicit: str | None, environ: Mapping[str, str] | None = None) -> Path:
    environ = os.environ if environ is None else environ
    chosen = explicit or environ.get(STATE_ENV) or str(DEFAULT_STATE_FILE)
    return Path(chosen).expanduser()


@dataclass
class RentState:
    path: Path

    def load(self) -> dict[str, Any]:
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            data = {}
        except (OSError, ValueError) as error:
            raise OSError(
                f"rent state file {self.path} is unreadable ({error}): fix or move it"
            ) from None
        data.setdefault("machines", {})
        data.setdefault("bad_hosts", {})
        return data

    def _save(self, data: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(self.path, (json.dumps(data, indent=2, sort_keys=True) + "\n").encode())

    def _change(self, key: str, section: str, entry: dict[str, Any] | None) -> None:
        data = self.load()
        if entry is None:
            data[section].pop(key, None)
        else:
            data[section][key] = entry
        self._save(data)

    # -- machines --------------------------------------------------------------------------

    def creating(self, provider: str, offer_id: str, rate: float, host_id: str) -> str:
        """Before the create call: an entry a crash leaves behind; its key."""
        key = f"{provider}:offer-{offer_id}:{time.time():.3f}"
        entry = {
            "provider": provider,
            "id": None,
            "offer": offer_id,
            "host_id": host_id,
            "hourly_rate_usd": rate,
            "created_at": time.time(),
            "state": "creating",
        }
        self._change(key, "machines", entry)
        return key

    def created(self, pending_key: str, machine_id: str) -> str:
        """After the create call: the pending entry becomes the machine's; its key."""
        data = self.load()
        entry = data["machines"].pop(pending_key, None) or {}
        key = f"{entry.get('provider', '?')}:{machine_id}"
        data["machines"][key] = {**entry, "id": machine_id, "state": "booting"}
        self._save(data)
        return key

    def update(self, key: str, **fields: Any) -> None:
        data = self.load()
        if key in data["machines"]:
            data["machines"][key].update(fields)
            self._save(data)

    def gone(self, key: str) -> None:
        """Destroyed (or vanished): no longer billing, no longer listed."""
        self._change(key, "machines", None)

    def machines(self) -> dict[str, dict[str, Any]]:
        return self.load()["machines"]

    # -- bad hosts -------------------------------------------------------------------------

    def mark_bad(self, provider: str, host_id: str, reason: str, offer_id: str) -> None:
        entry = {"reason": reason, "at": time.time(), "offer": offer_id}
        self._change(f"{provider}:{host_id}", "bad_hosts", entry)

    def bad_reason(self, provider: str, host_id: str, skip_s: float) -> str | None:
        """Why the host is skipped, if it failed within the last ``skip_s`` seconds."""
        entry = self.load()["bad_hosts"].get(f"{provider}:{host_id}")
        if entry is None or time.time() - float(entry.get("at", 0)) > skip_s:
            return None
        return str(entry.get("reason"))
