"""Template experiment throughput with the S3 checkpoint mirror on against off.

Each run is the real script (``experiments/template_experiment.py``) in its own process,
checkpointing every ``--every`` steps; with the mirror on, every checkpoint and the run
directory go to moto's S3 server on loopback in the background. Steps/s is global_step /
train_seconds (from test_results.json: training time only, start-up excluded). On and off
alternate, ``--pairs`` times; the ratio is the median of the paired ratios (on / off).

    python benchmarks/bench_s3_mirror_steps.py [--pairs 3] [--every 100]
Target: >= 0.97.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
BUCKET = "bench-bucket"
WORKLOAD = [
    "data.num_samples=16384",
    "model.hidden_dim=256",
    "trainer.max_epochs=2",
    "trainer.progress_bar=false",
    "trainer.early_stopping_patience=0",
]


def steps_per_second(output_dir: Path, name: str, every: int, s3: list[str]) -> float:
    env = {**os.environ, "DEV_MODE": "True", "WANDB_MODE": "disabled"}
    args = [
        f"paths.output_dir={output_dir}",
        f"run_name={name}",
        f"checkpoint.every_n_steps={every}",
    ]
    command = [sys.executable, "experiments/template_experiment.py", *WORKLOAD, *args, *s3]
    subprocess.run(command, cwd=REPO_ROOT, env=env, check=True, capture_output=True)
    results = json.loads((output_dir / name / "test_results.json").read_text())
    return results["global_step"] / results["train_seconds"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--every", type=int, default=100, help="checkpoint.every_n_steps")
    args = parser.parse_args()

    from benchmarks.s3_server import moto_bucket

    ratios = []
    with moto_bucket(BUCKET) as (endpoint, _):
        s3 = [f"checkpoint.s3_bucket={BUCKET}", f"checkpoint.endpoint_url={endpoint}"]
        with tempfile.TemporaryDirectory() as tmp:
            for pair in range(args.pairs):
                off = steps_per_second(Path(tmp), f"off{pair}", args.every, [])
                on = steps_per_second(Path(tmp), f"on{pair}", args.every, s3)
                ratios.append(on / off)
                print(f"  pair {pair}: off {off:.0f} steps/s, on {on:.0f} steps/s ({on / off:.3f})")
    print(f"S3 mirror on / off: {statistics.median(ratios):.3f} steps/s (target >= 0.97)")


if __name__ == "__main__":
    main()
