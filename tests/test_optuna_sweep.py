"""Optuna sweeps (src/sweeps/optuna_*.py) with real processes on the template experiment.

A learning rate of 4.0 diverges (validation loss in the thousands after one epoch), 0.003
learns; ``trainer.log_every_n_steps`` changes nothing in the weights, so two good settings
report identical values and never prune each other. Trials are 4 short epochs on CPU.
"""

from __future__ import annotations

import ast
import json
import os
import re
import signal
import subprocess
import sys
from importlib.util import find_spec
from pathlib import Path

import optuna
import pytest
import torch
import yaml

from src.common.signals import EXIT_INTERRUPTED
from src.config import ConfigError
from src.sweeps.hparam import expand_trials, load_sweep, uses_optuna
from src.sweeps.optuna_report import trial_rows
from src.sweeps.optuna_study import SURPLUS_ATTR, first_number, open_storage, run_study
from tests.support.experiment import (
    experiment_env,
    newest_checkpoint_step,
    run_experiment,
    wait_until,
)
from tests.support.postgres import postgres_bin, postgres_server

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPT = REPO_ROOT / "scripts" / "sweep.py"
GOOD_LR, BAD_LR = 0.003, 4.0
EPOCHS = 4
TRIAL_OVERRIDES = [
    f"trainer.max_epochs={EPOCHS}",
    "data.num_samples=1024",
    "trainer.early_stopping_patience=0",
    "checkpoint.every_n_steps=2",
    "checkpoint.async_save=false",
    "logging.tensorboard=false",
    "trainer.progress_bar=false",
]
SPACE = {"optim.lr": [GOOD_LR, BAD_LR], "trainer.log_every_n_steps": [5, 7]}


def write_sweep(tmp_path: Path, **sweep: object) -> Path:
    settings = {
        "name": "opt",
        "experiment": "experiments/template_experiment.py",
        "output_dir": str(tmp_path / "out"),
        "overrides": TRIAL_OVERRIDES,
        "parameters": SPACE,
        **sweep,
    }
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({"sweep": settings}, sort_keys=False))
    return path


def fake_trial_sweep(tmp_path: Path, n_trials: int, **sweep: object) -> Path:
    """A random search over the stand-in trial (tests/support/sweep_fake_trial.py)."""
    return write_sweep(
        tmp_path,
        experiment="tests/support/sweep_fake_trial.py",
        method="random",
        n_trials=n_trials,
        pruner="none",
        parameters={"x": [0.5, 2.0]},
        **sweep,
    )


def start_sweep(config: Path, *overrides: str, env: dict[str, str] | None = None):
    return subprocess.Popen(
        [sys.executable, str(SCRIPT), "--config", str(config), *overrides],
        cwd=REPO_ROOT,
        env=env or experiment_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def run_sweep(config: Path, *overrides: str, timeout: float = 240) -> tuple[int, str]:
    process = start_sweep(config, *overrides)
    out, _ = process.communicate(timeout=timeout)
    return process.returncode, out


def load_study(tmp_path: Path, name: str = "opt", url: str | None = None) -> optuna.Study:
    url = url or f"sqlite:///{tmp_path / 'out' / 'sweeps' / name / 'study.db'}"
    return optuna.load_study(study_name=name, storage=open_storage(url))


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "final_model.pt", map_location="cpu")


