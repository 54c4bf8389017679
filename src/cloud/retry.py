"""How a cloud API client retries a read: bounded attempts, doubling waits, Retry-After."""

from __future__ import annotations

from dataclasses import dataclass


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
