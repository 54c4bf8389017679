"""What the person watching sees: the ``[trainer]`` lines, the progress bar, the GPU sampler,
the per-step scalars (TensorBoard/W&B and the bar's postfix), and at each evaluation the
history record (training_log.json) and the line the epoch ends with."""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from tqdm import tqdm

from src.telemetry.metric_logger import MetricLogger
from src.trainers.train_state import TrainState
from src.utils.gpu_monitor import GpuSampler, GpuSamplerGroup, cuda_index


def say(message: str) -> None:
    """One ``[trainer]`` line on stdout, above the progress bar (callers gate it to rank 0)."""
    tqdm.write(f"[trainer] {message}", file=sys.stdout)
    sys.stdout.flush()


def fmt_seconds(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def progress_bar(total: int, initial: int, desc: str, enabled: bool) -> tqdm:
    interactive = sys.stderr.isatty()
    return tqdm(
        total=total,
        initial=initial,
        desc=desc,
        unit="step",
        dynamic_ncols=True,
        mininterval=0.2 if interactive else 30.0,  # log files get a line every 30 s
        disable=not enabled,
        file=sys.stderr,
    )


def start_gpu_sampler(
    devices: Sequence[torch.device], logging_cfg: DictConfig
) -> GpuSampler | GpuSamplerGroup | None:
    """Sample the GPUs among ``devices`` (the model's: several when device_map spread it; call
    on rank 0 only: it alone logs); None on a CPU, with ``logging.gpu_stats`` off, or when
    NVML is missing (said in one line)."""
    indexes = [cuda_index(str(device)) for device in devices]
    indexes = sorted({index for index in indexes if index is not None})
    if not indexes or not logging_cfg.gpu_stats:
        return None
    samplers = [
        GpuSampler(
            index,
            low_util_percent=logging_cfg.low_gpu_util_percent,
            low_util_s=logging_cfg.low_gpu_util_minutes * 60,
        )
        for index in indexes
    ]
    sampler = samplers[0] if len(samplers) == 1 else GpuSamplerGroup(samplers)
    if not sampler.start():
        say(f"GPU stats off: {sampler.unavailable_reason}")
        return None
    return sampler


class Progress:
    """What ``fit`` shows and logs while it runs: the progress bar, the metric logger
    (TensorBoard, W&B) and the GPU sampler. Rank 0 alone shows and logs."""

    def __init__(
        self,
        cfg: DictConfig,
        run_dir: Path,
        state: TrainState,
        *,
        total_steps: int,
        resumed_step: int,
        devices: Sequence[torch.device],
        is_main: bool,
    ) -> None:
        self.logger = MetricLogger(
            cfg, run_dir, resumed_step, is_main, wandb_run_id=state.wandb_run_id
        )
        self.gpu_sampler = start_gpu_sampler(devices, cfg.logging) if is_main else None
        show_bar = is_main and cfg.trainer.progress_bar
        self.bar = progress_bar(total_steps, state.global_step, cfg.run_name, enabled=show_bar)
        self.is_main, self.total_steps, self.max_epochs = (
            is_main,
            total_steps,
            cfg.trainer.max_epochs,
        )

    def training(self, active: bool) -> None:
        """Only training counts towards the low-GPU-utilisation warning, not evaluation."""
        if self.gpu_sampler is not None:
            self.gpu_sampler.set_training(active)

    def step(
        self, metrics: Mapping[str, torch.Tensor], step: int, lr: float, cost_usd: float | None
    ) -> None:
        """Log a step's scalars, with the GPU's and the cost so far, and update the bar."""
        values = {name: float(value.detach()) for name, value in metrics.items()}  # one sync
        scalars = {**{f"train/{name}": value for name, value in values.items()}, "train/lr": lr}
        postfix = {"loss": f"{values['loss']:.4f}", "lr": f"{lr:.2e}"}
        if self.gpu_sampler is not None:
            scalars.update(self.gpu_sampler.metrics())
            if "gpu/utilization_percent" in scalars:
                postfix["gpu"] = f"{scalars['gpu/utilization_percent']:.0f}%"
            warning = self.gpu_sampler.take_warning()
            if warning:
                say(f"warning: {warning}")
        if cost_usd is not None:
            scalars["cost/usd"] = cost_usd
            postfix["cost"] = f"${cost_usd:.2f}"
        self.logger.log(scalars, step)
        self.bar.set_postfix(postfix, refresh=False)

    def evaluation(
        self,
        state: TrainState,
        train_loss: float,
        val: Mapping[str, float],
        *,
        lr: float,
        epoch_done: bool,
        cost_usd: float | None,
        budget_usd: float | None,
    ) -> None:
        """Add the evaluation to the history, log its metrics, print the epoch line."""
        record = epoch_record(state, train_loss, val, lr, cost_usd, epoch_done)
        state.history.append(record)
        self.logger.log({f"val/{name}": value for name, value in val.items()}, record["step"])
        if self.is_main:
            gpu = self.gpu_sampler.summary() if self.gpu_sampler is not None else ""
            say(
                epoch_summary(
                    record,
                    val,
                    max_epochs=self.max_epochs,
                    total_steps=self.total_steps,
                    train_seconds=state.train_seconds,
                    gpu_summary=gpu,
                    cost_usd=cost_usd,
                    budget_usd=budget_usd,
                )
            )

    def close(self) -> None:
        self.bar.close()
        if self.gpu_sampler is not None:
            self.gpu_sampler.stop()
        self.logger.close()


def epoch_record(
    state: TrainState,
    train_loss: float,
    val: Mapping[str, float],
    lr: float,
    cost_usd: float | None,
    epoch_done: bool,
) -> dict[str, Any]:
    """An evaluation's entry in the history (training_log.json)."""
    record: dict[str, Any] = {
        "epoch": state.epoch,
        "step": state.global_step,
        "train_loss": train_loss,
        **{f"val_{name}": metric for name, metric in val.items()},
        "lr": lr,
        "elapsed_s": round(state.train_seconds, 3),
    }
    if cost_usd is not None:
        record["cost_usd"] = round(cost_usd, 4)
    if not epoch_done:
        record["partial_epoch"] = True
    return record


def epoch_summary(
    record: Mapping[str, Any],
    val: Mapping[str, float],
    *,
    max_epochs: int,
    total_steps: int,
    train_seconds: float,
    gpu_summary: str,
    cost_usd: float | None,
    budget_usd: float | None,
) -> str:
    """``epoch 2/10 | step 40/200 | train_loss ... | val_... | elapsed | ETA [| gpu] [| cost]``."""
    steps_done = max(1, record["step"])
    eta = train_seconds / steps_done * max(0, total_steps - record["step"])
    label = "epoch" if not record.get("partial_epoch") else "max_steps in epoch"
    parts = [
        f"{label} {record['epoch'] + 1}/{max_epochs}",
        f"step {record['step']}/{total_steps}",
        f"train_loss {record['train_loss']:.4f}",
        *(f"val_{name} {value:.4f}" for name, value in val.items()),
        f"elapsed {fmt_seconds(train_seconds)}",
        f"ETA {fmt_seconds(eta)}",
    ]
    if gpu_summary:
        parts.append(gpu_summary)
    if cost_usd is not None:
        budget = f" of ${budget_usd:.2f}" if budget_usd is not None else ""
        parts.append(f"cost ${cost_usd:.2f}{budget}")
    return " | ".join(parts)


def finished_line(run_name: str, state: TrainState) -> str:
    return (
        f"run '{run_name}' already finished ({state.status.replace('_', ' ')} "
        f"at step {state.global_step}, epoch {state.epoch}): nothing to train; raise "
        "trainer.max_epochs or trainer.max_steps to train longer, or use a new run_name"
    )


def extending_line(state: TrainState, total_steps: int, trainer_cfg: DictConfig) -> str:
    return (
        f"extending the finished run: trained {state.global_step} steps, "
        f"now up to {total_steps} (max_epochs={trainer_cfg.max_epochs}, "
        f"max_steps={trainer_cfg.max_steps}); the LR follows the schedule "
        "recomputed for the new length from this step on"
    )
