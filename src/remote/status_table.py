"""``--status``: the host's runs as one table (state, step, age, experiment, tmux session)."""

from __future__ import annotations

import shlex
import sys
from typing import Any

from rich.console import Console
from rich.table import Table


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = max(0.0, seconds)
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def print_status_table(host: str, remote_dir: str, runs: list[dict[str, Any]], now: float) -> None:
    console = Console(highlight=False, width=None if sys.stdout.isatty() else 160)
    if not runs:
        console.print(f"no runs on {host} ({remote_dir})")
        return
    table = Table("run", "state", "step", "age", "experiment", "tmux session", title=host)
    for state in runs:
        shown = state["outcome"] if state["state"] == "finished" else state["state"]
        if state["state"] == "finished":
            age = f"ended {_age(now - state['finished_at'])} ago" if state["finished_at"] else "-"
        else:
            since = state.get("started_at") or state["created_at"]
            age = _age(now - since)
        command = shlex.join([state["experiment"], *state["args"]])
        table.add_row(
            state["run_name"], shown, state["step"] or "-", age, command, state["session"]
        )
    console.print(table)
