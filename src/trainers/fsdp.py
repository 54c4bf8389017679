"""FSDP2 (``trainer.strategy: fsdp``): parameters, gradients and optimizer state sharded over
the ranks, so a model too big for one GPU trains on several.

``shard_model`` applies ``fully_shard`` to each block (the model's repeated block class, or the
class ``trainer.fsdp_wrap`` names) and then to the root, with a mixed-precision policy from
``trainer.precision`` (bf16/fp16 parameters and gradient reduction, fp32 master weights in the
optimizer) and, with ``trainer.fsdp_cpu_offload``, parameters and optimizer state on the CPU.
The model is sharded in place: the user's ``optimizer_fn`` receives it sharded.

Gradient accumulation: between micro-batches gradients are neither reduced nor resharded
(``gradient_sync(model, False)``); gradient clipping works on the sharded (DTensor) gradients
with ``nn.utils.clip_grad_norm_``, whose norm is over all shards.

Checkpoints are sharded (src/checkpoints/sharded_format.py, ``sharded_state``/
``load_sharded_state``); best_model.pt and final_model.pt are consolidated (``full_weights``),
so export takes them unchanged.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, fully_shard

from src.common.errors import ConfigError
from src.trainers.distributed import DistInfo

PRECISION_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
FULL_ON_CPU = StateDictOptions(full_state_dict=True, cpu_offload=True)


def block_class(model: nn.Module, wrap_name: str = "") -> type[nn.Module] | None:
    """The class whose instances ``fully_shard`` wraps one by one: ``wrap_name`` (a class
    name), else the most repeated parameter-holding class among the children of the model's
    first ModuleList/Sequential (a transformer's blocks, an MLP's layers); None: only the root.
    """
    if wrap_name:
        for module in model.modules():
            if type(module).__name__ == wrap_name:
                return type(module)
        names = sorted({type(module).__name__ for module in model.modules()})
        raise ConfigError(
            f"trainer.fsdp_wrap={wrap_name!r} names no module of the model; its classes: "
            + ", ".join(names)
        )
    for module in model.modules():
        if isinstance(module, (nn.ModuleList, nn.Sequential)):
            counts = Counter(
                type(child) for child in module.children() if any(True for _ in child.parameters())
            )
            repeated = [(count, cls) for cls, count in counts.items() if count >= 2]
            if repeated:
                return max(repeated, key=lambda item: item[0])[1]
    return None


def shard_model(
    model: nn.Module,
    info: DistInfo,
    device: torch.device,
    precision: str,
    *,
    wrap_name: str = "",
    cpu_offload: bool = False,
) -> nn.Module:
    """``fully_shard`` each block, then the root; returns ``model`` (sharded in place)."""
    if not info.is_distributed:
        raise ConfigError(
            "trainer.strategy=fsdp shards over the ranks of torchrun: start the script with "
            "torchrun --nproc_per_node=N (1 works), or set trainer.strategy=ddp"
        )
    if any(not parameter.requires_grad for parameter in model.parameters()):
        raise ConfigError(
            "trainer.strategy=fsdp shards models whose every parameter trains; this one is "
            "partly frozen (LoRA): its checkpoints hold only what trains, so run it under "
            "trainer.strategy=ddp"
        )
    mesh = init_device_mesh(device.type, (info.world_size,))
    options: dict[str, Any] = {"mesh": mesh}
    dtype = PRECISION_DTYPES.get(precision)
    if dtype is not None:  # fp32 master weights stay in the optimizer's shards
        options["mp_policy"] = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=dtype)
    if cpu_offload:
        options["offload_policy"] = CPUOffloadPolicy(pin_memory=device.type == "cuda")
    block = block_class(model, wrap_name)
    if block is not None:
        for module in list(model.modules()):
            if isinstance(module, block) and module is not model:
                fully_shard(module, **options)
    fully_shard(model, **options)
    return model


def gradient_sync(model: nn.Module, enabled: bool) -> None:
    """Reduce and reshard gradients after this backward (the last micro-batch), or keep them
    unreduced and the parameters unsharded (the ones before)."""
    if isinstance(model, FSDPModule):
        model.set_requires_gradient_sync(enabled)
        model.set_reshard_after_backward(enabled)


def sharded_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """This rank's shards of the model and optimizer, keyed by parameter name."""
    model_state, optimizer_state = get_state_dict(model, optimizer)
    return {"model": model_state, "optimizer": optimizer_state}


def load_sharded_state(
    model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]
) -> None:
    set_state_dict(
        model,
        optimizer,
        model_state_dict=state["model"],
        optim_state_dict=state["optimizer"],
    )


def full_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's weights on the CPU on rank 0 (empty on the others): a collective."""
    return get_model_state_dict(model, options=FULL_ON_CPU)


def load_full_weights(model: nn.Module, weights: dict[str, torch.Tensor]) -> None:
    """Load whole weights (every rank holds them) into the sharded model."""
    set_model_state_dict(model, weights, options=StateDictOptions(full_state_dict=True))
