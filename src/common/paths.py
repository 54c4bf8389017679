"""Where things live: the repo root, and a writable output directory.

On Vast.ai the persistent volume is mounted at /workspace; everything else in the
container dies with it. Off Vast.ai (laptop, CI) /workspace usually does not exist,
so outputs fall back to the repo-local ``outputs/`` with one line saying so.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
VOLUME_ROOT = Path("/workspace")
DEFAULT_PERSISTENT_DIR = "/workspace/persistent"
LOCAL_FALLBACK_DIR = REPO_ROOT / "outputs"
DOTENV_ENV = "SYNC_DOTENV"  # names another .env file for the sync/Vast.ai tools (tests use it)
_announced_fallbacks: set[tuple[Path, Path]] = set()  # say each fallback once per process


def tools_dotenv_path(environ: Mapping[str, str]) -> Path:
    """The .env that sync_outputs.sh and launch_vast.py read: SYNC_DOTENV, else the repo's."""
    return Path(environ.get(DOTENV_ENV) or REPO_ROOT / ".env")


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
    setting: str = "paths.output_dir",
    announce: bool = True,
) -> Path:
    """Return ``requested`` if usable, else ``fallback`` when ``requested`` is on /workspace.

    Only the /workspace location falls back: a directory the user named explicitly that
    cannot be written is an error (``PermissionError`` naming ``setting``), never silently
    moved. The result is absolute, so child processes started elsewhere agree on it.
    ``announce=False``: the caller reports the fallback itself (``fallback_reason``).
    """
    requested_path = Path(os.path.abspath(Path(requested).expanduser()))
    on_volume = requested_path == VOLUME_ROOT or VOLUME_ROOT in requested_path.parents
    # Never create /workspace itself: its absence means "not on a Vast.ai-style box".
    if (not on_volume or VOLUME_ROOT.is_dir()) and is_writable_dir(requested_path):
        return requested_path
    if on_volume:
        if announce and (requested_path, fallback) not in _announced_fallbacks:
            _announced_fallbacks.add((requested_path, fallback))
            print(
                f"[paths] {requested_path} is not available ({fallback_reason()}); "
                f"writing {what} to {fallback}",
                file=sys.stderr,
            )
        fallback.mkdir(parents=True, exist_ok=True)
        return fallback
    raise PermissionError(
        f"{what} directory {requested_path} is not writable: "
        f"choose another with {setting}=/some/writable/dir"
    )


def fallback_reason() -> str:
    """Why a /workspace path was not used, in a few words."""
    return "not writable" if VOLUME_ROOT.is_dir() else "no /workspace volume here"


def resolve_output_dir(requested: str | os.PathLike[str] = DEFAULT_PERSISTENT_DIR) -> Path:
    """The root under which each run gets ``<output_dir>/<run_name>/``."""
    return resolve_persistent_dir(requested, LOCAL_FALLBACK_DIR, what="outputs")
