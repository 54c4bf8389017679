"""Whether an instance may be destroyed: only when its outputs are home and proven identical.

Destroying a Vast.ai instance deletes its disk. The gate finds the download manifests written
by ``scripts/sync_outputs.sh`` for the instance's SSH address (direct or proxy), then checks,
right now, that (1) the last sync verified, (2) the local copies still hash to the manifest,
and (3) no remote file changed or appeared since the sync (training may have written more;
a file deleted remotely is still safe at home). Any doubt refuses; ``--force`` is the way out.
"""

from __future__ import annotations

import os
import shlex
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from src.utils.manifest import (
    Manifest,
    compare_entries,
    find_manifests,
    manifest_dir,
    parse_remote_listing,
    remote_listing_command,
    verify_local,
)
from src.utils.sync import SSH_OPTS_ENV
from src.vast.instances import ssh_addresses, status_of

SYNC_HINT = "run ./scripts/sync_outputs.sh HOST LOCAL_DIR REMOTE_DIR first, or pass --force"


@dataclass
class GateResult:
    allowed: bool
    reason: str
    manifests: list[Path] = field(default_factory=list)


def remote_entries(manifest: Manifest, environ: Mapping[str, str]) -> list[Any]:
    """The remote listing now, over one SSH command; RuntimeError with one line on failure."""
    command = [
        "ssh",
        *shlex.split(environ.get(SSH_OPTS_ENV, "")),
        "-p",
        str(manifest.ssh_port),
        "-o",
        "BatchMode=yes",
        "-o",
        "ConnectTimeout=15",
        "-o",
        "StrictHostKeyChecking=accept-new",
        f"{manifest.ssh_user}@{manifest.ssh_hostname}",
        remote_listing_command(manifest.remote_dir),
    ]
    result = subprocess.run(command, stdin=subprocess.DEVNULL, capture_output=True, timeout=600)
    if result.returncode != 0:
        lines = result.stderr.decode(errors="replace").strip().splitlines()
        raise RuntimeError(lines[-1] if lines else f"ssh exited with code {result.returncode}")
    return parse_remote_listing(result.stdout)


def check_outputs_downloaded(
    instance: Mapping[str, Any], environ: Mapping[str, str] | None = None
) -> GateResult:
    """Allowed only if every manifest for this instance still matches remote and local files."""
    environ = os.environ if environ is None else environ
    instance_id = instance.get("id")
    addresses = ssh_addresses(dict(instance))
    if not addresses:
        return GateResult(
            False,
            f"instance {instance_id} has no SSH address (status {status_of(dict(instance))}), so "
            f"its outputs cannot be checked: start it and sync, or pass --force",
        )
    directory = manifest_dir(environ)
    found = [m for a in addresses for m in find_manifests(directory, a.host, a.port)]
    if not found:
        where = " or ".join(f"{a.user}@{a.host} -p {a.port}" for a in addresses)
        return GateResult(
            False, f"no download manifest for instance {instance_id} ({where}): {SYNC_HINT}"
        )
    paths = [path for path, _ in found]
    for _path, manifest in found:
        source = f"{manifest.host}:{manifest.remote_dir}"
        if not manifest.verified:
            first = manifest.mismatches[0] if manifest.mismatches else "unknown"
            return GateResult(
                False,
                f"the last sync of {source} failed verification ({first}): {SYNC_HINT}",
                paths,
            )
        local_problems = verify_local(manifest)
        if local_problems:
            return GateResult(
                False,
                f"local copy in {manifest.local_dir} differs: {local_problems[0]}: {SYNC_HINT}",
                paths,
            )
        try:
            now = remote_entries(manifest, environ)
        except (RuntimeError, ValueError, subprocess.TimeoutExpired) as error:
            return GateResult(
                False,
                f"cannot check the remote {source} ({error}): outputs unverified, refusing",
                paths,
            )
        changed = compare_entries(now, manifest.files)
        if changed:
            problem = changed[0].replace(": missing", ": new on the remote, not downloaded")
            return GateResult(
                False, f"remote {source} changed since the sync: {problem}: {SYNC_HINT}", paths
            )
    count = sum(len(m.files) for _, m in found)
    return GateResult(True, f"{count} files verified against {len(found)} manifest(s)", paths)
