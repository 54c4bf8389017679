"""``run_interruptible(trainer)``: a Hugging Face ``Trainer`` (TRL's ``SFTTrainer``,
``DPOTrainer``, ...) with the kit's promises, in place of ``trainer.train()``::

    from src.integrations.hf_trainer import run_interruptible

    trainer = SFTTrainer(model=model, args=SFTConfig(output_dir=..., save_steps=50), ...)
    result = run_interruptible(trainer, s3_bucket=None, budget_usd=None)

- **Stops.** SIGTERM, SIGINT and SIGUSR1 (Slurm's notice) only set a flag. At the next step
  end every rank agrees (the max over ranks: one signalled rank stops them all at the same
  step), the Trainer saves its own ``checkpoint-N``, its files are fsynced and a completeness
  record is written into it last (``hf_checkpoints.py``). A script then exits 75 (76 when
  ``budget_usd`` is spent); in a notebook the call returns with ``result.interrupted``.
- **Resume.** The newest *complete* ``checkpoint-N`` in ``args.output_dir`` (an incomplete or
  corrupt one is skipped with one warning line and set aside), or the S3 one when it is newer
  or the disk is empty, goes to ``trainer.train(resume_from_checkpoint=...)``. A finished run
  says so and trains nothing. One process per output directory (the kit's run lock).
- **S3** (``s3_bucket``): each complete checkpoint is uploaded in the background by the kit's
  own :class:`CheckpointMirror` (verified, manifest last, retention, outages, lease).
- **Retention.** The callback owns it: ``args.save_total_limit`` is taken from the Trainer
  for the run (the Trainer's own rotation would delete a checkpoint that S3 does not yet
  hold, or the only complete one), and older checkpoints go once S3 has them verified.
- **Cost and GPU.** ``cost/usd`` and ``gpu/*`` go into the Trainer's own ``log`` (its
  TensorBoard/W&B reporters and ``log_history`` show them); the budget stop; the
  low-utilisation warning.
- **Searches.** After each evaluation the kit's evaluation hooks
  (``src/trainers/evaluation_hooks.py``) see ``metric_for_best_model``; one that asks to stop
  (an Optuna pruner in ``scripts/sweep.py``) ends the run there, that step saved, as
  ``PRUNED``.

Settings: keyword arguments, else the kit's config sections when ``config`` is given
(``checkpoint.s3_*``, ``checkpoint.remote_keep_last_n``, ``checkpoint.s3_stop_grace_s``,
``cost.*``, ``logging.gpu_stats``); credentials from the AWS chain and ``.env``. Bad settings
fail before training: one line, exit 2 (a ConfigError in a notebook).
"""

from __future__ import annotations

import atexit
import functools
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from transformers import TrainerCallback, TrainerState

from src.checkpoints.record import CheckpointRecord
from src.common.errors import EXIT_CONFIG_ERROR, ConfigError
from src.common.process_groups import leave_process_group
from src.common.signals import (
    EXIT_BUDGET_REACHED,
    EXIT_INTERRUPTED,
    StopRequest,
    exit_interrupted,
    parse_signals,
)
from src.config import LoggingConfig, in_notebook, load_dotenv_file
from src.integrations import hf_checkpoints
from src.integrations.hf_args import eval_metric_key, evaluations_logged, kit_metric_name
from src.runs.lock import acquire_run_lock
from src.storage.checkpoint_mirror import CheckpointMirror, FlushReport
from src.storage.s3 import object_key
from src.trainers.cost_meter import CostMeter, bill_origin
from src.trainers.distributed import DistInfo, barrier, max_over_ranks
from src.trainers.evaluation_hooks import Evaluation, run_evaluation_hooks
from src.trainers.final_upload import finish_uploads
from src.trainers.progress import say, start_gpu_sampler
from src.trainers.train_state import STOP_PRECEDENCE, Outcome, TrainState

STOP_SIGNALS = ("SIGTERM", "SIGINT", "SIGUSR1")
DEFAULT_S3_PREFIX = "hf-checkpoints"  # objects go under <s3_prefix>/<output_dir's name>/
DEFAULT_STOP_GRACE_S = 20.0  # after a stop, how long the last upload may take


