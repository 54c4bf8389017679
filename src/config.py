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

import dataclasses
import os
import re
import sys
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from src.common.errors import EXIT_CONFIG_ERROR, ConfigError
from src.common.paths import DEFAULT_PERSISTENT_DIR, REPO_ROOT
from src.data.splits import split_sizes

CONFIG_DIR = REPO_ROOT / "configs"
DEV_CONFIG = CONFIG_DIR / "dev_config.yaml"
PROD_CONFIG = CONFIG_DIR / "prod_config.yaml"
AUTO_BATCH_SIZE = "auto"  # data.batch_size: the largest that fits the GPU
# S3 bucket names: 3-63 lowercase letters, digits, dots and hyphens, starting and ending with a
# letter or digit (AWS's rules; S3-compatible stores accept the same).
BUCKET_NAME = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")


@dataclass
class PathsConfig:
    # Run directory is <output_dir>/<run_name>/. /workspace/persistent is the Vast.ai
    # volume; without /workspace the repo-local outputs/ is used instead.
    output_dir: str = DEFAULT_PERSISTENT_DIR


def require(ok: bool, key: str, value: Any, expected: str) -> None:
    """For a settings dataclass's ``__post_init__``: one clear ValueError when ``ok`` is False.

    The loader turns it into ``bad value for '<section>.<key>' in <file>: ...``.
    """
    if not ok:
        raise SettingError(key, f"{value!r}, expected {expected}")


class SettingError(ValueError):
    """A bad value in one field of a settings dataclass (raised by ``require``)."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"{key}: {problem}")
        self.key, self.problem = key, problem


@dataclass
class DataConfig:
    """What the trainer reads from ``data:``. An experiment's own data settings extend it."""

    # Per device (under torchrun the effective batch is x world size), or "auto": the largest
    # that fits the GPU, found once per run (src/utils/batch_size.py) and kept on resume.
    batch_size: Any = 64
    num_workers: int = 0

    def __post_init__(self) -> None:
        size_ok = self.batch_size == AUTO_BATCH_SIZE or (
            isinstance(self.batch_size, int)
            and not isinstance(self.batch_size, bool)
            and self.batch_size >= 1
        )
        require(size_ok, "batch_size", self.batch_size, 'an integer >= 1 or "auto"')
        require(self.num_workers >= 0, "num_workers", self.num_workers, "an integer >= 0")


@dataclass
class SyntheticDataConfig(DataConfig):
    """The template experiment's data: Gaussian clusters (src/data/synthetic.py)."""

    num_samples: int = 2048
    num_features: int = 32
    num_classes: int = 4
    noise: float = 0.5
    val_fraction: float = 0.1
    test_fraction: float = 0.1
    seed: int = 1234  # the synthetic data set itself, independent of the training seed

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.num_features >= 1, "num_features", self.num_features, "an integer >= 1")
        require(self.num_classes >= 2, "num_classes", self.num_classes, "an integer >= 2")
        fractions_ok = 0 < self.val_fraction + self.test_fraction < 1
        require(fractions_ok, "val_fraction", self.val_fraction, "val+test < 1")
        train_size = split_sizes(self.num_samples, self.val_fraction, self.test_fraction)[0]
        require(train_size >= 1, "num_samples", self.num_samples, "enough for train, val and test")


@dataclass
class MLPConfig:
    """The template experiment's model (src/models/mlp.py)."""

    name: str = "mlp"
    hidden_dim: int = 64
    num_layers: int = 2
    dropout: float = 0.1

    def __post_init__(self) -> None:
        require(self.hidden_dim >= 1, "hidden_dim", self.hidden_dim, "an integer >= 1")
        require(self.num_layers >= 1, "num_layers", self.num_layers, "an integer >= 1")
        require(0 <= self.dropout < 1, "dropout", self.dropout, "a number in [0, 1)")


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
    compile: bool = False  # torch.compile for training; checkpoints keep plain state_dicts
    # The validation metric that picks best_model.pt and drives early stopping.
    monitor: str = "val/loss"
    monitor_mode: str = "min"  # min | max


