"""A synthetic classification set generated locally: no downloads, same data for every seed.

Gaussian clusters around random class centres. Deterministic in ``data.seed``, so a
resumed run on a fresh machine rebuilds exactly the same data.
"""

from __future__ import annotations

import torch
from torch.utils.data import Subset, TensorDataset

from src.config import split_sizes


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
