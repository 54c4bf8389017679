"""A training loop that can be killed at any moment and resumed bit for bit.

One path, top to bottom (``fit``): resume if the run has a checkpoint, then for each
epoch train step by step, checkpoint every ``checkpoint.every_n_steps`` and at the
epoch end, evaluate, track the best model, stop early if asked.

Your model, your batches: ``step_fn(model, batch)`` returns the loss (or a dict with
``"loss"`` and other scalars), ``collate_fn`` builds batches (dicts, tuples, nestings),
``optimizer_fn(model)`` builds the optimizer. Without them, ``(inputs, targets)`` batches
train with ``loss_fn(model(inputs), targets)`` and dict batches with ``model(**batch).loss``.

Interruptions: SIGTERM, SIGINT and ``trainer.extra_stop_signal`` only set a flag.
At the next step boundary the trainer saves a checkpoint, waits until it is on
disk, and ``fit`` returns with ``interrupted=True``; scripts then exit with
``EXIT_INTERRUPTED`` (75). Running the same command again resumes. A spent
``cost.budget_usd`` stops the run the same way, with ``EXIT_BUDGET_REACHED`` (76).

Cost: the machine bills wall time, so the run's cost counts every second of its processes
(start-up, evaluation, checkpointing) at the hourly rate, and is carried in the checkpoint.

Exact resume: the checkpoint holds model, optimizer, LR scheduler, grad scaler,
all RNG states, the position inside the epoch (the sampler order is a function of
seed and epoch; worker RNGs are reseeded per batch, see src/data/loaders.py),
early-stopping state and counters. It is loaded onto the CPU first, so a run saved on
a GPU resumes on the CPU, another GPU or another precision, and the other way round.

S3 (``checkpoint.s3_bucket``): every checkpoint and the run directory are mirrored to
``s3://<bucket>/<s3_prefix>/<run_name>/`` in the background; on a fresh machine the same
command downloads the newest checkpoint and the run's files, then resumes
(src/storage/checkpoint_mirror.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from src.common.rng import capture_rng_state, restore_rng_state, seed_everything
from src.common.signals import (
    EXIT_BUDGET_REACHED,
    EXIT_INTERRUPTED,
    StopRequest,
    ignore_stop_signals,
    parse_signals,
)
from src.config import AUTO_BATCH_SIZE, ConfigError, in_notebook, resume_settings
from src.data.batches import batch_size_of, move_to_device
from src.data.loaders import EVAL_EPOCH, make_loader
from src.data.resumable_sampler import ResumableSampler
from src.runs.lock import acquire_run_lock
from src.utils.batch_size import BatchSizeError, find_max_batch_size
from src.utils.checkpoint_manager import (
    CheckpointManager,
    atomic_torch_save,
    read_checkpoint_infos,
)
from src.utils.distributed import (
    DistInfo,
    barrier,
    gather_objects,
    init_distributed,
    max_over_ranks,
    sum_over_ranks,
)
from src.utils.gpu_monitor import GpuSampler, cuda_index, hourly_rate, process_age_s
from src.utils.metric_logger import MetricLogger, new_wandb_run_id
from src.utils.run_io import check_resume_settings, prepare_run_dir, run_dir_for, write_json

__all__ = [
    "EXIT_BUDGET_REACHED",
    "EXIT_INTERRUPTED",
    "FitResult",
    "InterruptibleTrainer",
    "default_eval_step",
    "default_train_step",
    "select_device",
]

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
_NO_CONTEXT = contextlib.nullcontext()  # reusable; one fewer object per step
FINAL_UPLOAD_S = 600.0  # at the end of a run, how long the last S3 uploads may take
# What stopped a step loop early, reduced over ranks with max (a budget stop wins).
STOP_NONE, STOP_SIGNAL, STOP_BUDGET = 0, 1, 2
StepOutput = torch.Tensor | Mapping[str, torch.Tensor]
StepFn = Callable[[nn.Module, Any], StepOutput]
EvalFn = Callable[[nn.Module, Any], Mapping[str, torch.Tensor]]
OptimizerFn = Callable[[nn.Module], torch.optim.Optimizer]


@dataclass
class TrainState:
    """Counters and early-stopping state; saved in every checkpoint."""

    epoch: int = 0  # epochs fully completed
    global_step: int = 0  # optimizer steps taken
    batch_in_epoch: int = 0  # micro-batches of the current epoch already consumed
    best_value: float | None = None  # of trainer.monitor
    best_epoch: int = -1
    best_step: int = -1
    epochs_without_improvement: int = 0
    status: str = "running"  # running | completed | early_stopped
    train_seconds: float = 0.0  # inside fit(): what the ETA is based on
    billed_seconds: float = 0.0  # every second of the run's processes: what the machine bills
    cost_usd: float = 0.0  # billed seconds at the rate of the machine they ran on
    wandb_run_id: str | None = None  # the same W&B run after a resume on any machine
    history: list[dict[str, float]] = field(default_factory=list)

    @classmethod
    def from_checkpoint(cls, saved: dict[str, Any]) -> TrainState:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{key: value for key, value in saved.items() if key in known})


@dataclass
class FitResult:
    status: str  # "completed" | "early_stopped" | "interrupted" | "budget_reached"
    global_step: int
    epoch: int
    monitor: str  # e.g. "val/loss"
    best_value: float | None  # best value of ``monitor``
    run_dir: Path
    signal_name: str | None = None
    cost_usd: float | None = None  # None: no hourly rate known

    @property
    def interrupted(self) -> bool:
        """Stopped early with a checkpoint saved: running the command again resumes."""
        return self.status in {"interrupted", "budget_reached"}

    @property
    def stopped_by(self) -> str | None:
        """``SIGTERM``, ``SIGINT``... or ``cost.budget_usd``; None if the run was not stopped."""
        return "cost.budget_usd" if self.status == "budget_reached" else self.signal_name

    @property
    def exit_code(self) -> int:
        """For scripts: 0, 75 (stopped by a signal) or 76 (budget reached)."""
        if self.status == "budget_reached":
            return EXIT_BUDGET_REACHED
        return EXIT_INTERRUPTED if self.status == "interrupted" else 0


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


def model_loss(output: Any) -> torch.Tensor:
    """The loss a model computed itself: ``output.loss`` or ``output["loss"]`` (Hugging Face)."""
    loss = getattr(output, "loss", None)
    if loss is None and isinstance(output, Mapping):
        loss = output.get("loss")
    if not isinstance(loss, torch.Tensor):
        raise TypeError(
            "model(**batch) returned no loss (no .loss attribute or 'loss' key): put the "
            "labels in the batch, or pass step_fn=(model, batch) -> loss to the trainer"
        )
    return loss


def _split_pair(batch: Any) -> tuple[Any, Any]:
    if isinstance(batch, (list, tuple)) and len(batch) == 2:
        return batch[0], batch[1]
    raise TypeError(
        f"the default step expects (inputs, targets) or a dict batch, got {type(batch).__name__}"
        f"{f' of length {len(batch)}' if isinstance(batch, (list, tuple)) else ''}: "
        "pass step_fn=(model, batch) -> loss to the trainer"
    )


def default_train_step(model: nn.Module, batch: Any, loss_fn: LossFn) -> torch.Tensor:
    """``loss_fn(model(inputs), targets)``, or ``model(**batch)``'s own loss for dict batches."""
    if isinstance(batch, Mapping):
        return model_loss(model(**batch))
    inputs, targets = _split_pair(batch)
    return loss_fn(model(inputs), targets)


