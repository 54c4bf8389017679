"""Training speed with every monitor on (GPU sampler, cost tracking, TensorBoard, W&B offline)
against all of them off, same model, same data, one process.

Steps/s is measured over the steady state (the steps after the first quarter, the evaluation
at the end excluded), from timestamps the step function itself records, so W&B's and
TensorBoard's start-up is out and their per-log-step cost is in. Runs are long (2000 steps,
about 10 s here) because W&B's service process keeps working for a few seconds after
``wandb.init`` returns: on 2 cores it slows the first 2-3 s of training by 20-30%, which
a 400-step run would count as per-step cost. Runs alternate (off, on,
off, ...); the headline is the median over repeats of each "on" run's speed divided by the
"off" run just before it, because a shared VM drifts between speed states.

On a machine without NVML (no NVIDIA driver), the sampler reads the stand-in NVML module of
the tests (tests/support/fake_nvml) and the trainer is pointed at its "GPU 0": the thread,
its locking and the per-log-step reads are real, the driver calls are not. On a GPU box the
real NVML is used and the model trains on the GPU.

    python benchmarks/bench_monitoring_overhead.py [--steps 2000] [--repeats 5]
Target: ratio >= 0.98.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

import torch

import src.trainers.progress as progress_module
from benchmarks.timed_template import timed_template_fit
from src.utils.gpu_monitor import NvmlUnavailable, read_gpu_stats

FAKE_NVML = REPO_ROOT / "tests" / "support" / "fake_nvml"


def use_stand_in_nvml(work: Path) -> None:
    state = work / "nvml.json"
    gpu = {"name": "stand-in GPU", "uuid": "GPU-0", "total": 80e9, "used": 10e9, "util": 90}
    state.write_text(json.dumps({"gpus": [{**gpu, "temp": 50, "power_mw": 300_000}]}))
    os.environ["FAKE_NVML_STATE"] = str(state)
    sys.path.insert(0, str(FAKE_NVML))
    sys.modules.pop("pynvml", None)
    progress_module.cuda_index = lambda device: 0  # the sampler's GPU: the stand-in's GPU 0


def steady_steps_per_second(
    output_dir: Path,
    steps: int,
    monitors: bool,
    device: str,
    log_every: int = 5,
    wandb: bool = True,
) -> float:
    overrides = [
        f"paths.output_dir={output_dir}",
        f"run_name={'on' if monitors else 'off'}-{time.monotonic_ns()}",
        f"trainer.device={device}",
        f"trainer.max_steps={steps}",
        "trainer.max_epochs=1",
        "trainer.progress_bar=false",
        "trainer.early_stopping_patience=0",
        f"trainer.log_every_n_steps={log_every}",
        f"checkpoint.every_n_steps={steps * 10}",  # no periodic checkpoints on either side
        f"data.num_samples={steps * 256 * 102 // 100}",  # one epoch holds every step
        "data.batch_size=256",
        "model.hidden_dim=256",
        f"logging.tensorboard={monitors}",
        f"logging.use_wandb={monitors and wandb}",
        "logging.wandb_mode=offline",
        f"logging.gpu_stats={monitors}",
        f"cost.hourly_rate_usd={2.5 if monitors else 'null'}",
    ]
    return timed_template_fit(overrides, skip_fraction=0.25)[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--log-every", type=int, default=5, help="trainer.log_every_n_steps")
    parser.add_argument("--no-wandb", action="store_true", help="leave W&B out of the 'on' side")
    args = parser.parse_args()
    os.environ.setdefault("WANDB_SILENT", "true")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        try:
            read_gpu_stats()
            nvml = "real NVML"
        except NvmlUnavailable:
            use_stand_in_nvml(work)
            nvml = "stand-in NVML (no driver here)"
        print(
            f"device {device}, {nvml}, {args.steps} steps x {args.repeats} repeats, "
            f"logging every {args.log_every} steps" + (", W&B off" if args.no_wandb else "")
        )
        ratios, off_speeds, on_speeds = [], [], []
        for repeat in range(args.repeats):
            off = steady_steps_per_second(work, args.steps, False, device, args.log_every)
            on = steady_steps_per_second(
                work, args.steps, True, device, args.log_every, wandb=not args.no_wandb
            )
            off_speeds.append(off)
            on_speeds.append(on)
            ratios.append(on / off)
            print(
                f"  repeat {repeat + 1}: off {off:7.1f} step/s  on {on:7.1f} step/s  {on / off:.3f}"
            )
    print(
        f"monitors on / off, steps per second: median ratio {statistics.median(ratios):.3f} "
        f"(ratio of medians {statistics.median(on_speeds) / statistics.median(off_speeds):.3f}); "
        "target >= 0.98"
    )


if __name__ == "__main__":
    main()