@dataclass
class InterruptibleResult:
    """What ``run_interruptible`` returns (in a script, only when training did not stop)."""

    status: Outcome  # COMPLETED, INTERRUPTED, BUDGET_REACHED or PRUNED (a search's pruner)
    global_step: int
    output_dir: Path
    checkpoint: Path | None  # the newest complete checkpoint
    train_output: Any = None  # trainer.train()'s TrainOutput; None when nothing was trained
    signal_name: str | None = None
    cost_usd: float | None = None  # the run's cost so far, all resumes included; None: no rate

    @property
    def interrupted(self) -> bool:
        """Stopped with a checkpoint saved (signal or budget): the same call resumes."""
        return self.status.stopped

    @property
    def exit_code(self) -> int:
        """0, 75 (a stop signal) or 76 (the budget)."""
        if self.status == Outcome.BUDGET_REACHED:
            return EXIT_BUDGET_REACHED
        return EXIT_INTERRUPTED if self.status == Outcome.INTERRUPTED else 0


@dataclass
class _Settings:
    s3_bucket: str | None
    s3_prefix: str
    endpoint_url: str | None
    remote_keep_last_n: int | None
    stop_grace_s: float
    hourly_rate_usd: float | None
    budget_usd: float | None
    logging: Any  # gpu_stats, low_gpu_util_percent, low_gpu_util_minutes


class InterruptibleCallback(TrainerCallback):
    """Stops at a step end on a signal or the budget, the same step on every rank; commits
    each checkpoint the Trainer saves (fsync, record), hands it to the mirror, prunes."""

    def __init__(
        self,
        stop_request: StopRequest,
        cost: CostMeter,
        cost_state: TrainState,
        dist: DistInfo,
        device: torch.device,
        *,
        mirror: CheckpointMirror | None = None,
        keep_last_n: int | None = None,
        gpu_sampler: Any = None,
    ) -> None:
        self.stop_request, self.cost, self.cost_state = stop_request, cost, cost_state
        self.dist, self.device = dist, device
        self.mirror, self.keep_last_n, self.gpu_sampler = mirror, keep_last_n, gpu_sampler
        self.outcome = Outcome.RUNNING
        self.last_saved: CheckpointRecord | None = None

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.cost.restart_training_clock()
        if self.gpu_sampler is not None:
            self.gpu_sampler.set_training(True)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        place = 1 if self.stop_request.requested else 0
        if self.cost.budget_spent(self.cost_state):
            place = 2
        stop = STOP_PRECEDENCE[max_over_ranks(place, self.dist, self.device)]
        if stop.stopped:
            self.outcome = stop
            control.should_save = True
            control.should_training_stop = True
        self._before_save(args, state, control)

    def on_epoch_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        saved = self.last_saved is not None and self.last_saved.step == state.global_step
        if control.should_save and saved:
            control.should_save = False  # this step's checkpoint is written and committed
        self._before_save(args, state, control)

    def on_evaluate(
        self, args: Any, state: Any, control: Any, metrics: dict | None = None, **kwargs: Any
    ) -> None:
        """The evaluation hooks (a hyperparameter search's pruner) see ``metric_for_best_model``;
        when one asks to stop, every rank stops here, this step saved, as pruned."""
        key = eval_metric_key(args)
        value = (metrics or {}).get(key)
        ask = 0
        if self.dist.is_main and isinstance(value, int | float):
            evaluations = evaluations_logged(state.log_history, key)
            evaluation = Evaluation(
                evaluations, state.global_step, kit_metric_name(key), float(value), True
            )
            ask = int(run_evaluation_hooks(evaluation))
        if max_over_ranks(ask, self.dist, self.device):
            self.outcome = Outcome.PRUNED
            control.should_save = True
            control.should_training_stop = True
            self._before_save(args, state, control)

    def _before_save(self, args: Any, state: Any, control: Any) -> None:
        if control.should_save and self.dist.is_main:
            hf_checkpoints.uncommit(
                hf_checkpoints.checkpoint_folder(args.output_dir, state.global_step)
            )

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        # Every rank wrote its part (rng_state_<rank>.pth) before rank 0 records the files.
        barrier(self.dist)
        if not self.dist.is_main:
            return
        folder = hf_checkpoints.checkpoint_folder(args.output_dir, state.global_step)
        hf_checkpoints.make_durable(folder)
        self.cost.tick(self.cost_state)
        metadata = {
            "billed_seconds": round(self.cost_state.billed_seconds, 3),
            "cost_usd": round(self.cost_state.cost_usd, 6),
        }
        best = state.best_model_checkpoint
        record = hf_checkpoints.build_record(
            folder, is_best=bool(best) and Path(best).name == folder.name, metadata=metadata
        )
        hf_checkpoints.commit(record)
        self.last_saved = record
        if self.mirror is not None:
            self.mirror.enqueue(record)
        hf_checkpoints.prune(Path(args.output_dir), self.keep_last_n, best, self.mirror)

    def extra_logs(self) -> dict[str, float]:
        """``cost/usd`` and ``gpu/*`` for the Trainer's next log entry."""
        extra: dict[str, float] = {}
        if self.cost.tracked:
            extra["cost/usd"] = round(self.cost.cost_now(self.cost_state), 4)
        if self.gpu_sampler is not None:
            extra.update(self.gpu_sampler.metrics())
            warning = self.gpu_sampler.take_warning()
            if warning:
                say(f"warning: {warning}")
        return extra