def test_tpe_median_prunes_diverging_trials_and_sigterm_resumes_the_same_trial(
    tmp_path: Path,
) -> None:
    # Seed 11 draws good, bad, good (TPE's random start-up, Optuna 5.1): the bad one comes
    # after a complete good trial (pruned at its first evaluation); trial 2, good, is stopped.
    config = write_sweep(
        tmp_path,
        method="tpe",
        n_trials=3,
        seed=11,
        pruner="median",
        pruner_args={"n_startup_trials": 1, "n_warmup_steps": 0},
    )
    out_dir = tmp_path / "out"
    sweep = start_sweep(config)
    stopped = out_dir / "opt_trial2"
    # 13 steps an epoch: past step 14 the first epoch is evaluated and reported.
    wait_until(lambda: newest_checkpoint_step(stopped) >= 14, "trial 2's second epoch", sweep)
    os.killpg(sweep.pid, signal.SIGTERM)
    first_out, _ = sweep.communicate(timeout=120)
    assert sweep.returncode == EXIT_INTERRUPTED, first_out
    assert "trial 2: back to waiting" in first_out
    before = {t.number: t for t in load_study(tmp_path).trials}
    assert before[2].state == optuna.trial.TrialState.WAITING
    assert list(before[2].intermediate_values) == [1]
    finished = {n: (out_dir / f"opt_trial{n}" / "test_results.json") for n in range(2)}
    mtimes = {n: path.stat().st_mtime_ns for n, path in finished.items()}

    code, out = run_sweep(config)
    assert code == 0, out
    assert "trial 2 (resumed)" in out
    log = (out_dir / "sweeps" / "opt" / "logs" / "opt_trial2.log").read_text()
    assert "resuming from" in log, log
    assert {n: path.stat().st_mtime_ns for n, path in finished.items()} == mtimes  # untouched

    trials = load_study(tmp_path).trials
    assert len(trials) == 3  # the stopped trial came back as itself, not as a fourth
    states = {t.number: t.state for t in trials}
    pruned = [t for t in trials if t.state == optuna.trial.TrialState.PRUNED]
    assert pruned and all(t.params["optim.lr"] == BAD_LR for t in pruned), states
    for trial in pruned:
        results = json.loads(
            (out_dir / f"opt_trial{trial.number}" / "test_results.json").read_text()
        )
        assert results["epochs"] < EPOCHS  # stopped at an evaluation, before the last epoch
        assert max(trial.intermediate_values) == results["epochs"]
    resumed = trials[2]
    assert resumed.state == optuna.trial.TrialState.COMPLETE
    assert resumed.params == before[2].params
    assert sorted(resumed.intermediate_values) == list(range(1, EPOCHS + 1))
    assert resumed.intermediate_values[1] == before[2].intermediate_values[1]  # kept
    best = load_study(tmp_path).best_trial
    assert best.params["optim.lr"] == GOOD_LR

    # The resumed trial ends where an uninterrupted run of its parameters ends.
    params = [f"{key}={value}" for key, value in resumed.params.items()]
    reference = run_experiment(
        [*TRIAL_OVERRIDES, *params, "run_name=reference", f"paths.output_dir={out_dir}"]
    )
    assert reference.returncode == 0, reference.stderr
    resumed_weights = final_weights(stopped)
    for name, tensor in final_weights(out_dir / "reference").items():
        assert torch.equal(tensor, resumed_weights[name]), name

    # The report: table, best and its command, importances, plots.
    summary_dir = out_dir / "sweeps" / "opt"
    summary = json.loads((summary_dir / "summary.json").read_text())
    assert [row["number"] for row in summary["trials"]] == [0, 1, 2]
    assert {row["state"] for row in summary["trials"]} == {"complete", "pruned"}
    assert all(row["epochs"] is not None for row in summary["trials"])
    assert summary["best"]["params"]["optim.lr"] == GOOD_LR
    assert "python experiments/template_experiment.py" in summary["best"]["command"]
    assert f"best: trial {best.number}" in out and "reproduce: python " in out
    for plot in ("optimization_history", "parallel_coordinate"):
        assert (summary_dir / "plots" / f"{plot}.png").stat().st_size > 1000
    # Both complete trials scored the same: no variance to explain, and the report says so.
    assert "note: no parameter importances yet: " in out


