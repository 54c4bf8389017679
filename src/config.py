"""Experiment configuration: a typed schema, YAML files, and `key=value` overrides.

Which file is loaded:
  1. ``--config PATH`` on the command line, else
  2. ``configs/dev_config.yaml`` when ``DEV_MODE`` is true (the default), else
  3. ``configs/prod_config.yaml``.
``DEV_MODE`` comes from the environment or from ``.env`` (python-dotenv; the
environment wins). Overrides are omegaconf dotlists: ``trainer.max_steps=300 seed=3``.

Every value is checked against the dataclasses below, so a typo'd key or a wrong
type fails at start-up with one line naming the key and the file, never mid-run.
"""

from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from src.data.splits import split_sizes
from src.utils.paths import DEFAULT_PERSISTENT_DIR, REPO_ROOT

CONFIG_DIR = REPO_ROOT / "configs"
DEV_CONFIG = CONFIG_DIR / "dev_config.yaml"
PROD_CONFIG = CONFIG_DIR / "prod_config.yaml"
EXIT_CONFIG_ERROR = 2


@dataclass
class PathsConfig:
    # Run directory is <output_dir>/<run_name>/. /workspace/persistent is the Vast.ai
    # volume; without /workspace the repo-local outputs/ is used instead.
    output_dir: str = DEFAULT_PERSISTENT_DIR


@dataclass
class DataConfig:
    num_samples: int = 2048
    num_features: int = 32
    num_classes: int = 4
    noise: float = 0.5
    val_fraction: float = 0.1
    test_fraction: float = 0.1
    batch_size: int = 64
    num_workers: int = 0
    seed: int = 1234  # the synthetic data set itself, independent of the training seed


@dataclass
class ModelConfig:
    name: str = "mlp"
    hidden_dim: int = 64
    num_layers: int = 2
    dropout: float = 0.1


@dataclass
class OptimConfig:
    lr: float = 3e-3
    weight_decay: float = 0.01
    warmup_steps: int = 10
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio


@dataclass
class TrainerConfig:
    max_epochs: int = 3
    max_steps: int = -1  # optimizer steps; -1: max_epochs decides
    grad_accum_steps: int = 1
    grad_clip_norm: float = 1.0  # 0 disables clipping
    precision: str = "fp32"  # fp32 | bf16 | fp16 (mixed precision on CUDA only)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    early_stopping_patience: int = 0  # epochs without val improvement; 0 disables
    early_stopping_min_delta: float = 0.0
    log_every_n_steps: int = 10
    progress_bar: bool = True
    # Besides SIGTERM and SIGINT; Slurm's `--signal=USR1@120` sends this. "" disables.
    extra_stop_signal: str = "SIGUSR1"


@dataclass
class CheckpointConfig:
    every_n_steps: int = 50
    keep_last_n: int = 3
    async_save: bool = True


@dataclass
class LoggingConfig:
    tensorboard: bool = True
    wandb: bool = False
    wandb_project: str = "gpu-train-kit"
    wandb_mode: str = "offline"  # offline | online | disabled


@dataclass
class CostConfig:
    # $/hour of the machine; None: looked up from the Vast.ai instance when running on one.
    hourly_rate_usd: float | None = None


RESIDUAL_COMPARE_DIR = f"{DEFAULT_PERSISTENT_DIR}/analyses/residual_compare"


@dataclass
class ResidualModelPair:
    name: str = MISSING  # what --names selects
    base: str = MISSING  # local path or Hugging Face id
    sft: str = MISSING


@dataclass
class ResidualCompareConfig:
    # Read by scripts/run_residual_sweep.py (docs/sweeps.md); experiments ignore it.
    models: list[ResidualModelPair] = field(default_factory=list)
    prompts: list[str] = field(
        default_factory=lambda: [
            "The capital of France is",
            "Explain why the sky is blue in one sentence.",
        ]
    )
    dtype: str = "bfloat16"  # float32 | bfloat16 | float16
    device: str = "cuda"  # cuda | cuda:N | cpu
    max_length: int = 256  # tokens per prompt; longer prompts are truncated
    output_dir: str = RESIDUAL_COMPARE_DIR  # falls back to outputs/analyses/... off Vast.ai
    log_dir: str = f"{RESIDUAL_COMPARE_DIR}/logs"
    required_gpu_names: list[str] = field(default_factory=lambda: ["A100", "H100", "H200"])
    min_gpu_memory_gb: float = 40.0  # the guardrail; --force bypasses it


