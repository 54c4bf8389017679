"""The one runner both sweeps share: run tasks as subprocesses, survive failures, summarise.

Each task is a command with its own log file. Tasks already done are skipped, so a sweep
that was interrupted is finished by running it again. A failing task is logged and
reported; the rest still run. Tasks run one at a time, or one per "slot" at a time where a
slot is a ``CUDA_VISIBLE_DEVICES`` value (one trial per GPU).

Stopping: each child runs in its own process group, so a terminal Ctrl-C or a SIGTERM to
the sweep reaches each child exactly once, forwarded by the runner (the trainer treats a
second Ctrl-C as "abort without saving"). If the runner is killed outright (SIGKILL), Linux
sends its children SIGTERM (``PR_SET_PDEATHSIG``), so they still checkpoint. A child keeps
an exclusive ``flock`` on its log file while alive: a re-run that starts while a previous
attempt is still saving waits for it instead of writing the same run directory twice.
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from types import FrameType
from typing import IO

from src.common.paths import REPO_ROOT
from src.common.signals import EXIT_ABORTED, EXIT_BUDGET_REACHED, EXIT_INTERRUPTED

EXIT_FAILED = 1
POLL_SECONDS = 0.05
PR_SET_PDEATHSIG = 1


@dataclass
class Task:
    """One entry of a sweep: what to run, where its output goes, and how to tell it is done."""

    name: str
    command: list[str]
    log_path: Path
    is_done: Callable[[], bool] = lambda: False
    env: dict[str, str] = field(default_factory=dict)
    output: str = ""  # shown in dry runs and summaries: where the result will be


@dataclass
class TaskResult:
    name: str
    status: str  # ok | failed | interrupted | skipped | dry-run | not-run
    returncode: int | None = None
    seconds: float = 0.0
    log_path: Path | None = None
    message: str = ""


@dataclass
class _Running:
    task: Task
    process: subprocess.Popen
    slot: str | None
    started: float
    log_handle: IO[bytes]
    signalled: bool = False


def _load_libc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None


_LIBC = _load_libc()  # loaded here, not in the forked child


def _child_setup(parent_pid: int) -> Callable[[], None]:
    def setup() -> None:
        os.setpgid(0, 0)
        if _LIBC is not None:
            _LIBC.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
            if os.getppid() != parent_pid:  # the runner died before prctl took effect
                os.kill(os.getpid(), signal.SIGTERM)

    return setup


def last_line(path: Path) -> str:
    """The last non-empty line of a log: usually the error that ended the run."""
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    for line in reversed(lines):
        if line.strip():
            return line.strip()[:200]
    return ""


def _open_log_locked(task: Task, echo: Callable[[str], None]) -> IO[bytes]:
    task.log_path.parent.mkdir(parents=True, exist_ok=True)
    handle = open(task.log_path, "ab")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        echo(f"[sweep] {task.name}: a previous attempt is still running; waiting for it")
        fcntl.flock(handle, fcntl.LOCK_EX)
    return handle


class _StopSignals:
    """SIGINT/SIGTERM: stop starting tasks and forward the signal once to running ones."""

    def __init__(self, running: list[_Running], echo: Callable[[str], None]) -> None:
        self.running = running
        self.echo = echo
        self.signal_name: str | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> _StopSignals:
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)  # type: ignore[arg-type]

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signal_name is not None:  # a second Ctrl-C: pass it on too (trainer aborts)
            for entry in self.running:
                entry.signalled = False
        self.signal_name = signal.Signals(signum).name
        os.write(2, f"\n[sweep] {self.signal_name}: stopping running tasks, no new ones\n".encode())
        self.forward()
        previous = self._previous.get(signum)
        if callable(previous) and previous is not signal.default_int_handler:
            previous(signum, frame)  # the caller's own handler (an Optuna worker's stop flag)

    def forward(self) -> None:
        """Send the stop signal to each running child that has not had it yet."""
        if self.signal_name is None:
            return
        for entry in self.running:
            if not entry.signalled:
                entry.signalled = True
                try:
                    os.killpg(entry.process.pid, signal.Signals[self.signal_name])
                except ProcessLookupError:
                    pass


def _start(task: Task, slot: str | None, cwd: Path, echo: Callable[[str], None]) -> _Running:
    handle = _open_log_locked(task, echo)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **task.env}
    if slot is not None:
        env["CUDA_VISIBLE_DEVICES"] = slot
    header = f"\n=== {datetime.now().isoformat(timespec='seconds')} {task.name}"
    header += f" (CUDA_VISIBLE_DEVICES={slot})" if slot is not None else ""
    handle.write(f"{header}\n$ {shlex.join(task.command)}\n".encode())
    handle.flush()
    process = subprocess.Popen(
        task.command,
        cwd=cwd,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=handle,
        stderr=subprocess.STDOUT,
        preexec_fn=_child_setup(os.getpid()),
    )
    where = f" on GPU {slot}" if slot is not None else ""
    echo(f"[sweep] {task.name}: started{where}, log {task.log_path}")
    return _Running(task, process, slot, time.monotonic(), handle)


def _finish(entry: _Running, echo: Callable[[str], None]) -> TaskResult:
    code = entry.process.returncode
    entry.log_handle.close()
    seconds = time.monotonic() - entry.started
    if code == 0:
        status, message = "ok", ""
    elif code == EXIT_INTERRUPTED:
        status, message = "interrupted", "stopped after saving; re-run the sweep to resume"
    elif code == EXIT_BUDGET_REACHED:
        status, message = "interrupted", "cost.budget_usd reached; raise it and re-run to resume"
    elif code == EXIT_ABORTED:
        status, message = "interrupted", "aborted (second Ctrl-C); re-run to resume"
    else:
        status = "failed"
        message = last_line(entry.task.log_path) if code > 0 else f"killed by signal {-code}"
    echo(f"[sweep] {entry.task.name}: {status} (exit {code}) in {seconds:.1f}s")
    return TaskResult(entry.task.name, status, code, seconds, entry.task.log_path, message)


def run_tasks(
    tasks: Sequence[Task],
    *,
    skip_done: bool = True,
    dry_run: bool = False,
    slots: Sequence[str | None] = (None,),
    cwd: Path = REPO_ROOT,
    echo: Callable[[str], None] = print,
) -> list[TaskResult]:
    """Run ``tasks`` (at most ``len(slots)`` at once); one result per task, in task order."""
    results: dict[str, TaskResult] = {}
    pending: list[Task] = []
    for task in tasks:
        if skip_done and task.is_done():
            results[task.name] = TaskResult(task.name, "skipped", message="already done")
        elif dry_run:
            echo(f"[dry-run] {task.name}: {shlex.join(task.command)}")
            if task.output:
                echo(f"          -> {task.output}")
            results[task.name] = TaskResult(task.name, "dry-run", log_path=task.log_path)
        else:
            pending.append(task)

    running: list[_Running] = []
    free_slots = list(slots) or [None]
    with _StopSignals(running, echo) as stop:
        while pending or running:
            while pending and free_slots and stop.signal_name is None:
                running.append(_start(pending.pop(0), free_slots.pop(0), cwd, echo))
                stop.forward()  # a signal that landed while the task was starting
            if stop.signal_name is not None and not running:
                break
            time.sleep(POLL_SECONDS)
            for entry in [entry for entry in running if entry.process.poll() is not None]:
                running.remove(entry)
                free_slots.append(entry.slot)
                results[entry.task.name] = _finish(entry, echo)
    for task in pending:
        results[task.name] = TaskResult(task.name, "not-run", message=f"sweep {stop.signal_name}")
    return [results[task.name] for task in tasks]


def exit_code(results: Sequence[TaskResult]) -> int:
    """0 if all done; 1 if any failed; 75 if stopped early (run again to continue)."""
    statuses = {result.status for result in results}
    if "failed" in statuses:
        return EXIT_FAILED
    if statuses & {"interrupted", "not-run"}:
        return EXIT_INTERRUPTED
    return 0


def format_table(rows: Sequence[dict[str, object]], columns: Sequence[str]) -> str:
    """Plain-text table: readable in a terminal, a log file and a test assertion alike."""

    def cell(value: object) -> str:
        if value is None:
            return "-"
        if isinstance(value, float):
            return f"{value:.4g}"
        return str(value)

    cells = [[cell(row.get(column)) for column in columns] for row in rows]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip() for r in cells]
    return "\n".join(lines)


def summary_table(results: Sequence[TaskResult]) -> str:
    rows = [
        {
            "name": result.name,
            "status": result.status,
            "exit": result.returncode,
            "seconds": round(result.seconds, 1) if result.returncode is not None else None,
            "message": result.message,
        }
        for result in results
    ]
    return format_table(rows, ["name", "status", "exit", "seconds", "message"])
