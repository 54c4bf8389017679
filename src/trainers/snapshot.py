"""The checkpoint's contents: built from the live training objects, and put back into them.

Everything exact resume needs: model, optimizer, LR scheduler, grad scaler, every rank's RNG
states and share of the epoch's train loss, and the ``TrainState`` counters. Only plain
tensors and Python values, so it loads with ``torch.load(weights_only=True)``.

A partly frozen model (LoRA) saves only what trains (``model_scope: "trainable"``, see
src/checkpoints/trainable.py): the frozen base comes from where the model was loaded.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from src.checkpoints.trainable import (
    FULL_SCOPE,
    TRAINABLE_SCOPE,
    load_trainable_state,
    trainable_state_dict,
)
from src.common.rng import capture_rng_state, restore_rng_state
from src.trainers.distributed import DistInfo, gather_objects
from src.trainers.train_state import EpochLoss, TrainState


@dataclass(frozen=True)
class TrainingParts:
    """The objects whose state a checkpoint holds (the model unwrapped: no DDP or compile).

    ``trainable_only``: save the model's trainable parameters and buffers, not its frozen ones.
    """

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    trainable_only: bool = False


def take_snapshot(
    parts: TrainingParts, state: TrainState, epoch_loss: EpochLoss, dist: DistInfo
) -> dict[str, Any]:
    """The checkpoint dict (a collective under torchrun: every rank must call it)."""
    # One entry per rank: its RNGs and its share of the epoch's train loss (rank 0's
    # share alone would count it twice and lose the others' on resume).
    per_rank = gather_objects(
        (capture_rng_state(), epoch_loss.sum.item(), epoch_loss.samples), dist
    )
    if parts.trainable_only:
        model_state, scope = trainable_state_dict(parts.model), TRAINABLE_SCOPE
    else:
        model_state, scope = parts.model.state_dict(), FULL_SCOPE
    return {
        "model": model_state,
        "model_scope": scope,
        "optimizer": parts.optimizer.state_dict(),
        "scheduler": parts.scheduler.state_dict(),
        "scaler": parts.scaler.state_dict(),
        "rng": [rng for rng, _, _ in per_rank],
        "trainer": state.to_checkpoint(),
        "epoch_loss_sum": [loss_sum for _, loss_sum, _ in per_rank],
        "epoch_samples": [samples for _, _, samples in per_rank],
    }


def restore_snapshot(
    checkpoint: Mapping[str, Any], parts: TrainingParts, rank: int, device: torch.device
) -> tuple[TrainState, EpochLoss]:
    """Load a checkpoint (loaded onto the CPU) into the training objects; returns the counters
    and this rank's epoch loss. A run saved on a GPU resumes on the CPU and the other way
    round: each part goes where its object lives now."""
    if checkpoint.get("model_scope") == TRAINABLE_SCOPE:
        load_trainable_state(parts.model, checkpoint["model"])
    else:  # a full state dict loads into a partly frozen model too
        parts.model.load_state_dict(checkpoint["model"])
    parts.optimizer.load_state_dict(checkpoint["optimizer"])  # moves state to param devices
    parts.scheduler.load_state_dict(checkpoint["scheduler"])
    if should_load_scaler(checkpoint["scaler"], parts.scaler.is_enabled()):
        parts.scaler.load_state_dict(checkpoint["scaler"])
    state = TrainState.from_checkpoint(checkpoint["trainer"])
    rng_states = checkpoint["rng"]
    rank = min(rank, len(rng_states) - 1)
    restore_rng_state(rng_states[rank])
    loss_sum, samples = checkpoint["epoch_loss_sum"], checkpoint["epoch_samples"]
    if isinstance(samples, list):  # per rank; older checkpoints hold rank 0's only
        loss_sum, samples = loss_sum[rank], samples[rank]
    return state, EpochLoss(device, loss_sum, samples)


def should_load_scaler(saved_state: Mapping[str, Any], scaler_enabled: bool) -> bool:
    """Load a saved GradScaler state only when both runs use one (fp16 on CUDA).

    A bf16 or fp32 run saves an empty state, and loading that into an enabled scaler
    raises; a saved fp16 state means nothing to a disabled scaler.
    """
    return scaler_enabled and bool(saved_state)
