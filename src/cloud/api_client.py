"""What every provider's API client shares: one httpx client with a bearer key, the key
scrubbed from every message, and requests sent through ``send_with_retries``."""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import httpx
from dotenv import dotenv_values
from typing_extensions import Self

from src.cloud.retry import RetryPolicy, send_with_retries
from src.common.paths import tools_dotenv_path

# What an HTTP header can carry: printable ASCII, no spaces (a pasted key with a newline or a
# non-ASCII character would otherwise fail deep inside httpx, or echo the key).
HEADER_SAFE_KEY = re.compile(r"[\x21-\x7e]+")


def key_from_settings(
    env_names: Sequence[str],
    dotenv_name: str,
    environ: Mapping[str, str] | None = None,
    dotenv_path: Path | None = None,
) -> str | None:
    """An API key from the environment (the first of ``env_names`` set), then ``.env``."""
    environ = os.environ if environ is None else environ
    for name in env_names:
        value = (environ.get(name) or "").strip()
        if value:
            return value
    dotenv_file = dotenv_path if dotenv_path is not None else tools_dotenv_path(environ)
    if dotenv_file.is_file():
        value = (dotenv_values(dotenv_file).get(dotenv_name) or "").strip()
        if value:
            return value
    return None


def resolve_url(
    explicit: str | None, env_name: str, default: str, environ: Mapping[str, str] | None = None
) -> str:
    """An explicit URL (``--url``) wins, then ``env_name`` (tests point it at 127.0.0.1)."""
    environ = os.environ if environ is None else environ
    return (explicit or environ.get(env_name) or default).rstrip("/")


class BearerApiClient:
    """A JSON API behind ``Authorization: Bearer <key>``; subclasses word the errors."""

    def __init__(
        self,
        api_key: str,
        *,
        timeout: float,
        retry: RetryPolicy | None,
        sleep: Callable[[float], None] = time.sleep,
        base_url: str | None = None,
    ) -> None:
        self._key = api_key
        self.timeout = timeout
        self.retry = retry or RetryPolicy()
        self._sleep = sleep
        self._http = httpx.Client(
            **({"base_url": base_url} if base_url else {}),
            headers={"Authorization": f"Bearer {api_key}", "Accept": "application/json"},
            timeout=timeout,
            follow_redirects=False,
        )

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _scrub(self, text: str) -> str:
        return text.replace(self._key, "***") if self._key else text

    def _send(
        self,
        method: str,
        url: str,
        *,
        where: str,
        params: Mapping[str, Any] | None = None,
        json_body: Any = None,
        idempotent: bool = True,
    ) -> httpx.Response:
        """The answer that is not worth retrying; MaybeSent or GaveUp otherwise."""
        return send_with_retries(
            lambda: self._http.request(method, url, params=params, json=json_body),
            self.retry,
            where=where,
            timeout=self.timeout,
            idempotent=idempotent,
            sleep=self._sleep,
        )