@pytest.mark.skipif(
    postgres_bin() is None or not (find_spec("psycopg2") or find_spec("psycopg")),
    reason="PostgreSQL or its Python driver not installed (setup/install_test_deps.sh)",
)
def test_two_workers_share_a_postgresql_study_and_a_vanished_worker_trial_is_retried(
    tmp_path: Path,
) -> None:
    with postgres_server() as url:
        config = write_sweep(
            tmp_path,
            method="random",
            n_trials=2,
            seed=1,
            pruner="none",
            storage=url,
            heartbeat_s=1,
            grace_s=3,
            parameters={"optim.lr": [GOOD_LR, 0.01], "model.hidden_dim": [16, 32]},
        )
        out_dir = tmp_path / "out"
        # Two machines as the study sees them: a worker takes back at once only the trials of
        # its own machine's dead workers; another machine's wait for the heartbeat grace.
        first = start_sweep(config, env=experiment_env(SWEEP_MACHINE_ID="machine-a"))
        wait_until(
            lambda: newest_checkpoint_step(out_dir / "opt_trial0") >= 2, "trial 0 starts", first
        )
        second = start_sweep(config, env=experiment_env(SWEEP_MACHINE_ID="machine-b"))
        os.kill(first.pid, signal.SIGKILL)  # the worker vanishes; its trial saves and exits
        first_out, _ = first.communicate(timeout=60)
        second_out, _ = second.communicate(timeout=240)
        assert second.returncode == 0, second_out

        trials = load_study(tmp_path, url=url).trials
        states = [t.state for t in trials]
        counted = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
        assert len(counted) == 2, states
        failed = [t for t in trials if t.state == optuna.trial.TrialState.FAIL]
        assert [t.number for t in failed] == [0]  # stale after the heartbeat grace
        retry = next(t for t in trials if t.system_attrs.get("failed_trial") == 0)
        assert retry.state == optuna.trial.TrialState.COMPLETE
        assert retry.params == failed[0].params
        log = (out_dir / "sweeps" / "opt" / "logs" / "opt_trial0.log").read_text()
        assert "resuming from" in log  # the retry went on from the vanished worker's checkpoint

        def started(out: str) -> set[int]:  # "[sweep] trial N: key=value, ..." lines
            pattern = r"^\[sweep\] trial (\d+)(?: \(resumed\))?: \S+="
            return {int(number) for number in re.findall(pattern, out, re.M)}

        assert started(first_out) == {0}
        assert 0 not in started(second_out)  # none ran twice: the retry has its own number
        run_dirs = {out_dir / f"opt_trial{first_number(t)}" for t in counted}
        assert all((run / "test_results.json").exists() for run in run_dirs)
        assert len(run_dirs) == 2 and len(list(out_dir.glob("opt_trial*"))) == 2
        summary_dir = out_dir / "sweeps" / "opt"
        summary = json.loads((summary_dir / "summary.json").read_text())
        assert set(summary["importances"]) == {"optim.lr", "model.hidden_dim"}
        assert "importance (fANOVA): " in second_out
        assert (summary_dir / "plots" / "param_importances.png").stat().st_size > 1000


def test_old_grid_and_random_configs_still_take_the_plain_path(tmp_path: Path) -> None:
    random_config = write_sweep(
        tmp_path,
        method="random",
        num_trials=3,
        parameters={"optim.lr": {"min": 1e-4, "max": 1e-2, "log": True}, "x": [1, 2]},
    )
    spec = load_sweep(random_config)
    assert not uses_optuna(spec)
    assert len(expand_trials(spec)) == 3
    code, out = run_sweep(write_sweep(tmp_path, parameters={"optim.lr": [0.001]}), "--dry-run")
    assert code == 0, out
    assert "[dry-run] opt_optim.lr=0.001:" in out and "Optuna" not in out


