"""Where things live: the repo root, and a writable output directory.

On Vast.ai the persistent volume is mounted at /workspace; everything else in the
container dies with it. Off Vast.ai (laptop, CI) /workspace usually does not exist,
so outputs fall back to the repo-local ``outputs/`` with one line saying so.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
VOLUME_ROOT = Path("/workspace")
DEFAULT_PERSISTENT_DIR = "/workspace/persistent"
LOCAL_FALLBACK_DIR = REPO_ROOT / "outputs"


def is_writable_dir(path: Path) -> bool:
    """True if ``path`` exists (or can be created) and a file can be written in it."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError:
        return False
    return os.access(path, os.W_OK | os.X_OK)


def resolve_persistent_dir(
    requested: str | os.PathLike[str],
    fallback: Path,
    what: str = "outputs",
) -> Path:
    """Return ``requested`` if usable, else ``fallback`` when ``requested`` is the Vast.ai default.

    Only the default location falls back: a directory the user named explicitly that
    cannot be written is an error (raised as ``PermissionError``), never silently moved.
    """
    requested_path = Path(requested).expanduser()
    on_volume = requested_path == VOLUME_ROOT or VOLUME_ROOT in requested_path.parents
    # Never create /workspace itself: its absence means "not on a Vast.ai-style box".
    if (not on_volume or VOLUME_ROOT.is_dir()) and is_writable_dir(requested_path):
        return requested_path
    if on_volume:
        print(
            f"[paths] {requested_path} is not available (no /workspace volume here); "
            f"writing {what} to {fallback}",
            file=sys.stderr,
        )
        fallback.mkdir(parents=True, exist_ok=True)
        return fallback
    raise PermissionError(
        f"{what} directory {requested_path} is not writable: "
        f"choose another with paths.output_dir=/some/writable/dir"
    )


def resolve_output_dir(requested: str | os.PathLike[str] = DEFAULT_PERSISTENT_DIR) -> Path:
    """The root under which each run gets ``<output_dir>/<run_name>/``."""
    return resolve_persistent_dir(requested, LOCAL_FALLBACK_DIR, what="outputs")
