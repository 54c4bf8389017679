"""Experiment configuration: a typed schema, YAML files, ``key=value`` overrides, secrets.

Every value is checked against the dataclasses in ``schema.py``, so a typo'd key or a wrong
type fails at start-up with one line naming the key and the file, never mid-run. Loading
(``loading.py``) imports nothing above ``src.common``; starting a run from an experiment
file (``load_experiment_config``) lives in ``src.launch``.
"""

from src.common.errors import EXIT_CONFIG_ERROR, ConfigError
from src.config.loading import (
    CONFIG_DIR,
    DEV_CONFIG,
    PROD_CONFIG,
    RENAMED_KEYS,
    default_config_path,
    describe_config_error,
    in_notebook,
    load_config,
    load_dotenv_file,
    load_yaml_mapping,
    parse_cli,
    rename_old_override,
    validate,
)
from src.config.schema import (
    AUTO_BATCH_SIZE,
    BUCKET_NAME,
    RESUME_SETTINGS,
    TOOL_SECTIONS,
    CheckpointConfig,
    CostConfig,
    DataConfig,
    ExperimentConfig,
    LoggingConfig,
    OptimConfig,
    PathsConfig,
    SettingError,
    TrainerConfig,
    accumulation_for,
    experiment_schema,
    require,
    resume_settings,
    split_sizes,
    wandb_enabled,
)
from src.config.secrets import (
    REDACTED,
    redact_secrets,
    scrub_secret_values,
    secret_values,
    to_plain_dict,
)

__all__ = [
    "AUTO_BATCH_SIZE",
    "BUCKET_NAME",
    "CONFIG_DIR",
    "DEV_CONFIG",
    "EXIT_CONFIG_ERROR",
    "PROD_CONFIG",
    "REDACTED",
    "RENAMED_KEYS",
    "RESUME_SETTINGS",
    "TOOL_SECTIONS",
    "CheckpointConfig",
    "ConfigError",
    "CostConfig",
    "DataConfig",
    "ExperimentConfig",
    "LoggingConfig",
    "OptimConfig",
    "PathsConfig",
    "SettingError",
    "TrainerConfig",
    "accumulation_for",
    "default_config_path",
    "describe_config_error",
    "experiment_schema",
    "in_notebook",
    "load_config",
    "load_dotenv_file",
    "load_yaml_mapping",
    "parse_cli",
    "redact_secrets",
    "rename_old_override",
    "require",
    "resume_settings",
    "scrub_secret_values",
    "secret_values",
    "split_sizes",
    "to_plain_dict",
    "validate",
    "wandb_enabled",
]
