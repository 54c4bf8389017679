"""What every provider's API client shares: one httpx client with a bearer key, the key
scrubbed from every message, and requests sent through ``send_with_retries``."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

import httpx
from typing_extensions import Self

from src.cloud.retry import RetryPolicy, send_with_retries


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
