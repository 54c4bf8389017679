"""``run_interruptible`` around a real ``transformers.Trainer``, in real processes, with moto's
real S3 server on loopback.

Importing transformers costs a process ~8 s, so one test walks a run through every promise in
four runs in a chain, with the other checks on the second core beside them (niced: the
chain is the critical path):

1. SIGTERM at a random step, S3 on: exit 75 | a reference run; the TRL SFT experiment
2. the output directory wiped, a tiny budget: resumes from S3, stops at once, exit 76
   | a second process on a locked output directory: one line, exit 2
3. a larger budget resumes; SIGKILL inside the save of step 16 (files written, no record)
4. the same command: skips checkpoint-16 with one warning, resumes from checkpoint-12,
   finishes; each step once in log_history; final weights bit-identical to the reference;
   called again, the finished run says so and trains nothing
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import TrainingArguments

from src.common.signals import EXIT_BUDGET_REACHED, EXIT_INTERRUPTED
from src.config import experiment_schema, load_config
from src.data.chat import ChatDataConfig
from src.integrations.hf_args import reporter_environment, trainer_arguments
from src.integrations.hf_checkpoints import RECORD_NAME
from src.models.llm import LlmConfig
from src.runs.lock import acquire_run_lock
from tests.support.moto_server import AWS_ENV, running_moto_s3

pytestmark = pytest.mark.slow

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPT = REPO_ROOT / "tests" / "support" / "hf_trainer_script.py"
TRL_EXPERIMENT = REPO_ROOT / "experiments" / "trl_sft_experiment.py"
BUCKET = "hf-bucket"
TIMEOUT_S = 120


def start(output_dir: Path, *options: str, side: bool = False) -> subprocess.Popen[str]:
    """``side``: a check beside the chain of runs, at a lower priority (the chain's runs are
    the test's critical path on two cores)."""
    env = {**os.environ, **AWS_ENV, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [sys.executable, str(SCRIPT), str(output_dir), *options],
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        preexec_fn=(lambda: os.nice(10)) if side else None,
    )


def start_trl(output_dir: Path) -> subprocess.Popen[str]:
    """The TRL experiment on the kit's dev config, 4 steps, evaluated and saved every 2."""
    options = ("trainer.max_steps=4", "checkpoint.every_n_steps=2", "trainer.log_every_n_steps=2")
    return subprocess.Popen(
        [sys.executable, str(TRL_EXPERIMENT), f"paths.output_dir={output_dir}", *options],
        cwd=REPO_ROOT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        preexec_fn=lambda: os.nice(10),
    )


def finish(process: subprocess.Popen[str]) -> tuple[int, str]:
    output, _ = process.communicate(timeout=TIMEOUT_S)
    return process.returncode, output


def signal_at_step(process: subprocess.Popen[str], step: int, sig: signal.Signals) -> str:
    """Read the output until ``step N`` shows, then send ``sig``; the output so far."""
    assert process.stdout is not None
    seen = []
    for line in process.stdout:
        seen.append(line)
        if line.strip() == f"step {step}":
            process.send_signal(sig)
            break
    return "".join(seen)


def weights(output_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(output_dir / "final_weights.pt", weights_only=True)


def test_stop_budget_kill_and_s3_resume_end_bit_identical(tmp_path: Path) -> None:
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # moto's access log, per request
    reference_dir, run_dir = tmp_path / "reference", tmp_path / "run"
    started = time.monotonic()
    with running_moto_s3() as s3:
        s3.client().create_bucket(Bucket=BUCKET)
        s3_options = (f"s3_bucket={BUCKET}", f"endpoint_url={s3.endpoint_url}")

        # 1. SIGTERM at a random step, S3 on | the reference run, the TRL experiment
        stop_step = random.Random().randint(5, 10)
        first = start(run_dir, *s3_options, "step_sleep_s=0.15")
        reference = start(reference_dir, side=True)
        trl = start_trl(tmp_path / "trl")
        output = signal_at_step(first, stop_step, signal.SIGTERM)
        code, rest = finish(first)
        output += rest
        assert code == EXIT_INTERRUPTED, output
        saved = sorted(int(p.name.split("-")[1]) for p in run_dir.glob("checkpoint-*"))
        stopped_at = saved[-1]
        assert stop_step <= stopped_at <= stop_step + 1, (stop_step, saved)
        assert (run_dir / f"checkpoint-{stopped_at}" / RECORD_NAME).exists()
        assert "S3 mirror up to date" in output, output

        # 2. wipe; a tiny budget resumes from S3 and stops at once | a locked output directory
        shutil.rmtree(run_dir)
        budget = start(run_dir, *s3_options, "hourly_rate_usd=36", "budget_usd=0.01")
        locked_dir = tmp_path / "locked"
        lock = acquire_run_lock(locked_dir)
        second = start(locked_dir, side=True)
        code, output = finish(budget)
        assert code == EXIT_BUDGET_REACHED, output
        assert f"downloaded checkpoint-{stopped_at} from s3://{BUCKET}/" in output, output
        assert f"resuming from {run_dir}/checkpoint-{stopped_at}" in output, output
        assert "budget reached" in output, output
        budget_step = stopped_at + 1
        assert (run_dir / f"checkpoint-{budget_step}" / RECORD_NAME).exists(), output

        # 3. a larger budget resumes; SIGKILL inside the save of step 16
        killed = start(
            run_dir, *s3_options, "hourly_rate_usd=36", "budget_usd=50", "kill_in_save_at=16"
        )
        code, output = finish(killed)
        assert code == -signal.SIGKILL, output
        assert f"resuming from {run_dir}/checkpoint-{budget_step}" in output, output
        assert not (run_dir / "checkpoint-16" / RECORD_NAME).exists()

        # 4. the same command skips the incomplete checkpoint and finishes; called again, it
        # says the run is finished and trains nothing
        code, output = finish(start(run_dir, *s3_options, "again=1"))
        assert code == 0, output
        warnings = [line for line in output.splitlines() if "skipping checkpoint-16" in line]
        assert len(warnings) == 1, output
        assert f"resuming from {run_dir}/checkpoint-12" in output, output
        assert "finished at step 24" in output, output
        result = json.loads((run_dir / "result.json").read_text())
        assert result["steps"] == list(range(1, 25)), result  # each step once, none missing
        manifest = s3.client().get_object(
            Bucket=BUCKET, Key=f"hf-checkpoints/{run_dir.name}/manifest.json"
        )
        steps = [entry["step"] for entry in json.loads(manifest["Body"].read())["checkpoints"]]
        assert steps[0] == 24, steps

    code, output = finish(reference)
    assert code == 0, output
    reference_weights, resumed = weights(reference_dir), weights(run_dir)
    for name, tensor in reference_weights.items():
        assert torch.equal(tensor, resumed[name]), name
    code, output = finish(second)
    lock.release()
    errors = [line for line in output.splitlines() if "is in use by" in line]
    assert code == 2 and len(errors) == 1, output
    assert "step 1\n" not in output, output
    code, output = finish(trl)
    assert code == 0, output
    trl_run = tmp_path / "trl" / "trl-sft-dev"  # <paths.output_dir>/<run_name>, as the kit's
    assert "completed at step 4" in output, output
    assert json.loads((trl_run / "config.json").read_text())["run_name"] == "trl-sft-dev"
    assert "test_loss" in json.loads((trl_run / "test_results.json").read_text())
    # The kit's export takes the TRL run: its best adapter (the checkpoint with the best
    # eval_loss) in PEFT's layout.
    export = subprocess.run(
        [sys.executable, str(REPO_ROOT / "scripts" / "export.py"), str(trl_run), "--format", "hf"],
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )
    assert export.returncode == 0, export.stdout + export.stderr
    state = json.loads((trl_run / "checkpoint-4" / "trainer_state.json").read_text())
    best = state["best_model_checkpoint"]
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        exported = (trl_run / "export_hf" / "adapter" / name).read_bytes()
        assert exported == (Path(best) / name).read_bytes(), name
    print(f"wall time {time.monotonic() - started:.1f} s")


def test_the_kit_config_maps_onto_training_arguments(tmp_path: Path) -> None:
    """The TRL experiment's dev config as TrainingArguments (which checks every name), and the
    GPU-only half precision the CPU never takes."""
    schema = experiment_schema(model=LlmConfig, data=ChatDataConfig)
    dev = REPO_ROOT / "configs" / "trl_sft_dev.yaml"
    cfg = load_config(dev, ["trainer.gradient_checkpointing=true"], schema=schema)
    arguments = TrainingArguments(**trainer_arguments(cfg, tmp_path, cuda=False))
    assert (arguments.max_steps, arguments.save_steps, arguments.eval_steps) == (24, 8, 8)
    assert arguments.learning_rate == cfg.optim.lr and arguments.use_cpu
    assert arguments.per_device_train_batch_size == cfg.data.batch_size
    assert arguments.save_total_limit == cfg.checkpoint.keep_last_n
    assert arguments.metric_for_best_model == "eval_loss" and not arguments.greater_is_better
    assert arguments.gradient_checkpointing_kwargs == {"use_reentrant": False}
    assert not arguments.bf16 and arguments.report_to == ["tensorboard"]
    on_gpu = trainer_arguments(cfg, tmp_path, cuda=True)
    assert on_gpu["bf16"] and not on_gpu["use_cpu"] and "fp16" not in on_gpu
    environment = reporter_environment(cfg, tmp_path)
    assert environment == {"TENSORBOARD_LOGGING_DIR": str(tmp_path / "tensorboard")}
    cfg = load_config(dev, ["logging.use_wandb=true"], schema=schema)
    assert reporter_environment(cfg, tmp_path)["WANDB_MODE"] == "offline"
    monitor = ["trainer.monitor=val/mean_token_accuracy", "trainer.monitor_mode=max"]
    cfg = load_config(dev, monitor, schema=schema)
    arguments = trainer_arguments(cfg, tmp_path, cuda=False)
    assert arguments["metric_for_best_model"] == "eval_mean_token_accuracy"
    assert arguments["greater_is_better"]