def run_interruptible(
    trainer: Any,
    *,
    s3_bucket: str | None = None,
    s3_prefix: str | None = None,
    endpoint_url: str | None = None,
    remote_keep_last_n: int | None = None,
    budget_usd: float | None = None,
    hourly_rate_usd: float | None = None,
    gpu_stats: bool | None = None,
    config: Any = None,
    exit_on_stop: bool | None = None,
) -> InterruptibleResult:
    """``trainer.train()`` with stops, complete-checkpoint resume, S3, budget and cost logs.

    ``exit_on_stop`` (default: in a script, not in a notebook): after a stop, exit 75 (76 for
    the budget) instead of returning. Bad settings: one line and exit 2 in a script.
    """
    script = not in_notebook()
    exit_on_stop = script if exit_on_stop is None else exit_on_stop
    dist = _dist_info(trainer.args)
    if dist.launched:
        _leave_process_group_at_exit()
    try:
        settings = _settings(
            config,
            s3_bucket=s3_bucket,
            s3_prefix=s3_prefix,
            endpoint_url=endpoint_url,
            remote_keep_last_n=remote_keep_last_n,
            budget_usd=budget_usd,
            hourly_rate_usd=hourly_rate_usd,
            gpu_stats=gpu_stats,
        )
        return _run(trainer, settings, dist, exit_on_stop)
    except ConfigError as error:
        if not script:
            raise
        print(error.line, file=sys.stderr, flush=True)
        sys.exit(EXIT_CONFIG_ERROR)


def _run(
    trainer: Any, settings: _Settings, dist: DistInfo, exit_on_stop: bool
) -> InterruptibleResult:
    args = trainer.args
    output_dir = Path(args.output_dir)
    billing_from = bill_origin()
    cost_cfg = OmegaConf.create(
        {"hourly_rate_usd": settings.hourly_rate_usd, "budget_usd": settings.budget_usd}
    )
    cost = CostMeter.for_run(cost_cfg, dist.is_main, billing_from)  # ConfigError: no rate
    run_lock = acquire_run_lock(output_dir) if dist.is_main else None  # RunInUseError: exit 2
    mirror = None
    try:
        if settings.s3_bucket and dist.is_main:
            mirror = _open_mirror(settings, output_dir, args.save_total_limit)
        newest = _newest_checkpoint(output_dir, mirror, dist, args.device)
        cost_state = TrainState()
        if newest is not None:
            record = hf_checkpoints.read_record(newest)
            metadata = record.metadata if record is not None else {}
            cost_state.billed_seconds = float(metadata.get("billed_seconds", 0.0))
            cost_state.cost_usd = float(metadata.get("cost_usd", 0.0))
        if mirror is not None:
            mirror.start(hf_checkpoints.committed_records(output_dir))
        finished = _finished_step(newest, args)
        if finished is not None:
            _load_finished(trainer, newest)  # what follows (save_model, evaluate) sees it
            _print(
                dist,
                f"run in {output_dir} finished at step {finished} ({newest.name}): "
                "nothing to train; raise max_steps or num_train_epochs to train more",
            )
            result = _result(
                Outcome.COMPLETED, finished, output_dir, newest, None, None, cost, cost_state
            )
            _finish_uploads(mirror, settings, output_dir, args, result.status)
            return result
        if newest is not None:
            _print(dist, f"resuming from {newest}")
        result = _train(trainer, settings, dist, cost, cost_state, mirror, newest)
    except BaseException:
        _finish_uploads(mirror, settings, output_dir, args, Outcome.FAILED)
        if run_lock is not None:
            run_lock.release()
        raise
    _finish_uploads(mirror, settings, output_dir, args, result.status)
    if run_lock is not None:
        run_lock.release()
    if result.interrupted and exit_on_stop:
        exit_interrupted(result)
    return result