@dataclass
class CheckpointConfig:
    every_n_steps: int = 50
    keep_last_n: int = 3  # on local disk, plus the best
    async_save: bool = True
    # S3 mirror (src/storage/checkpoint_mirror.py). null: local only. Credentials come from
    # the AWS chain (environment, .env, ~/.aws, instance role), never from this file.
    s3_bucket: str | None = None
    s3_prefix: str = "checkpoints"  # the run's objects live under <s3_prefix>/<run_name>/
    endpoint_url: str | None = None  # S3-compatible stores: MinIO, Cloudflare R2, B2, Wasabi
    remote_keep_last_n: int | None = None  # in the bucket, plus the best; null: keep_last_n
    s3_stop_grace_s: float = 20.0  # on SIGTERM, how long the stop checkpoint's upload may take


@dataclass
class LoggingConfig:
    tensorboard: bool = True
    use_wandb: bool = False  # `wandb` in older configs, still read (RENAMED_KEYS)
    wandb_project: str = "gpu-train-kit"
    wandb_mode: str = "offline"  # offline | online | disabled
    # GPU utilisation and memory (NVML, ~1 Hz) into TensorBoard/W&B and the epoch line.
    gpu_stats: bool = True
    # One warning per run when the GPU stays under this utilisation for this long in training.
    low_gpu_util_percent: float = 30.0
    low_gpu_util_minutes: float = 5.0


@dataclass
class CostConfig:
    # $/hour of the machine; None: looked up from the Vast.ai instance when running on one.
    hourly_rate_usd: float | None = None
    # Stop the run (checkpoint, exit 76) once it has cost this much; None: no budget.
    budget_usd: float | None = None


