"""How much room a run's checkpoints need on their volume, and the warning when it is short.

The same estimate serves the trainer (once it knows a checkpoint's size: after its first
save, or from the newest checkpoint when resuming) and ``scripts/check_instance.py``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from src.common.errors import DISK_FIXES, free_bytes, human_bytes

# What torch's zip writer says when a write came up short (a full disk, most often).
TORCH_SHORT_WRITE = ("unexpected pos", "file write failed")


def disk_need_bytes(checkpoint_bytes: int, keep_last_n: int, weights_bytes: int = 0) -> int:
    """Space a run needs on its volume: ``keep_last_n`` + 2 checkpoints (one being written,
    one being retired) plus the best and final weights."""
    return checkpoint_bytes * (keep_last_n + 2) + 2 * weights_bytes


def state_bytes(state: Any) -> int:
    """Bytes of the tensors in a nested state (each storage once): what ``torch.save``
    will write, give or take its small headers."""
    storages: dict[tuple[str, int], int] = {}

    def visit(value: Any) -> None:
        if isinstance(value, torch.Tensor):
            # A DTensor (FSDP): the whole tensor's bytes (its shards over all ranks).
            if hasattr(value, "to_local"):
                storages[("dtensor", id(value))] = value.numel() * value.element_size()
                return
            storage = value.untyped_storage()
            storages[(str(value.device), storage.data_ptr())] = storage.nbytes()
        elif isinstance(value, dict):
            for item in value.values():
                visit(item)
        elif isinstance(value, (list, tuple)):
            for item in value:
                visit(item)

    visit(state)
    return sum(storages.values())


def is_torch_short_write(error: BaseException) -> bool:
    return isinstance(error, RuntimeError) and any(text in str(error) for text in TORCH_SHORT_WRITE)


def shortfall_line(
    directory: Path,
    checkpoint_bytes: int,
    keep_last_n: int,
    weights_bytes: int = 0,
    used_bytes: int = 0,
    *,
    mirrored: bool = False,
) -> str | None:
    """The warning when the run's checkpoints will not fit, else None. ``used_bytes``: what
    the run's checkpoints already take there (part of the need, not of the free space).
    ``mirrored``: with the S3 mirror, local checkpoints verified there make room instead."""
    need = disk_need_bytes(checkpoint_bytes, keep_last_n, weights_bytes)
    free = free_bytes(directory)
    if free + used_bytes >= need:
        return None
    weights = f" + 2 x {human_bytes(weights_bytes)} best/final weights" if weights_bytes else ""
    already = f" (+ {human_bytes(used_bytes)} this run's checkpoints use)" if used_bytes else ""
    then = (
        "local checkpoints already verified in S3 will be deleted to make room"
        if mirrored
        else "the run will stop when the disk is full"
    )
    return (
        f"disk space: {directory} has {human_bytes(free)} free{already}, but "
        f"checkpoint.keep_last_n={keep_last_n} needs ~{human_bytes(need)} "
        f"({keep_last_n + 2} x {human_bytes(checkpoint_bytes)} checkpoints{weights}): "
        f"{then}; {DISK_FIXES}"
    )
