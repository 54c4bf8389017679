"""Trainer step overhead against a hand-written PyTorch loop (same model, data, batch).

Both sides do the same work: DataLoader batches, forward, backward, grad clipping,
AdamW, LR schedule, one validation pass and one save at the end. The trainer also
checks the stop flag every step and keeps its counters; checkpoints are off
(every_n_steps beyond the run) so this measures the loop itself.
Runs alternate (plain, trainer, plain, ...) and the medians are compared.

    python benchmarks/bench_step_overhead.py [--steps 300] [--repeats 5]
Target: ratio <= 1.03.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from src.config import DEV_CONFIG, load_config
from src.data.synthetic import make_classification, split
from src.models import build_model
from src.trainers.interruptible_trainer import InterruptibleTrainer, lr_factor
from src.utils.rng import seed_everything


def config(output_dir: str, steps: int, device: str):
    return load_config(
        DEV_CONFIG,
        [
            f"paths.output_dir={output_dir}",
            "run_name=bench",
            "data.num_samples=100000",
            "data.batch_size=256",
            "model.hidden_dim=512",
            "model.num_layers=4",
            f"trainer.max_steps={steps}",
            f"trainer.device={device}",
            "trainer.progress_bar=true",
            f"checkpoint.every_n_steps={steps * 10}",
            "checkpoint.async_save=false",
            "logging.tensorboard=false",
        ],
    )


def plain_loop(cfg, train_set, val_set, device: torch.device, output_dir: Path) -> float:
    seed_everything(cfg.seed)
    model = build_model(cfg.model, cfg.data.num_features, cfg.data.num_classes).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr)
    schedule = functools.partial(
        lr_factor, warmup_steps=10, total_steps=cfg.trainer.max_steps, min_ratio=0.1
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    loader = DataLoader(train_set, batch_size=cfg.data.batch_size, shuffle=True)
    started = time.perf_counter()
    step = 0
    model.train()
    for features, targets in loader:
        features, targets = features.to(device), targets.to(device)
        loss = F.cross_entropy(model(features), targets)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        step += 1
        if step >= cfg.trainer.max_steps:
            break
    model.eval()
    with torch.no_grad():
        for features, targets in DataLoader(val_set, batch_size=cfg.data.batch_size):
            F.cross_entropy(model(features.to(device)), targets.to(device))
    torch.save(model.state_dict(), output_dir / "plain_final.pt")
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - started


def trainer_loop(cfg, train_set, val_set) -> float:
    seed_everything(cfg.seed)
    model = build_model(cfg.model, cfg.data.num_features, cfg.data.num_classes)
    trainer = InterruptibleTrainer(cfg, model, train_set, val_set)
    started = time.perf_counter()
    trainer.fit()
    if trainer.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        cfg = config(tmp, args.steps, args.device)
        data = make_classification(
            cfg.data.num_samples, cfg.data.num_features, cfg.data.num_classes, cfg.data.noise, 0
        )
        train_set, val_set, _ = split(data, 0.05, 0.05, 0)
        device = torch.device(
            "cuda"
            if args.device == "auto" and torch.cuda.is_available()
            else ("cpu" if args.device == "auto" else args.device)
        )
        plain_loop(cfg, train_set, val_set, device, Path(tmp))  # warm-up
        plain_times, trainer_times = [], []
        for repeat in range(args.repeats):
            plain_times.append(plain_loop(cfg, train_set, val_set, device, Path(tmp)))
            run_cfg = config(f"{tmp}/r{repeat}", args.steps, args.device)
            trainer_times.append(trainer_loop(run_cfg, train_set, val_set))
    plain, ours = statistics.median(plain_times), statistics.median(trainer_times)
    print(f"device {device}, {args.steps} steps, batch 256, MLP 512x4, {args.repeats} repeats")
    print(f"plain loop median   {plain:.3f} s  ({1000 * plain / args.steps:.2f} ms/step)")
    print(f"trainer median      {ours:.3f} s  ({1000 * ours / args.steps:.2f} ms/step)")
    print(f"ratio trainer/plain {ours / plain:.3f}  (target <= 1.03)")


if __name__ == "__main__":
    main()
