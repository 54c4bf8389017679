"""Secrets never reach config.json, checkpoints, logs or W&B: redaction by key and by value."""

from __future__ import annotations

import os
import re
from typing import Any

from omegaconf import DictConfig, OmegaConf

SECRET_KEY_PATTERN = re.compile(r"(key|secret|token|password|passwd|credential)", re.IGNORECASE)
REDACTED = "***REDACTED***"


def redact_secrets(value: Any) -> Any:
    """Copy of a plain dict/list with values under secret-looking keys replaced."""
    if isinstance(value, dict):
        return {
            key: REDACTED if SECRET_KEY_PATTERN.search(str(key)) and item else redact_secrets(item)
            for key, item in value.items()
        }
    if isinstance(value, list):
        return [redact_secrets(item) for item in value]
    return value


def secret_values(environ: dict[str, str] | None = None) -> list[str]:
    """Values of secret-looking environment variables (AWS_SECRET_ACCESS_KEY, *_TOKEN...)."""
    environ = dict(os.environ) if environ is None else environ
    values = {v for k, v in environ.items() if SECRET_KEY_PATTERN.search(k) and len(v) >= 6}
    return sorted(values, key=len, reverse=True)  # longest first: no partial leftovers


def scrub_secret_values(value: Any, secrets: list[str]) -> Any:
    """Copy with every occurrence of a secret value replaced, at any depth."""
    if isinstance(value, str):
        for secret in secrets:
            value = value.replace(secret, REDACTED)
        return value
    if isinstance(value, dict):
        return {key: scrub_secret_values(item, secrets) for key, item in value.items()}
    if isinstance(value, list):
        return [scrub_secret_values(item, secrets) for item in value]
    return value


def to_plain_dict(cfg: DictConfig) -> dict[str, Any]:
    """Resolved config as a plain dict, safe for config.json and W&B: values under
    secret-looking keys are redacted, and so is any secret from the environment that an
    interpolation such as ``${oc.env:AWS_SECRET_ACCESS_KEY}`` copied into another value."""
    plain = redact_secrets(OmegaConf.to_container(cfg, resolve=True))
    return scrub_secret_values(plain, secret_values())
