"""Slurm for real: a one-node cluster (tests/support/slurm_cluster.py) runs the sbatch
templates on CPU. USR1 checkpoints, requeues and the restart resumes to the end; a budget
stop is not requeued; the parallel launcher submits one job per case and refuses a bad
file whole. The decisions behind them (commands, run names, requeue or not, cases files)
are also checked as pure logic, without a cluster.

The cluster is required: a missing slurm-wlm or munge is an error here, never a skip
(setup/install_slurm.sh installs them).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from src.config import ConfigError
from src.integrations.hf_checkpoints import RECORD_NAME as HF_RECORD
from src.slurm.batch_job import (
    MULTINODE,
    SINGLE,
    TORCHRUN,
    SlurmJob,
    UsageError,
    decide,
    plan_job,
    torchrun_first_failure,
)
from src.slurm.launcher import load_cases, merge_sbatch_args, plan_submissions
from tests.support.experiment import REPO_ROOT, experiment_env, newest_checkpoint_step
from tests.support.slurm_cluster import SlurmCluster, start_cluster

EXPERIMENT = "experiments/template_experiment.py"
TRAIN = "scripts/slurm/train.sbatch"
LAUNCHER = REPO_ROOT / "scripts" / "slurm" / "launch_parallel.py"
# The test node has 2 CPUs, 2000 MB and no GPU: each job takes one CPU, so two run at once.
CPU_JOB = ["--gres=none", "--cpus-per-task=1", "--mem=200M"]
# ~156 steps, a checkpoint every 10: a few seconds of training with time to send the notice.
SMALL = ["trainer.progress_bar=false", "data.num_samples=4096", "checkpoint.every_n_steps=10"]
TOTAL_STEPS = 156  # 3 epochs of 3278 samples in batches of 64
ENDED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL"}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SlurmCluster]:
    started = start_cluster(tmp_path_factory.mktemp("slurm"))
    try:
        yield started
    finally:
        started.stop()


def job_env(cluster: SlurmCluster, **extra: str) -> dict[str, str]:
    """What sbatch passes on to the job (--export=ALL): this python, the test cluster."""
    return experiment_env(
        SLURM_CONF=cluster.env["SLURM_CONF"], PYTHON=sys.executable, OMP_NUM_THREADS="1", **extra
    )


def sbatch(cluster: SlurmCluster, *args: str, **env: str) -> str:
    """Submit from the repo root, as a user does; the job id."""
    result = subprocess.run(
        ["sbatch", "--parsable", *args],
        cwd=REPO_ROOT,
        env=job_env(cluster, **env),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.strip().split(";")[0]


def submit(cluster: SlurmCluster, tmp_path: Path, template: str, *args: str) -> str:
    """``template`` on CPU with the small template experiment; outputs and log in tmp_path."""
    return sbatch(
        cluster,
        *CPU_JOB,
        f"--output={tmp_path}/%x_%j.out",  # the templates' logs/%x_%j.out, moved here
        *(arg for arg in args if arg.startswith("--")),  # sbatch's options
        template,
        EXPERIMENT,
        f"paths.output_dir={tmp_path / 'out'}",
        *SMALL,
        *(arg for arg in args if not arg.startswith("--")),  # the experiment's overrides
    )


def job_log(tmp_path: Path, job_id: str) -> Path:
    found = list(tmp_path.glob(f"*_{job_id}.out"))
    return found[0] if found else tmp_path / f"missing_{job_id}.out"


def log_text(log: Path) -> str:
    return log.read_text() if log.is_file() else f"(no log at {log})"


def wait_for_end(cluster: SlurmCluster, job_id: str, log: Path, timeout: float = 90) -> dict:
    """Poll until the job has ended for good (a requeued job passes through PENDING)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        fields = cluster.job(job_id)
        if fields.get("JobState") in ENDED:
            return fields
        time.sleep(0.2)
    raise AssertionError(
        f"job {job_id} still {fields.get('JobState')} after {timeout}s:\n{log_text(log)}"
    )


def ended(
    cluster: SlurmCluster, job_id: str, tmp_path: Path, state: str, exit_code: str, restarts: str
) -> str:
    """Wait for the job's end, check how it ended (scontrol's fields); its log."""
    fields = wait_for_end(cluster, job_id, job_log(tmp_path, job_id))
    text = log_text(job_log(tmp_path, job_id))
    assert (fields["JobState"], fields["ExitCode"], fields["Restarts"]) == (
        state,
        exit_code,
        restarts,
    ), text
    return text


