"""Run scripts/sync_outputs.sh as a user would, against the test sshd."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

from tests.support.sshd import SshServer

REPO_ROOT = Path(__file__).resolve().parents[2]
SYNC_SCRIPT = REPO_ROOT / "scripts" / "sync_outputs.sh"


def make_tree(root: Path, sizes: dict[str, int], seed: int = 0) -> None:
    """Files of pseudo-random bytes (incompressible, so byte counts mean something)."""
    import random

    rng = random.Random(seed)
    for relative, size in sizes.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(rng.randbytes(size))


def sync_env(server: SshServer, manifest_dir: Path, key: Path | None = None, **extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("S3_", "AWS_", "SYNC_"))}
    env.update(
        SYNC_SSH_OPTS=server.ssh_opts_env(key),
        SYNC_MANIFEST_DIR=str(manifest_dir),
        SYNC_DOTENV=str(manifest_dir / "no.env"),  # never the developer's own .env
        PYTHONUNBUFFERED="1",
    )
    env.update(extra)
    return env


def run_sync(
    server: SshServer,
    local_dir: Path,
    remote_dir: Path,
    env: dict,
    port: int | None = None,
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            str(SYNC_SCRIPT),
            "-q",
            "-p",
            str(port or server.port),
            server.target,
            str(local_dir),
            str(remote_dir),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def transferred(stdout: str) -> tuple[int, int, int]:
    """(received, sent, tree bytes) from the script's summary line."""
    match = re.search(r"received=(\d+) sent=(\d+) tree=(\d+)", stdout)
    assert match, stdout
    return int(match.group(1)), int(match.group(2)), int(match.group(3))
