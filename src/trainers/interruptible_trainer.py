"""A training loop that can be killed at any moment and resumed bit for bit.

One path, top to bottom (``fit``): resume if the run has a checkpoint, then for each
epoch train step by step, checkpoint every ``checkpoint.every_n_steps`` and at the
epoch end, evaluate, track the best model, stop early if asked.

Interruptions: SIGTERM, SIGINT and ``trainer.extra_stop_signal`` only set a flag.
At the next step boundary the trainer saves a checkpoint, waits until it is on
disk, and ``fit`` returns with ``interrupted=True``; scripts then exit with
``EXIT_INTERRUPTED`` (75). Running the same command again resumes.

Exact resume: the checkpoint holds model, optimizer, LR scheduler, grad scaler,
all RNG states, the position inside the epoch (the sampler order is a function of
seed and epoch), early-stopping state and counters. On CPU an interrupted and
resumed run ends with the same weights, bit for bit, as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import functools
import math
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from src.config import resume_settings
from src.data.resumable_sampler import ResumableSampler
from src.utils.checkpoint_manager import CheckpointManager, atomic_torch_save
from src.utils.distributed import (
    DistInfo,
    any_rank,
    barrier,
    gather_objects,
    init_distributed,
    sum_over_ranks,
)
from src.utils.metric_logger import MetricLogger
from src.utils.rng import capture_rng_state, restore_rng_state, seed_everything
from src.utils.run_io import prepare_run_dir, write_json
from src.utils.signals import EXIT_INTERRUPTED, StopRequest, ignore_stop_signals, parse_signals
from src.vast.pricing import detect_hourly_rate

__all__ = ["EXIT_INTERRUPTED", "FitResult", "InterruptibleTrainer", "select_device"]

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class TrainState:
    """Counters and early-stopping state; saved in every checkpoint."""

    epoch: int = 0  # epochs fully completed
    global_step: int = 0  # optimizer steps taken
    batch_in_epoch: int = 0  # micro-batches of the current epoch already consumed
    best_val_loss: float = math.inf
    best_epoch: int = -1
    epochs_without_improvement: int = 0
    finished: bool = False
    train_seconds: float = 0.0
    history: list[dict[str, float]] = field(default_factory=list)


@dataclass
class FitResult:
    status: str  # "completed" | "early_stopped" | "interrupted"
    global_step: int
    epoch: int
    best_val_loss: float
    run_dir: Path
    signal_name: str | None = None

    @property
    def interrupted(self) -> bool:
        return self.status == "interrupted"


def select_device(requested: str) -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


def lr_factor(step: int, warmup_steps: int, total_steps: int, min_ratio: float) -> float:
    """Linear warmup then cosine decay: a pure function of the step (nothing to resume)."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class InterruptibleTrainer:
    """Trains ``model`` on ``train_set`` with the settings in ``cfg`` (see configs/)."""

    def __init__(
        self,
        cfg: DictConfig,
        model: nn.Module,
        train_set: Dataset,
        val_set: Dataset,
        loss_fn: LossFn = F.cross_entropy,
    ) -> None:
        self.cfg = cfg
        self.device = select_device(cfg.trainer.device)
        self.dist: DistInfo = init_distributed(self.device.type)
        if self.dist.is_distributed and self.device.type == "cuda":
            self.device = torch.device("cuda", self.dist.local_rank)
        self.run_dir = prepare_run_dir(cfg, is_main=self.dist.is_main)
        self.train_set, self.val_set, self.loss_fn = train_set, val_set, loss_fn
        self.model = model.to(self.device)
        self.train_model: nn.Module = self.model
        if self.dist.is_distributed:
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            self.train_model = nn.parallel.DistributedDataParallel(self.model, device_ids)

        self.precision = self._effective_precision(cfg.trainer.precision)
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(), lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay
        )
        self.sampler = ResumableSampler(
            len(train_set), cfg.seed, True, self.dist.rank, self.dist.world_size
        )
        self.batches_per_epoch = math.ceil(len(self.sampler) / cfg.data.batch_size)
        self.steps_per_epoch = math.ceil(self.batches_per_epoch / cfg.trainer.grad_accum_steps)
        self.total_steps = cfg.trainer.max_epochs * self.steps_per_epoch
        if cfg.trainer.max_steps > 0:
            self.total_steps = min(self.total_steps, cfg.trainer.max_steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            functools.partial(
                lr_factor,
                warmup_steps=cfg.optim.warmup_steps,
                total_steps=self.total_steps,
                min_ratio=cfg.optim.min_lr_ratio,
            ),
        )
        self.scaler = torch.amp.GradScaler(
            self.device.type, enabled=self.precision == "fp16" and self.device.type == "cuda"
        )
        self.checkpoints = CheckpointManager(
            self.run_dir / "checkpoints",
            keep_last_n=cfg.checkpoint.keep_last_n,
            async_save=cfg.checkpoint.async_save,
            is_writer=self.dist.is_main,
        )
        self.state = TrainState()
        self._resume_settings = resume_settings(cfg)
        self._last_tick = time.perf_counter()
        # Running sums for the epoch's mean train loss, kept on the device (no sync per step).
        self._epoch_loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        self._epoch_samples = 0
        stop_names = ["SIGTERM", "SIGINT", cfg.trainer.extra_stop_signal]
        self._stop_signal_names = [name for name in stop_names if name]
        self.stop_request = StopRequest(parse_signals(self._stop_signal_names))
        # $/h for the cost shown in epoch lines: config value, else the Vast.ai instance's price.
        self.hourly_rate_usd = (
            detect_hourly_rate(cfg.cost.hourly_rate_usd) if self.dist.is_main else None
        )

    # ----- the loop ---------------------------------------------------------------------

    def fit(self) -> FitResult:
        """Train to the end (or until a stop signal); safe to call again to resume."""
        with self.stop_request:
            resumed_step = self._resume()
            self._last_tick = time.perf_counter()
            logger = MetricLogger(self.cfg, self.run_dir, resumed_step, self.dist.is_main)
            bar = self._progress_bar()
            try:
                status = self._run_epochs(logger, bar)
            finally:
                bar.close()
                logger.close()
                self.checkpoints.wait()  # pending writes are durable before we return
        if status != "interrupted" and self.dist.is_main:
            atomic_torch_save(self.model.state_dict(), self.run_dir / "final_model.pt")
            write_json(self.run_dir / "training_log.json", self.state.history)
        barrier(self.dist)  # other ranks read best_model.pt only once rank 0 has written it
        return FitResult(
            status=status,
            global_step=self.state.global_step,
            epoch=self.state.epoch,
            best_val_loss=self.state.best_val_loss,
            run_dir=self.run_dir,
            signal_name=self.stop_request.signal_name,
        )

    def _run_epochs(self, logger: MetricLogger, bar: tqdm) -> str:
        cfg, state = self.cfg, self.state
        while not state.finished and state.epoch < cfg.trainer.max_epochs:
            outcome = self._train_epoch(logger, bar)
            if outcome == "interrupted":
                return "interrupted"
            improved, early_stop = self._end_epoch(logger)
            state.finished = early_stop or state.global_step >= self.total_steps
            self._save_checkpoint(is_best=improved)
            if early_stop:
                waited = state.epochs_without_improvement
                self._print(f"early stopping: no val improvement for {waited} epochs")
                return "early_stopped"
            if self._stop_requested():
                self.checkpoints.wait()
                return "interrupted"
        state.finished = True
        return "completed"

    def _train_epoch(self, logger: MetricLogger, bar: tqdm) -> str:
        cfg, state = self.cfg, self.state
        accum = cfg.trainer.grad_accum_steps
        self.sampler.set_epoch(state.epoch, start_index=state.batch_in_epoch * cfg.data.batch_size)
        loader = self._loader(self.train_set, self.sampler)
        self.train_model.train()
        for features, targets in loader:
            group_start = (state.batch_in_epoch // accum) * accum
            group_size = min(accum, self.batches_per_epoch - group_start)
            is_last_micro = state.batch_in_epoch + 1 == group_start + group_size
            features = features.to(self.device, non_blocking=True)
            targets = targets.to(self.device, non_blocking=True)
            sync = contextlib.nullcontext()
            if self.dist.is_distributed and not is_last_micro:
                sync = self.train_model.no_sync()  # type: ignore[operator]
            with sync, self._autocast():
                loss = self.loss_fn(self.train_model(features), targets)
                self.scaler.scale(loss / group_size).backward()
            state.batch_in_epoch += 1
            self._epoch_loss_sum += loss.detach().double() * targets.shape[0]
            self._epoch_samples += targets.shape[0]
            if not is_last_micro:
                continue
            self._optimizer_step()
            bar.update(1)
            if state.global_step % cfg.trainer.log_every_n_steps == 0:
                self._log_step(logger, bar, loss)
            if state.global_step >= self.total_steps:
                return "max_steps"
            stop = self._stop_requested()
            at_epoch_end = state.batch_in_epoch >= self.batches_per_epoch
            periodic = state.global_step % cfg.checkpoint.every_n_steps == 0 and not at_epoch_end
            if stop or periodic:
                # On stop: no staging copy, and durable before we say so.
                self._save_checkpoint(blocking=stop)
            if stop:
                self._print(f"saved checkpoint at step {state.global_step}; re-run to resume")
                return "interrupted"
        return "epoch_done"

    def _optimizer_step(self) -> None:
        if self.cfg.trainer.grad_clip_norm > 0:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.trainer.grad_clip_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.state.global_step += 1

    def _end_epoch(self, logger: MetricLogger) -> tuple[bool, bool]:
        """Validate, update best/early-stopping state and the history; reset epoch counters."""
        cfg, state = self.cfg, self.state
        self._tick()
        val = self.evaluate(self.val_set)
        loss_sum, samples = sum_over_ranks(
            torch.stack(
                [self._epoch_loss_sum, self._epoch_loss_sum.new_tensor(self._epoch_samples)]
            ),
            self.dist,
        )
        train_loss = (loss_sum / max(1.0, samples.item())).item()
        improved = val["loss"] < state.best_val_loss - cfg.trainer.early_stopping_min_delta
        if improved:
            state.best_val_loss, state.best_epoch = val["loss"], state.epoch
            state.epochs_without_improvement = 0
        else:
            state.epochs_without_improvement += 1
        patience = cfg.trainer.early_stopping_patience
        early_stop = patience > 0 and state.epochs_without_improvement >= patience
        record = {
            "epoch": state.epoch,
            "step": state.global_step,
            "train_loss": train_loss,
            "val_loss": val["loss"],
            "val_accuracy": val["accuracy"],
            "lr": self.scheduler.get_last_lr()[0],
            "elapsed_s": round(state.train_seconds, 3),
        }
        state.history.append(record)
        logger.log({"val/loss": val["loss"], "val/accuracy": val["accuracy"]}, state.global_step)
        self._print_epoch_summary(record)
        state.epoch += 1
        state.batch_in_epoch = 0
        self._epoch_loss_sum.zero_()
        self._epoch_samples = 0
        return improved, early_stop

    @torch.no_grad()
    def evaluate(self, dataset: Dataset) -> dict[str, float]:
        """Mean loss and accuracy over ``dataset`` (the full set, on every rank)."""
        self.model.eval()
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        correct = torch.zeros((), dtype=torch.int64, device=self.device)
        sampler = ResumableSampler(len(dataset), seed=0, shuffle=False)
        for features, targets in self._loader(dataset, sampler):
            features, targets = features.to(self.device), targets.to(self.device)
            with self._autocast():
                logits = self.model(features)
            loss_sum += self.loss_fn(logits.float(), targets).double() * targets.shape[0]
            correct += (logits.argmax(dim=-1) == targets).sum()
        self.model.train()
        count = max(1, len(dataset))  # type: ignore[arg-type]
        return {"loss": (loss_sum / count).item(), "accuracy": correct.item() / count}

    def test(self, test_set: Dataset, use_best: bool = True) -> dict[str, Any]:
        """Evaluate on the test set (with the best weights) and write test_results.json."""
        weights = "final"
        best_path = self.run_dir / "best_model.pt"
        if use_best and best_path.is_file():
            final_state = {k: v.clone() for k, v in self.model.state_dict().items()}
            self.model.load_state_dict(torch.load(best_path, map_location=self.device))
            weights = "best"
        metrics = self.evaluate(test_set)
        if weights == "best":
            self.model.load_state_dict(final_state)
        results = {
            "test_loss": metrics["loss"],
            "test_accuracy": metrics["accuracy"],
            "weights": weights,
            "best_val_loss": self.state.best_val_loss,
            "best_epoch": self.state.best_epoch,
            "global_step": self.state.global_step,
            "epochs": self.state.epoch,
            "train_seconds": round(self.state.train_seconds, 3),
        }
        if self.dist.is_main:
            write_json(self.run_dir / "test_results.json", results)
        return results

    # ----- checkpoints ------------------------------------------------------------------

    def _tick(self) -> None:
        """Add the wall time since the last tick to ``train_seconds`` (kept across resumes)."""
        now = time.perf_counter()
        self.state.train_seconds += now - self._last_tick
        self._last_tick = now

    def _checkpoint_state(self) -> dict[str, Any]:
        self._tick()
        rng_states = gather_objects(capture_rng_state(), self.dist)  # one per rank
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": rng_states,
            "trainer": asdict(self.state),
            "epoch_loss_sum": self._epoch_loss_sum,
            "epoch_samples": self._epoch_samples,
        }

    def _save_checkpoint(self, is_best: bool = False, blocking: bool = False) -> None:
        state = self._checkpoint_state()
        self.checkpoints.save(
            state,
            self.state.global_step,
            blocking=blocking,
            is_best=is_best,
            metadata={
                "epoch": self.state.epoch,
                "batch_in_epoch": self.state.batch_in_epoch,
                "resume_settings": self._resume_settings,  # checked before a re-run resumes
            },
            best_model_path=self.run_dir / "best_model.pt" if is_best else None,
        )

    def _resume(self) -> int:
        loaded = self.checkpoints.load_latest(map_location=self.device)
        if loaded is None:
            seed_everything(self.cfg.seed + self.dist.rank)
            self._print(f"starting run '{self.cfg.run_name}' in {self.run_dir}")
            return 0
        checkpoint, info = loaded
        self.model.load_state_dict(checkpoint["model"])
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        self.scheduler.load_state_dict(checkpoint["scheduler"])
        self.scaler.load_state_dict(checkpoint["scaler"])
        self.state = TrainState(**checkpoint["trainer"])
        self._epoch_loss_sum = checkpoint["epoch_loss_sum"].to(self.device)
        self._epoch_samples = checkpoint["epoch_samples"]
        rng_states = checkpoint["rng"]
        restore_rng_state(rng_states[min(self.dist.rank, len(rng_states) - 1)])
        self._print(
            f"resuming from {info.path} at step {self.state.global_step} "
            f"(epoch {self.state.epoch}, batch {self.state.batch_in_epoch})"
        )
        return self.state.global_step

    # ----- helpers ----------------------------------------------------------------------

    def _loader(self, dataset: Dataset, sampler: ResumableSampler) -> DataLoader:
        workers = self.cfg.data.num_workers
        return DataLoader(
            dataset,
            batch_size=self.cfg.data.batch_size,
            sampler=sampler,
            num_workers=workers,
            pin_memory=self.device.type == "cuda",
            worker_init_fn=functools.partial(ignore_stop_signals, self._stop_signal_names),
            # Its own generator: creating an iterator must not draw from the global RNG,
            # or a resumed run's dropout masks would shift.
            generator=torch.Generator().manual_seed(self.cfg.seed),
            persistent_workers=False,
        )

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    def _effective_precision(self, requested: str) -> str:
        if requested != "fp32" and self.device.type != "cuda":
            self._print(f"precision {requested} needs CUDA; training in fp32 on {self.device}")
            return "fp32"
        if requested == "bf16" and not torch.cuda.is_bf16_supported():
            self._print("this GPU has no bf16 support; using fp16 with a grad scaler")
            return "fp16"
        return requested

    def _stop_requested(self) -> bool:
        return any_rank(self.stop_request.requested, self.dist, self.device)

    def _progress_bar(self) -> tqdm:
        interactive = sys.stderr.isatty()
        return tqdm(
            total=self.total_steps,
            initial=self.state.global_step,
            desc=self.cfg.run_name,
            unit="step",
            dynamic_ncols=True,
            mininterval=0.2 if interactive else 30.0,  # log files get a line every 30 s
            disable=not (self.dist.is_main and self.cfg.trainer.progress_bar),
            file=sys.stderr,
        )

    def _log_step(self, logger: MetricLogger, bar: tqdm, loss: torch.Tensor) -> None:
        loss_value = loss.item()
        lr = self.scheduler.get_last_lr()[0]
        logger.log({"train/loss": loss_value, "train/lr": lr}, self.state.global_step)
        bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}", refresh=False)

    def _print_epoch_summary(self, record: dict[str, float]) -> None:
        steps_done = max(1, self.state.global_step)
        seconds_per_step = self.state.train_seconds / steps_done
        eta = seconds_per_step * max(0, self.total_steps - self.state.global_step)
        parts = [
            f"epoch {record['epoch'] + 1}/{self.cfg.trainer.max_epochs}",
            f"step {record['step']}/{self.total_steps}",
            f"train_loss {record['train_loss']:.4f}",
            f"val_loss {record['val_loss']:.4f}",
            f"val_acc {record['val_accuracy']:.3f}",
            f"elapsed {_fmt_seconds(self.state.train_seconds)}",
            f"ETA {_fmt_seconds(eta)}",
        ]
        if self.hourly_rate_usd:
            parts.append(f"cost ${self.hourly_rate_usd * self.state.train_seconds / 3600:.2f}")
        self._print(" | ".join(parts))

    def _print(self, message: str) -> None:
        if self.dist.is_main:
            tqdm.write(f"[trainer] {message}", file=sys.stdout)
            sys.stdout.flush()


def _fmt_seconds(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"
