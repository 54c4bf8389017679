"""Send the repo to the host with rsync: only what changed, never what must stay home.

Excluded: version control, virtual environments, caches, outputs and checkpoints (they come
*from* the host), W&B's folder, install stamps (the host keeps its own), and ``.env``, which
holds API keys: sent only with ``--with-env``. Files deleted locally are not deleted on the
host (no ``--delete``), so nothing the host made beside the code is ever removed by a sync.
"""

from __future__ import annotations

import shlex
from pathlib import Path

from src.remote.stages import StageError
from src.storage.output_sync import SshSession, SyncError, TransferStats, run_rsync

# rsync filter patterns: a leading '/' anchors at the repo root, a trailing '/' means folders.
CODE_EXCLUDES = (
    ".git",  # a folder, or in a git worktree a file pointing to a laptop path
    ".hg/",
    ".svn/",
    "/.venv/",
    "/venv/",
    "/env/",
    "/.conda/",
    "__pycache__/",
    "*.pyc",
    ".pytest_cache/",
    ".ruff_cache/",
    ".mypy_cache/",
    ".ipynb_checkpoints/",
    "/.benchmarks/",
    "outputs/",
    "checkpoints/",
    "wandb/",
    "/runs/",
    "*.pt",
    "*.ckpt",
    "/.deps-installed-*",
    "/.remote_runs/",
)
# Code folders whose names the excludes above would catch; rsync takes the first match.
CODE_INCLUDES = ("/src/checkpoints/",)
ENV_FILE = ".env"


def rsync_exclude_options(with_env: bool) -> list[str]:
    patterns = list(CODE_EXCLUDES) + ([] if with_env else [ENV_FILE])
    includes = [f"--include={pattern}" for pattern in CODE_INCLUDES]
    return includes + [f"--exclude={pattern}" for pattern in patterns]


def push_code(
    session: SshSession, repo_root: Path, remote_dir: str, with_env: bool = False
) -> TransferStats:
    """rsync ``repo_root/`` to ``remote_dir/`` (created if missing); StageError("sync")."""
    made = session.run(f"mkdir -p -- {shlex.quote(remote_dir)}", timeout=60)
    if made.returncode != 0:
        lines = made.stderr.decode(errors="replace").strip().splitlines()
        raise StageError(
            "sync",
            f"cannot create {remote_dir} on {session.host} ({lines[-1] if lines else 'no message'})"
            ": pass --remote-dir with a writable folder, e.g. --remote-dir ~/code",
        )
    try:
        return run_rsync(
            session,
            remote_dir,
            repo_root,
            show_progress=False,
            push=True,
            options=rsync_exclude_options(with_env),
            copy_links=False,
            stage="sync",
        )
    except SyncError as error:
        raise StageError("sync", error.reason) from None
