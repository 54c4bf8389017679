"""What a finished run leaves behind: files, TensorBoard events, W&B offline, no secrets."""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tests.support.experiment import experiment_env, interrupt_at_step, run_experiment

FAKE_SECRETS = {
    "AWS_SECRET_ACCESS_KEY": "aws-secret-Zq8mN3pX",
    "AWS_ACCESS_KEY_ID": "AKIAFAKEKEYID12345",
    "VASTAI_API_KEY": "vast-key-Hj4kL9wQ",
    "WANDB_API_KEY": "wandb-key-0123456789abcdef0123456789abcdef01234567",
}
# tqdm's bar: "309/309 [00:04<00:00, 70.12step/s" (steps, elapsed<ETA, rate)
PROGRESS_BAR = re.compile(r"\d+/\d+ \[[\d:]+<[\d:]+, +[\d.]+step/s")


def scalar_steps(run_dir: Path, tag: str) -> list[int]:
    accumulator = EventAccumulator(str(run_dir / "tensorboard"))
    accumulator.Reload()
    return [event.step for event in accumulator.Scalars(tag)]


def test_run_outputs_tracking_and_resume_on_a_moved_run_directory(tmp_path: Path) -> None:
    """SIGTERM, move the run directory (another disk, another machine), resume: TensorBoard
    steps continue with no duplicate or gap, W&B continues the same run, cost keeps counting."""
    args = [
        "run_name=tb",
        "data.num_samples=8192",
        "model.hidden_dim=256",
        "trainer.early_stopping_patience=0",
        "trainer.log_every_n_steps=1",
        "checkpoint.every_n_steps=5",
        "logging.use_wandb=true",
        "cost.hourly_rate_usd=1.0",
    ]
    first_root, moved_root = tmp_path / "first", tmp_path / "moved"
    interrupt_at_step([f"paths.output_dir={first_root}", *args], first_root / "tb", 150)
    moved_root.mkdir()
    (first_root / "tb").rename(moved_root / "tb")
    run_dir = moved_root / "tb"
    result = run_experiment([f"paths.output_dir={moved_root}", *args])
    assert result.returncode == 0, result.stderr
    assert PROGRESS_BAR.search(result.stderr), result.stderr[-500:]
    assert "ETA" in result.stdout and "cost $" in result.stdout  # the per-epoch summary line

    for name in ("best_model.pt", "final_model.pt", "config.json", "training_log.json"):
        assert (run_dir / name).is_file(), name
    log = json.loads((run_dir / "training_log.json").read_text())
    assert [record["epoch"] for record in log] == [0, 1, 2]
    results = json.loads((run_dir / "test_results.json").read_text())
    assert results["global_step"] == 309 and results["weights"] == "best"
    config = json.loads((run_dir / "config.json").read_text())
    assert config["run_name"] == "tb" and config["trainer"]["log_every_n_steps"] == 1

    accumulator = EventAccumulator(str(run_dir / "tensorboard"))
    accumulator.Reload()
    for tag in accumulator.Tags()["scalars"]:
        steps = [event.step for event in accumulator.Scalars(tag)]
        assert steps == sorted(set(steps)), f"{tag}: steps repeat or go back across the resume"
    assert scalar_steps(run_dir, "train/loss") == list(range(1, 310)), "a step lost or doubled"
    assert len(scalar_steps(run_dir, "val/loss")) == 3
    costs = [event.value for event in accumulator.Scalars("cost/usd")]
    # test_results.json rounds to 4 decimals: allow half a unit of that rounding.
    assert costs == sorted(costs) and costs[-1] <= results["cost_usd"] + 0.00005

    saved = torch.load(sorted((run_dir / "checkpoints").glob("step_*.pt"))[-1], weights_only=False)
    run_id = saved["trainer"]["wandb_run_id"]
    wandb_runs = sorted(run_dir.glob("wandb/offline-run-*"))
    assert len(wandb_runs) == 2, wandb_runs  # the first process and the resumed one
    assert {path.name.rsplit("-", 1)[1] for path in wandb_runs} == {run_id}


def test_wandb_offline_and_no_secret_anywhere(tmp_path: Path) -> None:
    args = [
        f"paths.output_dir={tmp_path}",
        "run_name=secret",
        "logging.wandb=true",  # the old name of logging.use_wandb still works
        # A config value that copies a secret in: it must be redacted wherever it lands.
        "logging.wandb_project=proj-${oc.env:AWS_SECRET_ACCESS_KEY}",
    ]
    result = run_experiment(args, env=experiment_env(**FAKE_SECRETS))
    assert result.returncode == 0, result.stderr
    run_dir = tmp_path / "secret"
    assert list(run_dir.glob("wandb/offline-run-*")), "W&B offline run directory missing"
    texts = [result.stdout, result.stderr]
    texts += [p.read_bytes().decode("latin-1") for p in run_dir.rglob("*") if p.is_file()]
    for name, value in FAKE_SECRETS.items():
        assert not any(value in text for text in texts), f"{name} leaked"
