"""The checkpoint format of a model with frozen parameters (a LoRA model): chosen by
``format_for_model`` when some parameter has ``requires_grad=False``.

On disk it is ``TorchFileFormat``'s (one ``step_<N>.pt`` plus its sidecar), so the S3 mirror,
retention and fresh-machine resume treat it alike. What differs: the file's ``model`` entry
holds only what trains (``trainable.py``, put there by the snapshot), and every sidecar
names the frozen base (``frozen_base.py``) as ``metadata["frozen_base"]``, which the opening
of a run checks before it resumes.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import nn

from src.checkpoints.format import CheckpointFormat
from src.checkpoints.frozen_base import frozen_base_identity
from src.checkpoints.record import CheckpointRecord
from src.checkpoints.torch_file import TorchFileFormat
from src.checkpoints.trainable import has_frozen_parameters

FROZEN_BASE_KEY = "frozen_base"  # the sidecar metadata key


class TrainableOnlyFormat(TorchFileFormat):
    """``TorchFileFormat`` whose records carry ``frozen_base``: the identity of the base."""

    def __init__(self, frozen_base: Mapping[str, Any]) -> None:
        self.frozen_base = dict(frozen_base)

    def write(
        self,
        directory: Path,
        step: int,
        state: Mapping[str, Any],
        *,
        is_best: bool = False,
        metadata: Mapping[str, Any] | None = None,
    ) -> CheckpointRecord:
        metadata = {**(metadata or {}), FROZEN_BASE_KEY: self.frozen_base}
        return super().write(directory, step, state, is_best=is_best, metadata=metadata)


def format_for_model(model: nn.Module) -> CheckpointFormat:
    """``TrainableOnlyFormat`` when part of ``model`` is frozen, else ``TorchFileFormat``."""
    if has_frozen_parameters(model):
        return TrainableOnlyFormat(frozen_base_identity(model))
    return TorchFileFormat()
