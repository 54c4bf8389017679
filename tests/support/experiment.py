"""Run experiments/template_experiment.py as a real subprocess, the way a user does."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[2]
EXPERIMENT = REPO_ROOT / "experiments" / "template_experiment.py"


def experiment_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "VAST"))}
    env.update(PYTHONUNBUFFERED="1", DEV_MODE="True", WANDB_MODE="offline", **extra)
    return env


def start_experiment(
    args: list[str], env: dict[str, str] | None = None, experiment: Path = EXPERIMENT
) -> subprocess.Popen:
    """Start in its own process group, so a test can signal it and its DataLoader workers."""
    return subprocess.Popen(
        [sys.executable, str(experiment), *args],
        cwd=REPO_ROOT,
        env=env or experiment_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def torchrun_command(ranks: int, args: list[str], experiment: Path = EXPERIMENT) -> list[str]:
    """``experiment`` under torchrun: ``ranks`` local processes, a standalone rendezvous."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={ranks}",
        "--standalone",
        str(experiment),
        *args,
    ]


def run_experiment(
    args: list[str],
    env: dict[str, str] | None = None,
    timeout: float = 180,
    experiment: Path = EXPERIMENT,
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(experiment), *args],
        cwd=REPO_ROOT,
        env=env or experiment_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def newest_checkpoint_step(run_dir: Path) -> int:
    steps = [int(p.stem.split("_")[1]) for p in (run_dir / "checkpoints").glob("step_*.json")]
    return max(steps, default=-1)


def wait_for_checkpoint(process: subprocess.Popen, run_dir: Path, step: int, timeout: float = 120):
    """Poll until a checkpoint at or past ``step`` is committed; fail if the run ends first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if newest_checkpoint_step(run_dir) >= step:
            return
        if process.poll() is not None:
            out, err = process.communicate()
            raise AssertionError(f"run ended (rc={process.returncode}) before step {step}:\n{err}")
        time.sleep(0.002)
    raise AssertionError(f"no checkpoint at step {step} within {timeout}s")


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_bit_identical(left: Path, right: Path) -> None:
    a, b = load_weights(left), load_weights(right)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), f"{name} differs between {left} and {right}"


def assert_same_history(run_dir: Path, reference: Path, keys: tuple[str, ...]) -> None:
    """The per-epoch records of training_log.json agree on ``keys`` (exactly): a resumed
    run replayed nothing and skipped nothing."""
    ours, theirs = (json.loads((d / "training_log.json").read_text()) for d in (run_dir, reference))
    assert [[r[k] for k in keys] for r in ours] == [[r[k] for k in keys] for r in theirs]


def interrupt_at_step(
    args: list[str], run_dir: Path, step: int, experiment: Path = EXPERIMENT
) -> None:
    """Run until a checkpoint at ``step`` exists, SIGTERM it, expect a clean interrupted exit."""
    from src.common.signals import EXIT_INTERRUPTED

    process = start_experiment(args, experiment=experiment)
    wait_for_checkpoint(process, run_dir, step)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=60)
    assert process.returncode == EXIT_INTERRUPTED, err


def wait_until(condition, what: str, process: subprocess.Popen, timeout: float = 120) -> None:
    """Poll ``condition`` while ``process`` (a sweep, its output piped) is still running."""
    deadline = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None:
            raise AssertionError(f"sweep ended before {what}:\n{process.communicate()[0]}")
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)