@dataclass
class ExperimentConfig:
    seed: int = 42
    run_name: str = "template"
    paths: PathsConfig = field(default_factory=PathsConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    cost: CostConfig = field(default_factory=CostConfig)
    residual_compare: ResidualCompareConfig = field(default_factory=ResidualCompareConfig)


class ConfigError(ValueError):
    """A config problem, worded as one line that says what is wrong and how to fix it."""


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
    from dotenv import load_dotenv

    load_dotenv(dotenv_path or REPO_ROOT / ".env", override=False)


def default_config_path() -> Path:
    return DEV_CONFIG if _env_flag("DEV_MODE", default=True) else PROD_CONFIG


def describe_parse_error(path: Path, error: Exception) -> str:
    """``cannot parse PATH: <problem> at line L, column C`` from a YAML error, in one line."""
    problem = getattr(error, "problem", None) or str(error).splitlines()[0]
    mark = getattr(error, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"cannot parse {path}: {problem}{where}"


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
) -> DictConfig:
    """Merge schema defaults, a YAML file and dotlist overrides; ConfigError on any problem."""
    load_dotenv_file()
    path = Path(config_path) if config_path is not None else default_config_path()
    if not path.is_file():
        raise ConfigError(f"config file not found: {path} (pass --config PATH to an existing YAML)")
    schema = OmegaConf.structured(ExperimentConfig)
    try:
        file_cfg = OmegaConf.load(path)
    except Exception as error:  # yaml.YAMLError and friends: report, don't dump a traceback
        raise ConfigError(describe_parse_error(path, error)) from None
    try:
        cfg = OmegaConf.merge(schema, file_cfg)
    except OmegaConfBaseException as error:
        raise ConfigError(describe_config_error(error, str(path))) from None
    bad = [item for item in overrides or [] if "=" not in item]
    if bad:
        raise ConfigError(f"override '{bad[0]}' is not key=value (e.g. trainer.max_steps=300)")
    try:
        cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(list(overrides or [])))
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
    validate(cfg, f"{path} + command-line overrides" if overrides else str(path))
    OmegaConf.set_readonly(cfg, True)
    return cfg


def _is_signal_name(name: str) -> bool:
    from src.utils.signals import parse_signals

    try:
        parse_signals([name])
    except ValueError:
        return False
    return True


def validate(cfg: DictConfig, source: str) -> None:
    """Checks the type system can't express (ranges, choices); no torch needed."""
    trainer, data, model, optim = cfg.trainer, cfg.data, cfg.model, cfg.optim
    checks = [
        ("trainer.precision", trainer.precision in {"fp32", "bf16", "fp16"}, "fp32|bf16|fp16"),
        ("trainer.grad_accum_steps", trainer.grad_accum_steps >= 1, "an integer >= 1"),
        ("trainer.max_epochs", trainer.max_epochs >= 1, "an integer >= 1"),
        ("trainer.max_steps", trainer.max_steps == -1 or trainer.max_steps >= 1, "-1 or >= 1"),
        ("trainer.log_every_n_steps", trainer.log_every_n_steps >= 1, "an integer >= 1"),
        ("trainer.grad_clip_norm", trainer.grad_clip_norm >= 0, "a number >= 0 (0: off)"),
        ("trainer.early_stopping_patience", trainer.early_stopping_patience >= 0, ">= 0"),
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
        ("data.batch_size", data.batch_size >= 1, "an integer >= 1"),
        ("data.num_workers", data.num_workers >= 0, "an integer >= 0"),
        ("data.num_features", data.num_features >= 1, "an integer >= 1"),
        ("data.num_classes", data.num_classes >= 2, "an integer >= 2"),
        ("data.val_fraction", 0 < data.val_fraction + data.test_fraction < 1, "val+test < 1"),
        (
            "data.num_samples",
            split_sizes(data.num_samples, data.val_fraction, data.test_fraction)[0] >= 1,
            "enough for train, val and test",
        ),
        ("model.hidden_dim", model.hidden_dim >= 1, "an integer >= 1"),
        ("model.num_layers", model.num_layers >= 1, "an integer >= 1"),
        ("model.dropout", 0 <= model.dropout < 1, "a number in [0, 1)"),
        ("optim.lr", optim.lr > 0, "a number > 0"),
        ("optim.weight_decay", optim.weight_decay >= 0, "a number >= 0"),
        ("optim.warmup_steps", optim.warmup_steps >= 0, "an integer >= 0"),
        ("optim.min_lr_ratio", 0 <= optim.min_lr_ratio <= 1, "a number in [0, 1]"),
        ("checkpoint.every_n_steps", cfg.checkpoint.every_n_steps >= 1, "an integer >= 1"),
        ("checkpoint.keep_last_n", cfg.checkpoint.keep_last_n >= 1, "an integer >= 1"),
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
    ]
    for key, ok, expected in checks:
        if not ok:
            value = OmegaConf.select(cfg, key)
            raise ConfigError(f"bad value for '{key}' in {source}: {value!r}, expected {expected}")


# Settings a checkpoint is only valid with: change one and "resume" silently trains something
# else (a new batch size shifts the position in the epoch; a new lr is overridden by the
# optimizer state). Length (max_epochs, max_steps), logging, checkpointing, paths, device,
# precision and num_workers may change between runs.
RESUME_SETTINGS = ("seed", "data", "model", "optim", "trainer.grad_accum_steps")
RESUME_SETTINGS_IGNORED = frozenset({"data.num_workers"})


