"""Steps/s of a Hugging Face ``Trainer`` run through ``run_interruptible`` against plain
``trainer.train()`` on the same model, data and arguments.

Both sides save a checkpoint every ``--save-steps`` (the Trainer's own save); the kit's side
adds what it promises: the stop check agreed at each step end, the fsync of each checkpoint
and its completeness record (sizes, sha256), the run lock, cost and GPU logging, retention
by the callback. No S3 (bench_s3_mirror_steps.py measures the mirror).

Runs alternate (plain, kit, plain, ...) in one process, each on a fresh output directory and
a freshly built model; the headline is the median over repeats of each kit run's
``train_steps_per_second`` divided by the plain run's just before it (neighbours in time
share the machine's speed state). Target: ratio >= 0.98.

    python benchmarks/bench_hf_trainer.py [--steps 200] [--save-steps 50] [--repeats 5]
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

import torch
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments
from transformers.utils import logging as hf_logging

from src.data.synthetic import RandomTokens
from src.integrations.hf_trainer import run_interruptible

SEQUENCE, VOCAB, SAMPLES = 64, 256, 512


def build_trainer(output_dir: Path, steps: int, save_steps: int) -> Trainer:
    torch.manual_seed(0)
    cuda = torch.cuda.is_available()
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=256 if cuda else 128,
        intermediate_size=1024 if cuda else 256,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=SEQUENCE,
    )
    args = TrainingArguments(
        output_dir=str(output_dir),
        max_steps=steps,
        save_steps=save_steps,
        save_total_limit=2,
        per_device_train_batch_size=8,
        learning_rate=1e-3,
        logging_steps=10,
        report_to=[],
        dataloader_num_workers=0,
        disable_tqdm=True,
        use_cpu=not cuda,
        bf16=cuda,
        seed=0,
    )
    tokens = RandomTokens(SAMPLES, SEQUENCE, VOCAB)
    return Trainer(model=LlamaForCausalLM(config), args=args, train_dataset=tokens)


def steps_per_second(kit: bool, steps: int, save_steps: int) -> float:
    with tempfile.TemporaryDirectory(prefix="bench-hf-") as tmp:
        trainer = build_trainer(Path(tmp) / "out", steps, save_steps)
        output: Any
        if kit:
            output = run_interruptible(trainer, gpu_stats=True, exit_on_stop=False).train_output
        else:
            output = trainer.train()
        return float(output.metrics["train_steps_per_second"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--save-steps", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        torch.set_num_threads(1)
    hf_logging.set_verbosity_error()
    logging.getLogger("src").setLevel(logging.WARNING)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    print(f"{args.steps} steps, a checkpoint every {args.save_steps}, {args.repeats} repeats")
    print(f"device: {device}")
    steps_per_second(False, 20, 10)  # warm-up: imports, allocator, first kernels
    ratios, plain_runs, kit_runs = [], [], []
    for repeat in range(args.repeats):
        plain = steps_per_second(False, args.steps, args.save_steps)
        kit = steps_per_second(True, args.steps, args.save_steps)
        plain_runs.append(plain)
        kit_runs.append(kit)
        ratios.append(kit / plain)
        print(f"  repeat {repeat + 1}: plain {plain:.2f} steps/s, kit {kit:.2f} steps/s")
    print(
        f"plain trainer.train(): median {statistics.median(plain_runs):.2f} steps/s; "
        f"run_interruptible: median {statistics.median(kit_runs):.2f} steps/s"
    )
    ratio = statistics.median(ratios)
    print(f"ratio (kit / plain, paired): {ratio:.3f} (target >= 0.98)")


if __name__ == "__main__":
    main()