def stop_after_first_checkpoint(
    cluster: SlurmCluster, job_id: str, run_dir: Path, tmp_path: Path
) -> None:
    """The notice by hand, as the time limit sends it: USR1 to the batch script only."""
    deadline = time.monotonic() + 60
    while newest_checkpoint_step(run_dir) < 0:
        state = cluster.job(job_id).get("JobState")
        if state in ENDED or time.monotonic() > deadline:
            text = log_text(job_log(tmp_path, job_id))
            raise AssertionError(
                f"job {job_id} ({state}) wrote no checkpoint in {run_dir}:\n{text}"
            )
        time.sleep(0.05)
    cluster.run("scancel", "--signal=USR1", "--batch", job_id)


def all_job_ids(cluster: SlurmCluster) -> set[str]:
    return set(cluster.run("squeue", "--states=all", "-h", "-o", "%i").split())


# ----- the real cluster ---------------------------------------------------------------


def test_usr1_checkpoints_requeues_and_the_restart_resumes_to_the_end(
    cluster: SlurmCluster, tmp_path: Path
) -> None:
    # patience 1 over 4 epochs: the early stop on val/loss is part of what the restart must
    # get right (the epochs run are checked against the rule below, not against numbers).
    job_id = submit(
        cluster, tmp_path, TRAIN, "trainer.max_epochs=4", "trainer.early_stopping_patience=1"
    )
    run_name = f"template_experiment-{job_id}"  # named after the job: stable across requeues
    run_dir = tmp_path / "out" / run_name
    stop_after_first_checkpoint(cluster, job_id, run_dir, tmp_path)
    text = ended(cluster, job_id, tmp_path, "COMPLETED", "0:0", "1")

    # First run: the notice reached training through the batch script, which requeued.
    assert f"[slurm] job {job_id} restart 0 on {cluster.node}: run_name={run_name} " in text
    stopped = re.findall(r"stopped by SIGUSR1 at step (\d+)", text)
    assert len(stopped) == 1, text
    step = int(stopped[0])
    assert 10 <= step < TOTAL_STEPS, text
    assert "[slurm] stopped after SIGUSR1 (exit 75)" in text
    assert f"[slurm] requeued job {job_id}: restart 1 resumes run {run_name}" in text
    # Second run: same run, resumed from the step the first one saved, then finished.
    assert f"[slurm] job {job_id} restart 1 on {cluster.node}: run_name={run_name} " in text
    checkpoint = run_dir / "checkpoints" / f"step_{step:09d}.pt"
    assert f"resuming from {checkpoint} at step {step} " in text
    assert text.count("starting run ") == 1 and text.rstrip().endswith("training finished")

    # The outputs layout cluster users expect.
    assert (run_dir / "best_model.pt").is_file()
    assert list((run_dir / "checkpoints").glob("step_*.pt"))
    assert json.loads((run_dir / "config.json").read_text())["run_name"] == run_name
    history = json.loads((run_dir / "training_log.json").read_text())
    results = json.loads((run_dir / "test_results.json").read_text())
    val_losses = [record["val_loss"] for record in history]
    assert results["best_val_loss"] == min(val_losses) and results["weights"] == "best"
    # Early stopping on val/loss, patience 1: the run ends after the first epoch that does
    # not improve on the best so far, or after max_epochs.
    no_gain = [e for e in range(1, len(history)) if val_losses[e] >= min(val_losses[:e])]
    assert len(history) == (no_gain[0] + 1 if no_gain else 4), val_losses
    assert ("early stopping: no val/loss improvement" in text) == bool(no_gain), text
    assert results["global_step"] == history[-1]["step"] > step


