"""A finished Hugging Face Trainer run's outputs in the kit's run layout: ``final_adapter/``
(the trained PEFT adapters) and ``best_adapter/`` (the adapters of the checkpoint with the
best ``metric_for_best_model``), so ``scripts/export.py RUN --format hf`` and
``remote_train --export hf`` take a TRL run as they take the kit's own.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from src.common.atomic_io import atomic_write_dir
from src.runs.layout import RunLayout
from src.trainers.adapters import ADAPTER_CONFIG, ADAPTER_WEIGHTS, is_peft_model, save_adapter


def save_adapters(trainer: Any, run_dir: Path) -> list[Path]:
    """``final_adapter/`` from the trained model, ``best_adapter/`` from the best checkpoint
    (when the Trainer tracked one and it still holds PEFT's files); each written whole or not
    at all. The folders written; none for a model without adapters, or on a rank other than
    the first under torchrun (every rank holds the same adapters)."""
    if not is_peft_model(trainer.model) or not trainer.is_world_process_zero():
        return []
    layout = RunLayout(run_dir)
    save_adapter(trainer.model, layout.final_adapter)
    written = [layout.final_adapter]
    best = trainer.state.best_model_checkpoint
    if best and (Path(best) / ADAPTER_WEIGHTS).is_file():
        source = Path(best)

        def fill(temp: Path) -> None:
            for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
                shutil.copy2(source / name, temp / name)

        atomic_write_dir(layout.best_adapter, fill)
        written.append(layout.best_adapter)
    return written
