"""The largest batch that fits the GPU: double until out of memory, then binary search.

A size that barely fits can still run out of memory later (fragmentation, a longer
sequence, the optimizer's state appearing at the first step), so the size used is the
largest that fitted minus a margin, and the search keeps room for Adam's two moment
buffers. The trainer runs this once per run (``data.batch_size: auto``) and records the
result in every checkpoint, so a resume, on this machine or another, uses the same size.
"""

from __future__ import annotations

import gc
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset, default_collate

from src.common.errors import ConfigError
from src.common.rng import capture_rng_state, restore_rng_state
from src.data.batches import move_to_device

DEFAULT_MARGIN = 0.1  # use 90% of the largest size that fitted


class BatchSizeError(RuntimeError):
    """Not even the smallest batch fits; the message says what to change."""


@dataclass
class BatchSearch:
    largest_fitting: int  # the largest size that ran
    chosen: int  # what training uses: largest_fitting minus the margin
    tried: list[tuple[int, bool]] = field(default_factory=list)  # (size, fitted), in order

    def describe(self) -> str:
        return (
            f"largest batch that fits: {self.largest_fitting}; using {self.chosen} "
            f"(a {DEFAULT_MARGIN:.0%} safety margin; tried {len(self.tried)} sizes)"
        )


def is_out_of_memory(error: BaseException) -> bool:
    """CUDA's OOM error, or the RuntimeErrors cuBLAS/cuDNN raise when their workspace won't fit."""
    if isinstance(error, torch.OutOfMemoryError):
        return True
    return isinstance(error, RuntimeError) and "out of memory" in str(error).lower()


def search_batch_size(
    fits: Callable[[int], bool],
    *,
    start: int = 1,
    limit: int | None = None,
    margin: float = DEFAULT_MARGIN,
) -> BatchSearch:
    """Largest ``size <= limit`` with ``fits(size)``, assuming fitting is monotone in size."""
    tried: list[tuple[int, bool]] = []

    def attempt(size: int) -> bool:
        ok = fits(size)
        tried.append((size, ok))
        return ok

    if limit is not None:
        start = min(start, limit)
    if not attempt(start):
        raise BatchSizeError(
            f"even a batch of {start} does not fit in GPU memory: use a smaller model, "
            "trainer.precision=bf16, or a GPU with more memory"
        )
    good, bad = start, None
    while bad is None and (limit is None or good < limit):
        size = good * 2 if limit is None else min(good * 2, limit)
        if attempt(size):
            good = size
        else:
            bad = size
    while bad is not None and bad - good > 1:
        middle = (good + bad) // 2
        if attempt(middle):
            good = middle
        else:
            bad = middle
    chosen = max(1, int(good * (1 - margin)))
    return BatchSearch(largest_fitting=good, chosen=chosen, tried=tried)


def free_cuda_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def sample_batch(dataset: Dataset, size: int, collate_fn: Callable[[list[Any]], Any] | None) -> Any:
    """``size`` samples (repeating the data set if it is smaller), collated as training does."""
    count = len(dataset)  # type: ignore[arg-type]
    return (collate_fn or default_collate)([dataset[i % count] for i in range(size)])


def find_max_batch_size(
    model: nn.Module,
    dataset: Dataset,
    train_step: Callable[[nn.Module, Any], torch.Tensor],
    device: torch.device,
    *,
    collate_fn: Callable[[list[Any]], Any] | None = None,
    limit: int | None = None,
    margin: float = DEFAULT_MARGIN,
    move: Callable[[Any, torch.device], Any] = move_to_device,
) -> BatchSearch:
    """Try forward+backward of ``train_step(model, batch)`` (returns the loss) at growing sizes.

    Gradients are dropped after each try; the weights are not changed (no optimizer step).
    """
    if device.type != "cuda":
        raise BatchSizeError(
            f"data.batch_size=auto measures GPU memory and needs CUDA; this run is on {device}: "
            "set data.batch_size to a number (e.g. 64)"
        )
    # Room for AdamW's two fp32 moment buffers, which appear only at the first real step.
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    reserve = torch.empty(2 * param_bytes, dtype=torch.uint8, device=device)

    def fits(size: int) -> bool:
        batch = None
        try:
            batch = sample_batch(dataset, size, collate_fn)
            batch = move(batch, device)
            train_step(model, batch).backward()
            torch.cuda.synchronize(device)
            return True
        except Exception as error:
            if not is_out_of_memory(error):
                raise
            return False
        finally:
            del batch
            model.zero_grad(set_to_none=True)
            free_cuda_memory()

    try:
        return search_batch_size(fits, limit=limit, margin=margin)
    finally:
        del reserve
        free_cuda_memory()


def measure_batch_size(
    model: nn.Module,
    dataset: Dataset,
    train_step: Callable[[nn.Module, Any], torch.Tensor],
    device: torch.device,
    *,
    collate_fn: Callable[[list[Any]], Any] | None,
    limit: int,
) -> BatchSearch:
    """``data.batch_size=auto``: ``find_max_batch_size`` with the RNGs left as they were (the
    search runs dropout, and a resumed run must draw what an uninterrupted one does) and a
    batch that never fits worded as a ConfigError."""
    rng_state = capture_rng_state()
    try:
        return find_max_batch_size(
            model, dataset, train_step, device, collate_fn=collate_fn, limit=limit
        )
    except BatchSizeError as error:
        raise ConfigError(str(error)) from None
    finally:
        restore_rng_state(rng_state)
