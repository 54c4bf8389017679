"""The experiment runs unchanged under torchrun (2 CPU ranks, gloo): rank 0 alone writes,
every rank stops at the same step on SIGTERM, and a re-run resumes."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

from tests.support.experiment import EXPERIMENT, REPO_ROOT, experiment_env, wait_for_checkpoint

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone"]


def torchrun_args(output_dir: Path) -> list[str]:
    return [
        *TORCHRUN,
        str(EXPERIMENT),
        f"paths.output_dir={output_dir}",
        "run_name=ddp",
        "data.num_samples=20000",
        "model.hidden_dim=256",
        "trainer.progress_bar=false",
        "checkpoint.every_n_steps=20",
    ]


def test_sigterm_under_torchrun_stops_all_ranks_at_one_step_then_resumes(tmp_path: Path) -> None:
    run_dir = tmp_path / "ddp"
    process = subprocess.Popen(
        torchrun_args(tmp_path),
        cwd=REPO_ROOT,
        env=experiment_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    wait_for_checkpoint(process, run_dir, 40)
    os.killpg(process.pid, signal.SIGTERM)  # agent and both ranks, like Slurm or docker stop
    out, err = process.communicate(timeout=120)
    stopped = re.findall(r"stopped by SIGTERM at step (\d+)", out)
    assert len(stopped) == 2 and stopped[0] == stopped[1], out + err
    step = int(stopped[0])
    assert (run_dir / "checkpoints" / f"step_{step:09d}.json").is_file()
    assert out.count("saved checkpoint at step") == 1  # rank 0 only

    resumed = subprocess.run(
        torchrun_args(tmp_path),
        cwd=REPO_ROOT,
        env=experiment_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stderr
    assert resumed.stdout.count(f"at step {step} ") == 1  # one resume line, from rank 0
    assert "effective batch 128 = 64 per device x 2 rank(s) x 1 micro-batch" in resumed.stdout
    test_lines = re.findall(r"test_loss \S+ \| test_acc \S+", resumed.stdout)
    assert len(test_lines) == 2 and test_lines[0] == test_lines[1]  # ranks agree
    assert (run_dir / "final_model.pt").is_file()
