"""An httpx client for the Vast.ai REST API that never mistakes an error for "no instances".

Why not the official ``vastai`` package: it pins exact versions of heavy dependencies
(cryptography, pillow...) that fight a training environment. The facts used here come from
the public API docs and the official CLI: ``Authorization: Bearer KEY``; every JSON answer may
carry ``success: false`` (the retired ``/api/v0/instances/?owner=me`` answers that way with
HTTP 410 *or 200*), so ``success`` is checked on every response; 429 and 5xx are retried with
a bounded backoff. Renting (``PUT /api/v0/asks/ID/``) is not idempotent: it is retried only
when the request surely never reached the server (no connection) or on 429, never after a
timeout or 5xx, which may hide a rental that went through. The key lives only in the request
header: it is scrubbed from every error message and never put in a URL.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import httpx

from src.cloud.api_client import (
    HEADER_SAFE_KEY,
    BearerApiClient,
    key_from_settings,
    resolve_url,
)
from src.cloud.provider import CloudError
from src.cloud.retry import GaveUp, MaybeSent, RetryPolicy

DEFAULT_BASE_URL = "https://console.vast.ai"
KEY_ENV = "VASTAI_API_KEY"
ALT_KEY_ENV = "VAST_API_KEY"  # what the vastai CLI itself reads
URL_ENV = "VAST_URL"
# Where the vastai CLI keeps the key (`vastai set api-key`), newest location first.
CLI_KEY_FILES = ("~/.config/vastai/vast_api_key", "~/.vast_api_key")
LIST_PAGE_LIMIT = 25  # the v1 listing caps `limit` at 25
NO_KEY_HINT = (
    f"no Vast.ai API key: set {KEY_ENV} in the environment or .env, "
    "or run `vastai set api-key` (~/.config/vastai/vast_api_key)"
)


class VastError(CloudError):
    """One line saying what failed and what to do; never contains the API key."""


class VastAuthError(VastError):
    """The key was refused (401/403, or 404 with ``auth_error``)."""


class VastNotFound(VastError):
    """The instance or offer does not exist (any more)."""


class VastKeyError(VastError):
    """The key is unusable as given (bad input: the CLI exits 2)."""


# What an HTTP header value may hold, minus spaces: a key with a space, newline or non-ASCII
# character is a copy-paste accident, and httpx would raise UnicodeEncodeError on it.
BAD_KEY_MESSAGE = (
    f"{KEY_ENV} contains characters that can't be sent in an HTTP header: "
    "check for stray characters (spaces, newlines, non-ASCII)"
)


def check_api_key(api_key: str) -> None:
    """VastKeyError (never showing the key) unless it can travel in a header."""
    if not HEADER_SAFE_KEY.fullmatch(api_key):
        raise VastKeyError(BAD_KEY_MESSAGE)


def find_api_key(
    environ: Mapping[str, str] | None = None,
    dotenv_path: Path | None = None,
    home: Path | None = None,
) -> str | None:
    """The key from the environment, then ``.env``, then the vastai CLI's key files."""
    environ = os.environ if environ is None else environ
    value = key_from_settings((KEY_ENV, ALT_KEY_ENV), KEY_ENV, environ, dotenv_path)
    if value:
        return value
    home_dir = home if home is not None else Path.home()
    candidates = [home_dir / name.removeprefix("~/") for name in CLI_KEY_FILES]
    if environ.get("XDG_CONFIG_HOME"):  # the CLI writes there when it is set
        candidates.insert(0, Path(environ["XDG_CONFIG_HOME"]) / "vastai" / "vast_api_key")
    for path in candidates:
        try:
            value = path.read_text().strip()
        except OSError:
            continue
        if value:
            return value
    return None


def resolve_base_url(explicit: str | None = None, environ: Mapping[str, str] | None = None) -> str:
    """``--url`` wins, then ``VAST_URL``, then console.vast.ai (tests point it at 127.0.0.1)."""
    return resolve_url(explicit, URL_ENV, DEFAULT_BASE_URL, environ)


def _encode_params(params: Mapping[str, Any] | None) -> dict[str, str]:
    # The API takes JSON-encoded query values (the official CLI does the same): strings as is.
    return {k: v if isinstance(v, str) else json.dumps(v) for k, v in (params or {}).items()}


