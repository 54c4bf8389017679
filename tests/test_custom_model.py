"""A user's own model through the documented API: dict batches, a collate function, a step
function, random augmentation in ``__getitem__``; killed for real and resumed bit for bit.

The experiment is tests/support/tiny_lm_experiment.py (its own settings dataclasses and
config file, nothing from the template).
"""

from __future__ import annotations

import json
import os
import random
import signal
import time
from pathlib import Path

import pytest

from src.common.signals import EXIT_INTERRUPTED
from tests.support.experiment import (
    REPO_ROOT,
    assert_bit_identical,
    assert_same_history,
    experiment_env,
    newest_checkpoint_step,
    run_experiment,
    start_experiment,
    wait_for_checkpoint,
)

TINY_LM = REPO_ROOT / "tests" / "support" / "tiny_lm_experiment.py"
STEPS_PER_EPOCH = 10  # 160 sequences / batch 16
TOTAL_STEPS = 2 * STEPS_PER_EPOCH
# Steps of a few ms each would let a run finish between "checkpoint seen" and the signal.
SLOW_STEPS = experiment_env(TINY_LM_STEP_SECONDS="0.03")


def tiny_args(output_dir: Path, run_name: str, workers: int, *extra: str) -> list[str]:
    return [
        f"paths.output_dir={output_dir}",
        f"run_name={run_name}",
        f"data.num_workers={workers}",
        "data.num_sequences=160",
        "trainer.max_epochs=2",
        "checkpoint.every_n_steps=2",
        *extra,
    ]


@pytest.fixture(scope="module")
def tiny_references(tmp_path_factory: pytest.TempPathFactory) -> dict[int, Path]:
    output_dir = tmp_path_factory.mktemp("tiny-reference")
    runs = {}
    for workers in (0, 2):
        result = run_experiment(
            tiny_args(output_dir, f"ref-w{workers}", workers), experiment=TINY_LM
        )
        assert result.returncode == 0, result.stderr
        runs[workers] = output_dir / f"ref-w{workers}"
    return runs


def test_step_metrics_replace_the_default_ones(tiny_references: dict[int, Path]) -> None:
    for run in tiny_references.values():
        log = json.loads((run / "training_log.json").read_text())
        assert len(log) == 2
        assert all("val_acc" in record and "val_accuracy" not in record for record in log)
        results = json.loads((run / "test_results.json").read_text())
        assert results["monitor"] == "val/acc" and "best_val_acc" in results


@pytest.mark.parametrize("workers", [0, 2])
def test_dict_batches_sigterm_then_rerun_is_bit_identical(
    tmp_path: Path, tiny_references: dict[int, Path], workers: int
) -> None:
    rng = random.Random(workers)
    target = rng.randint(2, TOTAL_STEPS - 8)  # a random step after the first checkpoint
    args = tiny_args(tmp_path, "stopped", workers)
    run_dir = tmp_path / "stopped"
    process = start_experiment(args, SLOW_STEPS, experiment=TINY_LM)
    wait_for_checkpoint(process, run_dir, target)
    time.sleep(rng.uniform(0, 0.05))
    os.killpg(process.pid, signal.SIGTERM)  # workers too, like docker stop
    _, err = process.communicate(timeout=60)
    assert process.returncode == EXIT_INTERRUPTED, err
    stopped_at = newest_checkpoint_step(run_dir)
    assert 0 < stopped_at < TOTAL_STEPS, "stopped mid-run"

    resumed = run_experiment(args, experiment=TINY_LM)
    assert resumed.returncode == 0, resumed.stderr
    assert f"at step {stopped_at} " in resumed.stdout
    reference = tiny_references[workers]
    assert_bit_identical(run_dir / "final_model.pt", reference / "final_model.pt")
    assert_bit_identical(run_dir / "best_model.pt", reference / "best_model.pt")
    assert_same_history(run_dir, reference, ("train_loss", "val_acc"))


def test_sigkill_during_checkpoint_writes_then_rerun_is_bit_identical(
    tmp_path: Path, tiny_references: dict[int, Path]
) -> None:
    args = tiny_args(tmp_path, "killed", 2, "checkpoint.every_n_steps=1")
    run_dir = tmp_path / "killed"
    for target in (5, 13):
        process = start_experiment(args, SLOW_STEPS, experiment=TINY_LM)
        wait_for_checkpoint(process, run_dir, target)
        os.killpg(process.pid, signal.SIGKILL)  # a write is in flight nearly always
        process.communicate(timeout=60)
        assert process.returncode == -signal.SIGKILL
    finished = run_experiment(args, experiment=TINY_LM)
    assert finished.returncode == 0, finished.stderr
    assert "Traceback" not in finished.stderr
    assert_bit_identical(run_dir / "final_model.pt", tiny_references[2] / "final_model.pt")


def test_unknown_monitor_from_the_command_line_is_one_line_and_writes_nothing(
    tmp_path: Path,
) -> None:
    """Only the model knows its metrics: the trainer checks trainer.monitor on one validation
    batch, before writing, and the script still ends with one line and exit 2."""
    args = tiny_args(tmp_path, "typo", 0, "trainer.monitor=val/acx")
    result = run_experiment(args, experiment=TINY_LM, timeout=120)
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0] == (
        "config error: trainer.monitor='val/acx' is not a validation metric "
        "(this run has val/loss, val/acc): set trainer.monitor to one of them"
    )
    assert not (tmp_path / "typo").exists()  # not even the lock's empty run directory
