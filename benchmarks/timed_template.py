"""The template experiment trained through the InterruptibleTrainer, timed from inside.

Benchmarks that compare trainer set-ups (monitors on/off, one rank against two) share it:
steps/s comes from timestamps the step function itself records, over the steps after
``skip_fraction`` of the run, so start-up, the first evaluation and the last one are out.
"""

from __future__ import annotations

import time

import torch

from src.common.rng import seed_everything
from src.config import DEV_CONFIG
from src.data.synthetic import make_classification, split
from src.models import build_model
from src.models.template import load_template_config
from src.trainers.interruptible_trainer import InterruptibleTrainer, default_train_step


def timed_template_fit(
    overrides: list[str], skip_fraction: float
) -> tuple[InterruptibleTrainer, float]:
    """Fit the template on the dev config plus ``overrides``; (trainer, steady steps/s)."""
    cfg = load_template_config(DEV_CONFIG, overrides)
    data = make_classification(
        cfg.data.num_samples, cfg.data.num_features, cfg.data.num_classes, cfg.data.noise, 0
    )
    train_set, val_set, _ = split(data, 0.005, 0.005, 0)
    seed_everything(cfg.seed)
    model = build_model(cfg.model, cfg.data.num_features, cfg.data.num_classes)
    stamps: list[float] = []

    def timed_step(model: torch.nn.Module, batch: object) -> torch.Tensor:
        stamps.append(time.perf_counter())
        return default_train_step(model, batch, torch.nn.functional.cross_entropy)

    trainer = InterruptibleTrainer(cfg, model, train_set, val_set, step_fn=timed_step)
    trainer.fit()
    steady = stamps[int(len(stamps) * skip_fraction) :]
    return trainer, (len(steady) - 1) / (steady[-1] - steady[0])