class VastClient(BearerApiClient):
    """Calls the API; every method returns parsed JSON or raises a one-line ``VastError``."""

    def __init__(
        self,
        api_key: str,
        base_url: str | None = None,
        timeout: float = 20.0,
        retry: RetryPolicy | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if not api_key:
            raise VastError(NO_KEY_HINT)
        check_api_key(api_key)
        self.base_url = resolve_base_url(base_url)
        super().__init__(api_key, timeout=timeout, retry=retry, sleep=sleep, base_url=self.base_url)

    def request(
        self,
        method: str,
        path: str,
        params: Mapping[str, Any] | None = None,
        json_body: Any = None,
        idempotent: bool = True,
    ) -> dict[str, Any]:
        """One API call with retries; checks HTTP status *and* ``success`` in the body.

        ``idempotent=False`` (renting): retried only when the request cannot have been acted
        on (no connection, or 429); a timeout or 5xx stops at once with a "check status" line.
        """
        what = f"{method} {path}"
        try:
            response = self._send(
                method,
                path,
                where=self.base_url,
                params=_encode_params(params),
                json_body=json_body,
                idempotent=idempotent,
            )
        except MaybeSent as error:
            raise VastError(
                self._scrub(
                    f"Vast.ai API {what}: {error.problem}; it may have gone through: check "
                    "`python scripts/launch_vast.py status` before retrying, "
                    "so you don't rent twice"
                )
            ) from None
        except GaveUp as error:
            raise VastError(
                self._scrub(
                    f"Vast.ai API {what}: {error.problem} after {self.retry.attempts} attempts; "
                    f"check your network or {URL_ENV}, or try again later"
                )
            ) from None
        return self._check(what, response)

    def _check(self, what: str, response: httpx.Response) -> dict[str, Any]:
        try:
            body = response.json()
        except ValueError:
            body = None
        error = msg = ""
        if isinstance(body, dict):
            error = str(body.get("error") or "")
            msg = str(body.get("msg") or body.get("message") or "")
        detail = self._scrub(" ".join(part for part in (error, msg) if part)[:200])
        status = response.status_code
        if status in (401, 403) or (status == 404 and "auth" in error):
            raise VastAuthError(
                f"Vast.ai API {what}: the API key was refused (HTTP {status} {detail}); "
                f"check {KEY_ENV} in the environment or .env"
            )
        if error == "deprecated_endpoint" or status == 410:
            raise VastError(
                f"Vast.ai API {what}: endpoint retired (HTTP {status} {detail}); "
                "this is not an empty list: update gpu-train-kit"
            )
        if status == 404:
            raise VastNotFound(f"Vast.ai API {what}: not found (HTTP 404 {detail})")
        if status >= 400:
            raise VastError(f"Vast.ai API {what}: HTTP {status} {detail}".rstrip())
        if not isinstance(body, dict):
            raise VastError(f"Vast.ai API {what}: answer is not a JSON object (HTTP {status})")
        if body.get("success") is False:
            raise VastError(f"Vast.ai API {what}: request failed ({detail or 'no reason given'})")
        return body

    # -- endpoints -----------------------------------------------------------------------

    def iter_instances(self, page_limit: int = LIST_PAGE_LIMIT) -> Iterator[dict[str, Any]]:
        """All instances, following ``next_token`` until it is null."""
        params: dict[str, Any] = {"limit": min(page_limit, LIST_PAGE_LIMIT)}
        seen_tokens: set[str] = set()
        while True:
            body = self.request("GET", "/api/v1/instances/", params=params)
            page = body.get("instances")
            if not isinstance(page, list):
                raise VastError(
                    "Vast.ai API GET /api/v1/instances/: answer has no 'instances' list; "
                    "refusing to report zero instances"
                )
            yield from (item for item in page if isinstance(item, dict))
            token = body.get("next_token")
            if not token:
                return
            if str(token) in seen_tokens:  # a server bug must not loop forever
                raise VastError("Vast.ai API GET /api/v1/instances/: next_token repeats")
            seen_tokens.add(str(token))
            params = {**params, "after_token": token}

    def list_instances(self) -> list[dict[str, Any]]:
        return list(self.iter_instances())

    def get_instance(self, instance_id: int) -> dict[str, Any]:
        body = self.request("GET", f"/api/v0/instances/{instance_id}/", params={"owner": "me"})
        instance = body.get("instances")
        if not isinstance(instance, dict) or not instance:
            raise VastNotFound(
                f"instance {instance_id} not found: check the id with `status --all`"
            )
        return instance

    def search_offers(self, query: Mapping[str, Any]) -> list[dict[str, Any]]:
        body = self.request("POST", "/api/v0/bundles/", json_body=dict(query))
        offers = body.get("offers")
        if not isinstance(offers, list):
            raise VastError("Vast.ai API POST /api/v0/bundles/: answer has no 'offers' list")
        return [offer for offer in offers if isinstance(offer, dict)]

    def create_instance(self, offer_id: int, payload: Mapping[str, Any]) -> int:
        body = self.request(
            "PUT", f"/api/v0/asks/{offer_id}/", json_body=dict(payload), idempotent=False
        )
        contract = body.get("new_contract")
        if body.get("success") is not True or contract is None:
            raise VastError(
                f"Vast.ai API PUT /api/v0/asks/{offer_id}/: no new_contract in the answer; "
                "check `status` before retrying so you don't rent twice"
            )
        return int(contract)

    def destroy_instance(self, instance_id: int) -> None:
        self.request("DELETE", f"/api/v0/instances/{instance_id}/")

    def set_state(self, instance_id: int, state: str) -> None:
        """``stopped`` keeps the disk (billed for storage); ``running`` starts it again."""
        if state not in {"stopped", "running"}:
            raise ValueError(f"state must be 'stopped' or 'running', not {state!r}")
        self.request("PUT", f"/api/v0/instances/{instance_id}/", json_body={"state": state})

    def current_user(self) -> dict[str, Any]:
        return self.request("GET", "/api/v0/users/current/")
