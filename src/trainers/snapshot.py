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
from src.trainers.fsdp import load_sharded_state, sharded_state
from src.trainers.train_state import EpochLoss, TrainState


@dataclass(frozen=True)
class TrainingParts:
    """The objects whose state a checkpoint holds (the model unwrapped: no DDP or compile).

    ``trainable_only``: save the model's trainable parameters and buffers, not its frozen ones.
    ``sharded``: FSDP; model and optimizer are this rank's shards (src/trainers/fsdp.py).
    """

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    trainable_only: bool = False
    sharded: bool = False


def take_snapshot(
    parts: TrainingParts, state: TrainState, epoch_loss: EpochLoss, dist: DistInfo
) -> dict[str, Any]:
    """The checkpoint dict (a collective under torchrun: every rank must call it)."""
    # One entry per rank: its RNGs and its share of the epoch's train loss (rank 0's
    # share alone would count it twice and lose the others' on resume).
    per_rank = gather_objects(
        (capture_rng_state(), epoch_loss.sum.item(), epoch_loss.samples), dist
    )
    if parts.sharded:
        sharded = sharded_state(parts.model, parts.optimizer)
        model_state, optimizer_state = sharded["model"], sharded["optimizer"]
    else:
        model_state, optimizer_state = parts.model.state_dict(), parts.optimizer.state_dict()
    scope = FULL_SCOPE
    if parts.trainable_only:
        model_state, scope = trainable_state_dict(parts.model), TRAINABLE_SCOPE
    return {
        "model": model_state,
        "model_scope": scope,
        "optimizer": optimizer_state,
        "scheduler": parts.scheduler.state_dict(),
        "scaler": parts.scaler.state_dict(),
        "rng": [rng for rng, _, _ in per_rank],
        "trainer": state.to_checkpoint(),
        "epoch_loss_sum": [loss_sum for _, loss_sum, _ in per_rank],
        "epoch_samples": [samples for _, _, samples in per_rank],
    }


def restore_snapshot(
    checkpoint: Mapping[str, Any],
    parts: TrainingParts,
    rank: int,
    device: torch.device,
    world_size: int = 1,
) -> tuple[TrainState, EpochLoss]:
    """Load a checkpoint (loaded onto the CPU) into the training objects; returns the counters
    and this rank's epoch loss. A run saved on a GPU resumes on the CPU and the other way
    round: each part goes where its object lives now.

    Saved by another number of ranks (``world_size`` now): each rank takes the RNG states of
    the saved rank of its number (the last one's beyond them), and the epoch's train loss
    shares are regrouped so that their sum over the ranks stays the same."""
    if parts.sharded:
        load_sharded_state(parts.model, parts.optimizer, dict(checkpoint))
    elif checkpoint.get("model_scope") == TRAINABLE_SCOPE:
        load_trainable_state(parts.model, checkpoint["model"])
        parts.optimizer.load_state_dict(checkpoint["optimizer"])
    else:  # a full state dict loads into a partly frozen model too
        parts.model.load_state_dict(checkpoint["model"])
        parts.optimizer.load_state_dict(checkpoint["optimizer"])  # moves state to param devices
    parts.scheduler.load_state_dict(checkpoint["scheduler"])
    if should_load_scaler(checkpoint["scaler"], parts.scaler.is_enabled()):
        parts.scaler.load_state_dict(checkpoint["scaler"])
    state = TrainState.from_checkpoint(checkpoint["trainer"])
    rng_states = checkpoint["rng"]
    restore_rng_state(rng_states[min(rank, len(rng_states) - 1)])
    loss_sum, samples = checkpoint["epoch_loss_sum"], checkpoint["epoch_samples"]
    if isinstance(samples, list):  # per rank; older checkpoints hold rank 0's only
        # The saved ranks rank, rank + world_size, ...: the same shares at the same size.
        loss_sum = sum(loss_sum[rank::world_size])
        samples = sum(samples[rank::world_size])
    return state, EpochLoss(device, loss_sum, samples)


def should_load_scaler(saved_state: Mapping[str, Any], scaler_enabled: bool) -> bool:
    """Load a saved GradScaler state only when both runs use one (fp16 on CUDA).

    A bf16 or fp32 run saves an empty state, and loading that into an enabled scaler
    raises; a saved fp16 state means nothing to a disabled scaler.
    """
    return scaler_enabled and bool(saved_state)
