"""Resume across devices and precisions on a real GPU (skipped with the reason elsewhere).

Checkpoints are loaded onto the CPU first and each part goes where it lives now, so a run
saved on the GPU finishes on the CPU and the other way round; the grad scaler state is
loaded only when both sides use one.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import torch

from src.common.signals import EXIT_INTERRUPTED
from src.trainers.interruptible_trainer import InterruptibleTrainer
from tests.support.experiment import (
    REPO_ROOT,
    newest_checkpoint_step,
    run_experiment,
    start_experiment,
    wait_for_checkpoint,
)
from tests.test_trainer import make_trainer

pytestmark = pytest.mark.gpu
CHAR_LM = REPO_ROOT / "experiments" / "char_lm_experiment.py"


def stop_at(trainer: InterruptibleTrainer, step: int) -> None:
    """Send the Slurm stop signal to ourselves right after optimizer step ``step``."""
    original = trainer._optimizer_step

    def step_then_signal() -> None:
        original()
        if trainer.state.global_step == step:
            os.kill(os.getpid(), signal.SIGUSR1)

    trainer._optimizer_step = step_then_signal  # type: ignore[method-assign]


@pytest.mark.parametrize(
    ("before", "after"),
    [
        (["trainer.device=cuda"], ["trainer.device=cpu"]),
        (["trainer.device=cpu"], ["trainer.device=cuda"]),
        (
            ["trainer.device=cuda", "trainer.precision=bf16"],
            ["trainer.device=cuda", "trainer.precision=fp16"],
        ),
        (
            ["trainer.device=cuda", "trainer.precision=fp16"],
            ["trainer.device=cuda", "trainer.precision=fp32"],
        ),
    ],
    ids=["cuda-to-cpu", "cpu-to-cuda", "bf16-to-fp16", "fp16-to-fp32"],
)
def test_interrupted_run_resumes_on_another_device_or_precision(
    tmp_path: Path, before: list[str], after: list[str]
) -> None:
    common = ["run_name=moved", "trainer.early_stopping_patience=0"]
    first, _ = make_trainer(tmp_path, *common, *before)
    stop_at(first, 20)
    assert first.fit().interrupted
    saved = torch.load(first.checkpoints.latest_path(), weights_only=True, map_location="cpu")
    if "trainer.precision=fp16" in before:
        assert saved["scaler"]["scale"] > 0  # a live scaler state was saved

    resumed, test_set = make_trainer(tmp_path, *common, *after)
    result = resumed.fit()
    assert result.status == "completed" and result.global_step == resumed.total_steps
    device = resumed.device.type
    assert all(p.device.type == device for p in resumed.model.parameters())
    for group in resumed.optimizer.state.values():
        assert group["exp_avg"].device.type == device
    if "trainer.precision=fp16" in after:
        assert resumed.scaler.is_enabled()
    assert resumed.test(test_set)["test_accuracy"] > 0.5


def test_char_lm_in_bf16_is_interrupted_and_resumes(tmp_path: Path) -> None:
    args = [
        f"paths.output_dir={tmp_path}",
        "run_name=charlm-bf16",
        "trainer.device=cuda",
        "trainer.precision=bf16",
        "trainer.progress_bar=false",
        "checkpoint.every_n_steps=10",
    ]
    run_dir = tmp_path / "charlm-bf16"
    process = start_experiment(args, experiment=CHAR_LM)
    wait_for_checkpoint(process, run_dir, 20)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=120)
    assert process.returncode == EXIT_INTERRUPTED, err
    stopped = newest_checkpoint_step(run_dir)
    resumed = run_experiment(args, experiment=CHAR_LM, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    assert f"at step {stopped} " in resumed.stdout and "needs CUDA" not in resumed.stdout
    assert (run_dir / "final_model.pt").is_file()
