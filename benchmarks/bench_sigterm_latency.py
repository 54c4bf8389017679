"""SIGTERM to checkpoint durable on disk and process exited, for a ~500 MB training state.

Starts the template experiment with a large MLP (~42M parameters: weights plus two
AdamW moments is about 500 MB), sends SIGTERM mid-training, and times until the
process has exited with EXIT_INTERRUPTED and its checkpoint verifies (sha256).
The latency includes finishing the step in flight: with a small batch that is ~0.1 s
on a CPU, milliseconds on a GPU. Baseline, measured side by side: a bare torch.save
+ fsync of a state of the same size in this process, the floor for any "save on
SIGTERM" design.

    python benchmarks/bench_sigterm_latency.py [--layers 11] [--hidden 2048]
Target: under 3 s (Docker's default stop grace period is 10 s).
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

import torch

from src.common.signals import EXIT_INTERRUPTED
from src.utils.checkpoint_manager import CheckpointManager


def baseline_save_seconds(numel: int, directory: Path) -> float:
    state = {"weights": torch.randn(numel)}
    started = time.perf_counter()
    with open(directory / "baseline.pt", "wb") as handle:
        torch.save(state, handle)
        handle.flush()
        os.fsync(handle.fileno())
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=11)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument(
        "--batch-size",
        type=int,
        default=8,
        help="small, so the step in flight (which must finish first) is short on a CPU",
    )
    parser.add_argument("--warmup-s", type=float, default=3.0, help="train this long first")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        command = [
            sys.executable,
            str(REPO_ROOT / "experiments" / "template_experiment.py"),
            f"paths.output_dir={tmp}",
            "run_name=sigterm",
            "data.num_samples=20000",
            f"model.hidden_dim={args.hidden}",
            f"model.num_layers={args.layers}",
            "checkpoint.every_n_steps=100000",
            "trainer.max_steps=1000000",  # on a GPU the dev config's steps end within the warm-up
            "trainer.max_epochs=1000",
            "trainer.early_stopping_patience=0",
            "trainer.progress_bar=false",
            "logging.tensorboard=false",
        ]
        process = subprocess.Popen(
            command,
            cwd=REPO_ROOT,
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, "DEV_MODE": "True"},
        )
        for line in process.stdout:
            if "starting run" in line:
                break
        time.sleep(args.warmup_s)
        started = time.perf_counter()
        process.send_signal(signal.SIGTERM)
        durable = None
        for line in process.stdout:  # the trainer says so once the checkpoint is on disk
            if "saved checkpoint at step" in line:
                durable = time.perf_counter() - started
        process.wait(timeout=60)
        latency = time.perf_counter() - started
        assert process.returncode == EXIT_INTERRUPTED, f"exit code {process.returncode}"
        manager = CheckpointManager(Path(tmp) / "sigterm" / "checkpoints")
        info = manager.list_checkpoints()[0]
        assert manager.verify(info) is None, "checkpoint does not verify"
        state_mb = info.size / 2**20
        baseline = baseline_save_seconds(info.size // 4, Path(tmp))
    print(f"state {state_mb:.0f} MB (checkpoint at step {info.step})")
    print(f"SIGTERM -> checkpoint durable         {durable:.2f} s")
    print(f"SIGTERM -> durable checkpoint + exit   {latency:.2f} s  (target < 3 s)")
    print(f"baseline torch.save + fsync, same size {baseline:.2f} s")
    print(f"ratio latency/baseline {latency / baseline:.2f}")
    print(f"ratio latency/docker stop grace (10 s) {latency / 10:.2f}")


if __name__ == "__main__":
    main()
