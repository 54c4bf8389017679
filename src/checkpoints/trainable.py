"""What of a partly frozen model a checkpoint holds: the parameters that train and the buffers.

A LoRA model (PEFT) trains ~1% of its parameters; saving ``model.state_dict()`` at every
checkpoint writes, fsyncs and uploads the frozen base each time (14 GB for a 7B model in
bf16, against ~0.5 GB of adapter and optimizer state). When any parameter has
``requires_grad=False``, a checkpoint holds instead:

- every parameter that trains (``requires_grad=True``);
- every persistent buffer (batch-norm statistics change; a frozen weight's quantization
  state, saved under the weight's own name, e.g. ``q_proj.weight.absmax``, does not, so it
  is left out with its weight);

and the frozen part is named by its identity (``frozen_base.py``), checked before a resume.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

# The checkpoint's "model_scope": what its "model" entry holds.
FULL_SCOPE = "full"
TRAINABLE_SCOPE = "trainable"


def frozen_parameter_names(model: nn.Module) -> set[str]:
    """The state-dict keys of the parameters that do not train (tied names included)."""
    return {
        name
        for name, parameter in model.named_parameters(remove_duplicate=False)
        if not parameter.requires_grad
    }


def has_frozen_parameters(model: nn.Module) -> bool:
    """True when some parameter has ``requires_grad=False`` (and some trains)."""
    trains = [parameter.requires_grad for parameter in model.parameters()]
    return any(trains) and not all(trains)


def _is_under(key: str, names: set[str]) -> bool:
    """``key`` is one of ``names`` or saved under one (``weight.absmax`` under ``weight``)."""
    while key:
        if key in names:
            return True
        key = key.rpartition(".")[0]
    return False


def trainable_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state without its frozen parameters: what a checkpoint must hold."""
    frozen = frozen_parameter_names(model)
    return {
        key: value.detach()
        for key, value in model.state_dict(keep_vars=True).items()
        if not _is_under(key, frozen)
    }


def load_trainable_state(model: nn.Module, saved: Mapping[str, torch.Tensor]) -> None:
    """Put a ``trainable_state_dict`` back: every key must land, and only frozen ones may be
    missing (ValueError naming the first key that does not fit)."""
    result = model.load_state_dict(dict(saved), strict=False)
    if result.unexpected_keys:
        raise ValueError(
            f"the checkpoint holds {result.unexpected_keys[0]!r}, which this model does not "
            f"have ({len(result.unexpected_keys)} such keys): is it the same model?"
        )
    frozen = frozen_parameter_names(model)
    trained_missing = [key for key in result.missing_keys if not _is_under(key, frozen)]
    if trained_missing:
        raise ValueError(
            f"the checkpoint lacks {trained_missing[0]!r}, which trains in this model "
            f"({len(trained_missing)} such keys): were other parameters frozen when it was saved?"
        )
