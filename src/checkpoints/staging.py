"""Asynchronous checkpoint writes: copy the state to a staging buffer, write on a thread.

The training loop pays only for the copy into one reusable CPU buffer (pinned memory for
CUDA tensors); a background thread serializes, hashes and renames. At most one write is in
flight: the next ``start`` waits for it, so host memory grows by at most one copy of the
state. A pending write is flushed if the interpreter exits without ``wait``.
"""

from __future__ import annotations

import atexit
import copy
import threading
import weakref
from collections.abc import Callable
from typing import Any

import torch

from src.common.console import print_warning
from src.common.errors import DiskFullError


class StagingBuffer:
    """Reusable CPU copies of every tensor in a nested state, keyed by position."""

    def __init__(self) -> None:
        self._buffers: dict[tuple, torch.Tensor] = {}
        self._source_devices: set[torch.device] = set()

    def take_source_devices(self) -> list[torch.device]:
        """CUDA devices copied from since the last call (each needs a synchronize)."""
        devices, self._source_devices = sorted(self._source_devices, key=str), set()
        return devices

    def stage(self, value: Any, key: tuple = ()) -> Any:
        if isinstance(value, torch.Tensor):
            return self._stage_tensor(value, key)
        if isinstance(value, dict):
            return {name: self.stage(item, (*key, name)) for name, item in value.items()}
        if isinstance(value, (list, tuple)):
            staged = [self.stage(item, (*key, index)) for index, item in enumerate(value)]
            return type(value)(staged) if isinstance(value, tuple) else staged
        return copy.deepcopy(value)

    def _stage_tensor(self, tensor: torch.Tensor, key: tuple) -> torch.Tensor:
        tensor = tensor.detach()
        buffer = self._buffers.get(key)
        if buffer is None or buffer.shape != tensor.shape or buffer.dtype != tensor.dtype:
            pin = tensor.is_cuda and torch.cuda.is_available()
            buffer = torch.empty(tensor.shape, dtype=tensor.dtype, device="cpu", pin_memory=pin)
            self._buffers[key] = buffer
        buffer.copy_(tensor, non_blocking=tensor.is_cuda)
        if tensor.is_cuda:
            self._source_devices.add(tensor.device)
        return buffer


class BackgroundWriter:
    """One checkpoint write at a time on a daemon thread; its error surfaces on ``wait``."""

    def __init__(self) -> None:
        self._staging = StagingBuffer()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        atexit.register(_flush_at_exit, weakref.ref(self))

    def snapshot(self, state: Any) -> Any:
        """A copy of ``state`` in the staging buffer, complete when this returns."""
        snapshot = self._staging.stage(state)
        # The non_blocking copies into pinned memory must land: synchronize each device they
        # came from (under torchrun that is this rank's GPU, not GPU 0).
        for device in self._staging.take_source_devices():
            torch.cuda.synchronize(device)
        return snapshot

    def start(self, write: Callable[[], None], name: str) -> None:
        """Run ``write`` on a new thread, after the previous write has finished."""
        self.wait()
        self._thread = threading.Thread(target=self._run, args=(write,), name=name, daemon=True)
        self._thread.start()

    def wait(self) -> None:
        """Block until the in-flight write (if any) is complete; re-raise its error."""
        thread = self._thread
        if thread is not None:
            thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            if isinstance(error, DiskFullError):
                raise error  # already one line that says which file and what to change
            raise RuntimeError(f"background checkpoint write failed: {error}") from error

    def _run(self, write: Callable[[], None]) -> None:
        try:
            write()
        except BaseException as error:  # surfaced by the next wait()/start()
            self._error = error


def _flush_at_exit(writer_ref: weakref.ref) -> None:
    writer = writer_ref()
    if writer is not None:
        try:
            writer.wait()
        except (RuntimeError, OSError) as error:
            print_warning(str(error))
