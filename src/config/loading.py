"""Loading a config: which file (``--config``, else DEV_MODE's choice), YAML, old key names,
``key=value`` overrides, and the checks the type system can't express.

Which file is loaded:
  1. ``--config PATH`` on the command line, else
  2. ``configs/dev_config.yaml`` when ``DEV_MODE`` is true (the default), else
  3. ``configs/prod_config.yaml``.
``DEV_MODE`` comes from the environment or from ``.env`` (python-dotenv; the
environment wins). Overrides are omegaconf dotlists: ``trainer.max_steps=300 seed=3``.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Collection
from pathlib import Path

from dotenv import load_dotenv
from omegaconf import DictConfig, OmegaConf, StringNode
from omegaconf.errors import OmegaConfBaseException

from src.common.errors import ConfigError
from src.common.paths import REPO_ROOT
from src.common.signals import parse_signals
from src.config.schema import (
    AUTO_BATCH_SIZE,
    BUCKET_NAME,
    TOOL_SECTIONS,
    ExperimentConfig,
    SettingError,
)

CONFIG_DIR = REPO_ROOT / "configs"
DEV_CONFIG = CONFIG_DIR / "dev_config.yaml"
PROD_CONFIG = CONFIG_DIR / "prod_config.yaml"

# Old key -> new key. Files and overrides may still use the old names; they are read as the
# new ones, each layer before it is merged, so a later layer wins as usual.
RENAMED_KEYS = {"logging.wandb": "logging.use_wandb"}
# Override values that YAML reads as null: they clear an optional setting, typed or not.
NULL_TEXTS = ("", "null", "~")
_MISSING = object()


def _env_flag(name: str, default: bool) -> bool:
    value = os.environ.get(name)
    if value is None or value.strip() == "":
        return default
    if value.strip().lower() in {"1", "true", "yes", "on"}:
        return True
    if value.strip().lower() in {"0", "false", "no", "off"}:
        return False
    raise ConfigError(f"{name}={value!r} is not a boolean: use {name}=True or {name}=False")


def load_dotenv_file(dotenv_path: Path | None = None) -> None:
    """Load ``.env`` (the repo root's by default) without overriding the real environment."""
    load_dotenv(dotenv_path or REPO_ROOT / ".env", override=False)


def default_config_path(dev_config: Path = DEV_CONFIG, prod_config: Path = PROD_CONFIG) -> Path:
    return dev_config if _env_flag("DEV_MODE", default=True) else prod_config


def describe_parse_error(path: Path, error: Exception) -> str:
    """``cannot parse PATH: <problem> at line L, column C`` from a YAML error, in one line."""
    problem = getattr(error, "problem", None) or str(error).splitlines()[0]
    mark = getattr(error, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"cannot parse {path}: {problem}{where}"


def load_yaml_mapping(path: Path, missing: str, not_a_mapping: str) -> DictConfig:
    """A YAML file that must hold a mapping of keys. Each way it can fail is one ConfigError
    line: ``missing`` when there is no file, ``not_a_mapping`` for a list or a scalar, and
    the parser's problem with its line and column for bad YAML."""
    if not path.is_file():
        raise ConfigError(missing)
    try:
        loaded = OmegaConf.load(path)
    except Exception as error:  # yaml.YAMLError and friends: report, don't dump a traceback
        raise ConfigError(describe_parse_error(path, error)) from None
    if not isinstance(loaded, DictConfig):
        raise ConfigError(not_a_mapping)
    return loaded


def describe_config_error(error: OmegaConfBaseException, source: str) -> str:
    key = getattr(error, "full_key", None) or getattr(error, "key", None)
    first_line = str(error).splitlines()[0] if str(error) else type(error).__name__
    if "not in" in first_line or "Missing key" in first_line:
        return f"unknown config key '{key}' in {source}: check the spelling against configs/"
    if "is not a ListConfig" in first_line:  # omegaconf's words for "a scalar where a list goes"
        first_line = "expected a list, e.g. [0, 1]"
    if key:
        return f"bad value for '{key}' in {source}: {first_line}"
    return f"invalid config in {source}: {first_line}"


def load_config(
    config_path: str | os.PathLike[str] | None = None,
    overrides: list[str] | None = None,
    *,
    schema: type = ExperimentConfig,
    sections: Collection[str] | None = None,
    dev_config: Path = DEV_CONFIG,
    prod_config: Path = PROD_CONFIG,
) -> DictConfig:
    """Merge schema defaults, a YAML file and dotlist overrides; ConfigError on any problem.

    ``schema``: the dataclass to check against (``experiment_schema(...)`` for an
    experiment with its own model/data settings). ``sections``: read only these top-level
    keys of the file (a tool sharing a file with experiments); by default every key is read
    except TOOL_SECTIONS.
    """
    load_dotenv_file()
    path = (
        Path(config_path)
        if config_path is not None
        else default_config_path(dev_config, prod_config)
    )
    file_cfg = load_yaml_mapping(
        path,
        f"config file not found: {path} (pass --config PATH to an existing YAML)",
        f"{path} must hold a mapping of sections (e.g. trainer: ...)",
    )
    keep = (lambda key: key in sections) if sections else (lambda key: key not in TOOL_SECTIONS)
    file_cfg = OmegaConf.masked_copy(file_cfg, [key for key in file_cfg if keep(key)])
    file_cfg = rename_old_keys(file_cfg, str(path))
    overrides = [rename_old_override(item) for item in overrides or []]
    try:
        cfg = OmegaConf.merge(OmegaConf.structured(schema), file_cfg)
    except OmegaConfBaseException as error:
        raise ConfigError(describe_config_error(error, str(path))) from None
    bad = [item for item in overrides or [] if "=" not in item]
    if bad:
        raise ConfigError(f"override '{bad[0]}' is not key=value (e.g. trainer.max_steps=300)")
    try:
        typed = [as_typed_text(cfg, item) for item in overrides or []]
        cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(typed))
    except OmegaConfBaseException as error:
        source = f"the command-line overrides (on {path})"
        message = describe_config_error(error, source)
        # omegaconf names the first unknown level ('nosuch'); show the key as typed.
        reported = getattr(error, "full_key", None)
        typed = [o.split("=", 1)[0] for o in overrides or []]
        full = next((k for k in typed if reported and k.startswith(f"{reported}.")), None)
        if full is not None:
            message = message.replace(f"'{reported}'", f"'{full}'", 1)
        raise ConfigError(message) from None
    source = f"{path} + command-line overrides" if overrides else str(path)
    if issubclass(schema, ExperimentConfig):
        validate(cfg, source)
    OmegaConf.set_readonly(cfg, True)
    return cfg


def rename_old_keys(file_cfg: DictConfig, source: str) -> DictConfig:
    """A file's old key names (RENAMED_KEYS) read as the new ones; both at once is an error."""
    for old, new in RENAMED_KEYS.items():
        value = OmegaConf.select(file_cfg, old, default=_MISSING)
        if value is _MISSING:
            continue
        if OmegaConf.select(file_cfg, new, default=_MISSING) is not _MISSING:
            raise ConfigError(
                f"{source} sets both '{old}' and its new name '{new}': keep only '{new}'"
            )
        parent, leaf = old.rsplit(".", 1)
        section = OmegaConf.select(file_cfg, parent)
        del section[leaf]
        OmegaConf.update(file_cfg, new, value, force_add=True)
    return file_cfg


def rename_old_override(item: str) -> str:
    """``logging.wandb=true`` -> ``logging.use_wandb=true``."""
    key, sep, value = item.partition("=")
    return f"{RENAMED_KEYS.get(key, key)}{sep}{value}"


def as_typed_text(cfg: DictConfig, item: str) -> str:
    """A ``key=value`` override whose key is a string setting keeps its text as typed: YAML
    would read ``run_name=off`` as False (then "False"), ``run_name=1e3`` as 1000.0. ``null``
    still clears an optional one."""
    key, _, value = item.partition("=")
    if value in NULL_TEXTS or value[:1] in ("'", '"'):
        return item
    parent, _, leaf = key.rpartition(".")
    section = OmegaConf.select(cfg, parent, default=None) if parent else cfg
    if not isinstance(section, DictConfig) or leaf not in section:
        return item  # an unknown key: the merge names it
    # _get_node: omegaconf has no public call for a value's declared type.
    if not isinstance(section._get_node(leaf), StringNode):
        return item
    return "{}='{}'".format(key, value.replace("'", "''"))


def _is_signal_name(name: str) -> bool:
    try:
        parse_signals([name])
    except ValueError:
        return False
    return True


def validate(cfg: DictConfig, source: str) -> None:
    """Checks the type system can't express (ranges, choices); no torch needed."""
    trainer, optim = cfg.trainer, cfg.optim
    checks = [
        ("trainer.precision", trainer.precision in {"fp32", "bf16", "fp16"}, "fp32|bf16|fp16"),
        ("trainer.grad_accum_steps", trainer.grad_accum_steps >= 1, "an integer >= 1"),
        ("trainer.strategy", trainer.strategy in {"ddp", "fsdp"}, "ddp|fsdp"),
        (
            "data.batch_size",
            not (trainer.strategy == "fsdp" and cfg.data.batch_size == AUTO_BATCH_SIZE),
            "a number under trainer.strategy=fsdp (auto measures each rank alone, and a "
            "sharded step is a collective)",
        ),
        ("trainer.max_epochs", trainer.max_epochs >= 1, "an integer >= 1"),
        ("trainer.max_steps", trainer.max_steps == -1 or trainer.max_steps >= 1, "-1 or >= 1"),
        ("trainer.log_every_n_steps", trainer.log_every_n_steps >= 1, "an integer >= 1"),
        ("trainer.grad_clip_norm", trainer.grad_clip_norm >= 0, "a number >= 0 (0: off)"),
        ("trainer.early_stopping_patience", trainer.early_stopping_patience >= 0, ">= 0"),
        (
            "trainer.monitor",
            re.fullmatch(r"val/\w+", trainer.monitor) is not None,
            "val/<metric>, e.g. val/loss",
        ),
        ("trainer.monitor_mode", trainer.monitor_mode in {"min", "max"}, "min|max"),
        (
            "trainer.device",
            re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", trainer.device) is not None,
            "auto, cpu, cuda or cuda:N",
        ),
        (
            "trainer.extra_stop_signal",
            trainer.extra_stop_signal == "" or _is_signal_name(trainer.extra_stop_signal),
            'a signal name such as SIGUSR1, or "" for none',
        ),
        ("optim.lr", optim.lr > 0, "a number > 0"),
        ("optim.weight_decay", optim.weight_decay >= 0, "a number >= 0"),
        ("optim.warmup_steps", optim.warmup_steps >= 0, "an integer >= 0"),
        ("optim.min_lr_ratio", 0 <= optim.min_lr_ratio <= 1, "a number in [0, 1]"),
        ("checkpoint.every_n_steps", cfg.checkpoint.every_n_steps >= 1, "an integer >= 1"),
        ("checkpoint.keep_last_n", cfg.checkpoint.keep_last_n >= 1, "an integer >= 1"),
        (
            "checkpoint.s3_bucket",
            cfg.checkpoint.s3_bucket is None or BUCKET_NAME.fullmatch(cfg.checkpoint.s3_bucket),
            "null or a bucket name: 3-63 lowercase letters, digits, dots or hyphens",
        ),
        (
            "checkpoint.endpoint_url",
            cfg.checkpoint.endpoint_url is None
            or re.fullmatch(r"https?://[^\s/]+(/\S*)?", cfg.checkpoint.endpoint_url),
            "null or an http(s):// URL",
        ),
        (
            "checkpoint.remote_keep_last_n",
            cfg.checkpoint.remote_keep_last_n is None or cfg.checkpoint.remote_keep_last_n >= 1,
            "null or an integer >= 1",
        ),
        ("checkpoint.s3_stop_grace_s", cfg.checkpoint.s3_stop_grace_s >= 0, "seconds >= 0"),
        (
            "run_name",
            re.fullmatch(r"[A-Za-z0-9._=+-]+", cfg.run_name) is not None,
            "letters, digits and . _ = + - only",
        ),
        (
            "logging.wandb_mode",
            cfg.logging.wandb_mode in {"offline", "online", "disabled"},
            "offline|online|disabled",
        ),
        (
            "logging.low_gpu_util_percent",
            0 < cfg.logging.low_gpu_util_percent <= 100,
            "a percentage in (0, 100]",
        ),
        ("logging.low_gpu_util_minutes", cfg.logging.low_gpu_util_minutes > 0, "minutes > 0"),
        (
            "cost.hourly_rate_usd",
            cfg.cost.hourly_rate_usd is None or cfg.cost.hourly_rate_usd >= 0,
            "null (the Vast.ai instance's price) or dollars per hour >= 0",
        ),
        (
            "cost.budget_usd",
            cfg.cost.budget_usd is None or cfg.cost.budget_usd > 0,
            "null (no budget) or dollars > 0",
        ),
    ]
    for key, ok, expected in checks:
        if not ok:
            value = OmegaConf.select(cfg, key)
            raise ConfigError(f"bad value for '{key}' in {source}: {value!r}, expected {expected}")
    for section in ("data", "model"):
        if section in cfg:
            check_section(cfg, section, source)


def check_section(cfg: DictConfig, section: str, source: str) -> None:
    """Run a settings dataclass's own ``__post_init__`` checks on the merged values."""
    try:
        OmegaConf.to_object(cfg[section])
    except SettingError as error:
        raise ConfigError(
            f"bad value for '{section}.{error.key}' in {source}: {error.problem}"
        ) from None
    except (ValueError, TypeError) as error:
        problem = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ConfigError(f"bad value in '{section}' of {source}: {problem}") from None


def in_notebook() -> bool:
    """True inside a Jupyter kernel (VS Code's Interactive Window), where sys.argv is not ours."""
    return "ipykernel" in sys.modules or hasattr(sys.modules.get("builtins"), "__IPYTHON__")


def parse_cli(argv: list[str]) -> tuple[str | None, list[str]]:
    """Split ``[--config PATH] [key=value ...]``; help and unknown flags are ConfigErrors."""
    config_path: str | None = None
    overrides: list[str] = []
    args = list(argv)
    while args:
        arg = args.pop(0)
        if arg in {"-h", "--help"}:
            raise SystemExit(
                "usage: python experiments/<name>.py [--config PATH] [--debug] [key=value ...]\n"
                "  e.g. trainer.max_steps=300 seed=3 run_name=my-run paths.output_dir=./outputs"
            )
        if arg == "--config":
            if not args:
                raise ConfigError("--config needs a path: --config configs/prod_config.yaml")
            config_path = args.pop(0)
        elif arg.startswith("--config="):
            config_path = arg.split("=", 1)[1]
        elif arg.startswith("-"):
            raise ConfigError(f"unknown option {arg}: only --config PATH and key=value are allowed")
        else:
            overrides.append(arg)
    return config_path, overrides
