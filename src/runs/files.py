"""The run directory itself and the small JSON files in it, written atomically."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from src.common.atomic_io import atomic_write_bytes
from src.common.paths import resolve_output_dir
from src.config import to_plain_dict
from src.runs.layout import RunLayout


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
        write_json(RunLayout(run_dir).config, to_plain_dict(cfg))
    return run_dir
