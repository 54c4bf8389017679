"""The settings schema: one dataclass per config section, checked when a config is loaded.

An experiment's own ``model:`` / ``data:`` sections are dataclasses too (``experiment_schema``);
``require`` in their ``__post_init__`` turns a bad value into one line naming the key.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any

from omegaconf import DictConfig, OmegaConf

from src.common.paths import DEFAULT_PERSISTENT_DIR

AUTO_BATCH_SIZE = "auto"  # data.batch_size: the largest that fits the GPU
# S3 bucket names: 3-63 lowercase letters, digits, dots and hyphens, starting and ending with a
# letter or digit (AWS's rules; S3-compatible stores accept the same).
BUCKET_NAME = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")


def split_sizes(
    num_samples: int, val_fraction: float, test_fraction: float
) -> tuple[int, int, int]:
    """(train, val, test) counts; val and test get at least one sample each.

    One rule for the config check and the data split (src/data/ re-exports it).
    """
    num_val = max(1, int(num_samples * val_fraction))
    num_test = max(1, int(num_samples * test_fraction))
    return num_samples - num_val - num_test, num_val, num_test


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
    # that fits the GPU, found once per run (src/trainers/batch_size.py) and kept on resume.
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
    # Activation checkpointing (non-reentrant) for models with gradient_checkpointing_enable()
    # (Hugging Face, PEFT): less memory for ~30% more compute.
    gradient_checkpointing: bool = False
    # The validation metric that picks best_model.pt and drives early stopping.
    monitor: str = "val/loss"
    monitor_mode: str = "min"  # min | max
    # ddp: every rank holds the whole model. fsdp: FSDP2 shards parameters, gradients and
    # optimizer state over the ranks (src/trainers/fsdp.py) and checkpoints are sharded.
    strategy: str = "ddp"
    # fsdp: the class name of the blocks to shard one by one ("" : the model's repeated
    # block class, found from its ModuleList/Sequential children).
    fsdp_wrap: str = ""
    fsdp_cpu_offload: bool = False  # fsdp: parameters, gradients and optimizer state on the CPU
    # Resumed on another number of ranks: change grad_accum_steps so that the effective
    # batch (per device x ranks x accumulation) stays the checkpoint's, when it divides.
    keep_effective_batch: bool = False


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
    # An experiment's own dataclasses (experiment_schema) replace these: the template's are
    # src/data/synthetic.py's SyntheticDataConfig and src/models/mlp.py's MLPConfig.
    data: DataConfig = field(default_factory=DataConfig)
    model: dict = field(default_factory=dict)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    cost: CostConfig = field(default_factory=CostConfig)


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


def wandb_enabled(cfg: DictConfig) -> bool:
    return bool(cfg.logging.use_wandb) and cfg.logging.wandb_mode != "disabled"


# Settings a checkpoint is only valid with: change one and "resume" silently trains something
# else (a new batch size shifts the position in the epoch; a new lr is overridden by the
# optimizer state). Length (max_epochs, max_steps), logging, checkpointing, paths, device,
# precision and num_workers may change between runs.
# World size is recorded too, but may change: the data position is the global number of samples
# consumed in the epoch, which any number of ranks can take up (src/launch/resume_guard.py).
RESUME_SETTINGS = (
    "seed",
    "data",
    "model",
    "optim",
    "trainer.grad_accum_steps",
    "trainer.strategy",
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


def accumulation_for(cfg: DictConfig, saved: dict[str, Any] | None, world_size: int) -> int:
    """The gradient accumulation to train with now: ``trainer.grad_accum_steps``, or with
    ``trainer.keep_effective_batch`` and a checkpoint (its ``saved`` resume settings) made on
    another number of ranks, what keeps that checkpoint's effective batch. ValueError when it
    cannot be kept (the effective batch is not a multiple of per device x ranks now)."""
    accumulation = int(cfg.trainer.grad_accum_steps)
    if not cfg.trainer.keep_effective_batch or not saved:
        return accumulation
    saved_world = int(saved.get("world_size", 1))
    per_device = saved.get("data.batch_size")
    if saved_world == world_size or not isinstance(per_device, int):
        return accumulation
    effective = per_device * saved_world * int(saved.get("trainer.grad_accum_steps", 1))
    if effective % (per_device * world_size):
        raise ValueError(
            f"trainer.keep_effective_batch=true cannot keep the effective batch {effective} "
            f"(checkpointed on {saved_world} rank(s)) on {world_size} rank(s): it is not a "
            f"multiple of {per_device} per device x {world_size} rank(s); resume on a number "
            "of ranks that divides it, or set trainer.keep_effective_batch=false"
        )
    return effective // (per_device * world_size)
