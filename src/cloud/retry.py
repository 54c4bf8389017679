"""How a cloud API client retries: bounded attempts, doubling waits, Retry-After, and never
a request that may already have been acted on (renting twice costs money)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import httpx


@dataclass(frozen=True)
class RetryPolicy:
    """Bounded: ``attempts`` tries at most; waits double from ``base_delay`` to ``max_delay``."""

    attempts: int = 4
    base_delay: float = 1.0
    max_delay: float = 10.0

    def delay(self, attempt: int, retry_after: str | None = None) -> float:
        if retry_after and retry_after.strip().isdigit():
            return min(float(retry_after.strip()), self.max_delay)
        return min(self.base_delay * 2**attempt, self.max_delay)


# Answers worth another try: rate limited, or the server failed before it could act.
RETRY_STATUSES = {429, 500, 502, 503, 504}


class MaybeSent(Exception):  # noqa: N818 - a state, not a bug: the request may have landed
    """A non-idempotent request hit a timeout, a dropped connection or a 5xx: it may have
    gone through, so it is not retried; ``problem`` says what happened."""

    def __init__(self, problem: str) -> None:
        super().__init__(problem)
        self.problem = problem


class GaveUp(Exception):  # noqa: N818 - the retries ran out; ``problem`` is the last one
    def __init__(self, problem: str) -> None:
        super().__init__(problem)
        self.problem = problem


def send_with_retries(
    send: Callable[[], httpx.Response],
    policy: RetryPolicy,
    *,
    where: str,
    timeout: float,
    idempotent: bool = True,
    sleep: Callable[[float], None] = time.sleep,
) -> httpx.Response:
    """``send()`` until it gets an answer that is not in RETRY_STATUSES, within ``policy``.

    A request that cannot have been acted on (no connection, or 429) is always retried; one
    that may have been (a timeout, a broken connection, a 5xx) only when ``idempotent``, else
    ``MaybeSent`` at once. ``GaveUp`` when the attempts run out; ``where`` names the server.
    """
    last_problem = ""
    for attempt in range(policy.attempts):
        retry_after = None
        maybe_sent = False
        try:
            response = send()
        except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout) as error:
            last_problem = f"cannot reach {where} ({type(error).__name__})"
        except httpx.TimeoutException:
            last_problem = f"no answer from {where} within {timeout:g} s"
            maybe_sent = True
        except httpx.TransportError as error:
            last_problem = f"connection to {where} failed ({type(error).__name__})"
            maybe_sent = True
        else:
            if response.status_code not in RETRY_STATUSES:
                return response
            retry_after = response.headers.get("Retry-After")
            kind = "rate limited" if response.status_code == 429 else "server error"
            last_problem = f"HTTP {response.status_code} ({kind})"
            maybe_sent = response.status_code != 429
        if maybe_sent and not idempotent:
            raise MaybeSent(last_problem)
        if attempt + 1 < policy.attempts:
            sleep(policy.delay(attempt, retry_after))
    raise GaveUp(last_problem)