@dataclass
class ExperimentConfig:
    seed: int = 42
    run_name: str = "template"
    paths: PathsConfig = field(default_factory=PathsConfig)
    data: SyntheticDataConfig = field(default_factory=SyntheticDataConfig)
    model: MLPConfig = field(default_factory=MLPConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    cost: CostConfig = field(default_factory=CostConfig)


# Old key -> new key. Files and overrides may still use the old names; they are read as the
# new ones, each layer before it is merged, so a later layer wins as usual.
RENAMED_KEYS = {"logging.wandb": "logging.use_wandb"}

# Top-level sections of a config file that belong to other tools (scripts/run_residual_sweep.py
# reads `residual_compare`): an experiment skips them, the tool checks them with its own schema.
TOOL_SECTIONS = frozenset({"residual_compare"})


def experiment_schema(model: type | None = None, data: type | None = None) -> type:
    """ExperimentConfig with an experiment's own ``model:`` / ``data:`` dataclasses.

    ``data`` must extend DataConfig (the trainer reads batch_size and num_workers).
    """
    if model is None and data is None:
        return ExperimentConfig
    for name, cls in (("model", model), ("data", data)):
        if cls is not None and not dataclasses.is_dataclass(cls):
            raise TypeError(f"{name}={cls!r} must be a dataclass (its fields are the settings)")
    if data is not None and not issubclass(data, DataConfig):
        raise TypeError(f"data={data.__name__} must extend src.config.DataConfig")
    fields = [
        (name, cls, field(default_factory=cls))
        for name, cls in (("model", model), ("data", data))
        if cls is not None
    ]
    return dataclasses.make_dataclass(
        f"{ExperimentConfig.__name__}_{'_'.join(c.__name__ for _, c, _ in fields)}",
        fields,
        bases=(ExperimentConfig,),
    )


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


_MISSING = object()


def _is_signal_name(name: str) -> bool:
    from src.common.signals import parse_signals

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
        check_section(cfg, section, source)


def wandb_enabled(cfg: DictConfig) -> bool:
    return bool(cfg.logging.use_wandb) and cfg.logging.wandb_mode != "disabled"


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


# Settings a checkpoint is only valid with: change one and "resume" silently trains something
# else (a new batch size shifts the position in the epoch; a new lr is overridden by the
# optimizer state). Length (max_epochs, max_steps), logging, checkpointing, paths, device,
# precision and num_workers may change between runs.
# World size is recorded too: with another number of ranks each rank's share of the epoch
# (and the effective batch) changes, so the saved position would replay or skip data.
RESUME_SETTINGS = (
    "seed",
    "data",
    "model",
    "optim",
    "trainer.grad_accum_steps",
    "trainer.monitor",
    "trainer.monitor_mode",
)
RESUME_SETTINGS_IGNORED = frozenset({"data.num_workers"})


def resume_settings(cfg: DictConfig, world_size: int = 1) -> dict[str, Any]:
    """The flat ``{dotted.key: value}`` of RESUME_SETTINGS, stored with every checkpoint."""
    flat: dict[str, Any] = {"world_size": world_size}

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

    if OmegaConf.get_type(cfg.model) is MLPConfig and cfg.model.name not in MODEL_BUILDERS:
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
    from src.common.paths import resolve_output_dir

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


def print_config_error(error: ConfigError) -> None:
    """The one line, once per machine: under torchrun every rank reads the same config and
    fails the same way, so only each node's first rank (LOCAL_RANK 0) prints it."""
    if int(os.environ.get("LOCAL_RANK", "0")) == 0:
        print(error.line, file=sys.stderr)


def exit_on_config_error(exc_type: type, error: BaseException, traceback: Any) -> None:
    """sys.excepthook for scripts: a ConfigError raised later (by the trainer, which checks
    what only the model can answer, such as trainer.monitor) is still one line and exit 2."""
    if issubclass(exc_type, ConfigError):
        from src.runs.lock import discard_unused_run_dirs

        discard_unused_run_dirs()  # "nothing written": not even an empty run directory
        print_config_error(error)  # type: ignore[arg-type]
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(EXIT_CONFIG_ERROR)  # raised before training: no write is pending
    sys.__excepthook__(exc_type, error, traceback)


def load_experiment_config(
    argv: list[str] | None = None,
    *,
    model: type | None = None,
    data: type | None = None,
    dev_config: str | os.PathLike[str] | None = None,
    prod_config: str | os.PathLike[str] | None = None,
) -> DictConfig:
    """Config for an experiment file, from the command line or (in a notebook) from defaults.

    ``model`` / ``data``: the experiment's own settings dataclasses (``data`` extends
    DataConfig); they are loaded, overridden and checked like the built-in sections.
    ``dev_config`` / ``prod_config``: the files DEV_MODE chooses between.

    As a script a ConfigError becomes one line on stderr and exit code 2, and the run
    directory is locked for this process (a second process on the same run exits at once);
    in a kernel errors are raised so the cell shows them without killing the kernel.
    """
    if (model or data) and (dev_config is None or prod_config is None):
        raise TypeError(
            "an experiment with its own model/data settings needs its own config files: pass "
            "dev_config= and prod_config= (the template's files hold the template's settings)"
        )
    notebook = in_notebook()
    if argv is None:
        argv = [] if notebook else sys.argv[1:]
    if not notebook:
        sys.excepthook = exit_on_config_error
    try:
        config_path, overrides = parse_cli(argv)
        cfg = load_config(
            config_path,
            overrides,
            schema=experiment_schema(model, data),
            dev_config=Path(dev_config or DEV_CONFIG),
            prod_config=Path(prod_config or PROD_CONFIG),
        )
        check_runtime(cfg)
        check_output_dir(cfg)
        from src.utils.run_io import check_resume_settings, run_dir_for

        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        check_resume_settings(cfg, world_size)
        if not notebook and int(os.environ.get("RANK", "0")) == 0:
            from src.runs.lock import acquire_run_lock

            acquire_run_lock(run_dir_for(cfg))  # held until this process exits
        return cfg
    except ConfigError as error:
        if notebook:
            raise
        print_config_error(error)
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
