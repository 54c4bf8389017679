"""The one error type for bad input, and its exit code."""

from __future__ import annotations

EXIT_CONFIG_ERROR = 2  # bad input: one line said what to fix; nothing was written


class ConfigError(ValueError):
    """A config problem, worded as one line that says what is wrong and how to fix it."""

    label = "config error"  # how a script prints it: "<label>: <message>", then exit 2

    @property
    def line(self) -> str:
        """The one line a script prints before exiting with EXIT_CONFIG_ERROR."""
        return f"{self.label}: {self}"


# scripts/check_instance.py --min-gpu-efficiency: a GPU delivers less than that share of its
# peak (remote_train --check reads it from the host to refuse training there).
EXIT_BELOW_EFFICIENCY = 3
