"""The process inside the tmux session: run the session's experiments in order, tee their
output to the pane and to ``<run dir>/remote_train.log``, record how each one ended.

Each experiment gets its own process group, so a Ctrl-C typed into the pane (or tmux killing
the pane) reaches the runner only; the runner forwards it (SIGHUP as SIGTERM), the trainer
saves a checkpoint and exits 75, and the runner still records that exit. The next experiment
starts only when the previous one finished with exit 0.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import BinaryIO

from src.remote.runs import EXIT_DONE, Registry, describe_exit, exit_code_of


class _Tee:
    """Bytes to the log (always) and to the pane (until the pane goes away)."""

    def __init__(self, log: BinaryIO, pane: BinaryIO | None) -> None:
        self.log, self.pane = log, pane

    def write(self, data: bytes) -> None:
        self.log.write(data)
        self.log.flush()
        if self.pane is not None:
            try:
                self.pane.write(data)
                self.pane.flush()
            except OSError:  # tmux killed: keep logging, stop echoing
                self.pane = None


def _stamp() -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S")


def run_session(repo_dir: Path, session: str, pane: BinaryIO | None = None) -> int:
    """Run every experiment of ``session``; 0 when all were done, else the first bad code."""
    registry = Registry(repo_dir)
    spec = registry.load(session)
    if spec is None:
        print(f"remote_train runner: no session {session} in {registry.path}", file=sys.stderr)
        return 2
    pane = pane if pane is not None else sys.stdout.buffer
    children: list[subprocess.Popen] = []

    def forward(signum: int, _frame: object) -> None:
        for child in children:
            child.send_signal(signal.SIGTERM if signum == signal.SIGHUP else signum)

    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, forward)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    first_bad: tuple[str, int] | None = None
    for index, run in enumerate(spec.runs):
        if first_bad is not None:
            reason = f"run '{first_bad[0]}' ended with exit {first_bad[1]}"
            registry.write_json(
                registry.state_file(session, index, "exit"), {"skipped": True, "reason": reason}
            )
            continue
        Path(run.run_dir).mkdir(parents=True, exist_ok=True)
        command = [spec.python, run.experiment, *run.args]
        with open(run.log_path, "ab") as log:
            tee = _Tee(log, pane)
            tee.write(f"[remote_train] {_stamp()} {run.run_name}: {shlex.join(command)}\n".encode())
            try:
                child = subprocess.Popen(
                    command,
                    cwd=repo_dir,
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                    env=env,
                )
            except OSError as error:
                tee.write(f"[remote_train] cannot start {command[0]}: {error}\n".encode())
                code, signal_name = 127, None
            else:
                children.append(child)
                registry.write_json(
                    registry.state_file(session, index, "start"),
                    {"started_at": time.time(), "pid": child.pid},
                )
                assert child.stdout is not None
                while chunk := child.stdout.read1(65536):
                    tee.write(chunk)
                code, signal_name = exit_code_of(child.wait())
                children.clear()
            outcome = describe_exit(code, signal_name)
            tee.write(
                f"[remote_train] {_stamp()} {run.run_name}: {outcome} (exit {code})\n".encode()
            )
        registry.write_json(
            registry.state_file(session, index, "exit"),
            {"exit_code": code, "signal": signal_name, "finished_at": time.time()},
        )
        if code != EXIT_DONE:
            first_bad = (run.run_name, code)
    return first_bad[1] if first_bad else 0