def test_the_time_limit_itself_sends_the_notice_and_the_job_requeues(
    cluster: SlurmCluster, tmp_path: Path
) -> None:
    """Nobody signals by hand: ``--time=1`` with the notice 50 s before the limit, and Slurm's
    own time-limit check sends USR1 (it runs about every 30 s, so 10-40 s in). Meanwhile a
    user-style experiment trains slowly (its steps sleep: little CPU). The restart resumes;
    then a plain scancel ends the job for good (checkpoint, not requeued)."""
    job_id = sbatch(
        cluster,
        *CPU_JOB,
        "--time=1",
        "--signal=B:USR1@50",
        f"--output={tmp_path}/%x_%j.out",
        TRAIN,
        "tests/support/tiny_lm_experiment.py",
        f"paths.output_dir={tmp_path / 'out'}",
        "trainer.max_epochs=1000",
        TINY_LM_STEP_SECONDS="0.1",
    )
    run_dir = tmp_path / "out" / f"tiny_lm_experiment-{job_id}"
    deadline = time.monotonic() + 120
    while "[trainer] resuming from" not in log_text(job_log(tmp_path, job_id)):
        state = cluster.job(job_id).get("JobState")
        assert state not in ENDED and time.monotonic() < deadline, (
            f"{state}: {log_text(job_log(tmp_path, job_id))}"
        )
        time.sleep(0.5)
    cluster.run("scancel", job_id)
    fields = wait_for_end(cluster, job_id, job_log(tmp_path, job_id))
    text = log_text(job_log(tmp_path, job_id))
    assert (fields["JobState"], fields["Restarts"]) == ("CANCELLED", "1"), text

    first_run = text.split(f"[slurm] job {job_id} restart 1 ")[0]
    assert first_run.count("[slurm] SIGUSR1 received") == 1, text  # the notice, mid-run
    saved = re.findall(r"saved checkpoint at step (\d+); re-run to resume", first_run)
    assert len(saved) == 1, text
    step = int(saved[0])
    assert "[slurm] stopped after SIGUSR1 (exit 75)" in first_run
    assert f"[slurm] requeued job {job_id}: restart 1 resumes run {run_dir.name}" in text
    checkpoint = run_dir / "checkpoints" / f"step_{step:09d}.pt"
    assert f"resuming from {checkpoint} at step {step} " in text
    # The scancel: SIGTERM from Slurm and again from the batch script; one clean stop.
    assert "[slurm] stopped by SIGTERM (exit 75; checkpoint saved; " in text, text


def test_multinode_template_on_one_node_stops_the_srun_step_and_resumes(
    cluster: SlurmCluster, tmp_path: Path
) -> None:
    """srun + torchrun (c10d rendezvous on the first node) on the one node there is: the
    notice becomes SIGTERM for the step's processes, and the agent's exit 1 still requeues."""
    job_id = submit(
        cluster, tmp_path, "scripts/slurm/train_multinode.sbatch", "--nodes=1", "run_name=multi"
    )
    run_dir = tmp_path / "out" / "multi"
    stop_after_first_checkpoint(cluster, job_id, run_dir, tmp_path)
    text = ended(cluster, job_id, tmp_path, "COMPLETED", "0:0", "1")
    assert f"--rdzv_endpoint={cluster.node}:" in text and "srun --nodes=1 " in text
    stopped = re.findall(r"stopped by SIGTERM at step (\d+)", text)
    assert len(stopped) == 1, text
    assert f"[slurm] requeued job {job_id}: restart 1 resumes run multi" in text
    assert f"at step {stopped[0]} " in text.split("restart 1 on")[-1]  # the resume line
    assert (run_dir / "test_results.json").is_file()


def test_a_budget_stop_is_not_requeued(cluster: SlurmCluster, tmp_path: Path) -> None:
    # $1000 a second against a 1 cent budget: the first step spends it.
    job_id = submit(
        cluster,
        tmp_path,
        TRAIN,
        "run_name=budget",
        "cost.hourly_rate_usd=3600000",
        "cost.budget_usd=0.01",
    )
    text = ended(cluster, job_id, tmp_path, "FAILED", "76:0", "0")
    assert "run_name=budget (given)" in text and "budget reached" in text
    assert "[slurm] cost.budget_usd reached (exit 76): not requeued" in text
    assert "requeued job" not in text
    run_dir = tmp_path / "out" / "budget"
    assert newest_checkpoint_step(run_dir) >= 1  # resumable with a bigger budget
    assert not (run_dir / "test_results.json").exists()


