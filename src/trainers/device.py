"""Where and in what precision the trainer computes: the device, the precision this machine
can actually give, and the autocast context for it."""

from __future__ import annotations

import contextlib

import torch

NO_CONTEXT = contextlib.nullcontext()  # reusable; one fewer object per step


def select_device(requested: str) -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


def effective_precision(requested: str, device: torch.device) -> tuple[str, str | None]:
    """The precision to train in, and a line saying why it differs from ``requested``."""
    if requested != "fp32" and device.type != "cuda":
        return "fp32", f"precision {requested} needs CUDA; training in fp32 on {device}"
    if requested == "bf16" and not torch.cuda.is_bf16_supported():
        return "fp16", "this GPU has no bf16 support; using fp16 with a grad scaler"
    return requested, None


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    if precision == "fp32":
        return NO_CONTEXT
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)
