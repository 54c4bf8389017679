"""One process per run directory: an exclusive ``flock`` on ``<run_dir>/.run.lock``.

A re-run started while the old job still lives (in a forgotten tmux pane, say) would
delete the other's temporary files and then both would train into the same checkpoints.
The kernel drops an flock when its process dies, however it dies, so a lock file left by
a SIGKILLed run never blocks: only a live holder does. The file keeps the holder's PID,
host and start time, for the message the second process prints.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path

from src.common.errors import ConfigError
from src.runs.layout import LOCK

LOCK_NAME = LOCK  # the file name, for globbing many runs


class RunInUseError(ConfigError):
    """Another live process holds the run directory."""

    label = "error"

    def __init__(self, message: str, holder: str = "another process") -> None:
        super().__init__(message)
        self.holder = holder  # "PID 123 on host (since ...)", for callers that word their own line


class RunLock:
    """A held lock; ``release()`` when this process is done with the run (or just exit)."""

    def __init__(self, path: Path, fd: int, created_dir: bool = False) -> None:
        self.path, self._fd, self._holders = path, fd, 1
        self.created_dir = created_dir  # the run directory did not exist before the lock

    @property
    def held(self) -> bool:
        return self._fd >= 0

    def release(self) -> None:
        """Drop one hold; the lock goes when the last holder in this process releases."""
        if not self.held:
            return
        self._holders -= 1
        if self._holders == 0:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = -1
            _HELD.pop(self.path, None)


# flock belongs to an open file description: a second open() in this process would conflict
# with the first, so holds within one process (a script, then its trainer) share one lock.
_HELD: dict[Path, RunLock] = {}


def acquire_run_lock(run_dir: Path) -> RunLock:
    """Lock ``run_dir`` (created if needed) for this process, or raise RunInUseError."""
    run_dir = Path(run_dir)
    path = (run_dir / LOCK_NAME).resolve()
    held = _HELD.get(path)
    if held is not None and held.held:
        held._holders += 1
        return held
    created_dir = not run_dir.exists()
    run_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder, pid = _describe_holder(fd)
        os.close(fd)
        if created_dir:  # cannot happen (the holder made it), but leave nothing behind
            _remove_if_only_lock(path)
        raise RunInUseError(
            f"run directory {run_dir} is in use by {holder}: wait for that run to finish, "
            f"stop it (kill -TERM {pid}: it saves and exits), or use another run_name",
            holder,
        ) from None
    info = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started_at": time.strftime("%Y-%m-%d %H:%M:%S"),
        "command": " ".join(sys.argv)[:200],
    }
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
    lock = RunLock(path, fd, created_dir)
    _HELD[path] = lock
    return lock


def discard_unused_run_dirs() -> None:
    """For a script failing before training (a config or S3 error): run directories this
    process created for its lock and never wrote to are removed, lock file and all."""
    for lock in list(_HELD.values()):
        if lock.created_dir and lock.held:
            lock._holders = 1
            lock.release()
            _remove_if_only_lock(lock.path)


def _remove_if_only_lock(lock_path: Path) -> None:
    run_dir = lock_path.parent
    try:
        if [p.name for p in run_dir.iterdir()] == [LOCK_NAME]:
            lock_path.unlink()
            run_dir.rmdir()
    except OSError:
        pass


def _describe_holder(fd: int) -> tuple[str, str]:
    """("PID 123 on host (since ...)", "123"), or a generic description and "<pid>"."""
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
        return f"PID {info['pid']} on {info['host']} (since {info['started_at']})", str(info["pid"])
    except (ValueError, KeyError, TypeError, OSError):
        return "another process (it is still starting)", "<pid>"


def held_run_locks(outputs_root: Path) -> list[Path]:
    """Run directories under ``outputs_root`` whose lock a live process holds right now.

    Probes each ``<root>/<run>/.run.lock`` with a non-blocking shared flock, released at
    once: it never blocks or disturbs the holder, and never creates a file.
    """
    held = []
    for lock_path in sorted(Path(outputs_root).glob(f"*/{LOCK_NAME}")):
        try:
            fd = os.open(lock_path, os.O_RDONLY)
        except OSError:
            continue  # removed between the listing and here
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            fcntl.flock(fd, fcntl.LOCK_UN)
        except BlockingIOError:
            held.append(lock_path.parent)
        finally:
            os.close(fd)
    return held
