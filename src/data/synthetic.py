"""A synthetic classification set generated locally: no downloads, same data for every seed.

Gaussian clusters around random class centres. Deterministic in ``data.seed``, so a
resumed run on a fresh machine rebuilds exactly the same data.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.data import Subset, TensorDataset

from src.config import DataConfig, require, split_sizes


@dataclass
class SyntheticDataConfig(DataConfig):
    """The template experiment's ``data:`` section: Gaussian clusters (``make_classification``)."""

    num_samples: int = 2048
    num_features: int = 32
    num_classes: int = 4
    noise: float = 0.5
    val_fraction: float = 0.1
    test_fraction: float = 0.1
    seed: int = 1234  # the synthetic data set itself, independent of the training seed

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.num_features >= 1, "num_features", self.num_features, "an integer >= 1")
        require(self.num_classes >= 2, "num_classes", self.num_classes, "an integer >= 2")
        fractions_ok = 0 < self.val_fraction + self.test_fraction < 1
        require(fractions_ok, "val_fraction", self.val_fraction, "val+test < 1")
        train_size = split_sizes(self.num_samples, self.val_fraction, self.test_fraction)[0]
        require(train_size >= 1, "num_samples", self.num_samples, "enough for train, val and test")


def make_classification(
    num_samples: int, num_features: int, num_classes: int, noise: float, seed: int
) -> TensorDataset:
    generator = torch.Generator().manual_seed(seed)
    centres = torch.randn(num_classes, num_features, generator=generator) * 2.0
    labels = torch.randint(0, num_classes, (num_samples,), generator=generator)
    features = centres[labels] + noise * torch.randn(num_samples, num_features, generator=generator)
    return TensorDataset(features, labels)


def split(
    dataset: TensorDataset, val_fraction: float, test_fraction: float, seed: int
) -> tuple[Subset, Subset, Subset]:
    """Deterministic train/val/test split."""
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed + 1))
    _, num_val, num_test = split_sizes(len(dataset), val_fraction, test_fraction)
    val_idx = order[:num_val].tolist()
    test_idx = order[num_val : num_val + num_test].tolist()
    train_idx = order[num_val + num_test :].tolist()
    return Subset(dataset, train_idx), Subset(dataset, val_idx), Subset(dataset, test_idx)


class RandomTokens(torch.utils.data.Dataset):
    """Random token sequences as a causal LM's dict samples (``labels`` = ``input_ids``): a
    Hugging Face ``Trainer`` trains on it with nothing to download. Same tokens for a seed."""

    def __init__(self, samples: int, length: int, vocab_size: int, seed: int = 0) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, vocab_size, (samples, length), generator=generator)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[index], "labels": self.ids[index]}
