"""The few tmux commands remote_train needs, on the host.

Training runs inside a detached tmux session so that a dropped SSH connection, a closed
laptop or a killed ``remote_train.py`` never stops it. ``new-session`` refuses a name that
exists, which makes "start this run unless it is already running" atomic. ``socket`` picks a
separate tmux server (``tmux -L``), which tests use to stay out of the user's own.
"""

from __future__ import annotations

import shlex
import subprocess


def tmux_args(socket: str | None) -> list[str]:
    return ["tmux", *(["-L", socket] if socket else [])]


def live_sessions(socket: str | None) -> set[str]:
    """Names of the sessions alive now (none when no tmux server runs)."""
    try:
        result = subprocess.run(
            [*tmux_args(socket), "list-sessions", "-F", "#{session_name}"],
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.TimeoutExpired):
        return set()
    return set(result.stdout.split()) if result.returncode == 0 else set()


def new_session(socket: str | None, name: str, cwd: str, command: list[str]) -> str | None:
    """Start ``command`` detached in a new session; None, "duplicate", or tmux's error."""
    result = subprocess.run(
        [*tmux_args(socket), "new-session", "-d", "-s", name, "-c", cwd, shlex.join(command)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    if result.returncode == 0:
        return None
    message = result.stderr.strip() or f"tmux exited with code {result.returncode}"
    return "duplicate" if "duplicate session" in message else message


def attach_command(socket: str | None, name: str) -> str:
    """What to type on the host to see the session's pane itself."""
    return shlex.join([*tmux_args(socket), "attach", "-t", name])
