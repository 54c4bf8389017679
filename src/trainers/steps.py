"""The step contract: ``step_fn(model, batch)`` returns a loss tensor or a dict with
``"loss"``; ``eval_fn(model, batch)`` a dict of scalar metrics. The defaults cover
``(inputs, targets)`` batches (``loss_fn(model(inputs), targets)``) and Hugging Face style
dict batches (``model(**batch).loss``); ``optimizer_fn(model)`` defaults to AdamW.
Evaluation averages each metric per sample over the whole set."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from contextlib import AbstractContextManager
from typing import Any

import torch
from omegaconf import DictConfig
from torch import nn

from src.data.batches import batch_size_of, move_to_device

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
StepOutput = torch.Tensor | Mapping[str, torch.Tensor]
StepFn = Callable[[nn.Module, Any], StepOutput]
EvalFn = Callable[[nn.Module, Any], Mapping[str, torch.Tensor]]
OptimizerFn = Callable[[nn.Module], torch.optim.Optimizer]


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


def as_metrics(output: StepOutput) -> dict[str, torch.Tensor]:
    """A step's output as ``{"loss": ..., <other scalars>}``; a clear TypeError otherwise."""
    if isinstance(output, torch.Tensor):
        return {"loss": output}
    if not isinstance(output, Mapping) or "loss" not in output:
        raise TypeError(
            "step_fn must return a loss tensor or a dict with a 'loss' key, "
            f"got {type(output).__name__}"
        )
    return dict(output)


def default_optimizer(model: nn.Module, optim_cfg: DictConfig) -> torch.optim.Optimizer:
    """AdamW with ``optim.lr`` and ``optim.weight_decay`` over the parameters that train (a
    LoRA model's adapters): what runs without ``optimizer_fn``."""
    trainable = [parameter for parameter in model.parameters() if parameter.requires_grad]
    return torch.optim.AdamW(trainable, lr=optim_cfg.lr, weight_decay=optim_cfg.weight_decay)


class EvaluationStopped(Exception):
    """``average_metrics`` gave up before the last batch: its ``should_stop`` said so."""


@torch.no_grad()
def average_metrics(
    model: nn.Module,
    batches: Iterable[Any],
    eval_fn: EvalFn | StepFn,
    device: torch.device,
    autocast: Callable[[], AbstractContextManager],
    should_stop: Callable[[], bool] | None = None,
) -> dict[str, float]:
    """Every metric ``eval_fn`` returns, averaged per sample over ``batches``; the sums stay
    on the device until the end (one host sync per metric, not per batch). ``should_stop``
    is asked before each batch: True raises EvaluationStopped (the model back in train mode)."""
    model.eval()
    sums: dict[str, torch.Tensor] = {}
    count = 0
    non_blocking = device.type == "cuda"
    try:
        for batch in batches:
            if should_stop is not None and should_stop():
                raise EvaluationStopped
            batch = move_to_device(batch, device, non_blocking)
            with autocast():
                metrics = as_metrics(eval_fn(model, batch))
            samples = batch_size_of(batch)
            for name, metric in metrics.items():
                total = sums.setdefault(name, torch.zeros((), dtype=torch.float64, device=device))
                total += torch.as_tensor(metric).detach().double().to(device) * samples
            count += samples
    finally:
        model.train()
    return {name: (total / max(1, count)).item() for name, total in sums.items()}