def test_a_hugging_face_trainer_script_stops_on_usr1_requeues_and_resumes(
    cluster: SlurmCluster, tmp_path: Path
) -> None:
    """``run_interruptible`` under the batch script: USR1 (Slurm's notice) -> the Trainer's
    checkpoint, record last -> exit 75 -> requeue -> the restart resumes it and finishes."""
    output_dir = tmp_path / "hf"
    job_id = sbatch(
        cluster,
        "--gres=none",
        "--cpus-per-task=1",
        "--mem=1000M",  # transformers' import alone is a few hundred MB
        f"--output={tmp_path}/%x_%j.out",
        TRAIN,
        "tests/support/hf_trainer_script.py",
        str(output_dir),
        "max_steps=16",
        "step_sleep_s=0.2",
    )
    deadline = time.monotonic() + 90
    while not list(output_dir.glob(f"checkpoint-*/{HF_RECORD}")):
        assert time.monotonic() < deadline, log_text(job_log(tmp_path, job_id))
        time.sleep(0.1)
    cluster.run("scancel", "--signal=USR1", "--batch", job_id)
    text = ended(cluster, job_id, tmp_path, "COMPLETED", "0:0", "1")
    saved = re.findall(r"saved checkpoint-(\d+); run the same command again", text)
    assert len(saved) == 1, text
    assert "[slurm] stopped after SIGUSR1 (exit 75)" in text
    assert f"[slurm] requeued job {job_id}: restart 1 resumes run " in text
    assert f"resuming from {output_dir / f'checkpoint-{saved[0]}'}" in text
    result = json.loads((output_dir / "result.json").read_text())
    assert result["status"] == "completed" and result["steps"] == list(range(1, 17))


def write_cases(path: Path, out: Path, cases: str) -> Path:
    path.write_text(
        f"""\
experiment: {EXPERIMENT}
sbatch_args: [{", ".join(CPU_JOB)}]
overrides:
  - paths.output_dir={out}
  - trainer.progress_bar=false
  - data.num_samples=1024
  - trainer.max_epochs=1
cases:
{cases}"""
    )
    return path


def launch(cluster: SlurmCluster, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(LAUNCHER), *args],
        cwd=REPO_ROOT,
        env=job_env(cluster),
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_launcher_runs_each_case_as_its_own_job(cluster: SlurmCluster, tmp_path: Path) -> None:
    out, logs = tmp_path / "out", tmp_path / "logs"  # logs/ does not exist yet
    cases = write_cases(
        tmp_path / "cases.yaml",
        out,
        "  - {run_name: seed1, overrides: [seed=1]}\n"
        "  - {run_name: seed2-lr1e-3, overrides: [seed=2, optim.lr=1.0e-3]}\n",
    )
    result = launch(cluster, "--config", str(cases), "--log-dir", str(logs))
    assert result.returncode == 0, result.stderr
    jobs = re.findall(r"^\s+(\d+)\s+(\S+)\s+tail -f (\S+)$", result.stdout, re.M)
    assert [name for _, name, _ in jobs] == ["seed1", "seed2-lr1e-3"], result.stdout
    ids = [job_id for job_id, _, _ in jobs]
    assert f"squeue -j {ids[0]},{ids[1]}" in result.stdout
    ended = {}
    for job_id, name, log in jobs:
        assert log == f"{logs}/{name}_{job_id}.out"
        ended[name] = wait_for_end(cluster, job_id, Path(log))
        assert (ended[name]["JobState"], ended[name]["ExitCode"]) == ("COMPLETED", "0:0")
        assert ended[name]["JobName"] == name
        assert f"run_name={name} (given)" in Path(log).read_text()
    # Side by side, not one after the other.
    assert ended["seed2-lr1e-3"]["StartTime"] < ended["seed1"]["EndTime"], ended
    for name, seed, lr in (("seed1", 1, 3.0e-3), ("seed2-lr1e-3", 2, 1.0e-3)):
        config = json.loads((out / name / "config.json").read_text())
        assert (config["seed"], config["optim"]["lr"]) == (seed, lr)
        assert (out / name / "test_results.json").is_file()


def test_launcher_refuses_a_bad_cases_file_and_submits_nothing(
    cluster: SlurmCluster, tmp_path: Path
) -> None:
    logs = tmp_path / "logs"
    before = all_job_ids(cluster)
    duplicate = write_cases(
        tmp_path / "duplicate.yaml",
        tmp_path,
        "  - {run_name: same}\n  - {run_name: same, overrides: [seed=2]}\n",
    )
    # The file is fine; Slurm refuses the second job (more memory than the node has),
    # which must keep the first from being submitted too.
    too_big = write_cases(
        tmp_path / "too_big.yaml",
        tmp_path,
        "  - {run_name: fits}\n  - {run_name: too-big, sbatch_args: [--mem=64G]}\n",
    )
    for cases, expected in (
        (duplicate, "cases[1].run_name 'same' is used twice"),
        (too_big, "case 'too-big': Slurm refuses the job"),
    ):
        result = launch(cluster, "--config", str(cases), "--log-dir", str(logs))
        assert result.returncode == 2, result.stdout + result.stderr
        assert result.stdout == "" and len(result.stderr.splitlines()) == 1, result.stderr
        assert expected in result.stderr
    assert all_job_ids(cluster) == before
    assert not logs.exists()