def default_eval_step(model: nn.Module, batch: Any, loss_fn: LossFn) -> dict[str, torch.Tensor]:
    """The loss, plus accuracy where it means something: integer class targets, logits."""
    if isinstance(batch, Mapping):
        return {"loss": model_loss(model(**batch))}
    inputs, targets = _split_pair(batch)
    output = model(inputs)
    metrics = {"loss": loss_fn(output.float(), targets)}
    is_classification = (
        isinstance(targets, torch.Tensor)
        and not targets.is_floating_point()
        and output.ndim == targets.ndim + 1
    )
    if is_classification:
        metrics["accuracy"] = (output.argmax(dim=-1) == targets).float().mean()
    return metrics


def _as_metrics(output: StepOutput) -> dict[str, torch.Tensor]:
    if isinstance(output, torch.Tensor):
        return {"loss": output}
    if not isinstance(output, Mapping) or "loss" not in output:
        raise TypeError(
            "step_fn must return a loss tensor or a dict with a 'loss' key, "
            f"got {type(output).__name__}"
        )
    return dict(output)


class InterruptibleTrainer:
    """Trains ``model`` on ``train_set`` with the settings in ``cfg`` (see configs/).

    ``collate_fn``: handed to the DataLoader. ``step_fn(model, batch)``: a loss tensor or
    a dict with ``"loss"`` and other scalar tensors (logged as train/<name>).
    ``eval_fn(model, batch)``: a dict of scalar metrics, averaged per sample over the
    validation set and logged as val/<name> (default: ``step_fn`` under no_grad).
    ``optimizer_fn(model)``: the optimizer (default: AdamW from ``cfg.optim``).
    ``loss_fn``: used by the default step for ``(inputs, targets)`` batches.
    """

    def __init__(
        self,
        cfg: DictConfig,
        model: nn.Module,
        train_set: Dataset,
        val_set: Dataset,
        *,
        collate_fn: Callable[[list[Any]], Any] | None = None,
        step_fn: StepFn | None = None,
        eval_fn: EvalFn | None = None,
        optimizer_fn: OptimizerFn | None = None,
        loss_fn: LossFn = F.cross_entropy,
    ) -> None:
        self.cfg = cfg
        self._last_bill_tick = _bill_origin()  # start-up is billed too
        self.device = select_device(cfg.trainer.device)
        self.dist: DistInfo = init_distributed(self.device.type)
        if self.dist.is_distributed and self.device.type == "cuda":
            self.device = torch.device("cuda", self.dist.local_rank)
        # Before anything is written: a changed setting is an error, a live run owns the dir.
        # The lock is only checked here and held while fit() runs, so a notebook that builds
        # a new trainer (re-running a cell) never blocks itself or a later tmux job.
        check_resume_settings(cfg, self.dist.world_size)
        if self.dist.is_main:
            acquire_run_lock(run_dir_for(cfg)).release()
        self.run_dir = run_dir_for(cfg)  # written to only at the end of __init__
        # S3 settings are probed (and the bucket's newest checkpoint checked like a local
        # one) now: a bad bucket or missing credentials fail before anything is written.
        self.mirror, remote_newest = make_mirror(
            cfg, self.run_dir, self.dist.world_size, self.dist.is_main
        )
        self.train_set, self.val_set = train_set, val_set
        self.collate_fn = collate_fn
        if step_fn is None:
            step_fn = functools.partial(default_train_step, loss_fn=loss_fn)
            eval_fn = eval_fn or functools.partial(default_eval_step, loss_fn=loss_fn)
        self.step_fn, self.eval_fn = step_fn, eval_fn or step_fn
        self.model = model.to(self.device)
        self.train_model: nn.Module = self.model  # what the step function sees while training
        if self.dist.is_distributed:
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            self.train_model = nn.parallel.DistributedDataParallel(self.model, device_ids)
        if cfg.trainer.compile:
            # Compiled for training only: checkpoints save self.model, so no _orig_mod. keys.
            self.train_model = torch.compile(self.train_model)  # type: ignore[assignment]

        self.precision = self._effective_precision(cfg.trainer.precision)
        self.batch_size = self._resolve_batch_size(remote_newest)
        self.optimizer = (
            optimizer_fn(self.model)
            if optimizer_fn is not None
            else torch.optim.AdamW(
                self.model.parameters(), lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay
            )
        )
        self.sampler = ResumableSampler(
            len(train_set),  # type: ignore[arg-type]
            cfg.seed,
            True,
            self.dist.rank,
            self.dist.world_size,
        )
        self.batches_per_epoch = math.ceil(len(self.sampler) / self.batch_size)
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
        self.state = TrainState()
        self.monitor = cfg.trainer.monitor
        # Read once: an omegaconf lookup costs ~25 us, several per step add up on small models.
        self._log_every = cfg.trainer.log_every_n_steps
        self._checkpoint_every = cfg.checkpoint.every_n_steps
        self._clip_norm = cfg.trainer.grad_clip_norm
        self._accum = cfg.trainer.grad_accum_steps
        self._resume_settings = resume_settings(cfg, self.dist.world_size)
        self._last_tick = time.perf_counter()
        self._budget_usd = cfg.cost.budget_usd
        # Running sums for the epoch's mean train loss, kept on the device (no sync per step).
        self._epoch_loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        self._epoch_samples = 0
        stop_names = ["SIGTERM", "SIGINT", cfg.trainer.extra_stop_signal]
        self._stop_signal_names = [name for name in stop_names if name]
        self.stop_request = StopRequest(parse_signals(self._stop_signal_names))
        # $/h: the config's value, else the Vast.ai instance's price; None: cost not tracked.
        self.hourly_rate_usd = hourly_rate(cfg.cost.hourly_rate_usd) if self.dist.is_main else None
        if self._budget_usd is not None and self.dist.is_main and self.hourly_rate_usd is None:
            raise ConfigError(
                f"cost.budget_usd={self._budget_usd} needs the machine's price, and none is "
                "known here: set cost.hourly_rate_usd (dollars per hour)"
            )
        self.gpu_sampler: GpuSampler | None = None
        # Last, so a bad trainer.monitor leaves the run directory untouched.
        self._check_monitor()
        prepare_run_dir(cfg, is_main=self.dist.is_main)
        self.checkpoints = CheckpointManager(
            self.run_dir / "checkpoints",
            keep_last_n=cfg.checkpoint.keep_last_n,
            async_save=cfg.checkpoint.async_save,
            is_writer=self.dist.is_main,
            mirror=self.mirror,
        )

    # ----- the loop ---------------------------------------------------------------------

    def fit(self) -> FitResult:
        """Train to the end (or until a stop signal or the budget); safe to call again to resume."""
        run_lock = acquire_run_lock(self.run_dir) if self.dist.is_main else None
        status = "failed"
        try:
            with self.stop_request:
                if self.mirror is not None:
                    self.checkpoints.fetch_remote()  # a newer checkpoint in S3 comes first
                    self.checkpoints.start_mirror()
                barrier(self.dist)  # every rank then loads what rank 0 downloaded
                resumed_step = self._resume()
                self._print(self._describe_batch())
                self._last_tick = time.perf_counter()
                if self.state.wandb_run_id is None:  # kept in the checkpoint from now on
                    self.state.wandb_run_id = new_wandb_run_id()
                logger = MetricLogger(
                    self.cfg,
                    self.run_dir,
                    resumed_step,
                    self.dist.is_main,
                    wandb_run_id=self.state.wandb_run_id,
                )
                self.gpu_sampler = self._start_gpu_sampler()
                bar = self._progress_bar()
                try:
                    status = self._run_epochs(logger, bar)
                finally:
                    bar.close()
                    if self.gpu_sampler is not None:
                        self.gpu_sampler.stop()
                    logger.close()
                    self.checkpoints.wait()  # pending writes are durable before we return
            if status not in {"interrupted", "budget_reached"} and self.dist.is_main:
                atomic_torch_save(self.model.state_dict(), self.run_dir / "final_model.pt")
                write_json(self.run_dir / "training_log.json", self.state.history)
            barrier(self.dist)  # other ranks read best_model.pt only once rank 0 has written it
        finally:
            self._finish_mirror(status)
            if run_lock is not None:
                run_lock.release()
        return FitResult(
            status=status,
            global_step=self.state.global_step,
            epoch=self.state.epoch,
            monitor=self.monitor,
            best_value=self.state.best_value,
            run_dir=self.run_dir,
            signal_name=self.stop_request.signal_name,
            cost_usd=round(self.state.cost_usd, 4) if self.hourly_rate_usd is not None else None,
        )

    def _work_left(self) -> bool:
        state = self.state
        return (
            state.status != "early_stopped"
            and state.epoch < self.cfg.trainer.max_epochs
            and state.global_step < self.total_steps
        )

    def _run_epochs(self, logger: MetricLogger, bar: tqdm) -> str:
        state = self.state
        # A resumed run whose budget is already spent stops before its first step (a fresh
        # run always takes one, so it has a checkpoint to resume from).
        if state.global_step > 0 and self._work_left() and self._budget_spent():
            self._print_budget_reached()
            return "budget_reached"
        while self._work_left():
            outcome = self._train_epoch(logger, bar)
            if outcome in {"interrupted", "budget_reached"}:
                return outcome
            # At max_steps mid-epoch: evaluate, but keep the position (a longer re-run goes on).
            improved, early_stop = self._evaluate_and_record(logger, epoch_done=outcome == "done")
            if early_stop:
                state.status = "early_stopped"
            elif not self._work_left():
                state.status = "completed"
            if self.dist.is_main:  # the run directory is complete at each epoch checkpoint
                write_json(self.run_dir / "training_log.json", state.history)
                logger.flush()
            self._save_checkpoint(is_best=improved)
            if early_stop:
                waited = state.epochs_without_improvement
                self._print(f"early stopping: no {self.monitor} improvement for {waited} epochs")
                return "early_stopped"
            stop = self._stop_requested() if self._work_left() else STOP_NONE
            if stop != STOP_NONE:
                self.checkpoints.wait()
                if stop == STOP_BUDGET:
                    self._print_budget_reached()
                    return "budget_reached"
                return "interrupted"
        if state.status != "early_stopped":
            state.status = "completed"
        return state.status

    def _train_epoch(self, logger: MetricLogger, bar: tqdm) -> str:
        state, accum = self.state, self._accum
        self.sampler.set_epoch(state.epoch, start_index=state.batch_in_epoch * self.batch_size)
        loader = self._loader(self.train_set, self.sampler)
        self.train_model.train()
        if self.gpu_sampler is not None:
            self.gpu_sampler.set_training(True)
        non_blocking = self.device.type == "cuda"
        for batch in loader:
            group_start = (state.batch_in_epoch // accum) * accum
            group_size = min(accum, self.batches_per_epoch - group_start)
            is_last_micro = state.batch_in_epoch + 1 == group_start + group_size
            batch = move_to_device(batch, self.device, non_blocking)
            sync = _NO_CONTEXT
            if self.dist.is_distributed and not is_last_micro:
                sync = self.train_model.no_sync()  # type: ignore[operator]
            with sync, self._autocast():
                metrics = _as_metrics(self.step_fn(self.train_model, batch))
                loss = metrics["loss"]
                self.scaler.scale(loss / group_size if group_size > 1 else loss).backward()
            samples = batch_size_of(batch)
            state.batch_in_epoch += 1
            self._epoch_loss_sum.add_(loss.detach(), alpha=samples)  # one op, no host sync
            self._epoch_samples += samples
            if not is_last_micro:
                continue
            self._optimizer_step()
            bar.update(1)
            if state.global_step % self._log_every == 0:
                self._log_step(logger, bar, metrics)
            at_epoch_end = state.batch_in_epoch >= self.batches_per_epoch
            if state.global_step >= self.total_steps and not at_epoch_end:
                return "max_steps"
            stop = self._stop_requested()  # at an epoch end too: evaluation can wait
            periodic = state.global_step % self._checkpoint_every == 0 and not at_epoch_end
            if stop or periodic:
                # On stop: no staging copy, and durable before we say so.
                self._save_checkpoint(blocking=stop != STOP_NONE)
            if stop == STOP_BUDGET:
                self._print_budget_reached()
                return "budget_reached"
            if stop:
                self._print(f"saved checkpoint at step {state.global_step}; re-run to resume")
                return "interrupted"
        return "done"

    def _optimizer_step(self) -> None:
        if self._clip_norm > 0:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.model.parameters(), self._clip_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.state.global_step += 1

    def _evaluate_and_record(self, logger: MetricLogger, epoch_done: bool) -> tuple[bool, bool]:
        """Validate, update best/early-stopping state and the history.

        ``epoch_done`` False (stopped by max_steps mid-epoch): the epoch counter and the
        position stay, and the evaluation does not count towards early-stopping patience.
        """
        cfg, state = self.cfg, self.state
        self._tick()
        if self.gpu_sampler is not None:
            self.gpu_sampler.set_training(False)  # evaluation is not the training loop
        val = self.evaluate(self.val_set)
        value = self._monitored_value(val)
        loss_sum, samples = sum_over_ranks(
            torch.stack(
                [self._epoch_loss_sum, self._epoch_loss_sum.new_tensor(self._epoch_samples)]
            ),
            self.dist,
        )
        train_loss = (loss_sum / max(1.0, samples.item())).item()
        improved = self._improves(value)
        if improved:
            state.best_value, state.best_epoch, state.best_step = (
                value,
                state.epoch,
                state.global_step,
            )
        if epoch_done:
            state.epochs_without_improvement = (
                0 if improved else state.epochs_without_improvement + 1
            )
        patience = cfg.trainer.early_stopping_patience
        early_stop = patience > 0 and state.epochs_without_improvement >= patience
        record: dict[str, Any] = {
            "epoch": state.epoch,
            "step": state.global_step,
            "train_loss": train_loss,
            **{f"val_{name}": metric for name, metric in val.items()},
            "lr": self.scheduler.get_last_lr()[0],
            "elapsed_s": round(state.train_seconds, 3),
        }
        if self.hourly_rate_usd is not None:
            record["cost_usd"] = round(state.cost_usd, 4)
        if not epoch_done:
            record["partial_epoch"] = True
        state.history.append(record)
        logger.log({f"val/{name}": metric for name, metric in val.items()}, state.global_step)
        self._print_epoch_summary(record, val)
        if epoch_done:
            state.epoch += 1
            state.batch_in_epoch = 0
            self._epoch_loss_sum.zero_()
            self._epoch_samples = 0
        return improved, early_stop

    def _check_monitor(self) -> None:
        """Fail before anything is written, not after an epoch, when trainer.monitor names
        no metric.

        Evaluates one validation batch in the main process; the RNG states are put back,
        so a resumed run draws exactly what an uninterrupted one does.
        """
        if self.monitor == "val/loss" or len(self.val_set) == 0:  # type: ignore[arg-type]
            return
        rng_state = capture_rng_state()
        self.model.eval()
        try:
            loader = self._eval_loader(self.val_set, num_workers=0)  # no workers for one batch
            batch = move_to_device(next(iter(loader)), self.device)
            with torch.no_grad(), self._autocast():
                names = list(_as_metrics(self.eval_fn(self.model, batch)))
        finally:
            self.model.train()
            restore_rng_state(rng_state)
        self._monitored_value(dict.fromkeys(names, 0.0))

    def _monitored_value(self, val: Mapping[str, float]) -> float:
        name = self.monitor.split("/", 1)[1]
        if name not in val:
            known = ", ".join(f"val/{key}" for key in val)
            raise ConfigError(
                f"trainer.monitor={self.monitor!r} is not a validation metric (this run has "
                f"{known}): set trainer.monitor to one of them"
            )
        return val[name]

    def _improves(self, value: float) -> bool:
        if math.isnan(value):
            return False
        best = self.state.best_value
        if best is None:
            return True
        delta = self.cfg.trainer.early_stopping_min_delta
        if self.cfg.trainer.monitor_mode == "max":
            return value > best + delta
        return value < best - delta

    @torch.no_grad()
    def evaluate(self, dataset: Dataset) -> dict[str, float]:
        """Every metric ``eval_fn`` returns, averaged per sample over ``dataset`` (every rank
        evaluates the full set)."""
        self.model.eval()
        sums: dict[str, torch.Tensor] = {}
        count = 0
        non_blocking = self.device.type == "cuda"
        for batch in self._eval_loader(dataset):
            batch = move_to_device(batch, self.device, non_blocking)
            with self._autocast():
                metrics = _as_metrics(self.eval_fn(self.model, batch))
            samples = batch_size_of(batch)
            for name, metric in metrics.items():
                total = sums.setdefault(
                    name, torch.zeros((), dtype=torch.float64, device=self.device)
                )
                total += torch.as_tensor(metric).detach().double().to(self.device) * samples
            count += samples
        self.model.train()
        return {name: (total / max(1, count)).item() for name, total in sums.items()}

    def test(self, test_set: Dataset, use_best: bool = True) -> dict[str, Any]:
        """Evaluate on the test set (with the best weights) and write test_results.json."""
        weights = "final"
        best_path = self.run_dir / "best_model.pt"
        if use_best and best_path.is_file():
            final_state = {k: v.clone() for k, v in self.model.state_dict().items()}
            self.model.load_state_dict(torch.load(best_path, map_location="cpu"))
            weights = "best"
        metrics = self.evaluate(test_set)
        if weights == "best":
            self.model.load_state_dict(final_state)
        best_key = f"best_{self.monitor.replace('/', '_')}"  # best_val_loss by default
        results = {
            **{f"test_{name}": value for name, value in metrics.items()},
            "weights": weights,
            "monitor": self.monitor,
            best_key: self.state.best_value,
            "best_epoch": self.state.best_epoch,
            "best_step": self.state.best_step,
            "global_step": self.state.global_step,
            "epochs": self.state.epoch,
            "train_seconds": round(self.state.train_seconds, 3),
            "batch_size": self.batch_size,
            "effective_batch_size": self.effective_batch_size,
        }
        if self.hourly_rate_usd is not None:
            self._tick()  # the evaluation above was billed too
            results.update(
                billed_seconds=round(self.state.billed_seconds, 3),
                hourly_rate_usd=self.hourly_rate_usd,
                cost_usd=round(self.state.cost_usd, 4),
            )
        if self.dist.is_main:
            write_json(self.run_dir / "test_results.json", results)
            if self.mirror is not None:
                self.mirror.push_files()
        return results

    # ----- checkpoints ------------------------------------------------------------------

    def _tick(self) -> None:
        """Add the wall time since the last tick to the training time and to the bill (both
        kept across resumes)."""
        now = time.perf_counter()
        self.state.train_seconds += now - self._last_tick
        self._last_tick = now
        billed = now - self._last_bill_tick
        self._last_bill_tick = now
        self.state.billed_seconds += billed
        if self.hourly_rate_usd is not None:
            self.state.cost_usd += self.hourly_rate_usd * billed / 3600

    def _cost_now(self) -> float:
        """The run's cost up to this moment, without ticking."""
        if self.hourly_rate_usd is None:
            return 0.0
        unbilled = time.perf_counter() - self._last_bill_tick
        return self.state.cost_usd + self.hourly_rate_usd * unbilled / 3600

    def _budget_spent(self) -> bool:
        return self._budget_usd is not None and self._cost_now() >= self._budget_usd

    def _print_budget_reached(self) -> None:
        self._tick()
        self._print(
            f"budget reached: this run has cost ${self.state.cost_usd:.2f} of "
            f"cost.budget_usd=${self._budget_usd:.2f} ({_fmt_seconds(self.state.billed_seconds)} "
            f"at ${self.hourly_rate_usd:.2f}/h); checkpoint saved at step "
            f"{self.state.global_step}; raise cost.budget_usd and re-run to resume"
        )

    def _checkpoint_state(self) -> dict[str, Any]:
        self._tick()
        # One entry per rank: its RNGs and its share of the epoch's train loss (rank 0's
        # share alone would count it twice and lose the others' on resume).
        per_rank = gather_objects(
            (capture_rng_state(), self._epoch_loss_sum.item(), self._epoch_samples), self.dist
        )
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": [rng for rng, _, _ in per_rank],
            "trainer": asdict(self.state),
            "epoch_loss_sum": [loss_sum for _, loss_sum, _ in per_rank],
            "epoch_samples": [samples for _, _, samples in per_rank],
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
                "batch_size": self.batch_size,  # the size data.batch_size=auto found
                "effective_batch_size": self.effective_batch_size,
                "resume_settings": self._resume_settings,  # checked before a re-run resumes
            },
            best_model_path=self.run_dir / "best_model.pt" if is_best else None,
        )

    def _resume(self) -> int:
        # Always onto the CPU first: RNG states must stay CPU tensors, and each part then
        # goes where it lives now (a GPU run resumes on CPU, and the other way round).
        loaded = self.checkpoints.load_latest(map_location="cpu")
        if loaded is None:
            seed_everything(self.cfg.seed + self.dist.rank)
            self._print(f"starting run '{self.cfg.run_name}' in {self.run_dir}")
            return 0
        checkpoint, info = loaded
        source = self.checkpoints.last_source or str(info.path)
        self.model.load_state_dict(checkpoint["model"])
        self.optimizer.load_state_dict(checkpoint["optimizer"])  # moves state to param devices
        self.scheduler.load_state_dict(checkpoint["scheduler"])
        if should_load_scaler(checkpoint["scaler"], self.scaler.is_enabled()):
            self.scaler.load_state_dict(checkpoint["scaler"])
        self.state = TrainState.from_checkpoint(checkpoint["trainer"])
        rng_states = checkpoint["rng"]
        rank = min(self.dist.rank, len(rng_states) - 1)
        restore_rng_state(rng_states[rank])
        loss_sum, samples = checkpoint["epoch_loss_sum"], checkpoint["epoch_samples"]
        if isinstance(samples, list):  # per rank; older checkpoints hold rank 0's only
            loss_sum, samples = loss_sum[rank], samples[rank]
        self._epoch_loss_sum = torch.as_tensor(loss_sum, dtype=torch.float64).to(self.device)
        self._epoch_samples = samples
        state = self.state
        if state.status != "running" and not self._work_left():
            self._print(
                f"run '{self.cfg.run_name}' already finished ({state.status.replace('_', ' ')} "
                f"at step {state.global_step}, epoch {state.epoch}): nothing to train; raise "
                "trainer.max_epochs or trainer.max_steps to train longer, or use a new run_name"
            )
            return state.global_step
        self._print(
            f"resuming from {source} at step {state.global_step} "
            f"(epoch {state.epoch}, batch {state.batch_in_epoch})"
        )
        if state.status == "completed" and self._work_left():
            self.state.status = "running"
            self._print(
                f"extending the finished run: trained {self.state.global_step} steps, "
                f"now up to {self.total_steps} (max_epochs={self.cfg.trainer.max_epochs}, "
                f"max_steps={self.cfg.trainer.max_steps}); the LR follows the schedule "
                "recomputed for the new length from this step on"
            )
        return self.state.global_step

    def _finish_mirror(self, status: str) -> None:
        """Wait for the S3 uploads (bounded on a stop), release the mirror, say what is left."""
        if self.mirror is None or not self.mirror.running:
            return  # never started (another machine holds the prefix): nothing to report
        self.mirror.mark_files_dirty()  # final_model.pt, training_log.json, test results
        grace = self.cfg.checkpoint.s3_stop_grace_s
        timeout = grace if status in {"interrupted", "failed"} else max(grace, FINAL_UPLOAD_S)
        if not self.mirror.flush(min(timeout, 2.0)).complete:
            self._print(f"waiting up to {timeout:.0f} s for the S3 uploads to finish")
        report = self.checkpoints.close(remote_timeout=timeout)
        if report is None:
            return
        where = self.mirror.url()
        if report.complete:
            newest = f"step {max(report.uploaded)} in " if report.uploaded else ""
            self._print(f"S3 mirror up to date: {newest}{where}")
            return
        waiting = ", ".join(str(step) for step in report.waiting) or "run files only"
        reason = f" ({self.mirror.last_error})" if self.mirror.last_error else ""
        self._print(
            f"S3 upload not finished within {timeout:.0f} s{reason}: step {waiting} still local "
            f"in {self.run_dir}; the next run of this command uploads it"
        )

    # ----- helpers ----------------------------------------------------------------------

    def _eval_loader(self, dataset: Dataset, num_workers: int | None = None) -> DataLoader:
        """The whole of ``dataset`` in order (every rank evaluates all of it)."""
        sampler = ResumableSampler(len(dataset), seed=0, shuffle=False)  # type: ignore[arg-type]
        sampler.set_epoch(EVAL_EPOCH)
        return self._loader(dataset, sampler, num_workers)

    def _loader(
        self, dataset: Dataset, sampler: ResumableSampler, num_workers: int | None = None
    ) -> DataLoader:
        return make_loader(
            dataset,
            sampler,
            batch_size=self.batch_size,
            seed=self.cfg.seed,
            rank=self.dist.rank,
            num_workers=self.cfg.data.num_workers if num_workers is None else num_workers,
            collate_fn=self.collate_fn,
            pin_memory=self.device.type == "cuda",
            worker_init_fn=functools.partial(ignore_stop_signals, self._stop_signal_names),
        )

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.precision == "fp32":
            return _NO_CONTEXT
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

    def _stop_requested(self) -> int:
        """STOP_NONE, STOP_SIGNAL or STOP_BUDGET, the same on every rank."""
        code = STOP_NONE
        if self.stop_request.requested:
            code = STOP_SIGNAL
        if self._budget_usd is not None and self._budget_spent():
            code = STOP_BUDGET
        return max_over_ranks(code, self.dist, self.device)

    def _start_gpu_sampler(self) -> GpuSampler | None:
        """Sample the GPU this rank trains on (rank 0 only: it alone logs)."""
        index = cuda_index(str(self.device))
        if index is None or not self.dist.is_main or not self.cfg.logging.gpu_stats:
            return None
        sampler = GpuSampler(
            index,
            low_util_percent=self.cfg.logging.low_gpu_util_percent,
            low_util_s=self.cfg.logging.low_gpu_util_minutes * 60,
        )
        if not sampler.start():
            self._print(f"GPU stats off: {sampler.unavailable_reason}")
            return None
        return sampler

    def _resolve_batch_size(self, remote_newest: Mapping[str, Any] | None) -> int:
        """``data.batch_size``, or for ``auto`` the size this run recorded, else a search now."""
        requested = self.cfg.data.batch_size
        if requested != AUTO_BATCH_SIZE:
            return int(requested)
        local = read_checkpoint_infos(self.run_dir / "checkpoints")
        for saved in (local[0].metadata if local else None, remote_newest):
            if saved and saved.get("batch_size"):
                self._print(f"data.batch_size=auto: {saved['batch_size']}, as this run recorded")
                return int(saved["batch_size"])
        rng_state = capture_rng_state()  # the search runs dropout: leave the RNGs as they were
        try:
            search = find_max_batch_size(
                self.model,
                self.train_set,
                self._search_step,
                self.device,
                collate_fn=self.collate_fn,
                limit=math.ceil(len(self.train_set) / self.dist.world_size),  # type: ignore[arg-type]
                move=move_to_device,
            )
        except BatchSizeError as error:
            raise ConfigError(str(error)) from None
        finally:
            restore_rng_state(rng_state)
        self._print(f"data.batch_size=auto: {search.describe()}")
        return -max_over_ranks(-search.chosen, self.dist, self.device)  # the smallest GPU's

    @property
    def effective_batch_size(self) -> int:
        """Samples per optimizer step: per device x ranks x accumulation steps."""
        return self.batch_size * self.dist.world_size * self._accum

    def _describe_batch(self) -> str:
        return (
            f"effective batch {self.effective_batch_size} = {self.batch_size} per device x "
            f"{self.dist.world_size} rank(s) x {self._accum} micro-batch(es) per optimizer step"
        )

    def _search_step(self, model: nn.Module, batch: Any) -> torch.Tensor:
        with self._autocast():
            return _as_metrics(self.step_fn(model, batch))["loss"]

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

    def _log_step(
        self, logger: MetricLogger, bar: tqdm, metrics: Mapping[str, torch.Tensor]
    ) -> None:
        values = {name: float(value.detach()) for name, value in metrics.items()}  # one sync
        lr = self.scheduler.get_last_lr()[0]
        scalars = {**{f"train/{name}": value for name, value in values.items()}, "train/lr": lr}
        postfix = {"loss": f"{values['loss']:.4f}", "lr": f"{lr:.2e}"}
        if self.gpu_sampler is not None:
            scalars.update(self.gpu_sampler.metrics())
            if "gpu/utilization_percent" in scalars:
                postfix["gpu"] = f"{scalars['gpu/utilization_percent']:.0f}%"
            warning = self.gpu_sampler.take_warning()
            if warning:
                self._print(f"warning: {warning}")
        if self.hourly_rate_usd is not None:
            cost = self._cost_now()
            scalars["cost/usd"] = cost
            postfix["cost"] = f"${cost:.2f}"
        logger.log(scalars, self.state.global_step)
        bar.set_postfix(postfix, refresh=False)

    def _print_epoch_summary(self, record: dict[str, Any], val: Mapping[str, float]) -> None:
        steps_done = max(1, self.state.global_step)
        seconds_per_step = self.state.train_seconds / steps_done
        eta = seconds_per_step * max(0, self.total_steps - self.state.global_step)
        label = "epoch" if not record.get("partial_epoch") else "max_steps in epoch"
        parts = [
            f"{label} {record['epoch'] + 1}/{self.cfg.trainer.max_epochs}",
            f"step {record['step']}/{self.total_steps}",
            f"train_loss {record['train_loss']:.4f}",
            *(f"val_{name} {value:.4f}" for name, value in val.items()),
            f"elapsed {_fmt_seconds(self.state.train_seconds)}",
            f"ETA {_fmt_seconds(eta)}",
        ]
        if self.gpu_sampler is not None and self.gpu_sampler.summary():
            parts.append(self.gpu_sampler.summary())
        if self.hourly_rate_usd is not None:
            budget = f" of ${self._budget_usd:.2f}" if self._budget_usd is not None else ""
            parts.append(f"cost ${self.state.cost_usd:.2f}{budget}")
        self._print(" | ".join(parts))

    def _print(self, message: str) -> None:
        if self.dist.is_main:
            tqdm.write(f"[trainer] {message}", file=sys.stdout)
            sys.stdout.flush()


