"""cost.budget_usd: a user's own experiment, run as a script, stops with a checkpoint and exit
76 when its cost reaches the budget; a bigger budget resumes it and the cost keeps counting."""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from src.common.signals import EXIT_BUDGET_REACHED
from tests.support.experiment import experiment_env, newest_checkpoint_step, run_experiment

REPO_ROOT = Path(__file__).resolve().parents[1]
TINY_LM = REPO_ROOT / "tests" / "support" / "tiny_lm_experiment.py"
TOTAL_STEPS = 6 * 32  # 6 epochs of 512 sequences in batches of 16
# $1 per second: the run (start-up included) can never finish within $2, as its steps alone
# take 192 x 0.025 s; a slow start still trains one step first, so a checkpoint exists.
# The re-run with the bigger budget trains at full speed.
RATE = "cost.hourly_rate_usd=3600"
SLOW = experiment_env(TINY_LM_STEP_SECONDS="0.025")
BUDGET_LINE = re.compile(
    r"budget reached: this run has cost \$(\d+\.\d\d) of cost\.budget_usd=\$2\.00 "
    r"\([\d:]+ at \$3600\.00/h\); checkpoint saved at step (\d+); raise cost\.budget_usd"
)


def saved_trainer_state(run_dir: Path, step: int) -> dict:
    path = run_dir / "checkpoints" / f"step_{step:09d}.pt"
    return torch.load(path, map_location="cpu", weights_only=False)["trainer"]


def test_budget_stops_with_a_checkpoint_and_a_bigger_budget_resumes(tmp_path: Path) -> None:
    args = [f"paths.output_dir={tmp_path}", "run_name=budget", "trainer.max_epochs=6", RATE]
    run_dir = tmp_path / "budget"

    first = run_experiment([*args, "cost.budget_usd=2"], env=SLOW, experiment=TINY_LM)
    assert first.returncode == EXIT_BUDGET_REACHED, first.stderr
    match = BUDGET_LINE.search(first.stdout)
    assert match, first.stdout
    stopped_at = newest_checkpoint_step(run_dir)
    assert int(match.group(2)) == stopped_at and 1 <= stopped_at < TOTAL_STEPS
    saved = saved_trainer_state(run_dir, stopped_at)
    assert saved["cost_usd"] >= 2.0 and saved["billed_seconds"] >= 2.0
    assert saved["billed_seconds"] > saved["train_seconds"]  # start-up is billed too
    assert not (run_dir / "final_model.pt").exists()

    again = run_experiment([*args, "cost.budget_usd=2"], env=SLOW, experiment=TINY_LM)
    assert again.returncode == EXIT_BUDGET_REACHED, again.stderr
    assert "budget reached" in again.stdout and newest_checkpoint_step(run_dir) == stopped_at

    more = run_experiment([*args, "cost.budget_usd=1000"], experiment=TINY_LM)
    assert more.returncode == 0, more.stderr
    assert f"at step {stopped_at} " in more.stdout and "resuming from" in more.stdout
    results = json.loads((run_dir / "test_results.json").read_text())
    assert results["global_step"] == TOTAL_STEPS and results["hourly_rate_usd"] == 3600
    # The rest of the run (start-up included) is billed on top of what the first run cost.
    assert results["cost_usd"] > saved["cost_usd"] + 0.5
    assert results["billed_seconds"] > saved["billed_seconds"] + 0.5
    costs = [
        record["cost_usd"] for record in json.loads((run_dir / "training_log.json").read_text())
    ]
    assert costs == sorted(costs) and len(costs) == 6
