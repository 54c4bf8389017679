"""One process per run directory: a second one exits at once; a dead one never blocks."""

from __future__ import annotations

import json
import os
import signal
import socket
from pathlib import Path

import pytest

from src.common.signals import EXIT_INTERRUPTED
from src.runs.lock import LOCK_NAME, RunInUseError, acquire_run_lock
from tests.support.experiment import (
    newest_checkpoint_step,
    run_experiment,
    start_experiment,
    wait_for_checkpoint,
)

LONG_RUN = [
    "data.num_samples=8192",
    "model.hidden_dim=256",
    "trainer.max_epochs=20",
    "trainer.progress_bar=false",
    "checkpoint.every_n_steps=5",
    "logging.tensorboard=false",
]


def test_second_process_on_a_live_run_exits_with_one_line(tmp_path: Path) -> None:
    args = [f"paths.output_dir={tmp_path}", "run_name=busy", *LONG_RUN]
    run_dir = tmp_path / "busy"
    first = start_experiment(args)
    try:
        wait_for_checkpoint(first, run_dir, 10)
        config_before = (run_dir / "config.json").read_bytes()
        second = run_experiment(args, timeout=60)
        assert second.returncode == 2
        lines = [line for line in second.stderr.splitlines() if line.strip()]
        assert len(lines) == 1, second.stderr
        assert lines[0].startswith(f"error: run directory {run_dir} is in use by PID {first.pid}")
        assert socket.gethostname() in lines[0] and "run_name" in lines[0]
        assert "starting run" not in second.stdout and "resuming" not in second.stdout
        # The first run goes on untouched: its files stay, its checkpoints keep coming.
        assert (run_dir / "config.json").read_bytes() == config_before
        step_then = newest_checkpoint_step(run_dir)
        wait_for_checkpoint(first, run_dir, step_then + 10)
    finally:
        first.send_signal(signal.SIGTERM)
        _, err = first.communicate(timeout=60)
    assert first.returncode == EXIT_INTERRUPTED, err


def test_lock_left_by_a_killed_process_does_not_block(tmp_path: Path) -> None:
    args = [f"paths.output_dir={tmp_path}", "run_name=stale", *LONG_RUN[:2], "trainer.max_steps=60"]
    run_dir = tmp_path / "stale"
    process = start_experiment(args)
    wait_for_checkpoint(process, run_dir, 10)
    os.killpg(process.pid, signal.SIGKILL)
    process.communicate(timeout=60)
    holder = json.loads((run_dir / LOCK_NAME).read_text())
    assert holder["pid"] == process.pid  # the file stays behind, the flock is gone

    rerun = run_experiment(args)
    assert rerun.returncode == 0, rerun.stderr
    assert "resuming from" in rerun.stdout


def test_holds_within_one_process_share_the_lock(tmp_path: Path) -> None:
    """A script locks in load_experiment_config, then its trainer locks again."""
    first = acquire_run_lock(tmp_path / "run")
    second = acquire_run_lock(tmp_path / "run")
    assert first is second
    second.release()
    assert first.held  # the script's hold remains
    first.release()
    assert not first.held
    again = acquire_run_lock(tmp_path / "run")
    assert again.held
    again.release()


def test_lock_held_elsewhere_raises_a_one_line_error(tmp_path: Path) -> None:
    import fcntl

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    path = run_dir / LOCK_NAME
    path.write_text(json.dumps({"pid": 4242, "host": "box", "started_at": "12:00"}))
    with open(path) as other:  # another open file description: what another process has
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(RunInUseError, match=r"in use by PID 4242 on box \(since 12:00\)"):
            acquire_run_lock(run_dir)


def test_rebuilding_the_trainer_in_a_notebook_leaves_the_run_unlocked(tmp_path: Path) -> None:
    """Re-running a train cell builds a new trainer; the old one must not keep the lock."""
    import fcntl

    from tests.test_trainer import make_trainer

    abandoned, _ = make_trainer(tmp_path, "run_name=nb", "trainer.max_steps=3")
    trainer, _ = make_trainer(tmp_path, "run_name=nb", "trainer.max_steps=3")
    assert trainer.fit().global_step == 3
    assert abandoned is not None
    with open(tmp_path / "nb" / LOCK_NAME) as other:  # what another process would do
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)  # raises if still held
