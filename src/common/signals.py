"""Turn stop signals into a flag the training loop checks at step boundaries.

The handler does no I/O beyond one line and never raises, so a signal that lands
mid-step (or mid checkpoint write) cannot corrupt anything: the loop finishes the
step, saves, and exits with EXIT_INTERRUPTED. A second Ctrl-C aborts at once
(EXIT_ABORTED) without saving; the previous checkpoint stays valid.

After the last step (``test()``, the final writes, interpreter shutdown) a stop signal ends
the process at once, but never inside a file write (``writing_file``): the write finishes
first. It exits 0 once the run's results are written (``mark_results_written``), else 75 and
the same command finishes the rest; never by the signal itself.
"""

from __future__ import annotations

import atexit
import gc
import os
import signal
import sys
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from types import FrameType
from typing import NoReturn

# EX_TEMPFAIL from sysexits.h: "temporary failure, retry later". Distinct from
# success (0), crashes (1), config errors (2) and death by signal (128+N).
EXIT_INTERRUPTED = 75
# cost.budget_usd reached: the run checkpointed and stopped like on SIGTERM. Not 75, so a
# script or sweep can tell "preempted, re-run" from "out of money, raise the budget first".
EXIT_BUDGET_REACHED = 76
# A second Ctrl-C: the shell's code for "ended by SIGINT". Nothing new was saved; the last
# complete checkpoint stays (writes are atomic), so a re-run resumes from it.
EXIT_ABORTED = 130


def parse_signals(names: Iterable[str]) -> list[signal.Signals]:
    """``["SIGTERM", "USR1", ""]`` -> signal objects; empty names are skipped."""
    result = []
    for name in names:
        name = name.strip().upper()
        if not name:
            continue
        full = name if name.startswith("SIG") else f"SIG{name}"
        if not hasattr(signal.Signals, full):
            raise ValueError(f"unknown signal {name!r}: use a name like SIGUSR1")
        result.append(signal.Signals[full])
    return result


class StopRequest:
    """Installs handlers for ``signals``; ``requested`` turns True on the first one."""

    def __init__(self, signals: Iterable[signal.Signals]) -> None:
        self.signals = list(dict.fromkeys(signals))
        self.requested = False
        self.signal_name: str | None = None
        self.training_done = False  # set by the trainer once every step and write is done
        self._previous: dict[signal.Signals, object] = {}

    def install(self) -> StopRequest:
        if threading.current_thread() is not threading.main_thread():
            return self  # Python allows handlers only in the main thread
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def restore(self) -> None:
        """Put the previous handlers back. After a stop, in a script, the stop signals other
        than SIGINT get ``exit_after_stop`` instead: the checkpoint is durable, and a
        duplicate of the signal (``scancel`` reaches every process of a job and the Slurm
        batch script passes it on too) must end the process with 75, not kill it by signal
        (exit 143). Once training is done (``training_done``: the trainer sets it), every
        stop signal gets ``exit_when_written`` (the test set, the final writes, shutdown).
        A kernel gets its handlers back: it lives on after the cell."""
        after_stop = self.requested and "ipykernel" not in sys.modules
        finishing = self.training_done and not self.requested and _results.scripted
        if finishing:
            _results.written = False  # this run's results are still to come
        for sig, previous in self._previous.items():
            if after_stop and sig != signal.SIGINT:
                previous = exit_after_stop
            elif finishing:
                previous = exit_when_written
            if previous in (exit_after_stop, exit_when_written):
                # Python puts SIG_DFL back in place of Python handlers while the interpreter
                # shuts down (seconds, with torch loaded): ignore the signal from atexit on.
                atexit.register(signal.signal, sig, signal.SIG_IGN)
            signal.signal(sig, previous)  # type: ignore[arg-type]
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if self.requested and signum == signal.SIGINT:
            self.restore()
            if "ipykernel" in sys.modules:  # a kernel interrupt: stop the cell, keep the kernel
                raise KeyboardInterrupt
            message = (
                "\n[trainer] second Ctrl-C: aborted without saving; the last complete "
                "checkpoint is kept and a re-run resumes from it\n"
            )
            os.write(2, message.encode())
            # Not an exception: one raised inside torch.save ends in two chained tracebacks.
            # Atomic writes mean a half-written temp file is all that can be left; the next
            # start removes it.
            os._exit(EXIT_ABORTED)
        self.requested = True
        self.signal_name = name
        hint = " (Ctrl-C again to abort without saving)" if signum == signal.SIGINT else ""
        message = f"\n[trainer] {name} received: finishing this step, saving, exiting{hint}\n"
        os.write(2, message.encode())

    def __enter__(self) -> StopRequest:
        return self.install()

    def __exit__(self, *exc: object) -> None:
        self.restore()


