"""A sampler whose order is a pure function of (seed, epoch), so it can restart mid-epoch.

Resuming needs no saved sampler state beyond the epoch and how many samples all ranks together
already consumed in it (``global_start``): the permutation is recomputed, that prefix skipped,
and the rest dealt out to the ranks there are now, each taking every ``world_size``-th index
(like DistributedSampler). So a run stopped at 8 ranks and resumed at 4 sees each remaining
sample of the epoch exactly once; at the same number of ranks each rank's share is exactly
what it would have been.
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
        self.global_start = 0

    def set_epoch(self, epoch: int, start_index: int = 0, global_start: int = 0) -> None:
        """Start ``epoch``, skipping the first ``global_start`` samples of the epoch's order
        (consumed by all ranks together), then the first ``start_index`` of this rank's share."""
        self.epoch = epoch
        self.start_index = start_index
        self.global_start = min(global_start, self.dataset_size)

    def rank_indices(self) -> list[int]:
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.dataset_size, generator=generator).tolist()
        else:
            order = list(range(self.dataset_size))
        remaining = order[self.global_start :]
        padded_size = -(-len(remaining) // self.world_size) * self.world_size
        # Equal shares, or DDP's collectives hang on the rank that runs out first. Padded from
        # the start of the epoch's order (so a resume at the same world size pads as the
        # uninterrupted run did), repeated when there are more ranks than samples.
        while len(remaining) < padded_size:
            remaining += order[: padded_size - len(remaining)]
        return remaining[self.rank :: self.world_size]

    @property
    def consumed_share(self) -> int:
        """Samples of this rank's share of the epoch already consumed: the position that keys
        per-batch seeds, so a resume at the same number of ranks seeds each batch as the
        uninterrupted run did."""
        return self.global_start // self.world_size + self.start_index

    def __iter__(self) -> Iterator[int]:
        return iter(self.rank_indices()[self.start_index :])

    def __len__(self) -> int:
        remaining = self.dataset_size - self.global_start
        return max(0, -(-remaining // self.world_size) - self.start_index)
