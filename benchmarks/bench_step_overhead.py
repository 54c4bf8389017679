"""Trainer step overhead against a hand-written PyTorch loop doing the same work.

Three models: the template's MLP ((inputs, targets) batches, default step), the char LM
(dict batches, a padding collate, its own step function and optimizer groups, bf16 on
CUDA), and LoRA SFT (the SFT experiment's dev config: tiny-llama with PEFT adapters on every
linear layer, masked chat batches; the plain side is a hand-written PEFT loop that saves what
a careful PEFT user saves: the adapter's state dict and the optimizer, and save_pretrained).
For each, both sides do what a careful hand-written loop would: DataLoader batches
(same collate), forward, backward, grad clipping, the same optimizer, LR schedule, a tqdm
bar, ``.item()`` of the metrics every ``log_every_n_steps``, a validation pass and a
full-state checkpoint at each epoch end and at the last step, and the final weights, each
fsynced. Periodic checkpoints are off (every_n_steps beyond the run), so what differs is the
trainer's own per-step work.

Ratios per model: the whole run (wall time, fixed costs included), and the steady-state
step (median time between consecutive optimizer steps after the first 10%, fixed costs out).
Runs alternate (plain, trainer, plain, ...). The headline is the median over repeats of
each trainer run's ratio to the plain run just before it: a shared VM drifts between speed
states (22 vs 28 ms per step for the same loop, minutes apart), and neighbours in time share
one. The ratio of the two sides' medians is printed too. On CUDA it also prints steps/s and,
for the char LM, tokens/s.

    python benchmarks/bench_step_overhead.py [--steps 300] [--repeats 5]
        [--models template,char_lm,sft]
Target: ratio <= 1.03.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from src.common.rng import seed_everything
from src.config import DEV_CONFIG, experiment_schema, load_config
from src.data.batches import move_to_device
from src.data.char_text import CharTextDataConfig, build_char_datasets, pad_batch
from src.data.synthetic import make_classification, split
from src.models import build_model
from src.models.char_gpt import CharGPT, CharGPTConfig, lm_step, make_optimizer
from src.models.template import load_template_config
from src.trainers.interruptible_trainer import InterruptibleTrainer, lr_factor


@dataclass
class Case:
    """One model's workload, shared by the plain loop and the trainer."""

    name: str
    make_cfg: Callable[[str, int, str], Any]
    train_set: Dataset
    val_set: Dataset
    build: Callable[[Any], nn.Module]
    collate_fn: Callable | None
    step_fn: Callable[[nn.Module, Any], dict[str, torch.Tensor]] | None  # None: default path
    optimizer_fn: Callable[[nn.Module, Any], torch.optim.Optimizer] | None
    tokens_per_step: int = 0
    # What the plain loop checkpoints of the model, and how it saves the final weights.
    model_state: Callable[[nn.Module], dict] = lambda model: model.state_dict()
    save_final: Callable[[nn.Module, Path], None] | None = None


def template_case(device: str) -> Case:
    def make_cfg(output_dir: str, steps: int, device: str):
        return load_template_config(
            DEV_CONFIG,
            [
                *common_overrides(output_dir, steps, device),
                "data.num_samples=100000",
                "data.batch_size=256",
                "model.hidden_dim=512",
                "model.num_layers=4",
            ],
        )

    cfg = make_cfg("/tmp", 1, device)
    data = make_classification(
        cfg.data.num_samples, cfg.data.num_features, cfg.data.num_classes, cfg.data.noise, 0
    )
    train_set, val_set, _ = split(data, 0.05, 0.05, 0)
    return Case(
        "template MLP 512x4, batch 256",
        make_cfg,
        train_set,
        val_set,
        lambda cfg: build_model(cfg.model, cfg.data.num_features, cfg.data.num_classes),
        None,
        None,
        None,
    )


def char_lm_case(device: str) -> Case:
    config_path = REPO_ROOT / "configs" / "char_lm_dev.yaml"
    schema = experiment_schema(CharGPTConfig, CharTextDataConfig)

    def make_cfg(output_dir: str, steps: int, device: str):
        return load_config(
            config_path,
            [*common_overrides(output_dir, steps, device), "trainer.max_epochs=1000"],
            schema=schema,
        )

    cfg = make_cfg("/tmp", 1, device)
    data = build_char_datasets(cfg.data, cfg.model.block_size, root=REPO_ROOT)
    vocab_size = len(data.vocab)
    return Case(
        f"char LM {cfg.model.n_layer}x{cfg.model.n_embd}, block {cfg.model.block_size}, "
        f"batch {cfg.data.batch_size}",
        make_cfg,
        data.train,
        data.val,
        lambda cfg: CharGPT(CharGPTConfig(**cfg.model), vocab_size=vocab_size),
        pad_batch,
        lm_step,
        lambda model, cfg: make_optimizer(model, optim_cfg=cfg.optim),
        tokens_per_step=cfg.data.batch_size * cfg.model.block_size,
    )


