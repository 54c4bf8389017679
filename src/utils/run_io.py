"""Run directory and the small JSON files in it, written atomically."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from src.common.atomic_io import atomic_write_bytes
from src.common.paths import resolve_output_dir
from src.config import ConfigError, resume_settings, to_plain_dict


def _finite(value: Any) -> Any:
    """JSON has no NaN/inf: write them as null instead of invalid JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_finite(item) for item in value]
    return value


def write_json(path: Path, data: Any) -> None:
    atomic_write_bytes(path, (json.dumps(_finite(data), indent=2) + "\n").encode())


def run_dir_for(cfg: DictConfig) -> Path:
    """``<paths.output_dir>/<run_name>`` with the /workspace fallback applied (creates nothing
    under an explicitly given directory beyond the run dir itself)."""
    return resolve_output_dir(cfg.paths.output_dir) / cfg.run_name


def prepare_run_dir(cfg: DictConfig, is_main: bool = True) -> Path:
    """Create the run directory and write the resolved, redacted config to config.json."""
    run_dir = run_dir_for(cfg)
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_json(run_dir / "config.json", to_plain_dict(cfg))
    return run_dir


def check_resume_settings(
    cfg: DictConfig,
    world_size: int = 1,
    *,
    saved: Mapping[str, Any] | None = None,
    where: str | None = None,
) -> None:
    """Refuse to resume a run whose newest checkpoint was made with other RESUME_SETTINGS.

    Called before anything is written (by the experiment's config loader, and again by the
    trainer for code that builds it directly), so a mistyped override costs a one-line
    error instead of a run that silently trains something else from the old weights.
    ``saved`` / ``where``: the settings of a checkpoint elsewhere (the S3 mirror's newest).
    """
    from src.utils.checkpoint_manager import read_checkpoint_infos

    run_dir = run_dir_for(cfg)
    if saved is None:
        infos = read_checkpoint_infos(run_dir / "checkpoints")
        saved = infos[0].metadata.get("resume_settings") if infos else None
    if not isinstance(saved, dict):
        return  # a new run, or checkpoints from before settings were recorded
    saved = {"world_size": 1, **saved}  # recorded since multi-rank resume checks
    now = resume_settings(cfg, world_size)
    changed = sorted(key for key in saved.keys() | now.keys() if saved.get(key) != now.get(key))
    if changed:
        diffs = ", ".join(f"{key}={saved.get(key)!r} (now {now.get(key)!r})" for key in changed[:3])
        more = f" and {len(changed) - 3} more" if len(changed) > 3 else ""
        raise ConfigError(
            f"run '{cfg.run_name}' in {where or run_dir} was checkpointed with {diffs}{more}: "
            "resume with the same settings, or start fresh with a new run_name"
        )
