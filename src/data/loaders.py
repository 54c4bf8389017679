"""DataLoaders whose every random draw comes back exactly when a run resumes mid-epoch.

The order of samples is the ResumableSampler's (a function of seed and epoch). What a
dataset draws in ``__getitem__`` (random crops, masking, noise) is pinned too:

- ``num_workers == 0``: it draws from the main process's RNGs, which every checkpoint
  saves and restores.
- ``num_workers > 0``: each worker reseeds python, numpy and torch before each batch from
  (seed, epoch, rank, batch index). A resumed run starts its workers fresh at batch k, and
  they draw exactly what the uninterrupted run's workers drew for batch k.

Worker base seeds (``torch.initial_seed()`` inside a worker) derive from (seed, epoch,
rank), so they differ between epochs and ranks and never consume the global RNG.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Sampler, get_worker_info

from src.common.rng import seed_everything
from src.data.resumable_sampler import ResumableSampler

EVAL_EPOCH = -1  # the epoch number that evaluation loaders seed with


def mix_seed(*parts: int) -> int:
    """A 63-bit seed from integers (splitmix64 steps): nearby inputs give unrelated seeds."""
    value = 0x9E3779B97F4A7C15
    for part in parts:
        value = (value ^ (part & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        value = (value ^ (value >> 27)) * 0x94D049BB133111EB & 0xFFFFFFFFFFFFFFFF
        value ^= value >> 31
    return value & 0x7FFFFFFFFFFFFFFF


class SeededBatchSampler(Sampler[tuple[int, list[int]]]):
    """Groups the sampler's indices into batches, each tagged with its own seed."""

    def __init__(
        self, sampler: ResumableSampler, batch_size: int, seed: int, rank: int, tag: bool = True
    ) -> None:
        self.sampler, self.batch_size, self.seed, self.rank = sampler, batch_size, seed, rank
        self.tag = tag  # False: seeds are unused (no workers), skip computing them

    def __iter__(self) -> Iterator[tuple[int, list[int]]]:
        batch_index = self.sampler.consumed_share // self.batch_size
        indices = list(self.sampler)
        for start in range(0, len(indices), self.batch_size):
            seed = (
                mix_seed(self.seed, self.sampler.epoch, self.rank, batch_index) if self.tag else 0
            )
            yield seed, indices[start : start + self.batch_size]
            batch_index += 1

    def __len__(self) -> int:
        return -(-len(self.sampler) // self.batch_size)


class SeededDataset(Dataset):
    """Wraps the user's dataset: fetches a tagged batch, reseeding first inside workers."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> Any:
        return self.dataset[index]

    def __getitems__(self, tagged_batch: tuple[int, list[int]]) -> Any:
        seed, indices = tagged_batch
        if get_worker_info() is not None:  # worker-local RNGs only; the main process's stay
            seed_everything(seed)
        getitems = getattr(self.dataset, "__getitems__", None)
        if getitems is not None:
            return getitems(indices)
        return [self.dataset[index] for index in indices]


def make_loader(
    dataset: Dataset,
    sampler: ResumableSampler,
    *,
    batch_size: int,
    seed: int,
    rank: int,
    num_workers: int,
    collate_fn: Callable[[list[Any]], Any] | None,
    pin_memory: bool,
    worker_init_fn: Callable[[int], None] | None = None,
) -> DataLoader:
    """A loader over ``sampler``'s current epoch (call ``sampler.set_epoch`` first)."""
    return DataLoader(
        SeededDataset(dataset),
        batch_sampler=SeededBatchSampler(sampler, batch_size, seed, rank, tag=num_workers > 0),
        num_workers=num_workers,
        collate_fn=collate_fn,
        pin_memory=pin_memory,
        worker_init_fn=worker_init_fn,
        # Its own generator: creating an iterator must not draw from the global RNG, or a
        # resumed run's dropout masks would shift.
        generator=torch.Generator().manual_seed(mix_seed(seed, sampler.epoch, rank)),
        persistent_workers=False,
    )
