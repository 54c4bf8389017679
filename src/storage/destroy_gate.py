"""Whether a machine may be destroyed: only when its outputs are home and proven identical.

Destroying a rented machine deletes its disk. The gate is given the machine's SSH addresses
(its provider knows them: a Vast.ai instance has a direct and a proxy one) and looks at the
outputs root (``SYNC_REMOTE_DIR`` from the environment or ``.env``, default
``/workspace/persistent``, or ``destroy --remote-dir``). It finds the download manifests
written by ``sync_outputs.sh`` for any of those addresses whose remote dir *covers* that
root (the root itself or a parent: a manifest of ``run1`` says nothing about ``run2``). One
of them must pass, right now: (1) the last sync verified, (2) the local copies still hash to
the manifest, (3) no remote file under it changed or appeared since the sync (training may
have written more; a file deleted remotely is still safe at home). Any doubt refuses;
``--force`` is the way out.

Hashes are reused from the sync's hash cache (``<manifest>.hashes``) for files whose stat
key (size, mtime, ctime, inode) is unchanged on their side, so the check right after a sync
reads no file twice; anything touched since is hashed again.

The remote is listed through the same SSH host the sync used (the manifest's alias or
user@host), so ``~/.ssh/config`` (IdentityFile, ProxyJump...) applies as it did for the sync;
``HostName``/``Port``/``User`` are pinned to the manifest's resolved address, so an alias since
re-pointed at another machine cannot answer for this one.
"""

from __future__ import annotations

import shlex
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from src.storage.manifest import (
    HashTable,
    Manifest,
    RemoteListingError,
    compare_entries,
    covers,
    find_manifests,
    list_remote_entries,
    manifest_dir,
    normalize_remote_dir,
    read_hash_cache,
    verify_local,
)
from src.storage.output_sync import DEFAULT_REMOTE_DIR, REMOTE_DIR_ENV, SSH_OPTS_ENV, load_settings

SYNC_SCRIPT = "./scripts/sync_outputs.sh"


class SshEndpoint(Protocol):
    """Where a machine answers SSH: any object with these three fields (each cloud provider
    has its own address type, and storage knows none of them)."""

    @property
    def host(self) -> str: ...

    @property
    def port(self) -> int: ...

    @property
    def user(self) -> str: ...


@dataclass
class GateResult:
    allowed: bool
    reason: str
    manifests: list[Path] = field(default_factory=list)


def remote_command_args(manifest: Manifest, environ: Mapping[str, str], command: str) -> list[str]:
    """The ssh argv running ``command`` on the synced host as the sync reached it, pinned to
    its address."""
    return [
        "ssh",
        *shlex.split(environ.get(SSH_OPTS_ENV, "")),
        "-p",
        str(manifest.ssh_port),
        "-l",
        manifest.ssh_user,
        "-o",
        f"HostName={manifest.ssh_hostname}",
        "-o",
        "BatchMode=yes",
        "-o",
        "ConnectTimeout=15",
        "-o",
        "StrictHostKeyChecking=accept-new",
        # The alias (or user@host) the sync was given: its Host block applies again.
        manifest.host,
        command,
    ]


def remote_entries(
    manifest: Manifest, environ: Mapping[str, str], cache: HashTable | None = None
) -> list[Any]:
    """The remote listing now (hashing only files not in ``cache`` with the same stat key);
    RuntimeError with one line on failure."""

    def run(command: str, stdin: bytes | None) -> subprocess.CompletedProcess:
        try:
            return subprocess.run(
                remote_command_args(manifest, environ, command),
                input=stdin,
                stdin=subprocess.DEVNULL if stdin is None else None,
                capture_output=True,
                timeout=600,
            )
        except OSError as error:  # no ssh binary, or not executable
            raise RuntimeError(
                f"cannot run ssh ({error.strerror or error}): install openssh-client"
            ) from None

    try:
        return list_remote_entries(run, manifest.remote_dir, cache)[0]
    except RemoteListingError as error:
        raise RuntimeError(str(error)) from None