def resume_settings(cfg: DictConfig) -> dict[str, Any]:
    """The flat ``{dotted.key: value}`` of RESUME_SETTINGS, stored with every checkpoint."""
    flat: dict[str, Any] = {}

    def add(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for key, item in value.items():
                add(f"{prefix}.{key}", item)
        elif prefix not in RESUME_SETTINGS_IGNORED:
            flat[prefix] = value

    for key in RESUME_SETTINGS:
        add(key, _select_plain(cfg, key))
    return flat


def _select_plain(cfg: DictConfig, key: str) -> Any:
    value = OmegaConf.select(cfg, key)
    return OmegaConf.to_container(value, resolve=True) if isinstance(value, DictConfig) else value


def check_runtime(cfg: DictConfig) -> None:
    """What only this machine can answer: is the model known, is the requested GPU here."""
    import torch

    from src.models import MODEL_BUILDERS
    from src.utils.gpu_monitor import cuda_index

    if cfg.model.name not in MODEL_BUILDERS:
        known = ", ".join(sorted(MODEL_BUILDERS))
        raise ConfigError(f"unknown model.name {cfg.model.name!r}: choose one of {known}")
    index = cuda_index(cfg.trainer.device)
    if index is not None:
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if index >= count:
            raise ConfigError(
                f"trainer.device={cfg.trainer.device} but this machine has {count} CUDA GPU(s): "
                "use trainer.device=auto (GPU if there is one, else CPU) or cpu"
            )


def check_output_dir(cfg: DictConfig) -> None:
    """Fail before any run starts if outputs could not be written (checked, not assumed)."""
    from src.utils.paths import resolve_output_dir

    try:
        run_dir = resolve_output_dir(cfg.paths.output_dir) / cfg.run_name
    except PermissionError as error:
        raise ConfigError(str(error)) from None
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(
            f"run directory {run_dir} exists but is a file: choose another run_name or move it"
        )


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
                "usage: python experiments/<name>.py [--config PATH] [key=value ...]\n"
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


def load_experiment_config(argv: list[str] | None = None) -> DictConfig:
    """Config for an experiment file, from the command line or (in a notebook) from defaults.

    As a script a ConfigError becomes one line on stderr and exit code 2; in a kernel it
    is raised so the cell shows it without killing the kernel.
    """
    notebook = in_notebook()
    if argv is None:
        argv = [] if notebook else sys.argv[1:]
    try:
        config_path, overrides = parse_cli(argv)
        cfg = load_config(config_path, overrides)
        check_runtime(cfg)
        check_output_dir(cfg)
        from src.utils.run_io import check_resume_settings

        check_resume_settings(cfg)
        return cfg
    except ConfigError as error:
        if notebook:
            raise
        print(f"config error: {error}", file=sys.stderr)
        raise SystemExit(EXIT_CONFIG_ERROR) from None


SECRET_KEY_PATTERN = re.compile(r"(key|secret|token|password|passwd|credential)", re.IGNORECASE)
REDACTED = "***REDACTED***"


def redact_secrets(value: Any) -> Any:
    """Copy of a plain dict/list with values under secret-looking keys replaced."""
    if isinstance(value, dict):
        return {
            key: REDACTED if SECRET_KEY_PATTERN.search(str(key)) and item else redact_secrets(item)
            for key, item in value.items()
        }
    if isinstance(value, list):
        return [redact_secrets(item) for item in value]
    return value


def secret_values(environ: dict[str, str] | None = None) -> list[str]:
    """Values of secret-looking environment variables (AWS_SECRET_ACCESS_KEY, *_TOKEN...)."""
    environ = dict(os.environ) if environ is None else environ
    values = {v for k, v in environ.items() if SECRET_KEY_PATTERN.search(k) and len(v) >= 6}
    return sorted(values, key=len, reverse=True)  # longest first: no partial leftovers


def scrub_secret_values(value: Any, secrets: list[str]) -> Any:
    """Copy with every occurrence of a secret value replaced, at any depth."""
    if isinstance(value, str):
        for secret in secrets:
            value = value.replace(secret, REDACTED)
        return value
    if isinstance(value, dict):
        return {key: scrub_secret_values(item, secrets) for key, item in value.items()}
    if isinstance(value, list):
        return [scrub_secret_values(item, secrets) for item in value]
    return value


def to_plain_dict(cfg: DictConfig) -> dict[str, Any]:
    """Resolved config as a plain dict, safe for config.json and W&B: values under
    secret-looking keys are redacted, and so is any secret from the environment that an
    interpolation such as ``${oc.env:AWS_SECRET_ACCESS_KEY}`` copied into another value."""
    plain = redact_secrets(OmegaConf.to_container(cfg, resolve=True))
    return scrub_secret_values(plain, secret_values())
