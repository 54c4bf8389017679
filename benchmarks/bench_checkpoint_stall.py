"""Training stall per checkpoint: asynchronous CheckpointManager.save() against a
synchronous torch.save of the same state, plus the extra host memory each costs.

The stall is the time the training loop is blocked. Async: copying the state into
the staging buffer (the write happens in a background thread). Sync: torch.save to
disk. Each mode runs in its own process so peak RSS (ru_maxrss) is measured cleanly,
as growth over the RSS after the state was built. Saves are spaced like training
steps would space them (the previous async write finishes before the next save).

    python benchmarks/bench_checkpoint_stall.py [--state-mb 400] [--saves 5]
Target: stall ratio <= 0.2; async extra memory <= about one copy of the state.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))


def build_state(state_mb: int, device: str) -> dict:
    import torch

    # Model + two AdamW moments, split into layer-sized tensors like a real state dict.
    numel = state_mb * 1024 * 1024 // 4 // 3
    layers = 16
    make = lambda: {f"layer{i}": torch.randn(numel // layers, device=device) for i in range(layers)}  # noqa: E731
    return {"model": make(), "optimizer": {"exp_avg": make(), "exp_avg_sq": make()}, "step": 1}


def worker(mode: str, state_mb: int, saves: int, device: str, out_dir: str) -> dict:
    import torch

    from src.utils.checkpoint_manager import CheckpointManager

    state = build_state(state_mb, device)
    base_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    manager = CheckpointManager(out_dir, keep_last_n=2, async_save=True)
    stalls = []
    for index in range(saves):
        started = time.perf_counter()
        if mode == "async":
            manager.save(state, index)
        else:
            torch.save(state, Path(out_dir) / f"sync_{index % 2}.pt")
        stalls.append(time.perf_counter() - started)
        manager.wait()  # "training" long enough for the write to finish
    peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"stall_s": statistics.median(stalls), "extra_rss_mb": peak_rss_mb - base_rss_mb}


def run_mode(mode: str, args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory() as out_dir:
        command = [
            sys.executable,
            __file__,
            "--worker",
            mode,
            "--state-mb",
            str(args.state_mb),
            "--saves",
            str(args.saves),
            "--device",
            args.device,
            "--out",
            out_dir,
        ]
        output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(output.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--state-mb", type=int, default=400)
    parser.add_argument("--saves", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--worker", choices=["sync", "async"])
    parser.add_argument("--out")
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.state_mb, args.saves, args.device, args.out)))
        return
    sync, async_ = run_mode("sync", args), run_mode("async", args)
    print(f"state {args.state_mb} MB on {args.device}, median of {args.saves} saves")
    for name, result in (("sync torch.save", sync), ("async save()", async_)):
        print(
            f"{name:<16} stall {result['stall_s']:.3f} s   "
            f"extra peak RSS {result['extra_rss_mb']:.0f} MB"
        )
    print(f"stall ratio async/sync {async_['stall_s'] / sync['stall_s']:.3f}  (target <= 0.2)")
    print(
        f"async extra memory / state size {async_['extra_rss_mb'] / args.state_mb:.2f}  "
        f"(target <= ~1.0: one staging copy)"
    )


if __name__ == "__main__":
    main()
