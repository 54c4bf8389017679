"""Hyperparameter sweep: trial expansion, ranked summaries, GPU slots, kill-and-rerun.

Most tests drive tests/support/sweep_fake_trial.py (same contract, starts in ms); the
last one runs a real 2x2 grid of experiments/template_experiment.py in dev mode.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from src.common.signals import EXIT_INTERRUPTED
from src.config import ConfigError
from src.sweeps.hparam import SweepSpec, expand_trials, load_sweep
from tests.support.experiment import experiment_env, newest_checkpoint_step, wait_until

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPT = REPO_ROOT / "scripts" / "sweep.py"
FAKE = "tests/support/sweep_fake_trial.py"


def write_sweep(tmp_path: Path, **sweep: object) -> Path:
    settings = {"name": "t", "experiment": FAKE, "output_dir": str(tmp_path / "out"), **sweep}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({"sweep": settings}, sort_keys=False))
    return path


def start_sweep(config: Path, *overrides: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(SCRIPT), "--config", str(config), *overrides],
        cwd=REPO_ROOT,
        env=experiment_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own process group, as in a terminal
    )


def run_sweep(config: Path, *overrides: str, timeout: float = 300) -> tuple[int, str]:
    process = start_sweep(config, *overrides)
    out, _ = process.communicate(timeout=timeout)
    return process.returncode, out


def attempts(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "attempts.jsonl").read_text().splitlines()]


def test_grid_expands_every_combination_with_stable_run_names(tmp_path: Path) -> None:
    spec = load_sweep(
        write_sweep(tmp_path, parameters={"x": [0.5, 2], "model.name": ["mlp", "b c"]})
    )
    trials = expand_trials(spec)
    assert [t.run_name for t in trials] == [
        "t_x=0.5_model.name=mlp",
        "t_x=0.5_model.name=b-c",
        "t_x=2_model.name=mlp",
        "t_x=2_model.name=b-c",
    ]
    assert trials[1].overrides == ["x=0.5", "model.name=b c"]


def test_random_search_is_seeded_and_respects_ranges(tmp_path: Path) -> None:
    parameters = {
        "optim.lr": {"min": 1e-4, "max": 1e-2, "log": True},
        "model.hidden_dim": {"min": 16, "max": 64, "type": "int"},
        "model.dropout": [0.0, 0.1],
    }
    spec = load_sweep(
        write_sweep(tmp_path, method="random", num_trials=6, seed=3, parameters=parameters)
    )
    trials = expand_trials(spec)
    assert [t.params for t in trials] == [t.params for t in expand_trials(spec)]
    other = expand_trials(SweepSpec(**{**spec.__dict__, "seed": 4}))
    assert [t.params for t in trials] != [t.params for t in other]
    for trial in trials:
        assert 1e-4 <= trial.params["optim.lr"] <= 1e-2
        assert isinstance(trial.params["model.hidden_dim"], int)
        assert 16 <= trial.params["model.hidden_dim"] <= 64
        assert trial.params["model.dropout"] in (0.0, 0.1)


@pytest.mark.parametrize(
    ("sweep", "message"),
    [
        ({"method": "bayes", "parameters": {"x": [1]}}, "sweep.method is 'bayes'"),
        ({"parameters": {"x": {"min": 0, "max": 1}}}, "grid search needs a list"),
        ({"method": "random", "parameters": {"x": [1]}}, "num_trials must be >= 1"),
        ({"parameters": {}}, "sweep.parameters is empty"),
        ({"experiment": "nope.py", "parameters": {"x": [1]}}, "does not exist"),
        ({"parameters": {"x": [1]}, "typo_key": 1}, "unknown config key .sweep.typo_key."),
    ],
)
def test_bad_sweep_files_fail_with_one_line(tmp_path: Path, sweep: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_sweep(write_sweep(tmp_path, **sweep))


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("other: 1\n", "has no sweep: section; start from configs/sweep_example.yaml"),
        ("sweep:\n  parameters: {x: [1\n", "did not find expected ',' or ']' at line 3"),
        ("sweep:\n  parameters: {x: [1]}\n  gpus: 0\n", "'sweep.gpus' .*expected a list"),
        ("sweep:\n  parameters: {x: [1]}\n  gpus: [0, 0]\n", "must be distinct GPU indices"),
    ],
)
def test_malformed_sweep_files_name_the_problem(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "sweep.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_sweep(path)


def test_relative_output_dir_means_the_same_folder_to_the_sweep_and_its_trials(
    tmp_path: Path,
) -> None:
    """The trials run from the repo root; a relative output_dir is taken from where the user is."""
    config = write_sweep(tmp_path, output_dir="relative-out", parameters={"x": [1]})
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--config", str(config), "--dry-run"],
        cwd=tmp_path,
        env=experiment_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert f"paths.output_dir={tmp_path / 'relative-out'}" in result.stdout
    assert str(REPO_ROOT / "relative-out") not in result.stdout


def test_misspelled_metric_is_called_out(tmp_path: Path) -> None:
    code, out = run_sweep(write_sweep(tmp_path, metric="best_val_los", parameters={"x": [1]}))
    assert code == 0, out
    assert "no finished trial reports sweep.metric 'best_val_los'" in out


def test_bad_sweep_file_exits_2_before_running_anything(tmp_path: Path) -> None:
    code, out = run_sweep(write_sweep(tmp_path, method="bayes", parameters={"x": [1]}))
    assert code == 2
    assert out.strip().splitlines()[-1].startswith("config error: ")
    assert not (tmp_path / "out").exists()


def test_summary_is_ranked_failures_reported_and_rerun_skips_done(tmp_path: Path) -> None:
    config = write_sweep(
        tmp_path,
        parameters={"x": [3.0, 1.0, 0.0], "fail": ["false", "true"]},
        overrides=["steps=2"],
    )
    code, out = run_sweep(config)
    assert code == 1, out
    summary = json.loads((tmp_path / "out" / "sweeps" / "t" / "summary.json").read_text())
    trials = summary["trials"]
    assert [t["x"] for t in trials[:3]] == [1.0, 0.0, 3.0]  # metric (x-1)^2, minimized
    assert [t["best_val_loss"] for t in trials[:3]] == [0.0, 1.0, 4.0]
    assert [t["rank"] for t in trials] == [1, 2, 3, None, None, None]
    assert {t["status"] for t in trials[3:]} == {"failed"}
    assert trials[3]["message"] == "boom: failing on purpose"
    rows = list(csv.DictReader((tmp_path / "out" / "sweeps" / "t" / "summary.csv").open()))
    assert [row["run_name"] for row in rows] == [t["run_name"] for t in trials]
    assert out.split("\nrank ")[1].splitlines()[2].startswith("1     t_x=1.0_fail=false")

    code, out = run_sweep(config, "sweep.direction=maximize")
    assert code == 1
    assert out.count("started") == 3  # only the failed trials ran again
    assert len(attempts(tmp_path / "out" / "t_x=1.0_fail=false")) == 1
    trials = json.loads((tmp_path / "out" / "sweeps" / "t" / "summary.json").read_text())["trials"]
    assert [t["x"] for t in trials[:3]] == [3.0, 0.0, 1.0]


def test_one_trial_per_gpu_in_parallel(tmp_path: Path) -> None:
    config = write_sweep(
        tmp_path, parameters={"x": [0, 1]}, overrides=["steps=10", "step_seconds=0.05"], gpus=[0, 1]
    )
    code, out = run_sweep(config)
    assert code == 0, out
    first, second = (attempts(tmp_path / "out" / f"t_x={x}")[0] for x in (0, 1))
    assert {first["cuda_visible_devices"], second["cuda_visible_devices"]} == {"0", "1"}
    assert first["start"] < second["end"] and second["start"] < first["end"]


def test_sigkill_mid_trial_then_rerun_resumes_and_skips_finished(tmp_path: Path) -> None:
    config = write_sweep(
        tmp_path, parameters={"x": [0, 1, 2]}, overrides=["steps=40", "step_seconds=0.02"]
    )
    sweep = start_sweep(config)
    second = tmp_path / "out" / "t_x=1"
    wait_until(lambda: (second / "progress.json").exists(), "trial 2 starts", sweep)
    os.killpg(sweep.pid, signal.SIGKILL)  # the sweep dies at once; its trial gets SIGTERM
    sweep.communicate(timeout=30)

    code, out = run_sweep(config)  # at once: waits for the orphaned trial to save
    assert code == 0, out
    assert len(attempts(tmp_path / "out" / "t_x=0")) == 1  # finished: not re-run
    interrupted, resumed = attempts(second)
    assert interrupted["exit"] == EXIT_INTERRUPTED and interrupted["last_step"] < 40
    assert resumed["first_step"] == interrupted["last_step"] and resumed["exit"] == 0
    assert (
        "resuming from step"
        in (tmp_path / "out" / "sweeps" / "t" / "logs" / "t_x=1.log").read_text()
    )
    assert (tmp_path / "out" / "t_x=2" / "test_results.json").exists()


def test_template_experiment_2x2_grid_kill_mid_trial_and_rerun(tmp_path: Path) -> None:
    config = write_sweep(
        tmp_path,
        name="grid",
        experiment="experiments/template_experiment.py",
        parameters={"optim.lr": [0.001, 0.003], "model.hidden_dim": [16, 32]},
        overrides=[
            "trainer.max_steps=24",
            "checkpoint.every_n_steps=4",
            "checkpoint.async_save=false",
            "logging.tensorboard=false",
            "trainer.progress_bar=false",
        ],
        metric="best_val_loss",
    )
    out_dir = tmp_path / "out"
    names = [f"grid_optim.lr={lr}_model.hidden_dim={h}" for lr in (0.001, 0.003) for h in (16, 32)]
    sweep = start_sweep(config)
    wait_until(
        lambda: newest_checkpoint_step(out_dir / names[1]) >= 4, "trial 2 checkpoints", sweep
    )
    os.killpg(sweep.pid, signal.SIGTERM)
    first_out, _ = sweep.communicate(timeout=120)
    assert sweep.returncode == EXIT_INTERRUPTED, first_out
    finished = out_dir / names[0] / "test_results.json"
    assert finished.exists() and not (out_dir / names[1] / "test_results.json").exists()
    assert not (out_dir / names[2]).exists()
    finished_mtime = finished.stat().st_mtime_ns

    code, out = run_sweep(config)
    assert code == 0, out
    assert finished.stat().st_mtime_ns == finished_mtime  # not re-run
    logs = out_dir / "sweeps" / "grid" / "logs"
    assert (logs / f"{names[0]}.log").read_text().count("\n=== ") == 1
    assert "resuming from" in (logs / f"{names[1]}.log").read_text()
    for name in names:
        results = json.loads((out_dir / name / "test_results.json").read_text())
        assert results["global_step"] == 24
    trials = json.loads((out_dir / "sweeps" / "grid" / "summary.json").read_text())["trials"]
    assert sorted(t["run_name"] for t in trials) == sorted(names)
    losses = [t["best_val_loss"] for t in trials]
    assert losses == sorted(losses) and [t["rank"] for t in trials] == [1, 2, 3, 4]
