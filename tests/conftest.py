"""Shared pytest set-up: GPU-only tests skip with a visible reason when there is no GPU, and
the slowest test files start first.

``make test`` hands whole files to its workers (``--dist loadfile``, so a file's module
fixtures run once). Handed out alphabetically, a 3-minute file picked up last keeps one
worker busy while the other idles; started first, the short files fill in around it.
Measured seconds per file (2-core machine): keep a new heavy file in this list.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

SLOWEST_FIRST = [
    "test_resume.py",  # 212 s
    "test_outputs_and_logging.py",  # 138
    "test_remote_train.py",  # ~130
    "test_hf_trainer.py",  # 124
    "test_optuna_sweep.py",  # ~115
    "test_s3_checkpoints.py",  # 112
    "test_distributed.py",  # 107
    "test_budget.py",  # 100
    "test_slurm.py",  # 96
    "test_fsdp.py",  # ~85
    "test_custom_model.py",  # 75
    "test_llm_resume.py",  # 68
    "test_rent.py",  # ~65
    "test_lora.py",  # 62
    "test_notebook_cells.py",  # 54
    "test_hf_trainer_torchrun.py",  # ~47
]


def slowest_first(item: pytest.Item) -> int:
    name = Path(str(item.fspath)).name
    return SLOWEST_FIRST.index(name) if name in SLOWEST_FIRST else len(SLOWEST_FIRST)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    items.sort(key=slowest_first)  # stable: a file's tests keep their order
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs an NVIDIA GPU (torch.cuda.is_available() is False)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
