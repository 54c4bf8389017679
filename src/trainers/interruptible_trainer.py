"""A training loop that can be killed at any moment and resumed bit for bit.

Read top to bottom: the wiring (``__init__``), ``fit``, the epoch, the step, ``evaluate``,
``test``. ``fit`` resumes if the run has a checkpoint, then for each epoch trains step by step,
checkpoints every ``checkpoint.every_n_steps`` and at the epoch end, evaluates, tracks the
best model, stops early if asked. The helpers sit beside this file: steps.py (the step
contract and its defaults), snapshot.py (what a checkpoint holds), cost_meter.py,
early_stopping.py, progress.py, lr_schedule.py; src/launch/opening.py checks the run
directory (resume settings, lock, S3) before anything is built.

Your model, your batches: ``step_fn(model, batch)`` returns the loss (or a dict with
``"loss"`` and other scalars), ``collate_fn`` builds batches (dicts, tuples, nestings),
``optimizer_fn(model)`` builds the optimizer. Without them, ``(inputs, targets)`` batches
train with ``loss_fn(model(inputs), targets)`` and dict batches with ``model(**batch).loss``.

Interruptions: SIGTERM, SIGINT and ``trainer.extra_stop_signal`` only set a flag. At the next
step boundary the trainer saves a checkpoint, waits until it is on disk, and ``fit`` returns
with ``interrupted=True``; scripts then exit with ``EXIT_INTERRUPTED`` (75). Running the same
command again resumes, exactly (model, optimizer, scheduler, scaler, RNGs, the position in
the epoch), on this machine or, through ``checkpoint.s3_bucket``, on a fresh one. A signal
during an epoch-end validation does not wait for it: the trained epoch is saved at once and
the resume validates first. A spent
``cost.budget_usd`` stops the run the same way, with ``EXIT_BUDGET_REACHED`` (76). A signal
after the last step lets the file being written finish, then exits 75 (0 once
test_results.json is written), never by the signal.

Fine-tuning (LoRA, QLoRA): a model with frozen parameters checkpoints only what trains, and
a resume onto another frozen base is refused (src/checkpoints/trainable_format.py); a PEFT
model's best and final weights are ``best_adapter/`` and ``final_adapter/`` (adapters.py); a
model its loader placed (``device_map``, 4-bit) stays where it is (placement.py).

Failures as one line (scripts, through ``src.launch``): a full disk exits 74 naming the file
and the room it needed (with S3, local checkpoints verified there are deleted first to make
room); GPU out of memory exits 1 naming the batch size and the fixes (out_of_memory.py).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import nn
from torch.utils.data import DataLoader, Dataset

from src.checkpoints.sharded_format import ShardedFormat
from src.checkpoints.trainable import load_trainable_state, trainable_state_dict
from src.checkpoints.trainable_format import TrainableOnlyFormat, format_for_model
from src.common.rng import capture_rng_state, restore_rng_state, seed_everything
from src.common.signals import (
    EXIT_BUDGET_REACHED,
    EXIT_INTERRUPTED,
    StopRequest,
    ignore_stop_signals,
    mark_results_written,
    parse_signals,
)
from src.config import AUTO_BATCH_SIZE, accumulation_for, resume_settings
from src.data.batches import batch_size_of, move_to_device
from src.data.loaders import EVAL_EPOCH, make_loader
from src.data.resumable_sampler import ResumableSampler
from src.launch.opening import ModelBase, open_run
from src.runs.files import prepare_run_dir, write_json
from src.runs.lock import acquire_run_lock
from src.storage.checkpoint_mirror import FlushReport
from src.telemetry.metric_logger import new_wandb_run_id
from src.trainers.adapters import is_peft_model, load_adapter_weights, save_adapter
from src.trainers.batch_size import measure_batch_size
from src.trainers.cost_meter import CostMeter, bill_origin
from src.trainers.device import NO_CONTEXT, autocast, effective_precision, select_device
from src.trainers.distributed import (
    DistInfo,
    barrier,
    init_distributed,
    max_over_ranks,
    wrap_for_training,
)
from src.trainers.early_stopping import EarlyStopping
from src.trainers.evaluation_hooks import Evaluation, run_evaluation_hooks
from src.trainers.final_upload import finish_uploads
from src.trainers.fsdp import (
    full_weights,
    gradient_sync,
    load_full_weights,
    shard_model,
    sharded_state,
)
from src.trainers.lr_schedule import lr_factor, warmup_cosine_schedule
from src.trainers.out_of_memory import ExplainOutOfMemory
from src.trainers.placement import enable_gradient_checkpointing, place_model
from src.trainers.progress import Progress, extending_line, finished_line, say
from src.trainers.snapshot import TrainingParts, restore_snapshot, should_load_scaler, take_snapshot
from src.trainers.steps import (
    EvalFn,
    EvaluationStopped,
    LossFn,
    OptimizerFn,
    StepFn,
    as_metrics,
    average_metrics,
    default_eval_step,
    default_optimizer,
    default_train_step,
)
from src.trainers.train_state import (
    STOP_PRECEDENCE,
    EpochLoss,
    FitResult,
    Outcome,
    TrainState,
    test_record,
)
from src.utils.checkpoint_manager import CheckpointManager
from src.utils.gpu_monitor import GpuSampler, GpuSamplerGroup

__all__ = [
    "EXIT_BUDGET_REACHED",
    "EXIT_INTERRUPTED",
    "FitResult",
    "InterruptibleTrainer",
    "Outcome",
    "default_eval_step",
    "default_train_step",
    "lr_factor",
    "should_load_scaler",
]

# Sharded validation: batches between the ranks' agreements on whether a stop cut it short.
SHARDED_STOP_CHECK_EVERY = 8


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
        billing_from = bill_origin()  # start-up is billed too
        self.device = select_device(cfg.trainer.device)
        self.dist: DistInfo = init_distributed(self.device.type)
        if self.dist.is_distributed and self.device.type == "cuda":
            self.device = torch.device("cuda", self.dist.local_rank)
        # Moved to the device, unless its loader placed it (device_map, 4-bit): then batches
        # go where its input embeddings are.
        self.placement = place_model(model, self.device, self.dist.world_size)
        self.device = self.placement.input_device
        self.model = model
        self.is_adapter = is_peft_model(model)  # best/final weights: adapter folders
        if cfg.trainer.gradient_checkpointing:
            enable_gradient_checkpointing(model)
        # fsdp: sharded model, sharded checkpoints (the format needs the optimizer: made below).
        self.sharded = cfg.trainer.strategy == "fsdp"
        # A partly frozen model (LoRA) checkpoints only what trains, and names its frozen base
        # (fingerprinted where it now lives: on a GPU, one fast pass).
        checkpoint_format = None if self.sharded else format_for_model(model)
        trainable_only = isinstance(checkpoint_format, TrainableOnlyFormat)
        # Before anything is written: a changed setting or base is an error, a live run owns
        # the dir, S3 settings work. The lock is only probed here and held while fit() runs,
        # so a notebook that builds a new trainer (re-running a cell) never blocks itself.
        is_main = self.dist.is_main
        self.opening = open_run(
            cfg,
            self.dist.world_size,
            lock="probe" if is_main else "none",
            mirror=is_main,
            model_base=ModelBase(checkpoint_format.frozen_base if trainable_only else None),  # type: ignore[union-attr]
        )
        self.layout, self.mirror = self.opening.layout, self.opening.mirror
        self.run_dir = self.layout.root
        self.train_set, self.val_set = train_set, val_set
        self.collate_fn = collate_fn
        if step_fn is None:
            step_fn = functools.partial(default_train_step, loss_fn=loss_fn)
            eval_fn = eval_fn or functools.partial(default_eval_step, loss_fn=loss_fn)
        self.step_fn, self.eval_fn = step_fn, eval_fn or step_fn
        self._parameter_count = sum(p.numel() for p in self.model.parameters())
        self.precision, why = effective_precision(cfg.trainer.precision, self.device)
        if why:
            self._print(why)
        # What the step function sees while training; checkpoints save self.model (under
        # fsdp the same module, sharded in place).
        if self.sharded:
            self.train_model = shard_model(
                self.model,
                self.dist,
                self.device,
                self.precision,
                wrap_name=cfg.trainer.fsdp_wrap,
                cpu_offload=cfg.trainer.fsdp_cpu_offload,
            )
        else:
            self.train_model = wrap_for_training(self.model, self.dist, self.device)
        if cfg.trainer.compile:
            # Compiled for training only: checkpoints save self.model, so no _orig_mod. keys.
            self.train_model = torch.compile(self.train_model)  # type: ignore[assignment]
        self.batch_size = self._resolve_batch_size()
        # trainer.keep_effective_batch on another number of ranks: another accumulation.
        saved_settings = self.opening.recorded_resume_settings
        self._accum = accumulation_for(cfg, saved_settings, self.dist.world_size)
        self.optimizer = (
            optimizer_fn or functools.partial(default_optimizer, optim_cfg=cfg.optim)
        )(self.model)
        self.sampler = ResumableSampler(
            len(train_set),  # type: ignore[arg-type]
            cfg.seed,
            True,
            self.dist.rank,
            self.dist.world_size,
        )
        self.batches_per_epoch = math.ceil(len(self.sampler) / self.batch_size)
        self.steps_per_epoch = math.ceil(self.batches_per_epoch / self._accum)
        self.total_steps = self._planned_steps()
        if cfg.trainer.max_steps > 0:
            self.total_steps = min(self.total_steps, cfg.trainer.max_steps)
        self.scheduler = warmup_cosine_schedule(self.optimizer, cfg.optim, self.total_steps)
        self.scaler = torch.amp.GradScaler(
            self.device.type, enabled=self.precision == "fp16" and self.device.type == "cuda"
        )
        self.parts = TrainingParts(
            self.model, self.optimizer, self.scheduler, self.scaler, trainable_only, self.sharded
        )
        self.state = TrainState()
        self.epoch_loss = EpochLoss(self.device)  # the epoch's mean train loss, per rank
        self.early_stopping = EarlyStopping.from_config(cfg.trainer)
        self.monitor = self.early_stopping.monitor
        # Read once: an omegaconf lookup costs ~25 us, several per step add up on small models.
        self._log_every = cfg.trainer.log_every_n_steps
        self._clip_norm = cfg.trainer.grad_clip_norm
        self._resume_settings = resume_settings(cfg, self.dist.world_size)
        stop_names = ["SIGTERM", "SIGINT", cfg.trainer.extra_stop_signal]
        self._stop_signal_names = [name for name in stop_names if name]
        self.stop_request = StopRequest(parse_signals(self._stop_signal_names))
        self.cost = CostMeter.for_run(cfg.cost, is_main, billing_from)  # rate None: not tracked
        self.gpu_sampler: GpuSampler | GpuSamplerGroup | None = None
        # Last, so a bad trainer.monitor leaves the run directory untouched.
        self._check_monitor()
        prepare_run_dir(cfg, is_main=is_main)
        if self.sharded:
            checkpoint_format = ShardedFormat(
                functools.partial(sharded_state, self.model, self.optimizer), self.dist.rank
            )
        self.checkpoints = CheckpointManager(
            self.layout.checkpoints,
            keep_last_n=cfg.checkpoint.keep_last_n,
            every_n_steps=cfg.checkpoint.every_n_steps,  # the manager owns when to save
            async_save=cfg.checkpoint.async_save,
            is_writer=is_main,
            checkpoint_format=checkpoint_format,
            mirror=self.mirror,
        )

    # ----- the loop ---------------------------------------------------------------------

    def fit(self) -> FitResult:
        """Train to the end (or until a stop signal or the budget); safe to call again to resume."""
        run_lock = acquire_run_lock(self.run_dir) if self.dist.is_main else None
        outcome = Outcome.FAILED
        try:
            with self.stop_request:
                if self.mirror is not None:
                    # A newer checkpoint in S3 (the opening read the manifest) comes first.
                    if self.opening.remote_newest is not None:
                        self.checkpoints.fetch_remote()
                    self.checkpoints.start_mirror()
                barrier(self.dist)  # every rank then loads what rank 0 downloaded
                resumed_step = self._resume()
                self._print(self._describe_batch())
                self.cost.restart_training_clock()
                if self.state.wandb_run_id is None:  # kept in the checkpoint from now on
                    self.state.wandb_run_id = new_wandb_run_id()
                progress = Progress(
                    self.cfg,
                    self.run_dir,
                    self.state,
                    total_steps=self.total_steps,
                    resumed_step=resumed_step,
                    devices=self.placement.devices,
                    is_main=self.dist.is_main,
                )
                self.gpu_sampler = progress.gpu_sampler
                try:
                    outcome = self._run_epochs(progress)
                finally:
                    progress.close()
                    self.checkpoints.wait()  # pending writes are durable before we return
                if not outcome.stopped:
                    # Still under the stop handler: a signal now only sets the flag.
                    outcome = self._finish_training(outcome)
            barrier(self.dist)  # other ranks read the best weights only once rank 0 wrote them
        finally:
            grace = self.cfg.checkpoint.s3_stop_grace_s

            def close(timeout: float) -> FlushReport | None:
                return self.checkpoints.close(remote_timeout=timeout)

            finish_uploads(self.mirror, close, outcome, grace, self.run_dir, self._print)
            if run_lock is not None:
                run_lock.release()
        return FitResult(
            status=outcome,
            global_step=self.state.global_step,
            epoch=self.state.epoch,
            monitor=self.monitor,
            best_value=self.state.best_value,
            run_dir=self.run_dir,
            signal_name=self.stop_request.signal_name,
            cost_usd=round(self.state.cost_usd, 4) if self.cost.tracked else None,
        )

    def _finish_training(self, outcome: Outcome) -> Outcome:
        """The final weights and log; then INTERRUPTED if a stop signal came after the last
        step (the script exits 75, the same command goes on to the test set), else
        ``outcome``, and stop signals from now on wait for the write in progress."""
        if self.dist.is_main:
            if self.is_adapter:
                final = self.layout.final_adapter
                self.checkpoints.save_output(lambda: save_adapter(self.model, final))
            elif not self.sharded:
                self.checkpoints.save_weights(self.model.state_dict(), self.layout.final_model)
            write_json(self.layout.training_log, self.state.history)
        if self.sharded:  # consolidated on rank 0 (a collective): export takes it unchanged
            weights = full_weights(self.model)
            if self.dist.is_main:
                self.checkpoints.save_weights(weights, self.layout.final_model)
        if max_over_ranks(int(self.stop_request.requested), self.dist, self.device):
            name = self.stop_request.signal_name or "a stop signal"
            self._print(f"{name} after the last step: the run is trained and saved")
            return Outcome.INTERRUPTED
        self.stop_request.training_done = True
        return outcome

    def _work_left(self) -> bool:
        state = self.state
        return not state.status.finished_early and (
            state.eval_pending
            or (state.epoch < self.cfg.trainer.max_epochs and state.global_step < self.total_steps)
        )

    def _stop_during_validation(self) -> Outcome:
        """A stop signal during an epoch-end validation: save the trained epoch now (its
        validation runs again first at the resume) rather than make the machine wait."""
        stop = self._stop_requested()
        self.state.eval_pending = True
        self._print(
            f"validation of epoch {self.state.epoch + 1} cut short by the stop: it runs again "
            "first at the resume"
        )
        self._save_checkpoint(blocking=True)
        self._announce_stop(stop)
        return stop

    def _run_epochs(self, progress: Progress) -> Outcome:
        state = self.state
        # A resumed run whose budget is already spent stops before its first step (a fresh
        # run always takes one, so it has a checkpoint to resume from).
        if state.global_step > 0 and self._work_left() and self.cost.budget_spent(state):
            self._print(self.cost.budget_reached_line(state))
            return Outcome.BUDGET_REACHED
        while self._work_left():
            if state.eval_pending:  # a stop cut this epoch's validation short: only that is left
                outcome = Outcome.RUNNING
            else:
                with self._explain_out_of_memory("a training step"):
                    outcome = self._train_epoch(progress)
            if outcome.stopped:
                return outcome
            # At max_steps mid-epoch: evaluate, but keep the position (a longer re-run goes on).
            epoch_done = outcome == Outcome.RUNNING
            with self._explain_out_of_memory("evaluation"):
                evaluated = self._evaluate_and_record(progress, epoch_done)
            if evaluated is None:
                return self._stop_during_validation()
            improved, early_stop = evaluated
            pruned = not early_stop and self._hooks_ask_to_stop(epoch_done)
            if early_stop:
                state.status = Outcome.EARLY_STOPPED
            elif pruned:
                state.status = Outcome.PRUNED
            elif not self._work_left():
                state.status = Outcome.COMPLETED
            if self.dist.is_main:  # the run directory is complete at each epoch checkpoint
                write_json(self.layout.training_log, state.history)
                progress.logger.flush()
            self._save_checkpoint(is_best=improved)
            if early_stop:
                waited = state.epochs_without_improvement
                self._print(f"early stopping: no {self.monitor} improvement for {waited} epochs")
                return Outcome.EARLY_STOPPED
            if pruned:
                self._print(f"pruned at epoch {state.epoch}: an evaluation hook asked to stop")
                return Outcome.PRUNED
            stop = self._stop_requested() if self._work_left() else Outcome.RUNNING
            if stop.stopped:  # after the validation's last check: the epoch checkpoint holds
                self.checkpoints.wait()
                self._announce_stop(stop)
                return stop
        if not state.status.finished_early:
            state.status = Outcome.COMPLETED
        return state.status

    def _train_epoch(self, progress: Progress) -> Outcome:
        """From the saved position to the epoch's end: RUNNING. COMPLETED when max_steps
        ends it early, INTERRUPTED or BUDGET_REACHED when a stop does (checkpoint saved)."""
        state, accum = self.state, self._accum
        # From the samples all ranks consumed so far: the ranks there are now share the rest.
        self.sampler.set_epoch(state.epoch, global_start=state.samples_in_epoch or 0)
        batches_left = math.ceil(len(self.sampler) / self.batch_size)
        samples_per_batch = self.batch_size * self.dist.world_size
        loader = self._loader(self.train_set, self.sampler)
        self.train_model.train()
        progress.training(True)
        non_blocking = self.device.type == "cuda"
        for done, batch in enumerate(loader):  # done: micro-batches of this loader so far
            group_start = (done // accum) * accum
            group_size = min(accum, batches_left - group_start)
            is_last_micro = done + 1 == group_start + group_size
            batch = move_to_device(batch, self.device, non_blocking)
            sync = NO_CONTEXT
            if self.sharded:
                gradient_sync(self.model, is_last_micro)
            elif self.dist.is_distributed and not is_last_micro:
                sync = self.train_model.no_sync()  # type: ignore[operator]
            with sync, self._autocast():
                metrics = as_metrics(self.step_fn(self.train_model, batch))
                loss = metrics["loss"]
                self.scaler.scale(loss / group_size if group_size > 1 else loss).backward()
            state.batch_in_epoch += 1
            state.samples_in_epoch = (state.samples_in_epoch or 0) + samples_per_batch
            self.epoch_loss.add(loss, batch_size_of(batch))
            if not is_last_micro:
                continue
            self._optimizer_step()
            progress.bar.update(1)
            if state.global_step % self._log_every == 0:
                lr = self.scheduler.get_last_lr()[0]
                cost = self.cost.cost_now(state) if self.cost.tracked else None
                progress.step(metrics, state.global_step, lr, cost)
            at_epoch_end = done + 1 >= batches_left
            if state.global_step >= self.total_steps and not at_epoch_end:
                return Outcome.COMPLETED
            stop = self._stop_requested()  # at an epoch end too: evaluation can wait
            if self.checkpoints.due(
                state.global_step, stopping=stop.stopped, epoch_end=at_epoch_end
            ):
                # On stop: no staging copy, and durable before we say so.
                self._save_checkpoint(blocking=stop.stopped)
            if stop.stopped:
                self._announce_stop(stop)
                return stop
        return Outcome.RUNNING

    def _announce_stop(self, stop: Outcome) -> None:
        """One line for a stop whose checkpoint is saved, wherever in the epoch it came."""
        if stop == Outcome.BUDGET_REACHED:
            self._print(self.cost.budget_reached_line(self.state))
        else:
            self._print(f"saved checkpoint at step {self.state.global_step}; re-run to resume")

    def _optimizer_step(self) -> None:
        if self._clip_norm > 0:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.model.parameters(), self._clip_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.state.global_step += 1

    def _stop_requested(self) -> Outcome:
        """RUNNING (no stop), INTERRUPTED or BUDGET_REACHED, the same on every rank."""
        place = 0
        if self.stop_request.requested:
            place = 1
        if self.cost.budget_spent(self.state):
            place = 2
        return STOP_PRECEDENCE[max_over_ranks(place, self.dist, self.device)]

    # ----- evaluation -------------------------------------------------------------------

    def _evaluate_and_record(
        self, progress: Progress, epoch_done: bool
    ) -> tuple[bool, bool] | None:
        """Validate, update best/early-stopping state and the history; (improved, stop now),
        or None when a stop signal cut an epoch-end validation short (nothing recorded).

        ``epoch_done`` False (stopped by max_steps mid-epoch): the epoch counter and the
        position stay, and the evaluation does not count towards early-stopping patience
        (nor is it cut short: it is the run's last).
        """
        state = self.state
        self.cost.tick(state)
        progress.training(False)
        val = self._validate_unless_stopped() if epoch_done else self.evaluate(self.val_set)
        if val is None:
            return None
        value = self.early_stopping.value_in(val)
        train_loss = self.epoch_loss.mean_over_ranks(self.dist)
        improved, early_stop = self.early_stopping.record(state, value, epoch_done)
        progress.evaluation(
            state,
            train_loss,
            val,
            lr=self.scheduler.get_last_lr()[0],
            epoch_done=epoch_done,
            cost_usd=state.cost_usd if self.cost.tracked else None,
            budget_usd=self.cost.budget_usd,
        )
        if epoch_done:
            state.epoch += 1
            state.batch_in_epoch = 0
            state.samples_in_epoch = 0
            state.eval_pending = False
            self.epoch_loss.reset()
        return improved, early_stop

    def _validate_unless_stopped(self) -> dict[str, float] | None:
        """The validation set's metrics, or None when a stop signal on any rank cut it
        short: the machine may be going away, and the resume validates again. The RNG states
        are put back as they were before, so that run draws what this one would have."""
        rng_state = capture_rng_state()
        batches_seen = 0

        def asked() -> bool:
            nonlocal batches_seen
            batches_seen += 1
            if not self.sharded:
                return self.stop_request.requested
            # Sharded forward passes meet in collectives: the ranks agree, every few batches.
            if batches_seen % SHARDED_STOP_CHECK_EVERY:
                return False
            return bool(max_over_ranks(int(self.stop_request.requested), self.dist, self.device))

        try:
            val: dict[str, float] | None = self.evaluate(self.val_set, should_stop=asked)
        except EvaluationStopped:
            val = None
        if max_over_ranks(int(val is None), self.dist, self.device):
            restore_rng_state(rng_state)
            return None
        return val

    def _hooks_ask_to_stop(self, epoch_done: bool) -> bool:
        """The after-evaluation hooks (evaluation_hooks.py) see the monitored value on the
        main process; their answer is the same on every rank."""
        state, ask = self.state, 0
        if self.dist.is_main and state.history:
            value = state.history[-1].get(self.monitor.replace("/", "_"))
            if value is not None:
                evaluation = Evaluation(
                    state.epoch, state.global_step, self.monitor, float(value), epoch_done
                )
                ask = int(run_evaluation_hooks(evaluation))
        return bool(max_over_ranks(ask, self.dist, self.device))

    def evaluate(
        self, dataset: Dataset, should_stop: Callable[[], bool] | None = None
    ) -> dict[str, float]:
        """Every metric ``eval_fn`` returns, averaged per sample over ``dataset`` (every rank
        evaluates the full set). ``should_stop``, asked before each batch, may end it early
        (EvaluationStopped)."""
        batches = self._eval_loader(dataset)
        return average_metrics(
            self.model, batches, self.eval_fn, self.device, self._autocast, should_stop
        )

    def test(self, test_set: Dataset, use_best: bool = True) -> dict[str, Any]:
        """Evaluate on the test set (with the best weights) and write test_results.json."""
        weights = "final"
        best_path = self.layout.best_adapter if self.is_adapter else self.layout.best_model
        if use_best and best_path.exists():
            # What the best weights replace, kept to put back (a LoRA model's adapters only).
            final_state = {k: v.clone() for k, v in trainable_state_dict(self.model).items()}
            if self.is_adapter:
                load_adapter_weights(self.model, best_path)
            elif self.sharded:
                load_full_weights(self.model, torch.load(best_path, map_location="cpu"))
            else:
                self.model.load_state_dict(torch.load(best_path, map_location="cpu"))
            weights = "best"
        with self._explain_out_of_memory("the test evaluation"):
            metrics = self.evaluate(test_set)
        if weights == "best":
            load_trainable_state(self.model, final_state)
        results = test_record(
            self.state, metrics, weights, self.monitor, self.batch_size, self.effective_batch_size
        )
        if self.cost.tracked:
            self.cost.tick(self.state)  # the evaluation above was billed too
            results.update(self.cost.record(self.state))
        if self.dist.is_main:
            write_json(self.layout.test_results, results)
            if self.mirror is not None:
                self.mirror.push_files()
        mark_results_written()  # a stop signal from now on exits 0
        return results

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
                names = list(as_metrics(self.eval_fn(self.model, batch)))
        finally:
            self.model.train()
            restore_rng_state(rng_state)
        self.early_stopping.value_in(dict.fromkeys(names, 0.0))

    # ----- checkpoints ------------------------------------------------------------------

    def _save_checkpoint(self, is_best: bool = False, blocking: bool = False) -> None:
        self.cost.tick(self.state)
        snapshot = take_snapshot(self.parts, self.state, self.epoch_loss, self.dist)
        # The best weights are durable before the checkpoint that names them commits. A plain
        # model's come from the snapshot (no second copy); a partly frozen one's snapshot lacks
        # the frozen part, so they are written from the model now.
        best_from_snapshot = is_best and not (
            self.is_adapter or self.parts.trainable_only or self.sharded
        )
        if is_best and not best_from_snapshot:
            self._save_best_now()
        self.checkpoints.save(
            snapshot,
            self.state.global_step,
            blocking=blocking,
            is_best=is_best,
            metadata={
                "epoch": self.state.epoch,
                "batch_in_epoch": self.state.batch_in_epoch,
                "samples_in_epoch": self.state.samples_in_epoch,
                "batch_size": self.batch_size,  # the size data.batch_size=auto found
                "effective_batch_size": self.effective_batch_size,
                "resume_settings": self._resume_settings,  # checked before a re-run resumes
            },
            best_model_path=self.layout.best_model if best_from_snapshot else None,
        )

    def _save_best_now(self) -> None:
        """Every rank (fsdp gathers the whole weights); rank 0 writes them."""
        if self.sharded:
            weights = full_weights(self.model)
            if self.dist.is_main:
                self.checkpoints.save_weights(weights, self.layout.best_model)
            return
        if not self.dist.is_main:
            return
        if self.is_adapter:
            best = self.layout.best_adapter
            self.checkpoints.save_output(lambda: save_adapter(self.model, best))
        else:
            self.checkpoints.save_weights(self.model.state_dict(), self.layout.best_model)

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
        self.state, self.epoch_loss = restore_snapshot(
            checkpoint, self.parts, self.dist.rank, self.device, self.dist.world_size
        )
        state = self.state
        saved_world = int((info.metadata.get("resume_settings") or {}).get("world_size", 1))
        if state.samples_in_epoch is None:  # a checkpoint from before it was recorded
            state.samples_in_epoch = state.batch_in_epoch * self.batch_size * saved_world
        if saved_world != self.dist.world_size:
            self._print(
                f"world size changed: checkpointed on {saved_world} rank(s), now "
                f"{self.dist.world_size}; {self._describe_batch()}"
            )
        if state.status != Outcome.RUNNING and not self._work_left():
            self._print(finished_line(self.cfg.run_name, state))
            return state.global_step
        self._print(
            f"resuming from {source} at step {state.global_step} "
            f"(epoch {state.epoch}, batch {state.batch_in_epoch})"
        )
        if state.eval_pending:
            self._print(f"epoch {state.epoch + 1} is trained; validating it first")
        if state.status == Outcome.COMPLETED and self._work_left():
            state.status = Outcome.RUNNING
            self._print(extending_line(state, self.total_steps, self.cfg.trainer))
        return state.global_step

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

    def _autocast(self) -> Any:
        return autocast(self.precision, self.device)

    def _explain_out_of_memory(self, where: str) -> ExplainOutOfMemory:
        return ExplainOutOfMemory(where, self.batch_size, self._parameter_count)

    def _resolve_batch_size(self) -> int:
        """``data.batch_size``, or for ``auto`` the size this run recorded, else a search now."""
        requested = self.cfg.data.batch_size
        if requested != AUTO_BATCH_SIZE:
            return int(requested)
        recorded = self.opening.recorded_batch_size
        if recorded:
            self._print(f"data.batch_size=auto: {recorded}, as this run recorded")
            return recorded
        search = measure_batch_size(
            self.model,
            self.train_set,
            self._search_step,
            self.device,
            collate_fn=self.collate_fn,
            limit=math.ceil(len(self.train_set) / self.dist.world_size),  # type: ignore[arg-type]
        )
        self._print(f"data.batch_size=auto: {search.describe()}")
        return -max_over_ranks(-search.chosen, self.dist, self.device)  # the smallest GPU's

    def _search_step(self, model: nn.Module, batch: Any) -> torch.Tensor:
        with self._autocast():
            return as_metrics(self.step_fn(model, batch))["loss"]

    def _planned_steps(self) -> int:
        """Optimizer steps to the end of ``max_epochs``. Resumed on another number of ranks,
        the steps already taken, then the rest of the interrupted epoch and the epochs after
        it at this many ranks (the LR schedule spans exactly the steps the run will take)."""
        planned = self.cfg.trainer.max_epochs * self.steps_per_epoch
        resume_from = self.opening.resume_metadata
        saved_world = int((resume_from.get("resume_settings") or {}).get("world_size", 1))
        if not resume_from or saved_world == self.dist.world_size:
            return planned
        epoch, step = int(resume_from.get("epoch", 0)), int(resume_from.get("step", 0))
        if epoch >= self.cfg.trainer.max_epochs:
            return step
        consumed = resume_from.get("samples_in_epoch")
        if consumed is None:  # recorded since world-size changes resume
            per_device = int(resume_from.get("batch_size") or self.batch_size)
            consumed = int(resume_from.get("batch_in_epoch", 0)) * per_device * saved_world
        left = len(self.train_set) - int(consumed)  # type: ignore[arg-type]
        batches_left = math.ceil(math.ceil(left / self.dist.world_size) / self.batch_size)
        epochs_after = self.cfg.trainer.max_epochs - epoch - 1
        return step + math.ceil(batches_left / self._accum) + epochs_after * self.steps_per_epoch

    @property
    def effective_batch_size(self) -> int:
        """Samples per optimizer step: per device x ranks x accumulation steps."""
        return self.batch_size * self.dist.world_size * self._accum

    def _describe_batch(self) -> str:
        return (
            f"effective batch {self.effective_batch_size} = {self.batch_size} per device x "
            f"{self.dist.world_size} rank(s) x {self._accum} micro-batch(es) per optimizer step"
        )

    def _print(self, message: str) -> None:
        if self.dist.is_main:
            say(message)
