"""Kill the template experiment for real (SIGTERM, SIGKILL), re-run it, and demand
the same final weights, bit for bit, as a run that was never interrupted."""

from __future__ import annotations

import os
import random
import signal
import time
from pathlib import Path

import pytest

from src.common.signals import EXIT_INTERRUPTED
from tests.support.experiment import (
    assert_bit_identical,
    assert_same_history,
    interrupt_at_step,
    newest_checkpoint_step,
    run_experiment,
    start_experiment,
    wait_for_checkpoint,
)

# ~50 optimizer steps per epoch, 3 epochs: long enough to land signals mid-run.
WORKLOAD = [
    "data.num_samples=4096",
    "model.hidden_dim=256",
    "trainer.max_epochs=3",
    "trainer.early_stopping_patience=0",
    "trainer.progress_bar=false",
    "trainer.log_every_n_steps=5",
    "logging.tensorboard=false",
]
STEPS_PER_EPOCH = 52  # ceil(4096 * 0.8 / 64)
TOTAL_STEPS = 3 * STEPS_PER_EPOCH


def run_args(output_dir: Path, run_name: str, *extra: str) -> list[str]:
    return [*WORKLOAD, f"paths.output_dir={output_dir}", f"run_name={run_name}", *extra]


# Gradient accumulation and early stopping, whose state must survive the resume too.
ACCUMULATE = ["trainer.grad_accum_steps=3", "trainer.early_stopping_patience=1"]
VARIANTS = {"plain": [], "accumulate": ACCUMULATE}


@pytest.fixture(scope="module")
def reference_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[int, str], Path]:
    """Uninterrupted runs, per (num_workers, variant)."""
    output_dir = tmp_path_factory.mktemp("reference")
    runs = {}
    for workers, variant in ((0, "plain"), (2, "plain"), (2, "accumulate")):
        name = f"reference-w{workers}-{variant}"
        overrides = [f"data.num_workers={workers}", "checkpoint.every_n_steps=5"]
        result = run_experiment(run_args(output_dir, name, *overrides, *VARIANTS[variant]))
        assert result.returncode == 0, result.stderr
        runs[(workers, variant)] = output_dir / name
    return runs


def test_reference_runs_agree_across_worker_counts(reference_runs: dict) -> None:
    assert_bit_identical(
        reference_runs[(0, "plain")] / "final_model.pt",
        reference_runs[(2, "plain")] / "final_model.pt",
    )


@pytest.mark.parametrize(
    ("workers", "target_step", "every_n_steps", "whole_group", "stop_signal", "variant"),
    [
        (0, 7, 5, False, "SIGTERM", "plain"),  # early, mid-epoch
        (0, STEPS_PER_EPOCH - 1, 1, False, "SIGINT", "plain"),  # epoch boundary, write in flight
        (2, 75, 5, True, "SIGTERM", "plain"),  # mid-epoch with DataLoader workers, whole group
        (2, 25, 5, True, "SIGUSR1", "accumulate"),  # Slurm's signal; accumulation, early stop
    ],
)
def test_signal_then_rerun_is_bit_identical(
    tmp_path: Path,
    reference_runs: dict,
    workers: int,
    target_step: int,
    every_n_steps: int,
    whole_group: bool,
    stop_signal: str,
    variant: str,
) -> None:
    rng = random.Random(target_step)
    overrides = [f"data.num_workers={workers}", f"checkpoint.every_n_steps={every_n_steps}"]
    args = run_args(tmp_path, "interrupted", *overrides, *VARIANTS[variant])
    run_dir = tmp_path / "interrupted"
    process = start_experiment(args)
    wait_for_checkpoint(process, run_dir, target_step)
    time.sleep(rng.uniform(0, 0.02))  # land anywhere inside a step or a write
    signum = signal.Signals[stop_signal]
    if whole_group:  # like `docker stop` / Ctrl-C / Slurm: workers get the signal too
        os.killpg(process.pid, signum)
    else:
        process.send_signal(signum)
    out, err = process.communicate(timeout=60)
    assert process.returncode == EXIT_INTERRUPTED, err
    assert f"{stop_signal} received" in err
    assert "Traceback" not in err, err
    stopped_at = newest_checkpoint_step(run_dir)
    assert 0 < stopped_at < TOTAL_STEPS
    assert not (run_dir / "final_model.pt").exists()

    resumed = run_experiment(args)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming from {run_dir / 'checkpoints'}" in resumed.stdout
    assert f"at step {stopped_at} " in resumed.stdout
    reference = reference_runs[(workers, variant)]
    assert_bit_identical(run_dir / "final_model.pt", reference / "final_model.pt")
    # The per-epoch losses match too: the resumed run replays nothing and skips nothing.
    assert_same_history(run_dir, reference, ("train_loss", "val_loss"))


