"""DDP overhead: two gloo ranks under torchrun against one rank, same global batch, same data.

Three set-ups, each a real process running the InterruptibleTrainer on the template MLP:

- ``1 rank x N threads``: plain ``python``, no process group, batch G, every core its own.
- ``1 rank x 1 thread``: the same on one core (what each DDP rank gets).
- ``2 ranks x 1 thread``: ``torchrun --nproc_per_node=2`` (gloo on CPU, NCCL on CUDA),
  batch G/2 per rank, torchrun's default of one thread per rank.
- ``2 ranks x 1 thread fsdp``: the same with ``trainer.strategy=fsdp`` (FSDP2: parameters,
  gradients and optimizer state sharded; sharded asynchronous checkpoints). On GPUs its
  row also gives the peak memory per GPU against ddp's.

Steps/s is measured on rank 0 over the steady state (the optimizer steps after the first
10%, from timestamps the step function records), so process start-up, the process group,
the first evaluation and the final one are out. Runs alternate in rounds; the headline is
the median over rounds of each DDP run's speed divided by the one-rank run of its round (a
shared VM drifts between speed states, and neighbours in time share one). The ratio of
medians is printed too. On a machine with several GPUs the ranks train on their own GPUs
and the one-rank side on GPU 0, which is the scaling figure owed to such a machine.

    python benchmarks/bench_ddp.py [--steps 300] [--repeats 3] [--global-batch 256]
Ideal: 2.0x against one thread per rank; against all cores on one rank, >= 1.0x means DDP
costs less than the intra-op threads it replaces.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

import torch

WORKER_TIMEOUT_S = 600


@dataclass(frozen=True)
class Setup:
    label: str
    ranks: int
    threads: int
    strategy: str = "ddp"


def run_worker(args: argparse.Namespace) -> None:
    """One training run (under torchrun: one rank of it); rank 0 writes its steps/s."""
    from benchmarks.timed_template import timed_template_fit

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    per_device = args.global_batch // world_size
    overrides = [
        f"paths.output_dir={args.output_dir}",
        f"run_name={args.run_name}",
        f"trainer.device={args.device}",
        f"trainer.max_steps={args.steps}",
        "trainer.max_epochs=1",
        "trainer.progress_bar=false",
        "trainer.early_stopping_patience=0",
        f"checkpoint.every_n_steps={args.steps * 10}",  # no periodic checkpoints on any side
        f"data.num_samples={args.steps * args.global_batch * 2}",  # one epoch holds every step
        f"data.batch_size={per_device}",
        "model.hidden_dim=512",
        "model.num_layers=4",
        "logging.tensorboard=false",
        "logging.gpu_stats=false",
        f"trainer.strategy={args.strategy}",
    ]
    trainer, speed = timed_template_fit(overrides, skip_fraction=0.1)
    if trainer.dist.is_main:
        result = {"steps_per_s": speed, "steps": trainer.state.global_step}
        if torch.cuda.is_available() and args.device == "cuda":
            result["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
        Path(args.result).write_text(json.dumps(result))


def measure(setup: Setup, work: Path, args: argparse.Namespace, run_index: int) -> float:
    """Steps/s of one set-up, as its own process (torchrun for more than one rank)."""
    result = work / f"result-{run_index}.json"
    worker_args = [
        str(Path(__file__).resolve()),
        "--worker",
        f"--output-dir={work}",
        f"--run-name=run-{run_index}",
        f"--result={result}",
        f"--device={args.device}",
        f"--steps={args.steps}",
        f"--global-batch={args.global_batch}",
        f"--strategy={setup.strategy}",
    ]
    launcher = [sys.executable]
    if setup.ranks > 1:
        launcher += ["-m", "torch.distributed.run", f"--nproc_per_node={setup.ranks}"]
        launcher += ["--standalone"]
    env = {**os.environ, "OMP_NUM_THREADS": str(setup.threads), "PYTHONUNBUFFERED": "1"}
    completed = subprocess.run(
        [*launcher, *worker_args],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=WORKER_TIMEOUT_S,
    )
    if completed.returncode != 0:
        raise SystemExit(f"{setup.label} failed:\n{completed.stdout}\n{completed.stderr}")
    measured = json.loads(result.read_text())
    if "peak_gpu_mb" in measured:
        print(f"    {setup.label}: peak GPU memory {measured['peak_gpu_mb']:.0f} MB on rank 0")
    return measured["steps_per_s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--global-batch", type=int, default=256)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--output-dir", help=argparse.SUPPRESS)
    parser.add_argument("--run-name", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--strategy", default="ddp", help=argparse.SUPPRESS)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    if args.worker:
        run_worker(args)
        return

    if args.device == "cuda" and torch.cuda.device_count() < 2:
        # Two ranks on one GPU measure contention, not DDP.
        print(f"{torch.cuda.device_count()} GPU here: DDP needs 2; measuring on the CPU")
        args.device = "cpu"
    cores = os.cpu_count() or 1
    ranks = 2
    all_cores = Setup(f"1 rank x {cores} threads", 1, cores)
    one_core = Setup("1 rank x 1 thread", 1, 1)
    ddp = Setup(f"{ranks} ranks x 1 thread", ranks, 1)
    fsdp = Setup(f"{ranks} ranks x 1 thread fsdp", ranks, 1, "fsdp")
    setups = [all_cores, one_core, ddp, fsdp] if args.device == "cpu" else [one_core, ddp, fsdp]
    backend = "gloo" if args.device == "cpu" else "nccl"
    print(
        f"device {args.device} ({backend}), {cores} CPU cores, global batch {args.global_batch}"
        f" (DDP: {args.global_batch // ranks} per rank), template MLP 512x4, "
        f"{args.steps} steps x {args.repeats} rounds"
    )
    speeds: dict[str, list[float]] = {setup.label: [] for setup in setups}
    ratios: dict[str, list[float]] = {
        setup.label: [] for setup in setups if setup not in (ddp, fsdp)
    }
    fsdp_over_ddp: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        run_index = 0
        for round_index in range(args.repeats):
            this_round = {}
            for setup in setups:
                this_round[setup.label] = measure(setup, Path(tmp), args, run_index)
                speeds[setup.label].append(this_round[setup.label])
                run_index += 1
            for label in ratios:
                ratios[label].append(this_round[ddp.label] / this_round[label])
            fsdp_over_ddp.append(this_round[fsdp.label] / this_round[ddp.label])
            print(
                f"  round {round_index + 1}: "
                + "  ".join(f"{label} {speed:6.1f} step/s" for label, speed in this_round.items())
            )
    for label, values in ratios.items():
        medians = statistics.median(speeds[ddp.label]) / statistics.median(speeds[label])
        print(
            f"{ddp.label} / {label}, steps per second: median ratio "
            f"{statistics.median(values):.2f}x (ratio of medians {medians:.2f}x)"
        )
    print(
        f"{fsdp.label} / {ddp.label}, steps per second: median ratio "
        f"{statistics.median(fsdp_over_ddp):.2f}x"
    )


if __name__ == "__main__":
    main()
