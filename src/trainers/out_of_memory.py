"""GPU out of memory in a training step or an evaluation, as one line that says what to change.

``torch.cuda.OutOfMemoryError`` becomes a ``GpuOutOfMemoryError`` whose message names the
per-device batch size, the model's size and the usual fixes; scripts print it as one line
and exit 1 (the traceback with ``--debug`` or ``LOGLEVEL=DEBUG``). The checkpoints are
untouched: the trainer still waits for the write in flight before the error leaves ``fit``.
"""

from __future__ import annotations

from types import TracebackType

import torch

from src.common.errors import GpuOutOfMemoryError


def out_of_memory_message(where: str, batch_size: int, parameters: int) -> str:
    return (
        f"in {where} at batch size {batch_size} per device, model of {parameters:,} "
        "parameters: set data.batch_size: auto (the largest batch that fits), or a smaller "
        "data.batch_size with trainer.grad_accum_steps to keep the effective batch (both under "
        "a new run_name), or re-run with trainer.precision=bf16; the last complete checkpoint "
        "is kept (--debug or LOGLEVEL=DEBUG shows the traceback)"
    )


class ExplainOutOfMemory:
    """``with ExplainOutOfMemory("a training step", 32, 124_000_000): ...``: an out-of-memory
    error inside becomes the one-line GpuOutOfMemoryError (raised from the original)."""

    def __init__(self, where: str, batch_size: int, parameters: int) -> None:
        self.where, self.batch_size, self.parameters = where, batch_size, parameters

    def __enter__(self) -> None:
        return None

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> bool:
        if exc_type is not None and issubclass(exc_type, torch.cuda.OutOfMemoryError):
            message = out_of_memory_message(self.where, self.batch_size, self.parameters)
            raise GpuOutOfMemoryError(message) from error
        return False
