"""Run name and run directory of an experiment command, found on the host without running it.

The tmux session is named after the run, and its log lives in the run directory, so both
must be known before the experiment starts. They come from the same sources the experiment
reads: ``--config PATH`` or the dev/prod file ``DEV_MODE`` picks (an experiment with its own
files names them in its ``load_experiment_config(dev_config=..., prod_config=...)`` call,
read here from its source), then the ``key=value`` overrides, then the /workspace fallback.
Only ``run_name`` and ``paths.output_dir`` are read; the experiment itself checks the rest.

``scripts/sweep.py --config SWEEP_FILE``: the file's ``sweep:`` section names the session
(``sweep.name``) and the outputs root (``sweep.output_dir``); the log goes to
``<root>/sweeps/<name>/`` and the whole root comes home, since the trials' run directories
``<name>_...`` sit in it beside the study.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from src.common.paths import DEFAULT_PERSISTENT_DIR, LOCAL_FALLBACK_DIR, resolve_persistent_dir
from src.config import (
    DEV_CONFIG,
    NULL_TEXTS,
    PROD_CONFIG,
    ConfigError,
    ExperimentConfig,
    default_config_path,
    load_dotenv_file,
    parse_cli,
)


def _string_parts(node: ast.AST) -> list[str]:
    """``REPO_ROOT / "configs" / "x.yaml"`` -> ["configs", "x.yaml"]; "configs/x.yaml" -> itself."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return [node.value]
    if isinstance(node, ast.BinOp):
        return _string_parts(node.left) + _string_parts(node.right)
    if isinstance(node, ast.Call):
        return [part for arg in node.args for part in _string_parts(arg)]
    return []


def experiment_config_files(experiment: Path, repo_root: Path) -> tuple[Path, Path]:
    """(dev, prod) config files the experiment loads by default."""
    found: dict[str, Path] = {}
    try:
        tree = ast.parse(experiment.read_text())
    except (OSError, SyntaxError, ValueError):
        tree = None
    for node in ast.walk(tree) if tree is not None else []:
        func = getattr(node, "func", None)
        name = getattr(func, "id", None) or getattr(func, "attr", None)
        if isinstance(node, ast.Call) and name == "load_experiment_config":
            for keyword in node.keywords:
                parts = _string_parts(keyword.value)
                if keyword.arg in ("dev_config", "prod_config") and parts:
                    found[keyword.arg] = repo_root.joinpath(*parts)
            break
    return found.get("dev_config", DEV_CONFIG), found.get("prod_config", PROD_CONFIG)


def needed_keys(cfg: Any) -> list[str]:
    """What the run will want from .env or the environment, in words (no values)."""
    needs = []
    if OmegaConf.select(cfg, "checkpoint.s3_bucket", default=None):
        needs.append("AWS credentials (checkpoint.s3_bucket is set)")
    wandb_on = OmegaConf.select(cfg, "logging.use_wandb", default=None)
    if wandb_on is None:
        wandb_on = OmegaConf.select(cfg, "logging.wandb", default=None)
    if wandb_on and OmegaConf.select(cfg, "logging.wandb_mode", default="offline") == "online":
        needs.append("WANDB_API_KEY (W&B online)")
    return needs


def merged_config(experiment: str, args: list[str], repo_root: Path, where: str = "host") -> Any:
    """The experiment's config file merged with its ``key=value`` overrides (not checked
    further); ConfigError with one line on bad input."""
    config_path, overrides = parse_cli(args)
    if config_path is None:
        load_dotenv_file()  # DEV_MODE may come from the host's .env
        dev, prod = experiment_config_files(repo_root / experiment, repo_root)
        path = default_config_path(dev, prod)
    else:
        path = Path(config_path)
        if not path.is_absolute() and not path.is_file():
            path = repo_root / path
    if not path.is_file():
        raise ConfigError(f"config file not found on the {where}: {path}")
    bad = [item for item in overrides if "=" not in item]
    if bad:
        raise ConfigError(f"override '{bad[0]}' is not key=value (e.g. trainer.max_steps=300)")
    try:
        return OmegaConf.merge(OmegaConf.load(path), OmegaConf.from_dotlist(overrides))
    except Exception as error:  # yaml or dotlist syntax: the experiment would say the same
        raise ConfigError(f"cannot read {path} with the overrides: {error}") from None


def plan_run(experiment: str, args: list[str], repo_root: Path) -> dict[str, Any]:
    """{run_name, run_dir, output_root, retrieve, needs_keys}; ConfigError with one line on
    bad input. ``retrieve``: the host directory that comes home (the run's, or a sweep's
    whole outputs root)."""
    cfg = merged_config(experiment, args, repo_root)
    sweep = OmegaConf.select(cfg, "sweep", default=None)
    if isinstance(sweep, DictConfig):  # scripts/sweep.py --config SWEEP_FILE
        name = str(sweep.get("name") or "sweep")
        root = _outputs_root(sweep.get("output_dir"), "sweep.output_dir")
        run_dir = root / "sweeps" / name
        return {
            "run_name": name,
            "run_dir": str(run_dir),
            "output_root": str(root),
            "retrieve": str(root),
            "needs_keys": [],
        }
    run_name = _typed_run_name(args) or str(
        OmegaConf.select(cfg, "run_name", default=None) or ExperimentConfig.run_name
    )
    root = _outputs_root(OmegaConf.select(cfg, "paths.output_dir", default=None))
    return {
        "run_name": run_name,
        "run_dir": str(root / run_name),
        "output_root": str(root),
        "retrieve": str(root / run_name),
        "needs_keys": needed_keys(cfg),
    }


def _outputs_root(output_dir: str | None, setting: str = "paths.output_dir") -> Path:
    try:
        requested = output_dir or DEFAULT_PERSISTENT_DIR
        return resolve_persistent_dir(
            requested, LOCAL_FALLBACK_DIR, setting=setting, announce=False
        )
    except PermissionError as error:
        raise ConfigError(str(error)) from None


def _typed_run_name(args: list[str]) -> str | None:
    """The last ``run_name=`` override as typed (YAML would read ``run_name=off`` as False),
    as the experiment's own loader keeps it."""
    _, overrides = parse_cli(args)
    given = [item.partition("=")[2] for item in overrides if item.startswith("run_name=")]
    return given[-1] if given and given[-1] not in NULL_TEXTS else None
