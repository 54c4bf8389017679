"""What an export refuses with: one line for the user, and the exit code a script returns."""

from __future__ import annotations

import re

from src.common.errors import EXIT_CONFIG_ERROR, ConfigError

EXIT_CHECK_FAILED = 1  # the export ran but disagrees with torch: not the user's input


class ExportError(ConfigError):
    """A problem with what was asked for, as one line; the script exits with ``exit_code``."""

    label = "error"
    exit_code = EXIT_CONFIG_ERROR


class CheckFailedError(ExportError):
    """The exported file does not compute what the torch model computes."""

    exit_code = EXIT_CHECK_FAILED


def describe_error(error: BaseException) -> str:
    """The innermost cause's first line, without colour codes (dynamo wraps the missing op's
    name two levels deep under a generic 'Failed to convert')."""
    while error.__cause__ is not None:
        error = error.__cause__
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(error)).strip()
    first = text.splitlines()[0] if text else type(error).__name__
    return first.rstrip(".")
