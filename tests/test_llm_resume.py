"""The LLM experiments as a user runs them (experiments/llm_sft_experiment.py, then
llm_dpo_experiment.py on its adapter, dev configs: tiny-llama, no download), killed for real
and re-run: the adapters they end with are bit-identical to runs never interrupted. (SIGTERM
at a random step of a LoRA run, resumed on a fresh machine: tests/test_lora.py.)

The uninterrupted references run in this process (``runpy``, as ``python experiments/...``
would: one transformers import fewer each); every interrupted run is a real subprocess.
"""

from __future__ import annotations

import os
import random
import runpy
import signal
import sys
import time
from pathlib import Path

import pytest
import torch

from src.common.signals import EXIT_INTERRUPTED
from tests.support.experiment import (
    REPO_ROOT,
    experiment_env,
    newest_checkpoint_step,
    run_experiment,
    start_experiment,
    wait_for_checkpoint,
)

SFT = REPO_ROOT / "experiments" / "llm_sft_experiment.py"
DPO = REPO_ROOT / "experiments" / "llm_dpo_experiment.py"
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


def assert_same_adapter(left: Path, right: Path) -> None:
    for name in ADAPTER_FILES:
        assert (left / name).read_bytes() == (right / name).read_bytes(), f"{left / name} differs"


def run_in_process(experiment: Path, args: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """``python experiment args`` in this process (its thread setting put back after)."""
    threads = torch.get_num_threads()
    with monkeypatch.context() as patch:
        patch.setattr(sys, "argv", [str(experiment), *args])
        patch.setattr(sys, "excepthook", sys.excepthook)  # the config loader sets its own
        patch.setenv("DEV_MODE", "True")
        patch.setenv("WANDB_MODE", "offline")
        try:
            runpy.run_path(str(experiment), run_name="__main__")
        finally:
            torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def references(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SFT then DPO (from the SFT run's final adapter), never interrupted: their output dir."""
    output_dir = tmp_path_factory.mktemp("llm-reference")
    with pytest.MonkeyPatch.context() as monkeypatch:
        args = [f"paths.output_dir={output_dir}", "checkpoint.every_n_steps=4"]
        run_in_process(SFT, args, monkeypatch)
        run_in_process(DPO, [f"paths.output_dir={output_dir}"], monkeypatch)
    return output_dir


def test_sft_sigkill_during_checkpoint_writes_with_workers_is_bit_identical(
    tmp_path: Path, references: Path
) -> None:
    args = [f"paths.output_dir={tmp_path}", "checkpoint.every_n_steps=1", "data.num_workers=2"]
    run_dir = tmp_path / "llm-sft-dev"
    process = start_experiment(args, experiment=SFT)
    wait_for_checkpoint(process, run_dir, 10)  # past epoch 1: best_adapter/ written
    time.sleep(random.uniform(0, 0.01))
    os.killpg(process.pid, signal.SIGKILL)
    process.communicate(timeout=60)
    assert process.returncode == -signal.SIGKILL
    killed_at = newest_checkpoint_step(run_dir)

    finished = run_experiment(args, experiment=SFT)
    assert finished.returncode == 0, finished.stderr
    assert f"at step {killed_at} " in finished.stdout  # the newest complete one
    reference = references / "llm-sft-dev"
    assert_same_adapter(run_dir / "final_adapter", reference / "final_adapter")


def test_dpo_from_the_sft_adapter_interrupted_and_resumed_is_bit_identical(
    tmp_path: Path, references: Path
) -> None:
    sft_adapter = references / "llm-sft-dev" / "final_adapter"
    args = [
        f"paths.output_dir={tmp_path}",
        f"model.init_adapter={sft_adapter}",
        "checkpoint.every_n_steps=3",
    ]
    run_dir = tmp_path / "llm-dpo-dev"
    process = start_experiment(args, experiment=DPO)
    wait_for_checkpoint(process, run_dir, 9)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=120)
    assert process.returncode == EXIT_INTERRUPTED, err

    resumed = run_experiment(args, env=experiment_env(), experiment=DPO)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from" in resumed.stdout
    reference = references / "llm-dpo-dev"
    assert_same_adapter(run_dir / "final_adapter", reference / "final_adapter")