# ----- pure logic: no cluster ----------------------------------------------------------


def job_environment(**extra: str) -> dict[str, str]:
    return {"SLURM_JOB_ID": "4242", "SLURM_JOB_NUM_NODES": "1", **extra}


def test_plan_names_the_run_after_the_job_and_picks_the_launcher() -> None:
    plan = plan_job([EXPERIMENT, "seed=3"], job_environment(), python="py", cwd=REPO_ROOT)
    assert plan.mode == SINGLE and plan.run_name_derived
    assert plan.command == ["py", EXPERIMENT, "seed=3", "run_name=template_experiment-4242"]
    # The same after a requeue: SLURM_JOB_ID stays, SLURM_RESTART_COUNT counts.
    again = plan_job([EXPERIMENT], job_environment(SLURM_RESTART_COUNT="3"), "py", REPO_ROOT)
    assert again.run_name == "template_experiment-4242"
    array = job_environment(SLURM_ARRAY_JOB_ID="100", SLURM_ARRAY_TASK_ID="7")
    assert plan_job([EXPERIMENT], array, "py", REPO_ROOT).run_name == "template_experiment-100_7"
    given = plan_job([EXPERIMENT, "run_name=a", "run_name=b"], job_environment(), "py", REPO_ROOT)
    assert given.run_name == "b" and not given.run_name_derived
    assert given.command.count("run_name=b") == 1 and len(given.command) == 4

    gpus = plan_job([EXPERIMENT], job_environment(SLURM_GPUS_ON_NODE="4"), "py", REPO_ROOT)
    assert gpus.mode == TORCHRUN and gpus.processes_per_node == 4
    assert gpus.command[:5] == [
        "py",
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=4",
    ]
    cpu_ranks = job_environment(NPROC_PER_NODE="2")
    assert plan_job([EXPERIMENT], cpu_ranks, "py", REPO_ROOT).mode == TORCHRUN


def test_multinode_plan_runs_one_torchrun_per_node_meeting_on_the_first() -> None:
    env = job_environment(
        SLURM_JOB_NUM_NODES="2",
        SLURM_GPUS_ON_NODE="8",
        SLURM_CPUS_PER_TASK="64",
        RDZV_HOST="node001",
    )
    plan = plan_job(["--multinode", EXPERIMENT, "seed=1"], env, "py", REPO_ROOT)
    assert plan.mode == MULTINODE and plan.processes_per_node == 8
    assert plan.command == [
        "srun",
        "--nodes=2",
        "--ntasks-per-node=1",
        "--cpus-per-task=64",
        "py",
        "-m",
        "torch.distributed.run",
        "--nnodes=2",
        "--nproc_per_node=8",
        "--rdzv_backend=c10d",
        "--rdzv_endpoint=node001:29742",  # 29500 + job id mod 1000
        "--rdzv_id=4242",
        EXPERIMENT,
        "seed=1",
        "run_name=template_experiment-4242",
    ]
    port = plan_job(["--multinode", EXPERIMENT], {**env, "RDZV_PORT": "1234"}, "py", REPO_ROOT)
    assert "--rdzv_endpoint=node001:1234" in port.command


@pytest.mark.parametrize(
    ("argv", "env", "words"),
    [
        ([], job_environment(), "usage: sbatch scripts/slurm/train.sbatch"),
        (["experiments/nope.py"], job_environment(), "experiment file not found"),
        ([EXPERIMENT], {}, "not inside a Slurm job (no SLURM_JOB_ID): pass run_name=NAME"),
        (["--multinode", EXPERIMENT], job_environment(), "RDZV_HOST is not set"),
        ([EXPERIMENT], job_environment(NPROC_PER_NODE="0"), "NPROC_PER_NODE='0'"),
    ],
)
def test_plan_refuses_bad_input_in_one_line(argv: list[str], env: dict, words: str) -> None:
    with pytest.raises(UsageError) as refused:
        plan_job(argv, env, "py", REPO_ROOT)
    assert words in str(refused.value) and "\n" not in str(refused.value)