def sft_case(device: str) -> Case:
    from peft import get_peft_model_state_dict

    from src.data.chat import ChatCollator, ChatDataConfig, build_chat_datasets
    from src.models.llm import LlmConfig, build_lora_model, load_tokenizer
    from src.models.llm_steps import make_optimizer as llm_optimizer
    from src.models.llm_steps import sft_step

    config_path = REPO_ROOT / "configs" / "llm_sft_dev.yaml"
    schema = experiment_schema(LlmConfig, ChatDataConfig)

    def make_cfg(output_dir: str, steps: int, device: str):
        return load_config(
            config_path,
            [*common_overrides(output_dir, steps, device), "trainer.max_epochs=1000"],
            schema=schema,
        )

    cfg = make_cfg("/tmp", 1, device)
    model_cfg = LlmConfig.from_section(cfg.model)
    tokenizer = load_tokenizer(model_cfg)
    data = build_chat_datasets(cfg.data, tokenizer, root=REPO_ROOT)
    if model_cfg.is_tiny and not torch.cuda.is_available():
        torch.set_num_threads(1)  # as the experiment does for its 0.2M-parameter model
    return Case(
        f"LoRA SFT on {model_cfg.name_or_path}, r={model_cfg.lora_r}, batch {cfg.data.batch_size}",
        make_cfg,
        data.train,
        data.val,
        lambda cfg: build_lora_model(LlmConfig.from_section(cfg.model)),
        ChatCollator(tokenizer.pad_token_id),
        sft_step,
        lambda model, cfg: llm_optimizer(model, cfg.optim),
        model_state=get_peft_model_state_dict,
        save_final=lambda model, path: model.save_pretrained(str(path)),
    )


def common_overrides(output_dir: str, steps: int, device: str) -> list[str]:
    return [
        f"paths.output_dir={output_dir}",
        "run_name=bench",
        f"trainer.max_steps={steps}",
        f"trainer.device={device}",
        "trainer.progress_bar=true",
        "trainer.early_stopping_patience=0",
        f"checkpoint.every_n_steps={steps * 10}",
        "checkpoint.async_save=false",
        "logging.tensorboard=false",
    ]


def default_step(model: nn.Module, batch: Any) -> dict[str, torch.Tensor]:
    features, targets = batch
    return {"loss": F.cross_entropy(model(features), targets)}


def plain_loop(case: Case, cfg, device: torch.device, output_dir: Path) -> tuple[float, float]:
    seed_everything(cfg.seed)
    model = case.build(cfg).to(device)
    if case.optimizer_fn is None:
        optimizer = torch.optim.AdamW(
            model.parameters(), lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay
        )
    else:
        optimizer = case.optimizer_fn(model, cfg)
    schedule = functools.partial(
        lr_factor,
        warmup_steps=cfg.optim.warmup_steps,
        total_steps=cfg.trainer.max_steps,
        min_ratio=cfg.optim.min_lr_ratio,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    step_fn = case.step_fn or default_step
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16)
        if device.type == "cuda" and cfg.trainer.precision == "bf16"
        else contextlib.nullcontext()
    )
    loader_args = dict(
        batch_size=cfg.data.batch_size,
        collate_fn=case.collate_fn,
        pin_memory=device.type == "cuda",
        num_workers=cfg.data.num_workers,
    )
    # Plain values, as a hand-written loop has them (an omegaconf lookup costs ~25 us).
    max_steps, clip_norm = cfg.trainer.max_steps, cfg.trainer.grad_clip_norm
    log_every = cfg.trainer.log_every_n_steps
    stamps: list[float] = []

    def validate_and_checkpoint() -> None:  # at each epoch end and at the last step
        model.eval()
        with torch.no_grad():
            for batch in DataLoader(case.val_set, **loader_args):
                with autocast:
                    step_fn(model, move_to_device(batch, device))
        model.train()
        state = {
            "model": case.model_state(model),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "rng": torch.get_rng_state(),
        }
        fsynced_save(state, output_dir / "plain_checkpoint.pt")

    started = time.perf_counter()
    step = 0
    model.train()
    bar = tqdm(total=max_steps, unit="step", file=sys.stderr, mininterval=0.2)
    while step < max_steps:
        for batch in DataLoader(case.train_set, shuffle=True, **loader_args):
            batch = move_to_device(batch, device, non_blocking=device.type == "cuda")
            with autocast:
                metrics = step_fn(model, batch)
            metrics["loss"].backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            step += 1
            bar.update(1)
            if step % log_every == 0:
                values = {name: float(value.detach()) for name, value in metrics.items()}
                bar.set_postfix(loss=f"{values['loss']:.4f}", refresh=False)
            stamps.append(time.perf_counter())
            if step >= max_steps:
                break
        validate_and_checkpoint()
    bar.close()
    if case.save_final is not None:
        case.save_final(model, output_dir / "plain_final")
    else:
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


