"""Open the one SSH connection (a ControlMaster that every later command rides on) and say in
one line what went wrong when it can't be opened.

ssh's own messages are accurate but scattered over several lines, and the last one
("Host key verification failed.") can hide the cause; each kind of failure gets a line
naming it and the usual fix.
"""

from __future__ import annotations

import shlex
from collections.abc import Mapping
from dataclasses import dataclass

from src.remote.stages import StageError
from src.storage.output_sync import SSH_OPTS_ENV, SshSession, SyncError

# The master outlives a client killed before it could close it (kill -9) by this long.
CONTROL_PERSIST_S = 120


def explain_ssh_failure(detail: str, host: str, address: str) -> str:
    """One line naming the kind of failure, from ssh's stderr."""
    text = detail.lower()
    last = next((line.strip() for line in reversed(detail.splitlines()) if line.strip()), "")
    if "could not resolve hostname" in text or "name or service not known" in text:
        return (
            f"unknown host {host}: check the name, or add a Host entry to ~/.ssh/config "
            "(Vast.ai: python scripts/launch_vast.py ssh-config ID)"
        )
    if "identification has changed" in text or "host key for" in text and "changed" in text:
        return (
            f"the host key of {address} changed (a new instance at a reused address?): if "
            f"you expect that, forget the old key with: ssh-keygen -R {shlex.quote(address)}"
        )
    if "host key verification failed" in text:
        return (
            f"the host key of {address} is not trusted (StrictHostKeyChecking): connect once "
            f"with ssh to accept it, or remove a stale entry: ssh-keygen -R {shlex.quote(address)}"
        )
    if "connection refused" in text:
        return (
            f"connection refused by {address}: is the instance running and is this its SSH "
            "port? (python scripts/launch_vast.py status shows both)"
        )
    if "permission denied" in text or "too many authentication failures" in text:
        return (
            f"authentication failed at {address} ({last}): the server refused your key; "
            f"check IdentityFile in ~/.ssh/config or -i in {SSH_OPTS_ENV}, and that the "
            "public key is on the host (Vast.ai: your account's SSH keys)"
        )
    if "timed out" in text:
        return (
            f"timed out connecting to {address}: the host is down, still starting, or a "
            "firewall drops the port"
        )
    if "no route to host" in text or "network is unreachable" in text:
        return f"no network route to {address} ({last}): check your connection and the address"
    return f"cannot open SSH to {host}: {last or 'ssh failed without a message'}"


@dataclass
class Probe:
    """What the host has, checked once right after connecting."""

    home: str
    remote_dir: str  # absolute: '~' expanded with the host's $HOME
    has_tmux: bool
    has_rsync: bool
    has_code: bool  # the repo (with its agent) was synced to remote_dir before


def remote_path_expr(path: str) -> str:
    """A shell word for ``path`` on the host: quoted, with a leading ``~`` left to expand."""
    if path == "~":
        return '"$HOME"'
    if path.startswith("~/"):
        return '"$HOME"/' + shlex.quote(path[2:])
    return shlex.quote(path)


def probe_command(remote_dir: str) -> str:
    return (
        f"d={remote_path_expr(remote_dir)}; "
        'printf "home=%s\\ndir=%s\\n" "$HOME" "$d"; '
        "command -v tmux >/dev/null 2>&1 && echo tmux=yes; "
        "command -v rsync >/dev/null 2>&1 && echo rsync=yes; "
        '[ -f "$d/src/remote/agent.py" ] && echo code=yes; true'
    )


def open_session(host: str, port: int | None, settings: Mapping[str, str]) -> SshSession:
    """A started ControlMaster session, or StageError("connect") with one clear line."""
    session = SshSession(
        host, port, shlex.split(settings.get(SSH_OPTS_ENV, "")), persist_s=CONTROL_PERSIST_S
    )
    try:
        try:
            _, hostname, resolved_port = session.resolve()
        except SyncError as error:
            raise StageError("connect", error.reason) from None
        # How ssh-keygen -R and known_hosts name it.
        address = hostname if resolved_port == 22 else f"[{hostname}]:{resolved_port}"
        try:
            session.start()
        except SyncError as error:
            explained = explain_ssh_failure(error.detail or error.reason, host, address)
            raise StageError("connect", explained) from None
    except OSError as error:  # no ssh binary
        session.close()
        raise StageError(
            "connect", f"cannot run ssh ({error.strerror or error}): install openssh-client"
        ) from None
    except StageError:
        session.close()
        raise
    return session


def probe(session: SshSession, remote_dir: str) -> Probe:
    """One command: the host's $HOME, the code dir, and whether tmux, rsync and code are there."""
    result = session.run(probe_command(remote_dir), timeout=60)
    if result.returncode != 0:
        message = result.stderr.decode(errors="replace").strip().splitlines()
        raise StageError(
            "connect", f"the host did not answer a shell command: {message[-1] if message else ''}"
        )
    lines = result.stdout.decode(errors="replace").splitlines()
    values = dict(line.split("=", 1) for line in lines if "=" in line)
    return Probe(
        home=values.get("home", ""),
        remote_dir=values.get("dir", remote_dir),
        has_tmux=values.get("tmux") == "yes",
        has_rsync=values.get("rsync") == "yes",
        has_code=values.get("code") == "yes",
    )