def test_sigkill_during_checkpoint_writes_never_loads_a_partial_one(
    tmp_path: Path, reference_runs: dict
) -> None:
    """SIGKILL three times while checkpoints are written back to back, then finish."""
    args = run_args(tmp_path, "killed", "data.num_workers=0", "checkpoint.every_n_steps=1")
    run_dir = tmp_path / "killed"
    rng = random.Random(3)
    previous = -1
    for target in (10, 60, 120):
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
    assert f"at step {previous} " in finished.stdout  # the newest complete one, nothing older
    assert "Traceback" not in finished.stderr
    reference = reference_runs[(0, "plain")]
    assert_bit_identical(run_dir / "final_model.pt", reference / "final_model.pt")


def test_corrupt_newest_checkpoint_falls_back_and_still_matches(
    tmp_path: Path, reference_runs: dict
) -> None:
    args = run_args(tmp_path, "corrupt", "data.num_workers=0", "checkpoint.every_n_steps=5")
    run_dir = tmp_path / "corrupt"
    interrupt_at_step(args, run_dir, 30)
    newest = max((run_dir / "checkpoints").glob("step_*.pt"))
    with open(newest, "r+b") as handle:  # flip bytes in the middle: same size, bad content
        handle.seek(newest.stat().st_size // 2)
        handle.write(b"\x00garbage\x00")

    resumed = run_experiment(args)
    assert resumed.returncode == 0, resumed.stderr
    assert f"skipping checkpoint {newest.name}: checksum mismatch" in resumed.stderr
    assert newest.name not in resumed.stdout.split("resuming from", 1)[1].splitlines()[0]
    reference = reference_runs[(0, "plain")]
    assert_bit_identical(run_dir / "final_model.pt", reference / "final_model.pt")


def test_resume_with_changed_settings_is_refused_and_touches_nothing(tmp_path: Path) -> None:
    base = [f"paths.output_dir={tmp_path}", "run_name=guarded", "trainer.progress_bar=false"]
    first = run_experiment([*base, "trainer.max_steps=20"])
    assert first.returncode == 0, first.stderr
    run_dir = tmp_path / "guarded"
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}

    changed = run_experiment([*base, "trainer.max_steps=20", "data.batch_size=32"])
    assert changed.returncode == 2
    lines = [line for line in changed.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("config error: run 'guarded'"), lines
    assert "data.batch_size=64 (now 32)" in lines[0] and "new run_name" in lines[0]
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == before

    # Length, workers and logging may change: the run goes on from where it stopped.
    longer = run_experiment([*base, "trainer.max_steps=30", "data.num_workers=2"])
    assert longer.returncode == 0, longer.stderr
    assert "at step 20 " in longer.stdout


def test_second_ctrl_c_aborts_with_130_and_one_line(tmp_path: Path) -> None:
    """A big state makes the stop checkpoint slow enough to Ctrl-C again during it."""
    args = [
        f"paths.output_dir={tmp_path}",
        "run_name=abort",
        "model.hidden_dim=2048",
        "model.num_layers=4",
        "trainer.max_steps=30",
        "checkpoint.every_n_steps=10",
        "trainer.progress_bar=false",
        "logging.tensorboard=false",
    ]
    run_dir = tmp_path / "abort"
    process = start_experiment(args)
    wait_for_checkpoint(process, run_dir, 10)
    process.send_signal(signal.SIGINT)
    err_lines = []
    for line in process.stderr:  # wait until the first Ctrl-C was taken
        err_lines.append(line)
        if "SIGINT received" in line:
            break
    process.send_signal(signal.SIGINT)
    _, rest = process.communicate(timeout=60)
    err = "".join(err_lines) + rest
    # The second SIGINT goes out within milliseconds of the first being taken, while the
    # step in flight plus a ~150 MB stop checkpoint take far longer.
    assert process.returncode == 130, err
    assert "second Ctrl-C: aborted without saving" in err and "Traceback" not in err, err

    last_complete = newest_checkpoint_step(run_dir)
    resumed = run_experiment(args)
    assert resumed.returncode == 0, resumed.stderr
    assert f"at step {last_complete} " in resumed.stdout
    assert not list((run_dir / "checkpoints").glob(".*.tmp")), "leftover temp file removed"
