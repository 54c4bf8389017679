"""Rank awareness, so the same script runs alone or under ``torchrun``.

Rank 0 alone writes files; every rank stops at the same step because the stop
flag is reduced across ranks (if any rank was signalled, all stop).

Under torchrun (``RANK`` set, as nanoGPT detects it) the process group is started and
the model wrapped in DDP even for one rank: a single GPU then runs the same NCCL and
DDP code a multi-GPU machine runs, and one rank's DDP averages over one, so its weights
equal a plain run's.
"""

from __future__ import annotations

import atexit
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from src.common.process_groups import leave_process_group


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    launched: bool = False  # by torchrun: a process group runs, even for one rank

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        """True when collectives and DDP are in use (under torchrun, any world size)."""
        return self.launched or self.world_size > 1


def launched_by_torchrun() -> bool:
    """torchrun sets RANK and WORLD_SIZE for every worker; a plain ``python`` run has neither."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def init_distributed(device_type: str) -> DistInfo:
    """Read torchrun's env vars and start the process group (NCCL on CUDA, gloo on CPU)."""
    if not launched_by_torchrun():
        return DistInfo()
    info = DistInfo(
        rank=int(os.environ["RANK"]),
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
        world_size=int(os.environ["WORLD_SIZE"]),
        launched=True,
    )
    if device_type == "cuda":
        # Before the process group: NCCL, object collectives and pinned-memory threads use
        # the current device, which is GPU 0 on every rank unless set here.
        torch.cuda.set_device(info.local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
        # NCCL warns at exit about a group never destroyed (and may leave work pending).
        atexit.register(leave_process_group)
    return info


def wrap_for_training(model: nn.Module, info: DistInfo, device: torch.device) -> nn.Module:
    """``model`` in DDP under torchrun (gradients averaged over ranks), else itself. The
    checkpoint saves the unwrapped model, so its keys carry no ``module.`` prefix."""
    if not info.is_distributed:
        return model
    device_ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids)


def max_over_ranks(value: int, info: DistInfo, device: torch.device) -> int:
    """The largest ``value`` of any rank, on every rank."""
    if not info.is_distributed:
        return value
    tensor = torch.tensor([value], device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return int(tensor.item())


def gather_objects(value: object, info: DistInfo) -> list[object]:
    """Every rank's ``value`` (one entry per rank); ``[value]`` when not distributed."""
    if not info.is_distributed:
        return [value]
    gathered: list[object] = [None] * info.world_size
    dist.all_gather_object(gathered, value)
    return gathered


def sum_over_ranks(tensor: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Element-wise sum across ranks (a copy; ``tensor`` itself is unchanged)."""
    if not info.is_distributed:
        return tensor
    total = tensor.clone()
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return total


def barrier(info: DistInfo) -> None:
    if info.is_distributed:
        dist.barrier()