@pytest.mark.parametrize(
    ("parameters", "message"),
    [
        (
            {"optim.lr": {"type": "float", "low": 1e-4, "high": 1e-2, "lgo": True}},
            "sweep.parameters.optim.lr: unknown key 'lgo'",
        ),
        (
            {"optim.lr": {"type": "float", "low": 0.1, "high": 0.01}},
            "sweep.parameters.optim.lr: low 0.1 > high 0.01",
        ),
        (
            {"model.hidden_dim": {"type": "categorical", "choices": [16]}},
            "sweep.parameters.model.hidden_dim: a categorical needs at least two choices",
        ),
    ],
)
def test_bad_space_is_one_line_exit_2_and_nothing_started(
    tmp_path: Path, parameters: dict, message: str
) -> None:
    config = write_sweep(tmp_path, method="tpe", n_trials=3, parameters=parameters)
    with pytest.raises(ConfigError, match=message):
        load_sweep(config)
    if "unknown key" not in message:
        return  # the script's path is the same for every one-line error: checked once
    code, out = run_sweep(config)
    assert code == 2, out
    lines = out.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("config error: ") and message in lines[0]
    assert not (tmp_path / "out").exists()


def test_report_of_a_study_never_run_is_one_line_and_makes_nothing(tmp_path: Path) -> None:
    code, out = run_sweep(write_sweep(tmp_path, method="tpe", n_trials=3), "--report")
    assert code == 2, out
    [line] = out.strip().splitlines()
    assert line.startswith("config error: no study 'opt': ") and "run the sweep first" in line
    assert not (tmp_path / "out" / "sweeps").exists()  # no empty study folder or database


@pytest.mark.parametrize("method", ["tpe", "random", "grid", "cmaes"])
@pytest.mark.parametrize("pruner", ["median", "hyperband", "none"])
def test_every_sampler_and_pruner_is_accepted(tmp_path: Path, method: str, pruner: str) -> None:
    spec = load_sweep(write_sweep(tmp_path, method=method, pruner=pruner, n_trials=2))
    assert uses_optuna(spec)


@pytest.mark.parametrize(
    ("sweep", "message"),
    [
        ({"method": "tpe"}, "sweep.n_trials must be >= 1"),
        ({"pruner": "sometimes"}, "sweep.pruner is 'sometimes'"),
        ({"pruner_args": {"n_startup": 1}}, "sweep.pruner_args for median: "),
        ({"method": "grid", "parameters": {"optim.lr": {"low": 0.1, "high": 1}}}, "grid search"),
        ({"parameters": {"optim.lr": {"low": 0, "high": 1, "log": True}}}, "needs low > 0"),
        ({"gpus": [0, 1]}, "start one sweep.py per GPU"),
    ],
)
def test_bad_study_settings_name_the_key(tmp_path: Path, sweep: dict, message: str) -> None:
    settings = {"n_trials": 2, **sweep}
    if sweep.get("method") == "tpe":
        settings.pop("n_trials")
    with pytest.raises(ConfigError, match=message):
        load_sweep(write_sweep(tmp_path, **settings))


def test_sigkilled_sweep_rerun_resumes_its_trial_under_the_same_number(tmp_path: Path) -> None:
    """The stand-in trial (tests/support/sweep_fake_trial.py) reports nothing and starts fast."""
    config = fake_trial_sweep(tmp_path, 2, overrides=["steps=40", "step_seconds=0.03"])
    sweep = start_sweep(config)
    first_run = tmp_path / "out" / "opt_trial0"
    wait_until(lambda: (first_run / "progress.json").exists(), "trial 0 starts", sweep)
    os.killpg(sweep.pid, signal.SIGKILL)  # the worker dies; its trial gets SIGTERM and saves
    sweep.communicate(timeout=30)

    code, out = run_sweep(config)  # at once: no heartbeat grace for this machine's own trial
    assert code == 0, out
    assert "trial 0: its worker" in out and "trial 0 (resumed)" in out
    trials = load_study(tmp_path).trials
    assert [t.number for t in trials] == [0, 1]
    assert {t.state for t in trials} == {optuna.trial.TrialState.COMPLETE}
    lines = (first_run / "attempts.jsonl").read_text().splitlines()
    interrupted, resumed = (json.loads(line) for line in lines)
    assert interrupted["exit"] == EXIT_INTERRUPTED
    assert resumed["first_step"] == interrupted["last_step"] and resumed["exit"] == 0


