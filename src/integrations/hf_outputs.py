"""A finished Hugging Face Trainer run's outputs in the kit's run layout: ``final_adapter/``
(the trained PEFT adapters) and ``best_adapter/`` (the adapters of the checkpoint with the
best ``metric_for_best_model``), so ``scripts/export.py RUN --format hf`` and
``remote_train --export hf`` take a TRL run as they take the kit's own; ``test_results.json``
with the fields the kit's runs have, so a sweep scores and reports a TRL trial like any other.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from src.common.atomic_io import atomic_write_dir
from src.integrations.hf_args import eval_metric_key, evaluations_logged, kit_metric_name
from src.integrations.hf_trainer import InterruptibleResult
from src.runs.files import write_json
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


def write_test_results(
    trainer: Any, run_dir: Path, test_metrics: dict[str, float], result: InterruptibleResult
) -> dict[str, Any]:
    """``test_results.json`` (first rank only): ``test_metrics`` as ``trainer.evaluate(...,
    metric_key_prefix="test")`` gave them, the best evaluation as ``best_val_loss`` (the kit's
    name for ``eval_loss``: what a sweep's ``trainer.monitor`` reads), the step, the epochs
    and evaluations run, and the cost. The fields written."""
    state = trainer.state
    key = eval_metric_key(trainer.args)
    monitor = kit_metric_name(key)
    best = state.best_metric
    if best is None:  # no checkpoint tracked the best: the best value the logs hold
        values = [entry[key] for entry in state.log_history if key in entry]
        better = max if trainer.args.greater_is_better else min
        best = better(values) if values else None
    results = {
        **test_metrics,
        "monitor": monitor,
        f"best_{monitor.replace('/', '_')}": best,
        "global_step": state.global_step,
        "epochs": int(state.epoch or 0),
        "evaluations": evaluations_logged(state.log_history, key),
        "status": result.status.value,
        "cost_usd": result.cost_usd,
    }
    if trainer.is_world_process_zero():
        write_json(RunLayout(run_dir).test_results, results)
    return results
