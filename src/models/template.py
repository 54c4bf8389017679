"""The template experiment's settings: its ``model:`` (MLPConfig) and ``data:``
(SyntheticDataConfig) sections, each beside the code it configures, and the schema they make.

    load_template_config(DEV_CONFIG, overrides)  # = load_config(..., schema=TEMPLATE_SCHEMA)
"""

from __future__ import annotations

import os
from typing import Any

from omegaconf import DictConfig

from src.config import experiment_schema, load_config
from src.data.synthetic import SyntheticDataConfig
from src.models.mlp import MLPConfig

TEMPLATE_SCHEMA = experiment_schema(MLPConfig, SyntheticDataConfig)


def load_template_config(
    config_path: str | os.PathLike[str] | None = None,
    overrides: list[str] | None = None,
    **options: Any,
) -> DictConfig:
    """``load_config`` with the template's schema: what tests, benchmarks and tools use to
    read configs/dev_config.yaml and configs/prod_config.yaml."""
    return load_config(config_path, overrides, schema=TEMPLATE_SCHEMA, **options)