def test_a_trl_experiment_is_a_trial_reported_at_each_evaluation_and_pruned(
    tmp_path: Path,
) -> None:
    """Any experiment, a Hugging Face one too: run_interruptible reports eval_loss (the kit's
    val/loss) after each evaluation; the pruner stops the bad trial at its first one, that
    step saved, and the sweep scores trials from their test_results.json."""
    good_lr, bad_lr = 0.01, 1e-6  # a LoRA on the tiny model learns at 1e-2, not at 1e-6
    config = write_sweep(
        tmp_path,
        name="trl",
        experiment="experiments/trl_sft_experiment.py",
        config="configs/trl_sft_dev.yaml",
        method="random",
        seed=0,  # draws the good rate, then the bad one
        n_trials=2,
        pruner="median",
        pruner_args={"n_startup_trials": 1, "n_warmup_steps": 0},
        parameters={"optim.lr": [bad_lr, good_lr]},
        overrides=[
            "trainer.max_steps=12",
            "checkpoint.every_n_steps=4",  # evaluated (and saved) at steps 4, 8 and 12
            "optim.warmup_steps=0",
            "logging.tensorboard=false",
        ],
    )
    code, out = run_sweep(config)
    assert code == 0, out
    good, bad = load_study(tmp_path, "trl").trials
    assert good.params["optim.lr"] == good_lr and bad.params["optim.lr"] == bad_lr, out
    assert good.state == optuna.trial.TrialState.COMPLETE
    assert sorted(good.intermediate_values) == [1, 2, 3]
    good_results = json.loads((tmp_path / "out" / "trl_trial0" / "test_results.json").read_text())
    assert good.value == good_results["best_val_loss"] == min(good.intermediate_values.values())
    assert good_results["global_step"] == 12 and good_results["status"] == "completed"

    assert bad.state == optuna.trial.TrialState.PRUNED, out
    assert list(bad.intermediate_values) == [1] and "trial 1: pruned at report 1" in out
    bad_run = tmp_path / "out" / "trl_trial1"
    bad_results = json.loads((bad_run / "test_results.json").read_text())
    assert (bad_results["global_step"], bad_results["status"]) == (4, "pruned")
    assert (bad_run / "checkpoint-4").is_dir() and (bad_run / "final_adapter").is_dir()
    summary = json.loads((tmp_path / "out" / "sweeps" / "trl" / "summary.json").read_text())
    assert summary["best"]["params"]["optim.lr"] == good_lr
    assert "python experiments/trl_sft_experiment.py --config " in summary["best"]["command"]


def test_two_workers_asking_for_the_last_trial_at_once_run_it_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both saw one trial left and asked: the database numbers them in order, so the later
    one is surplus, never run and not counted; the study ends with exactly n_trials."""
    config = fake_trial_sweep(tmp_path, 1)
    original_ask = optuna.Study.ask

    def another_worker_asks_first(study: optuna.Study, *args: object, **kwargs: object):
        other = load_study(tmp_path)  # the other worker's own connection to the study
        other.tell(original_ask(other), 1.0)
        return original_ask(study, *args, **kwargs)

    monkeypatch.setattr(optuna.Study, "ask", another_worker_asks_first)
    lines: list[str] = []
    outcome = run_study(load_sweep(config), echo=lines.append)
    monkeypatch.undo()

    assert outcome.ran == [] and outcome.exit_code == 0, lines
    assert "[sweep] trial 1: not run, another worker took the last one" in lines
    completed, surplus = load_study(tmp_path).trials
    assert completed.state == optuna.trial.TrialState.COMPLETE
    assert surplus.state == optuna.trial.TrialState.FAIL and surplus.system_attrs[SURPLUS_ATTR]
    assert not (tmp_path / "out" / "opt_trial1").exists()
    assert [row["number"] for row in trial_rows(outcome.setup)] == [0]


def test_the_trainer_imports_no_search_library() -> None:
    for path in sorted((REPO_ROOT / "src" / "trainers").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import | ast.ImportFrom):
                names = [alias.name for alias in node.names] + [getattr(node, "module", "") or ""]
                assert not any(name.split(".")[0] == "optuna" for name in names), path
