"""A sampler whose order is a pure function of (seed, epoch), so it can restart mid-epoch.

Resuming needs no saved sampler state beyond the epoch and how many samples this
rank already consumed: the permutation is recomputed and the consumed prefix skipped.
Under torchrun each rank takes every ``world_size``-th index (like DistributedSampler).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler


class ResumableSampler(Sampler[int]):
    def __init__(
        self,
        dataset_size: int,
        seed: int,
        shuffle: bool = True,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.dataset_size = dataset_size
        self.seed = seed
        self.shuffle = shuffle
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self.start_index = 0

    def set_epoch(self, epoch: int, start_index: int = 0) -> None:
        """Start ``epoch``, skipping the first ``start_index`` samples of this rank's share."""
        self.epoch = epoch
        self.start_index = start_index

    def rank_indices(self) -> list[int]:
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.dataset_size, generator=generator).tolist()
        else:
            order = list(range(self.dataset_size))
        padded_size = -(-self.dataset_size // self.world_size) * self.world_size
        # Equal shares, or DDP's collectives hang on the rank that runs out first. Repeat the
        # whole order when there are more ranks than samples (one copy would leave some short).
        while len(order) < padded_size:
            order += order[: padded_size - len(order)]
        return order[self.rank :: self.world_size]

    def __iter__(self) -> Iterator[int]:
        return iter(self.rank_indices()[self.start_index :])

    def __len__(self) -> int:
        return max(0, -(-self.dataset_size // self.world_size) - self.start_index)
