"""Stage reporting for remote_train: one line when a stage starts, one when it ends (with its
duration), and a failure that names its stage, gives one line and its own exit code.

A remote run costs money while it waits, so the user should always see which step is
running and how long each took; a script wrapping remote_train reads the exit code.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TextIO

# In the order of their exit codes (connect 10 ... shutdown 16, export 17, check 18, rent 19);
# export (between train and retrieve), check (between install and train) and rent (before
# connect: find, create and boot a machine) came later, so they take the next free codes.
STAGES = (
    "connect",
    "sync",
    "install",
    "train",
    "retrieve",
    "verify",
    "shutdown",
    "export",
    "check",
    "rent",
)
STAGE_EXIT = {name: 10 + index for index, name in enumerate(STAGES)}
EXIT_USAGE = 2
EXIT_DETACHED = 130  # Ctrl-C: training goes on on the host


class StageError(RuntimeError):
    """A failed stage; ``str()`` is the one line shown (``<stage> failed: <reason>``)."""

    def __init__(self, stage: str, reason: str) -> None:
        super().__init__(f"{stage} failed: {reason}")
        self.stage = stage
        self.reason = reason

    @property
    def exit_code(self) -> int:
        return STAGE_EXIT[self.stage]


@dataclass
class StageHandle:
    """What the body of a stage may add to its end line, or report without stopping."""

    name: str
    note: str = ""
    failure: StageError | None = None
    ended_as: str = "done"  # the end line's verb when it did not fail ("detached")

    def fail(self, reason: str) -> StageError:
        """Mark the stage failed but let the caller go on (a crashed run is still retrieved)."""
        self.failure = StageError(self.name, reason)
        return self.failure


@dataclass
class StageReporter:
    out: TextIO = field(default_factory=lambda: sys.stdout)
    err: TextIO = field(default_factory=lambda: sys.stderr)
    prog: str = "remote_train"
    durations: dict[str, float] = field(default_factory=dict)

    def line(self, text: str) -> None:
        print(text, file=self.out, flush=True)

    def error(self, error: StageError | str) -> None:
        print(f"{self.prog}: {error}", file=self.err, flush=True)

    @contextmanager
    def stage(self, name: str, what: str) -> Iterator[StageHandle]:
        assert name in STAGE_EXIT, name
        handle = StageHandle(name)
        self.line(f"[{name}] {what}")
        started = time.monotonic()
        try:
            yield handle
        except StageError:
            self._end(handle, started, ok=False)
            raise
        except BaseException:
            self._end(handle, started, ok=False, how="stopped")
            raise
        self._end(handle, started, ok=handle.failure is None)
        if handle.failure is not None:
            self.error(handle.failure)

    def _end(self, handle: StageHandle, started: float, ok: bool, how: str = "failed") -> None:
        seconds = time.monotonic() - started
        self.durations[handle.name] = self.durations.get(handle.name, 0.0) + seconds
        note = f": {handle.note}" if handle.note else ""
        verb = handle.ended_as if ok else how
        self.line(f"[{handle.name}] {verb} in {seconds:.1f} s{note}")
