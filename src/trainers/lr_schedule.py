"""The learning rate as a pure function of the step (nanoGPT's way): nothing to resume but
the step itself, and a longer re-run follows the schedule recomputed for its new length."""

from __future__ import annotations

import functools
import math

import torch
from omegaconf import DictConfig


def lr_factor(step: int, warmup_steps: int, total_steps: int, min_ratio: float) -> float:
    """Linear warmup then cosine decay: a pure function of the step (nothing to resume)."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def warmup_cosine_schedule(
    optimizer: torch.optim.Optimizer, optim_cfg: DictConfig, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """``lr_factor`` for ``optim.warmup_steps`` and ``optim.min_lr_ratio``, as a scheduler
    (its state_dict is in the checkpoint; the factor needs only the step)."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        functools.partial(
            lr_factor,
            warmup_steps=optim_cfg.warmup_steps,
            total_steps=total_steps,
            min_ratio=optim_cfg.min_lr_ratio,
        ),
    )
