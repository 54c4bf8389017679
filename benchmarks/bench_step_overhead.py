"""Trainer step overhead against a hand-written PyTorch loop (same model, data, batch).

Both sides do the same work, as a careful hand-written loop would: DataLoader batches,
forward, backward, grad clipping, AdamW, LR schedule, a tqdm bar, ``loss.item()`` every
``log_every_n_steps``, one validation pass, and at the end a full-state checkpoint plus the
final weights, each fsynced. Periodic checkpoints are off (every_n_steps beyond the run),
so what differs is the trainer's own per-step work: the stop-flag check, its counters and
the device-side loss sum.

Two ratios: the whole run (wall time, fixed costs included), and the steady-state step
(median time between consecutive optimizer steps after the first 10%, fixed costs out).
Runs alternate (plain, trainer, plain, ...) and medians are compared.

    python benchmarks/bench_step_overhead.py [--steps 300] [--repeats 5]
Target: ratio <= 1.03.
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm import tqdm

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


def plain_loop(cfg, train_set, val_set, device: torch.device, output_dir: Path):
    seed_everything(cfg.seed)
    model = build_model(cfg.model, cfg.data.num_features, cfg.data.num_classes).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr)
    schedule = functools.partial(
        lr_factor, warmup_steps=10, total_steps=cfg.trainer.max_steps, min_ratio=0.1
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    loader = DataLoader(
        train_set, batch_size=cfg.data.batch_size, shuffle=True, pin_memory=device.type == "cuda"
    )
    stamps: list[float] = []
    started = time.perf_counter()
    step = 0
    model.train()
    bar = tqdm(total=cfg.trainer.max_steps, unit="step", file=sys.stderr, mininterval=0.2)
    for features, targets in loader:
        features = features.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        loss = F.cross_entropy(model(features), targets)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        step += 1
        bar.update(1)
        if step % cfg.trainer.log_every_n_steps == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
        stamps.append(time.perf_counter())
        if step >= cfg.trainer.max_steps:
            break
    bar.close()
    model.eval()
    with torch.no_grad():
        for features, targets in DataLoader(val_set, batch_size=cfg.data.batch_size):
            F.cross_entropy(model(features.to(device)), targets.to(device))
    state = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng": torch.get_rng_state(),
    }
    fsynced_save(state, output_dir / "plain_checkpoint.pt")
    fsynced_save(model.state_dict(), output_dir / "plain_final.pt")
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - started, steady_step(stamps)


def fsynced_save(obj, path: Path) -> None:
    with open(path, "wb") as handle:
        torch.save(obj, handle)
        handle.flush()
        os.fsync(handle.fileno())


def steady_step(stamps: list[float]) -> float:
    """Median seconds between consecutive steps, skipping the first 10% (warm-up)."""
    gaps = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
    return statistics.median(gaps[len(gaps) // 10 :])


def trainer_loop(cfg, train_set, val_set):
    seed_everything(cfg.seed)
    model = build_model(cfg.model, cfg.data.num_features, cfg.data.num_classes)
    trainer = InterruptibleTrainer(cfg, model, train_set, val_set)
    stamps: list[float] = []
    optimizer_step = trainer._optimizer_step

    def timed_step() -> None:  # a timestamp per step, as the plain loop takes
        optimizer_step()
        stamps.append(time.perf_counter())

    trainer._optimizer_step = timed_step
    started = time.perf_counter()
    trainer.fit()
    if trainer.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - started, steady_step(stamps)


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
        plain_runs, trainer_runs = [], []
        for repeat in range(args.repeats):
            plain_runs.append(plain_loop(cfg, train_set, val_set, device, Path(tmp)))
            run_cfg = config(f"{tmp}/r{repeat}", args.steps, args.device)
            trainer_runs.append(trainer_loop(run_cfg, train_set, val_set))
    plain = statistics.median(run[0] for run in plain_runs)
    ours = statistics.median(run[0] for run in trainer_runs)
    plain_step = statistics.median(run[1] for run in plain_runs)
    our_step = statistics.median(run[1] for run in trainer_runs)
    print(f"device {device}, {args.steps} steps, batch 256, MLP 512x4, {args.repeats} repeats")
    print(f"plain loop   whole run {plain:.3f} s   steady step {1000 * plain_step:.3f} ms")
    print(f"trainer      whole run {ours:.3f} s   steady step {1000 * our_step:.3f} ms")
    print(
        f"ratio trainer/plain: whole run {ours / plain:.3f}, steady step "
        f"{our_step / plain_step:.3f}  (target <= 1.03)"
    )


if __name__ == "__main__":
    main()
