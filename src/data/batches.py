"""Batches of any shape: a tensor, a tuple ``(inputs, targets)``, a dict, or nestings of them."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch


def move_to_device(batch: Any, device: torch.device, non_blocking: bool = False) -> Any:
    """A copy of ``batch`` with every tensor on ``device``; other values pass through."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=non_blocking)
    if isinstance(batch, Mapping):
        return type(batch)(  # type: ignore[call-arg]
            {key: move_to_device(value, device, non_blocking) for key, value in batch.items()}
        )
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # namedtuple
        return type(batch)(*(move_to_device(value, device, non_blocking) for value in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(move_to_device(value, device, non_blocking) for value in batch)
    return batch


def first_tensor(batch: Any) -> torch.Tensor | None:
    """The first tensor met walking the batch depth-first (dicts in insertion order)."""
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, Mapping):
        batch = list(batch.values())
    if isinstance(batch, (list, tuple)):
        for value in batch:
            found = first_tensor(value)
            if found is not None:
                return found
    return None


def batch_size_of(batch: Any) -> int:
    """Samples in ``batch``: the leading size of its first tensor (what metrics average by)."""
    tensor = first_tensor(batch)
    if tensor is None or tensor.ndim == 0:
        raise ValueError(
            "cannot tell the batch size: the batch holds no tensor with a leading batch "
            "dimension (return tensors from your collate_fn)"
        )
    return int(tensor.shape[0])
