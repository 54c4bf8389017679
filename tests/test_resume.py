"""Kill the template experiment for real (SIGTERM, SIGKILL), re-run it, and demand
the same final weights, bit for bit, as a run that was never interrupted."""

from __future__ import annotations

import json
import os
import random
import signal
import time
from pathlib import Path

import pytest

from src.utils.signals import EXIT_INTERRUPTED
from tests.support.experiment import (
    assert_bit_identical,
    interrupt_at_step,
    newest_checkpoint_step,
    run_experiment,
    start_experiment,
    wait_for_checkpoint,
)

# ~100 optimizer steps per epoch, 3 epochs: long enough to land signals mid-run.
WORKLOAD = [
    "data.num_samples=8192",
    "model.hidden_dim=256",
    "trainer.max_epochs=3",
    "trainer.early_stopping_patience=0",
    "trainer.progress_bar=false",
    "trainer.log_every_n_steps=5",
    "logging.tensorboard=false",
]
STEPS_PER_EPOCH = 103  # ceil(8192 * 0.8 / 64)
TOTAL_STEPS = 3 * STEPS_PER_EPOCH


def run_args(output_dir: Path, run_name: str, *extra: str) -> list[str]:
    return [*WORKLOAD, f"paths.output_dir={output_dir}", f"run_name={run_name}", *extra]


@pytest.fixture(scope="module")
def reference_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[int, Path]:
    """Uninterrupted runs, one per num_workers setting."""
    output_dir = tmp_path_factory.mktemp("reference")
    runs = {}
    for workers in (0, 2):
        name = f"reference-w{workers}"
        result = run_experiment(
            run_args(output_dir, name, f"data.num_workers={workers}", "checkpoint.every_n_steps=5")
        )
        assert result.returncode == 0, result.stderr
        runs[workers] = output_dir / name
    return runs


def test_reference_runs_agree_across_worker_counts(reference_runs: dict[int, Path]) -> None:
    assert_bit_identical(reference_runs[0] / "final_model.pt", reference_runs[2] / "final_model.pt")


@pytest.mark.parametrize(
    ("workers", "target_step", "every_n_steps", "whole_group"),
    [
        (0, 7, 5, False),  # early, mid-epoch
        (0, STEPS_PER_EPOCH - 1, 1, False),  # at the epoch boundary, a write always in flight
        (2, 150, 5, True),  # mid-epoch with DataLoader workers; signal the whole group
        (2, 230, 1, True),  # late, workers, checkpoint writes back to back
    ],
)
def test_sigterm_then_rerun_is_bit_identical(
    tmp_path: Path,
    reference_runs: dict[int, Path],
    workers: int,
    target_step: int,
    every_n_steps: int,
    whole_group: bool,
) -> None:
    rng = random.Random(target_step)
    overrides = [f"data.num_workers={workers}", f"checkpoint.every_n_steps={every_n_steps}"]
    args = run_args(tmp_path, "interrupted", *overrides)
    run_dir = tmp_path / "interrupted"
    process = start_experiment(args)
    wait_for_checkpoint(process, run_dir, target_step)
    time.sleep(rng.uniform(0, 0.02))  # land anywhere inside a step or a write
    if whole_group:  # like `docker stop` / Ctrl-C: workers get the signal too
        os.killpg(process.pid, signal.SIGTERM)
    else:
        process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=60)
    assert process.returncode == EXIT_INTERRUPTED, err
    assert "SIGTERM received" in err
    assert "Traceback" not in err, err
    stopped_at = newest_checkpoint_step(run_dir)
    assert 0 < stopped_at < TOTAL_STEPS
    assert not (run_dir / "final_model.pt").exists()

    resumed = run_experiment(args)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming from {run_dir / 'checkpoints'}" in resumed.stdout
    assert f"at step {stopped_at} " in resumed.stdout
    assert_bit_identical(run_dir / "final_model.pt", reference_runs[workers] / "final_model.pt")
    # The per-epoch losses match too: the resumed run replays nothing and skips nothing.
    ours = json.loads((run_dir / "training_log.json").read_text())
    theirs = json.loads((reference_runs[workers] / "training_log.json").read_text())
    assert [(r["train_loss"], r["val_loss"]) for r in ours] == [
        (r["train_loss"], r["val_loss"]) for r in theirs
    ]


def test_sigkill_during_checkpoint_writes_never_loads_a_partial_one(
    tmp_path: Path, reference_runs: dict[int, Path]
) -> None:
    """SIGKILL three times while checkpoints are written back to back, then finish."""
    args = run_args(tmp_path, "killed", "data.num_workers=0", "checkpoint.every_n_steps=1")
    run_dir = tmp_path / "killed"
    rng = random.Random(3)
    previous = -1
    for target in (20, 120, 240):
        process = start_experiment(args)
        wait_for_checkpoint(process, run_dir, target)
        time.sleep(rng.uniform(0, 0.01))
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate(timeout=60)
        assert process.returncode == -signal.SIGKILL
        now = newest_checkpoint_step(run_dir)
        assert now > previous
        previous = now

    finished = run_experiment(args)
    assert finished.returncode == 0, finished.stderr
    assert "resuming from" in finished.stdout
    assert "Traceback" not in finished.stderr
    assert_bit_identical(run_dir / "final_model.pt", reference_runs[0] / "final_model.pt")


def test_corrupt_newest_checkpoint_falls_back_and_still_matches(
    tmp_path: Path, reference_runs: dict[int, Path]
) -> None:
    args = run_args(tmp_path, "corrupt", "data.num_workers=0", "checkpoint.every_n_steps=5")
    run_dir = tmp_path / "corrupt"
    interrupt_at_step(args, run_dir, 60)
    newest = max((run_dir / "checkpoints").glob("step_*.pt"))
    with open(newest, "r+b") as handle:  # flip bytes in the middle: same size, bad content
        handle.seek(newest.stat().st_size // 2)
        handle.write(b"\x00garbage\x00")

    resumed = run_experiment(args)
    assert resumed.returncode == 0, resumed.stderr
    assert f"skipping checkpoint {newest.name}: checksum mismatch" in resumed.stderr
    assert newest.name not in resumed.stdout.split("resuming from", 1)[1].splitlines()[0]
    assert_bit_identical(run_dir / "final_model.pt", reference_runs[0] / "final_model.pt")