def _train(
    trainer: Any,
    settings: _Settings,
    dist: DistInfo,
    cost: CostMeter,
    cost_state: TrainState,
    mirror: CheckpointMirror | None,
    resume_from: Path | None,
) -> InterruptibleResult:
    args = trainer.args
    output_dir = Path(args.output_dir)
    stop_request = StopRequest(parse_signals(STOP_SIGNALS))
    gpu_sampler = start_gpu_sampler([args.device], settings.logging) if dist.is_main else None
    keep_last_n = args.save_total_limit
    callback = InterruptibleCallback(
        stop_request,
        cost,
        cost_state,
        dist,
        args.device,
        mirror=mirror,
        keep_last_n=keep_last_n,
        gpu_sampler=gpu_sampler,
    )
    trainer.add_callback(callback)
    original_log = trainer.log
    trainer.log = functools.partial(_log_with_extras, original_log, callback)
    args.save_total_limit = None  # the callback prunes, never a checkpoint S3 lacks
    try:
        with stop_request:
            train_output = trainer.train(
                resume_from_checkpoint=str(resume_from) if resume_from is not None else None
            )
    finally:
        args.save_total_limit = keep_last_n
        trainer.log = original_log
        trainer.remove_callback(callback)
        if gpu_sampler is not None:
            gpu_sampler.stop()
    status = callback.outcome
    if status == Outcome.RUNNING:
        # A signal after the last step end: trained and saved; the next call says finished.
        status = Outcome.INTERRUPTED if stop_request.requested else Outcome.COMPLETED
    step = trainer.state.global_step
    if status == Outcome.BUDGET_REACHED:
        _print(dist, cost.budget_reached_line(cost_state, setting="budget_usd"))
    elif status == Outcome.INTERRUPTED:
        _print(dist, f"saved checkpoint-{step}; run the same command again to resume")
    elif status == Outcome.PRUNED:
        _print(dist, f"pruned at step {step}: an evaluation hook asked to stop")
    newest = callback.last_saved.path if callback.last_saved is not None else resume_from
    return _result(
        status, step, output_dir, newest, train_output, stop_request.signal_name, cost, cost_state
    )


def _log_with_extras(original: Any, callback: InterruptibleCallback, logs: dict, *a: Any) -> None:
    logs.update(callback.extra_logs())
    original(logs, *a)


def _result(
    status: Outcome,
    step: int,
    output_dir: Path,
    checkpoint: Path | None,
    train_output: Any,
    signal_name: str | None,
    cost: CostMeter,
    cost_state: TrainState,
) -> InterruptibleResult:
    cost_usd = round(cost.cost_now(cost_state), 4) if cost.tracked else None
    return InterruptibleResult(
        status, step, output_dir, checkpoint, train_output, signal_name, cost_usd
    )


# ----- start-up ---------------------------------------------------------------------------


def _settings(config: Any, **given: Any) -> _Settings:
    """Keyword arguments win; the config's sections fill the rest."""
    checkpoint = getattr(config, "checkpoint", None)
    cost = getattr(config, "cost", None)
    logging = getattr(config, "logging", None) or LoggingConfig()

    def pick(name: str, section: Any, key: str, default: Any = None) -> Any:
        if given.get(name) is not None:
            return given[name]
        return getattr(section, key, default) if section is not None else default

    settings = _Settings(
        s3_bucket=pick("s3_bucket", checkpoint, "s3_bucket"),
        s3_prefix=pick("s3_prefix", checkpoint, "s3_prefix", DEFAULT_S3_PREFIX),
        endpoint_url=pick("endpoint_url", checkpoint, "endpoint_url"),
        remote_keep_last_n=pick("remote_keep_last_n", checkpoint, "remote_keep_last_n"),
        stop_grace_s=float(getattr(checkpoint, "s3_stop_grace_s", DEFAULT_STOP_GRACE_S)),
        hourly_rate_usd=pick("hourly_rate_usd", cost, "hourly_rate_usd"),
        budget_usd=pick("budget_usd", cost, "budget_usd"),
        logging=OmegaConf.create(
            {
                "gpu_stats": pick("gpu_stats", logging, "gpu_stats", True),
                "low_gpu_util_percent": logging.low_gpu_util_percent,
                "low_gpu_util_minutes": logging.low_gpu_util_minutes,
            }
        ),
    )
    if settings.budget_usd is not None and settings.budget_usd <= 0:
        raise ConfigError(f"budget_usd={settings.budget_usd} must be > 0 (None: no budget)")
    if settings.hourly_rate_usd is not None and settings.hourly_rate_usd < 0:
        raise ConfigError(f"hourly_rate_usd={settings.hourly_rate_usd} must be >= 0")
    if settings.remote_keep_last_n is not None and settings.remote_keep_last_n < 1:
        raise ConfigError(f"remote_keep_last_n={settings.remote_keep_last_n} must be >= 1")
    return settings


