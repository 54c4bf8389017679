"""How a checkpoint is written, verified, listed and loaded: the format seam.

``format``: the :class:`CheckpointFormat` protocol every on-disk format implements.
``record``: :class:`CheckpointRecord`, what a committed checkpoint is (step, files, sizes,
sha256, metadata); the manager, the S3 mirror and the resume checks pass these around.
``sidecar``: the ``step_<N>.json`` commit marker every format shares, and the step naming.
``torch_file``: the default format, one ``torch.save`` file per checkpoint.
``trainable_format``: the format for a partly frozen model (LoRA): what trains, plus the
identity of the frozen base (``frozen_base``) that a resume must match; ``trainable``
picks those tensors out and puts them back.
``staging``: the background writer (copy to a CPU staging buffer, write on a thread).
``sharded_format``: FSDP's sharded checkpoints (every rank writes its shards through
``torch.distributed.checkpoint``; a resume on another number of ranks reshards them).

When to save and what to prune is the manager's business (``src.utils.checkpoint_manager``);
moving checkpoints off the machine is storage's (``src.storage.checkpoint_mirror``).
"""

from src.checkpoints.format import CheckpointFormat
from src.checkpoints.record import CheckpointFile, CheckpointRecord, retained_steps
from src.checkpoints.sidecar import read_checkpoint_infos
from src.checkpoints.torch_file import TorchFileFormat, atomic_torch_save
from src.checkpoints.trainable_format import TrainableOnlyFormat, format_for_model

__all__ = [
    "CheckpointFile",
    "CheckpointFormat",
    "CheckpointRecord",
    "TorchFileFormat",
    "TrainableOnlyFormat",
    "atomic_torch_save",
    "format_for_model",
    "read_checkpoint_infos",
    "retained_steps",
]