def sync_command(address: SshEndpoint, root: str, settings: Mapping[str, str]) -> str:
    """The exact command that syncs ``root`` from this address into SYNC_LOCAL_DIR."""
    local = settings.get("SYNC_LOCAL_DIR") or "./outputs"
    return shlex.join(
        [SYNC_SCRIPT, "-p", str(address.port), f"{address.user}@{address.host}", local, root]
    )


def resync_command(manifest: Manifest) -> str:
    """The sync that would refresh this manifest (an alias keeps its own Port)."""
    port = ["-p", str(manifest.ssh_port)] if "@" in manifest.host else []
    return shlex.join([SYNC_SCRIPT, *port, manifest.host, manifest.local_dir, manifest.remote_dir])


def _check_manifest(
    manifest: Manifest, environ: Mapping[str, str], manifest_file: Path | None = None
) -> str | None:
    """None when this manifest proves its remote dir is home right now; else why not."""
    source = f"{manifest.host}:{manifest.remote_dir}"
    hint = f"run {resync_command(manifest)} again, or pass --force"
    if not manifest.verified:
        first = manifest.mismatches[0] if manifest.mismatches else "unknown"
        return f"the last sync of {source} failed verification ({first}): {hint}"
    cache = (
        read_hash_cache(manifest_file, manifest.local_dir, manifest.remote_dir)
        if manifest_file is not None
        else None
    )
    local_problems = verify_local(manifest, cache.local if cache else None)
    if local_problems:
        return f"local copy in {manifest.local_dir} differs: {local_problems[0]}: {hint}"
    try:
        now = remote_entries(manifest, environ, cache.remote if cache else None)
    except (RuntimeError, ValueError, subprocess.TimeoutExpired) as error:
        return f"cannot check the remote {source} ({error}): outputs unverified, refusing"
    if not manifest.files and now:
        # Said explicitly: an empty sync must never stand for a directory that has files.
        return (
            f"the last sync of {source} brought 0 files but it now holds {len(now)} "
            f"(e.g. {now[0].path}): {hint}"
        )
    changed = compare_entries(now, manifest.files)
    if changed:
        problem = changed[0].replace(": missing", ": new on the remote, not downloaded")
        return f"remote {source} changed since the sync: {problem}: {hint}"
    return None


def check_outputs_downloaded(
    addresses: Sequence[SshEndpoint],
    environ: Mapping[str, str] | None = None,
    remote_root: str | None = None,
    machine: str = "the machine",
) -> GateResult:
    """Allowed only if a manifest covering the outputs root still matches remote and local.

    ``addresses``: every SSH address of the machine (a sync through any of them counts);
    ``machine`` names it in the messages (``instance 101``).
    """
    settings = load_settings(environ)
    root = normalize_remote_dir(remote_root or settings.get(REMOTE_DIR_ENV) or DEFAULT_REMOTE_DIR)
    if not addresses:
        return GateResult(
            False,
            f"{machine} has no SSH address, so its outputs cannot be checked: "
            "start it and sync, or pass --force",
        )
    directory = manifest_dir(settings)
    found = [m for a in addresses for m in find_manifests(directory, a.host, a.port)]
    covering = [(path, m) for path, m in found if covers(m.remote_dir, root)]
    if not covering:
        where = " or ".join(f"{a.user}@{a.host} -p {a.port}" for a in addresses)
        if found:
            synced = ", ".join(sorted({m.remote_dir for _, m in found}))
            what = f"the syncs of {machine} ({synced}) do not cover {root}"
        else:
            what = f"no download manifest for {machine} ({where}) covers {root}"
        return GateResult(
            False,
            f"{what}: run {sync_command(addresses[0], root, settings)} "
            f"(another outputs dir: --remote-dir or SYNC_REMOTE_DIR), or pass --force",
            [path for path, _ in found],
        )
    covering.sort(key=lambda item: item[1].created_at, reverse=True)  # newest first
    paths = [path for path, _ in covering]
    first_problem = None
    for path, manifest in covering:
        problem = _check_manifest(manifest, settings, path)
        if problem is None:
            return GateResult(
                True,
                f"{len(manifest.files)} files under {manifest.remote_dir} verified "
                f"against {path.name}",
                paths,
            )
        first_problem = first_problem or problem
    assert first_problem is not None
    return GateResult(False, first_problem, paths)
