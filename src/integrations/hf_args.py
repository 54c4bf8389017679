"""The kit's config sections as a Hugging Face ``TrainingArguments`` / TRL ``SFTConfig``.

A script on ``transformers.Trainer`` or TRL that loads the kit's YAML (``load_experiment_config``)
gets the same run directory, and so the same ``remote_train``, Slurm and export handling, as
the kit's own experiments. Each key maps onto one argument; what has no counterpart here
(early stopping, ``compile``) stays with the kit's trainer.

=============================  ==========================================================
kit key                        Trainer argument
=============================  ==========================================================
``trainer.max_steps``          ``max_steps`` (-1: ``num_train_epochs`` from max_epochs)
``trainer.grad_accum_steps``   ``gradient_accumulation_steps``
``trainer.grad_clip_norm``     ``max_grad_norm``
``trainer.precision``          ``bf16`` / ``fp16`` on CUDA (fp32 on the CPU)
``trainer.gradient_ckpt...``   ``gradient_checkpointing`` (non-reentrant)
``trainer.log_every_n_steps``  ``logging_steps``
``optim.*``                    ``learning_rate``, ``weight_decay``, ``warmup_steps``,
                               cosine to ``lr * min_lr_ratio``
``data.batch_size``            ``per_device_train_batch_size`` / ``_eval_batch_size``
``data.num_workers``           ``dataloader_num_workers``
``checkpoint.every_n_steps``   ``save_steps`` and ``eval_steps``
``trainer.monitor(_mode)``     ``metric_for_best_model`` (``val/loss`` -> ``eval_loss``),
                               ``greater_is_better`` (``max``)
``checkpoint.keep_last_n``     ``save_total_limit`` (``run_interruptible`` prunes)
``logging.tensorboard/wandb``  ``report_to``; ``reporter_environment``: TensorBoard in
                               ``<run_dir>/tensorboard``, W&B's project and mode
``seed``                       ``seed``
=============================  ==========================================================
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from src.runs.layout import RunLayout

HALF_PRECISIONS = {"bf16": "bf16", "fp16": "fp16"}


def trainer_arguments(
    cfg: Any, run_dir: Path, *, cuda: bool | None = None, evaluate: bool = True
) -> dict[str, Any]:
    """Keyword arguments for ``TrainingArguments``/``SFTConfig`` from the kit's sections.

    ``output_dir`` is the run directory itself: the Trainer's ``checkpoint-N`` folders sit
    beside ``config.json`` and ``final_adapter/``, where ``remote_train`` and the export look.
    """
    cuda = torch.cuda.is_available() if cuda is None else cuda
    trainer, optim, data = cfg.trainer, cfg.optim, cfg.data
    arguments: dict[str, Any] = {
        "output_dir": str(run_dir),
        "max_steps": int(trainer.max_steps),
        "num_train_epochs": float(trainer.max_epochs),
        "gradient_accumulation_steps": int(trainer.grad_accum_steps),
        "max_grad_norm": float(trainer.grad_clip_norm),
        "gradient_checkpointing": bool(trainer.gradient_checkpointing),
        "logging_steps": int(trainer.log_every_n_steps),
        "learning_rate": float(optim.lr),
        "weight_decay": float(optim.weight_decay),
        "warmup_steps": int(optim.warmup_steps),
        "lr_scheduler_type": "cosine_with_min_lr",
        "lr_scheduler_kwargs": {"min_lr_rate": float(optim.min_lr_ratio)},
        "per_device_train_batch_size": int(data.batch_size),
        "per_device_eval_batch_size": int(data.batch_size),
        "dataloader_num_workers": int(data.num_workers),
        "save_steps": int(cfg.checkpoint.every_n_steps),
        "save_total_limit": int(cfg.checkpoint.keep_last_n),
        "report_to": _reporters(cfg.logging),
        "seed": int(cfg.seed),
        "use_cpu": not cuda,
    }
    if arguments["gradient_checkpointing"]:
        arguments["gradient_checkpointing_kwargs"] = {"use_reentrant": False}
    half = HALF_PRECISIONS.get(str(trainer.precision)) if cuda else None
    if half is not None:
        arguments[half] = True
    if evaluate:  # at every save, so each checkpoint knows its loss and the best is kept
        arguments["eval_strategy"] = "steps"
        arguments["eval_steps"] = arguments["save_steps"]
        arguments["metric_for_best_model"] = trainer_metric_key(str(trainer.monitor))
        arguments["greater_is_better"] = str(trainer.monitor_mode) == "max"
    return arguments


def eval_metric_key(args: Any) -> str:
    """The Trainer's metric for the best checkpoint as its evaluation names it: ``eval_loss``
    when unset (``metric_for_best_model="loss"`` means ``eval_loss`` to the Trainer too)."""
    name = args.metric_for_best_model or "loss"
    return name if name.startswith("eval_") else f"eval_{name}"


def evaluations_logged(log_history: list[dict[str, Any]], key: str) -> int:
    """How many evaluations the Trainer's ``log_history`` holds (entries with ``key``)."""
    return sum(1 for entry in log_history if key in entry)


def kit_metric_name(key: str) -> str:
    """``eval_loss`` -> ``val/loss``: the kit's ``trainer.monitor`` for the same number."""
    return f"val/{key.removeprefix('eval_')}"


def trainer_metric_key(monitor: str) -> str:
    """``val/loss`` -> ``eval_loss``: ``trainer.monitor`` as the Trainer's evaluation names it."""
    return f"eval_{monitor.split('/', 1)[-1]}"


def reporter_environment(cfg: Any, run_dir: Path) -> dict[str, str]:
    """What the Trainer's reporters read from the environment (transformers 5 has no
    ``logging_dir`` argument): TensorBoard into ``<run_dir>/tensorboard`` as the kit's runs,
    W&B's project, mode and files. Set them only where the environment has none."""
    environment = {"TENSORBOARD_LOGGING_DIR": str(RunLayout(run_dir).tensorboard)}
    if cfg.logging.use_wandb:
        environment.update(
            WANDB_PROJECT=str(cfg.logging.wandb_project),
            WANDB_MODE=str(cfg.logging.wandb_mode),
            WANDB_DIR=str(run_dir),
            WANDB_NAME=str(cfg.run_name),
        )
    return environment


def _reporters(logging: Any) -> list[str]:
    reporters = ["tensorboard"] if logging.tensorboard else []
    if logging.use_wandb:
        reporters.append("wandb")
    return reporters