def trainer_loop(case: Case, cfg) -> tuple[float, float]:
    seed_everything(cfg.seed)
    optimizer_fn = None
    if case.optimizer_fn is not None:
        optimizer_fn = functools.partial(case.optimizer_fn, cfg=cfg)
    trainer = InterruptibleTrainer(
        cfg,
        case.build(cfg),
        case.train_set,
        case.val_set,
        collate_fn=case.collate_fn,
        step_fn=case.step_fn,
        optimizer_fn=optimizer_fn,
    )
    stamps: list[float] = []
    optimizer_step = trainer._optimizer_step

    def timed_step() -> None:  # a timestamp per step, as the plain loop takes
        optimizer_step()
        stamps.append(time.perf_counter())

    trainer._optimizer_step = timed_step  # type: ignore[method-assign]
    started = time.perf_counter()
    trainer.fit()
    if trainer.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - started, steady_step(stamps)


def gpu_utilization() -> str:
    try:
        import pynvml

        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(torch.cuda.current_device())
        return f"{pynvml.nvmlDeviceGetUtilizationRates(handle).gpu}%"
    except Exception:  # no NVML: say so rather than guess
        return "n/a"


def measure(case: Case, args: argparse.Namespace, device: torch.device) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        cfg = case.make_cfg(tmp, args.steps, args.device)
        plain_loop(case, cfg, device, Path(tmp))  # warm-up
        plain_runs, trainer_runs = [], []
        for repeat in range(args.repeats):
            plain_runs.append(plain_loop(case, cfg, device, Path(tmp)))
            trainer_runs.append(
                trainer_loop(case, case.make_cfg(f"{tmp}/r{repeat}", args.steps, args.device))
            )
        utilization = gpu_utilization() if device.type == "cuda" else None
    plain = statistics.median(run[0] for run in plain_runs)
    ours = statistics.median(run[0] for run in trainer_runs)
    plain_step = statistics.median(run[1] for run in plain_runs)
    our_step = statistics.median(run[1] for run in trainer_runs)
    print(f"== {case.name}: device {device}, {args.steps} steps, {args.repeats} repeats")
    print(f"plain loop   whole run {plain:.3f} s   steady step {1000 * plain_step:.3f} ms")
    print(f"trainer      whole run {ours:.3f} s   steady step {1000 * our_step:.3f} ms")
    if device.type == "cuda":
        rate = f"trainer {1 / our_step:.1f} steps/s"
        if case.tokens_per_step:
            rate += f", {case.tokens_per_step / our_step:,.0f} tokens/s (padded)"
        print(f"{rate}; GPU utilization at the end: {utilization}")
    # Each trainer run against the plain run just before it: neighbours in time share the
    # machine's speed state, so the median of these pair ratios resists drift best.
    pairs = list(zip(plain_runs, trainer_runs, strict=True))
    pair_run = statistics.median(ours_run[0] / plain_run[0] for plain_run, ours_run in pairs)
    pair_step = statistics.median(ours_run[1] / plain_run[1] for plain_run, ours_run in pairs)
    print(
        f"ratio trainer/plain, median of adjacent pairs: whole run {pair_run:.3f}, steady step "
        f"{pair_step:.3f}  (target <= 1.03); ratio of medians: {ours / plain:.3f}, "
        f"{our_step / plain_step:.3f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--models", default="template,char_lm,sft")
    args = parser.parse_args()
    device = torch.device(
        "cuda"
        if args.device == "auto" and torch.cuda.is_available()
        else ("cpu" if args.device == "auto" else args.device)
    )
    cases = {"template": template_case, "char_lm": char_lm_case, "sft": sft_case}
    for name in args.models.split(","):
        measure(cases[name](args.device), args, device)


if __name__ == "__main__":
    main()