def make_mirror(
    cfg: DictConfig, run_dir: Path, world_size: int, is_main: bool
) -> tuple[Any, dict[str, Any] | None]:
    """The run's S3 mirror (rank 0, ``checkpoint.s3_bucket`` set), probed and checked: the
    bucket's newest checkpoint must have been made with the same resume settings too.

    Also returns that checkpoint's metadata when it is newer than the local one (a fresh
    machine learns the run's recorded batch size from it), else None.
    """
    if not cfg.checkpoint.s3_bucket or not is_main:
        return None, None
    from src.storage.checkpoint_mirror import mirror_for_run

    mirror = mirror_for_run(cfg.checkpoint, cfg.run_name, run_dir)
    records = mirror.remote_records()
    local = read_checkpoint_infos(run_dir / "checkpoints")
    if records and (not local or int(records[0]["step"]) > local[0].step):
        metadata = records[0].get("metadata", {})
        check_resume_settings(
            cfg, world_size, saved=metadata.get("resume_settings"), where=mirror.url()
        )
        return mirror, metadata
    return mirror, None


_process_start_billed = False


def _bill_origin() -> float:
    """``perf_counter`` time the bill starts from: process start for the first trainer of a
    script (interpreter start-up and imports are billed too); trainer creation otherwise (a
    notebook kernel may have sat idle for hours, a second trainer must not bill it twice)."""
    global _process_start_billed
    now = time.perf_counter()
    if _process_start_billed or in_notebook():
        return now
    _process_start_billed = True
    return now - process_age_s()


def should_load_scaler(saved_state: Mapping[str, Any], scaler_enabled: bool) -> bool:
    """Load a saved GradScaler state only when both runs use one (fp16 on CUDA).

    A bf16 or fp32 run saves an empty state, and loading that into an enabled scaler
    raises; a saved fp16 state means nothing to a disabled scaler.
    """
    return scaler_enabled and bool(saved_state)


def _fmt_seconds(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"
