"""What the host keeps about remote_train's runs: plain JSON files in one folder.

Only the host knows whether a run is still going (the laptop may have slept, lost its
connection or been killed), so ``--status`` and ``--attach`` read everything from here::

    <repo on the host>/.remote_runs/
        <session>.json        the tmux session: its runs in order (name, run dir, command)
        <session>.<i>.start   written when run i starts (time, pid)
        <session>.<i>.exit    written when it ends (exit code, signal) or is skipped
    <run dir>/remote_train.log   everything the run printed (tee'd from the tmux pane)

Standard library only (and src.utils modules that are): the agent imports this with whatever
interpreter the host has.
"""

from __future__ import annotations

import json
import re
import signal
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from src.common.atomic_io import atomic_write_bytes
from src.common.errors import EXIT_DISK_FULL
from src.common.signals import EXIT_ABORTED, EXIT_BUDGET_REACHED, EXIT_INTERRUPTED

REGISTRY_DIR = ".remote_runs"
LOG_NAME = "remote_train.log"
# Exit codes of experiments (README "Interrupt and resume"), and what remote_train calls them.
# EXIT_CONFIG is src.config's EXIT_CONFIG_ERROR, not imported: that module needs omegaconf,
# and --status must work on a host the install stage has not reached yet.
EXIT_DONE, EXIT_CONFIG = 0, 2
# Ends after which --stop-after / --destroy-after may go ahead.
FINISHED_ON_PURPOSE = {EXIT_DONE, EXIT_BUDGET_REACHED}
_STEP = re.compile(rb"(?:\| *|step )(\d+)/(\d+)")


@dataclass
class RunSpec:
    run_name: str
    run_dir: str  # absolute, on the host
    output_root: str  # the run dir's parent: what --destroy-after retrieves and the gate checks
    experiment: str  # relative to the repo root
    args: list[str] = field(default_factory=list)
    log_offset: int = 0  # the log's size when the session was created: this session's output
    retrieve: str = ""  # the host directory that comes home: "" is run_dir (a sweep: its root)

    @property
    def log_path(self) -> Path:
        return Path(self.run_dir) / LOG_NAME


@dataclass
class SessionSpec:
    session: str
    python: str
    runs: list[RunSpec]
    created_at: float = field(default_factory=time.time)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SessionSpec:
        runs = [RunSpec(**run) for run in data["runs"]]
        return cls(str(data["session"]), str(data["python"]), runs, float(data["created_at"]))


def session_name(run_name: str) -> str:
    """tmux names can't hold '.' or ':'; the session is named after the (first) run."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", run_name)[:80] or "run"


def describe_exit(exit_code: int | None, signal_name: str | None = None) -> str:
    """The word for how a run ended."""
    if exit_code is None:
        return "unknown"
    if signal_name:
        hint = ": out of memory?" if signal_name == "SIGKILL" else ""
        return f"crashed (killed by {signal_name}{hint})"
    return {
        EXIT_DONE: "done",
        EXIT_INTERRUPTED: "interrupted",
        EXIT_BUDGET_REACHED: "stopped (budget reached)",
        EXIT_CONFIG: "failed (config error or run in use)",
        EXIT_DISK_FULL: "disk full",
        EXIT_ABORTED: "aborted",
    }.get(exit_code, "crashed")


def exit_code_of(returncode: int) -> tuple[int, str | None]:
    """(shell-style exit code, signal name): a child killed by signal N exits 128+N."""
    if returncode >= 0:
        return returncode, None
    try:
        name = signal.Signals(-returncode).name
    except ValueError:
        name = f"signal {-returncode}"
    return 128 - returncode, name


class Registry:
    """The ``.remote_runs`` folder of one repo copy on the host."""

    def __init__(self, repo_dir: Path) -> None:
        self.repo_dir = Path(repo_dir)
        self.path = self.repo_dir / REGISTRY_DIR

    def session_file(self, session: str) -> Path:
        return self.path / f"{session}.json"

    def state_file(self, session: str, index: int, kind: str) -> Path:
        return self.path / f"{session}.{index}.{kind}"

    def write_json(self, path: Path, data: Any) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, json.dumps(data).encode())

    @staticmethod
    def read_json(path: Path) -> Any:
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            return None

    def load(self, session: str) -> SessionSpec | None:
        data = self.read_json(self.session_file(session))
        try:
            return SessionSpec.from_json(data) if isinstance(data, dict) else None
        except (KeyError, TypeError, ValueError):
            return None

    def sessions(self) -> list[SessionSpec]:
        """Every recorded session, oldest first."""
        found = []
        for path in self.path.glob("*.json") if self.path.is_dir() else []:
            spec = self.load(path.stem)
            if spec is not None:
                found.append(spec)
        return sorted(found, key=lambda spec: spec.created_at)

    def save(self, spec: SessionSpec) -> None:
        """A new session replaces an old one of the same name, state files and all."""
        for old in self.path.glob(f"{spec.session}.*.*") if self.path.is_dir() else []:
            if old.suffix in (".start", ".exit"):
                old.unlink(missing_ok=True)
        self.write_json(self.session_file(spec.session), spec.to_json())

    def run_state(self, spec: SessionSpec, index: int, alive: bool) -> dict[str, Any]:
        """State of one run: queued, running, finished (with its exit), skipped or lost."""
        run = spec.runs[index]
        started = self.read_json(self.state_file(spec.session, index, "start"))
        ended = self.read_json(self.state_file(spec.session, index, "exit"))
        state: dict[str, Any] = {
            "session": spec.session,
            "index": index,
            "run_name": run.run_name,
            "run_dir": run.run_dir,
            "output_root": run.output_root,
            "retrieve": run.retrieve or run.run_dir,
            "experiment": run.experiment,
            "args": run.args,
            "created_at": spec.created_at,
            "started_at": (started or {}).get("started_at"),
            "finished_at": (ended or {}).get("finished_at"),
            "exit_code": None,
            "signal": None,
        }
        if isinstance(ended, dict) and ended.get("skipped"):
            state["state"] = "skipped"
            state["reason"] = ended.get("reason", "")
        elif isinstance(ended, dict):
            state["exit_code"] = ended.get("exit_code")
            state["signal"] = ended.get("signal")
            state["state"] = "finished"
            state["outcome"] = describe_exit(state["exit_code"], state["signal"])
        elif started:
            state["state"] = "running" if alive else "lost"
        else:
            state["state"] = "queued" if alive else "not started"
        state["step"] = last_step(run.log_path)
        return state


def read_tail(path: Path, max_bytes: int = 32768) -> bytes:
    try:
        with open(path, "rb") as handle:
            handle.seek(0, 2)
            size = handle.tell()
            handle.seek(max(0, size - max_bytes))
            return handle.read()
    except OSError:
        return b""


def last_step(log_path: Path) -> str | None:
    """'140/2000' from the last progress bar or epoch line in the log, if any."""
    matches = _STEP.findall(read_tail(log_path))
    if not matches:
        return None
    done, total = matches[-1]
    return f"{int(done)}/{int(total)}"


def tail_lines(log_path: Path, count: int = 15) -> list[str]:
    """The last lines as a terminal shows them: of '\\r'-overwritten progress, the last."""
    text = read_tail(log_path).decode(errors="replace")
    lines = []
    for line in text.split("\n"):
        shown = [segment.rstrip() for segment in line.split("\r") if segment.strip()]
        if shown:
            lines.append(shown[-1])
    return lines[-count:]
