"""How many samples go to train, val and test: one rule for the split and the config check."""

from __future__ import annotations


def split_sizes(
    num_samples: int, val_fraction: float, test_fraction: float
) -> tuple[int, int, int]:
    """(train, val, test) counts; val and test get at least one sample each."""
    num_val = max(1, int(num_samples * val_fraction))
    num_test = max(1, int(num_samples * test_fraction))
    return num_samples - num_val - num_test, num_val, num_test