@pytest.mark.parametrize(
    ("code", "notice", "mode", "requeue", "exit_code"),
    [
        (75, "SIGUSR1", SINGLE, True, 75),  # checkpointed after the notice: more time
        (138, "SIGUSR1", SINGLE, True, 75),  # killed by USR1 before its handler was in
        (1, "SIGUSR1", MULTINODE, True, 75),  # the agents' exit 1 hides the ranks' 75
        (1, "SIGUSR1", SINGLE, False, 1),  # a crash stays a crash
        (76, "SIGUSR1", SINGLE, False, 76),  # out of budget: a restart would stop at once
        (76, None, SINGLE, False, 76),
        (75, "SIGTERM", SINGLE, False, 75),  # scancel means stop; preemption requeues itself
        (75, None, SINGLE, False, 75),
        (0, "SIGUSR1", SINGLE, False, 0),  # finished meanwhile
    ],
)
def test_only_a_stop_after_the_notice_is_requeued(
    code: int, notice: str | None, mode: str, requeue: bool, exit_code: int
) -> None:
    outcome = decide(code, notice, mode, "run-1")
    assert (outcome.requeue, outcome.exit_code) == (requeue, exit_code), outcome.message


def test_torchrun_failure_report_gives_the_ranks_exit_code() -> None:
    report = (
        "Failures:\n  <NO_OTHER_FAILURES>\nRoot Cause (first observed failure):\n[0]:\n"
        "  rank      : 1 (local_rank: 1)\n  exitcode  : 75 (pid: 123)\n"
    )
    assert torchrun_first_failure(report) == 75
    assert torchrun_first_failure(report.replace(": 75", ": -10")) == 138
    assert torchrun_first_failure("Traceback ...") is None
    assert SlurmJob.from_env({}).stable_id is None


def test_cases_file_becomes_one_sbatch_per_case(tmp_path: Path) -> None:
    spec = load_cases(REPO_ROOT / "configs" / "cases.yaml")  # the shipped example is valid
    assert len({case.run_name for case in spec.cases}) == len(spec.cases) >= 3

    cases = write_cases(
        tmp_path / "cases.yaml",
        tmp_path,
        "  - {run_name: a, overrides: [seed=1]}\n"
        "  - {run_name: b, sbatch_args: [--mem=1G, --time=01:00:00]}\n",
    )
    first, second = plan_submissions(load_cases(cases), log_dir="runs/logs")
    common = [f"paths.output_dir={tmp_path}", "trainer.progress_bar=false"]
    assert first.command[:4] == [
        "sbatch",
        "--parsable",
        "--job-name=a",
        "--output=runs/logs/%x_%j.out",
    ]
    assert first.command[4:7] == CPU_JOB and first.command[7:9] == [TRAIN, EXPERIMENT]
    assert first.command[9:11] == common and first.command[-2:] == ["seed=1", "run_name=a"]
    # A case's own sbatch option replaces the common one of the same name.
    assert second.test_command[:2] == ["sbatch", "--test-only"]
    assert second.command[4:8] == [
        "--gres=none",
        "--cpus-per-task=1",
        "--mem=1G",
        "--time=01:00:00",
    ]
    assert second.log_path("runs/logs", "77") == "runs/logs/b_77.out"
    assert merge_sbatch_args(["--exclusive", "--mem=1G"], ["--mem=2G"]) == [
        "--exclusive",
        "--mem=2G",
    ]


@pytest.mark.parametrize(
    ("cases", "words"),
    [
        ("  []\n", "cases is empty"),
        ("  - {overrides: [seed=1]}\n", "cases[0] has no run_name"),
        ("  - {run_name: a b}\n", "run_name 'a b' may hold only"),
        (
            "  - {run_name: a, overrides: [trainer.max_epoch=3]}\n",
            "unknown config key 'trainer.max_epoch'",
        ),
        ("  - {run_name: a, overrides: [seed]}\n", "override 'seed' is not key=value"),
        ("  - {run_name: a, overrides: [run_name=b]}\n", "set the case's run_name: instead"),
        ("  - {run_name: a, sbatch_args: [--job-name=x]}\n", "set by the launcher"),
        ("  - {run_name: a, sbatch_args: [gpu:1]}\n", "not an option"),
        ("  - {run_name: a, gpus: 1}\n", "unknown key 'gpus'"),
        ("  {run_name: a}\n", "cases must be a list of mappings"),
    ],
)
def test_bad_cases_file_is_one_line_naming_the_problem(
    tmp_path: Path, cases: str, words: str
) -> None:
    path = write_cases(tmp_path / "cases.yaml", tmp_path, cases)
    with pytest.raises(ConfigError) as refused:
        load_cases(path)
    assert words in str(refused.value) and "\n" not in str(refused.value)