def _dist_info(args: Any) -> DistInfo:
    """The Trainer's ranks (accelerate started the process group under torchrun)."""
    launched = torch.distributed.is_available() and torch.distributed.is_initialized()
    return DistInfo(
        rank=args.process_index,
        local_rank=args.local_process_index,
        world_size=args.world_size,
        launched=launched,
    )


@functools.cache
def _leave_process_group_at_exit() -> None:
    """Under torchrun, once: at exit every rank leaves accelerate's process group together. A
    gloo rank whose script ends first (rank 0 still writing its results) otherwise tears the
    group down under its peer and aborts (exit -6) after a run that succeeded."""
    atexit.register(leave_process_group)


def _open_mirror(
    settings: _Settings, output_dir: Path, keep_last_n: int | None
) -> CheckpointMirror:
    """The kit's mirror of ``<output_dir>/checkpoint-N`` at ``s3://bucket/<prefix>/<name>/``:
    probed (a write) and lease-checked now, so bad settings fail before training."""
    load_dotenv_file()  # AWS_* from the repo's .env, never over the real environment
    assert settings.s3_bucket is not None
    mirror = CheckpointMirror(
        settings.s3_bucket,
        object_key(settings.s3_prefix, output_dir.resolve().name),
        local_dir=output_dir,
        keep_last_n=settings.remote_keep_last_n or keep_last_n or 3,
        endpoint_url=settings.endpoint_url,
    )
    mirror.probe("s3_bucket")
    mirror.check_lease()
    return mirror


def _newest_checkpoint(
    output_dir: Path, mirror: CheckpointMirror | None, dist: DistInfo, device: torch.device
) -> Path | None:
    """Rank 0 picks (local or S3, downloading when S3's is newer); every rank gets its step."""
    step = -1
    if dist.is_main:
        local = hf_checkpoints.newest_complete(output_dir)
        remote = mirror.remote_checkpoints() if mirror is not None else []
        if remote and (local is None or remote[0].step > local.step):
            local = hf_checkpoints.download(mirror, remote[0])  # type: ignore[arg-type]
        step = local.step if local is not None else -1
    barrier(dist)
    step = max_over_ranks(step, dist, device)
    return hf_checkpoints.checkpoint_folder(output_dir, step) if step >= 0 else None


def _load_finished(trainer: Any, checkpoint: Path) -> None:
    """A finished run's weights and state into ``trainer``, as ``train()`` would leave them."""
    trainer._load_from_checkpoint(str(checkpoint))
    trainer.state = TrainerState.load_from_json(str(checkpoint / "trainer_state.json"))


def _finished_step(checkpoint: Path | None, args: Any) -> int | None:
    """The step a finished run ended at (its checkpoint reached the run's length), else None.

    The length is the Trainer's own ``max_steps`` as saved, unless the settings now ask for
    more (a larger ``max_steps``, or more epochs when ``max_steps`` is unset)."""
    if checkpoint is None:
        return None
    try:
        saved = json.loads((checkpoint / "trainer_state.json").read_text())
    except (OSError, ValueError):
        return None
    step, length = int(saved.get("global_step", 0)), int(saved.get("max_steps", 0))
    if args.max_steps and args.max_steps > 0:
        length = args.max_steps
    elif float(saved.get("num_train_epochs", args.num_train_epochs)) != args.num_train_epochs:
        return None
    return step if length and step >= length else None


# ----- the end ------------------------------------------------------------------------------


def _finish_uploads(
    mirror: CheckpointMirror | None,
    settings: _Settings,
    output_dir: Path,
    args: Any,
    outcome: Outcome,
) -> None:
    """The kit's end of run: the uploads, then retention of what S3 now holds verified."""

    def close(timeout: float) -> FlushReport:
        assert mirror is not None
        report = mirror.stop(timeout)
        hf_checkpoints.prune(output_dir, args.save_total_limit, None, mirror)
        return report

    finish_uploads(mirror, close, outcome, settings.stop_grace_s, output_dir, say)


def _print(dist: DistInfo, message: str) -> None:
    if dist.is_main:
        say(message)