def exit_after_stop(signum: int, frame: FrameType | None) -> NoReturn:
    """A stop signal once the stop checkpoint is durable: end now, as the stop would have.

    A Python handler, not SIG_IGN, which child processes would inherit."""
    _exit_now(EXIT_INTERRUPTED)


class _Results:
    """What a stop signal after training needs to know: the writes in progress (any thread)
    and whether the run's results are all written."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.writes_in_progress = 0
        self.exit_code_when_written: int | None = None  # set by a signal during a write
        self.written = False
        self.scripted = False  # exit_cleanly_after_training() was called: a script


_results = _Results()


def exit_cleanly_after_training() -> None:
    """For scripts (``src.launch.load_experiment_config`` calls it): once ``fit`` has
    trained to the end, a stop signal exits 75 or 0 (``exit_when_written``) instead of
    killing the process. Not in a kernel or a test process: they live on after a fit."""
    _results.scripted = True


@contextmanager
def writing_file() -> Iterator[None]:
    """Around each atomic file write: a stop signal after training waits for it to end."""
    with _results.lock:
        _results.writes_in_progress += 1
    try:
        yield
    finally:
        with _results.lock:
            _results.writes_in_progress -= 1
            done = _results.writes_in_progress == 0
        if done and _results.exit_code_when_written is not None:
            _exit_now(_results.exit_code_when_written)


def mark_results_written() -> None:
    """The run's last result is on disk (test_results.json): a stop signal now exits 0."""
    _results.written = True


def exit_when_written(signum: int, frame: FrameType | None) -> None:
    """A stop signal after the last step: exit now, or as soon as the file being written is
    complete; 0 if the results are all written, else 75 (the same command finishes them).

    Runs in the main thread between bytecodes: takes no lock (the main thread may hold it)."""
    code = 0 if _results.written else EXIT_INTERRUPTED
    name = signal.Signals(signum).name
    what = "everything is written" if code == 0 else "trained and saved, the same command ends it"
    _results.exit_code_when_written = code
    wait = "; finishing the file being written first" if _results.writes_in_progress else ""
    line = f"\n[trainer] {name} received after the last step: {what} (exit {code}){wait}\n"
    os.write(2, line.encode())
    if not _results.writes_in_progress:  # a write that ended meanwhile saw the code set above
        _exit_now(code)


def _exit_now(code: int) -> NoReturn:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, RuntimeError, ValueError):  # closed, or flushing when signalled
            pass
    os._exit(code)


def ignore_stop_signals(signal_names: Iterable[str], worker_id: int = 0) -> None:
    """DataLoader ``worker_init_fn``: workers ignore stop signals sent to the process group.

    ``docker stop``, Ctrl-C and Slurm signal every process; a worker that died on it
    would crash the main process before it could save. The main process shuts its
    workers down itself once it has checkpointed.
    """
    for sig in parse_signals(signal_names):
        signal.signal(sig, signal.SIG_IGN)


def exit_interrupted(result: object = None) -> NoReturn:
    """Exit once the stop checkpoint is durable, quickly: with ``result.exit_code`` (a
    FitResult: 75 for a signal, 76 for a spent budget), else EXIT_INTERRUPTED.

    ``gc.freeze()`` skips the interpreter's final garbage-collection pass over every
    torch object, which takes about a second for a large model: time that counts
    against the grace period (10 s for ``docker stop``) after the checkpoint is safe.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    gc.freeze()
    sys.exit(getattr(result, "exit_code", EXIT_INTERRUPTED))
