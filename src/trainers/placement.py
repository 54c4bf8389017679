"""Where the model lives and where its batches go.

A plain model is moved to the trainer's device. Two kinds of model are placed by their
loader and must not move:

- spread over devices by ``from_pretrained(device_map=...)`` (``hf_device_map``): accelerate's
  hooks pass activations from GPU to GPU; ``.to(one_gpu)`` would pull a 70B model onto one;
- quantized by bitsandbytes (4-bit, 8-bit): ``.to`` raises for them.

Their batches go to the device of the input embeddings, where the forward pass starts. One
process drives all the GPUs such a model spans, so torchrun (one process per GPU) is refused.

``trainer.gradient_checkpointing``: activation checkpointing through the model's own
``gradient_checkpointing_enable`` (Hugging Face models and PEFT models have it), non-reentrant
(works with frozen inputs, as LoRA has, and keeps dropout's randomness exact on recompute).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from src.common.errors import ConfigError


@dataclass(frozen=True)
class Placement:
    """Where a model ended up: ``input_device`` takes the batches, ``devices`` are all its
    parameters' (the GPUs to watch), ``kept_by`` says why it was not moved ("" if it was)."""

    input_device: torch.device
    devices: tuple[torch.device, ...]
    kept_by: str = ""


def placed_by_loader(model: nn.Module) -> str:
    """Why ``model`` must stay where it is ("" when it may move). PEFT models hand attribute
    lookups down to their base, so a LoRA model over a 4-bit base answers for it."""
    device_map = getattr(model, "hf_device_map", None)
    if device_map:
        spread = sorted({str(where) for where in device_map.values()})
        return f"placed by device_map over {', '.join(spread)}"
    for flag, bits in (("is_loaded_in_4bit", 4), ("is_loaded_in_8bit", 8)):
        if getattr(model, flag, False):
            return f"quantized to {bits}-bit"
    return ""


def parameter_devices(model: nn.Module) -> tuple[torch.device, ...]:
    """Every device holding a parameter, in a stable order (cuda:0 before cuda:1)."""
    devices = {parameter.device for parameter in model.parameters()}
    return tuple(sorted(devices, key=lambda device: (device.type, device.index or 0)))


def input_device(model: nn.Module) -> torch.device:
    """Where the forward pass starts: the input embeddings' device, else the first parameter's."""
    get_embeddings = getattr(model, "get_input_embeddings", None)
    embeddings = get_embeddings() if callable(get_embeddings) else None
    weight = getattr(embeddings, "weight", None)
    if isinstance(weight, torch.Tensor):
        return weight.device
    first = next(model.parameters(), None)
    return first.device if first is not None else torch.device("cpu")


def place_model(model: nn.Module, device: torch.device, world_size: int = 1) -> Placement:
    """Move ``model`` to ``device`` unless its loader placed it; ConfigError (one line) for a
    loader-placed model under torchrun."""
    kept_by = placed_by_loader(model)
    if not kept_by:
        model.to(device)
        return Placement(device, (device,))
    if world_size > 1:
        raise ConfigError(
            f"the model is {kept_by}: one process drives all its GPUs, so it cannot run "
            f"under torchrun ({world_size} processes); run the script with python instead"
        )
    return Placement(input_device(model), parameter_devices(model), kept_by)


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Turn on non-reentrant activation checkpointing; ConfigError if the model has none."""
    enable = getattr(model, "gradient_checkpointing_enable", None)
    if not callable(enable) or not getattr(model, "supports_gradient_checkpointing", True):
        raise ConfigError(
            f"trainer.gradient_checkpointing=true needs a model with gradient_checkpointing_"
            f"enable() (Hugging Face models have it); {type(model).__name__} has none: set it "
            "to false, or wrap your blocks in torch.utils.checkpoint.checkpoint(..., "
            "use_reentrant=False)"
        )
    enable(gradient_checkpointing_kwargs={"use_reentrant": False})
