"""The identity of a model's frozen part, so a checkpoint that lacks it is never resumed on
another one.

A trainable-only checkpoint (``trainable.py``) means nothing without the exact base it was
trained on. Its sidecar records the base's identity; before a resume the model built now
must match it, else one line names what differs (exit 2) and nothing is touched:

- ``name_or_path`` and hub ``revision`` (commit hash) of a Hugging Face model, when known;
- the frozen parameters' dtypes and the quantization config (4-bit is another model);
- a fingerprint of every frozen tensor: the sum and the sum of squares of its raw bits read
  as integers. Integer sums do not depend on the order of the additions, so a GPU and a CPU
  compute the same value (a float sum would not); any single changed element changes it.
  One pass over the weights at start-up, in chunks, on whatever device they live.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from src.checkpoints.trainable import frozen_parameter_names

_INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_CHUNK = 1 << 24  # elements per pass: 128 MB of int64 on the device at most
_MASK = (1 << 64) - 1


def tensor_fingerprint(tensor: torch.Tensor) -> str:
    """``<sum>:<sum of squares>`` (mod 2**64, hex) of the tensor's bits read as integers."""
    flat = tensor.detach().reshape(-1)
    if flat.dtype == torch.bool:
        flat = flat.view(torch.uint8)
    flat = flat.view(_INT_OF_SIZE[flat.element_size()])
    total = squares = 0
    for start in range(0, flat.numel(), _CHUNK):
        chunk = flat[start : start + _CHUNK].to(torch.int64)
        total += int(chunk.sum())
        squares += int((chunk * chunk).sum())
    return f"{total & _MASK:x}:{squares & _MASK:x}"


def _quantization(config: Any) -> dict[str, Any] | None:
    quantization = getattr(config, "quantization_config", None)
    if quantization is None:
        return None
    as_dict = quantization.to_dict() if hasattr(quantization, "to_dict") else dict(quantization)
    return json.loads(json.dumps(as_dict, default=str))  # JSON-safe: dtypes become strings


def frozen_base_identity(model: nn.Module) -> dict[str, Any]:
    """JSON for a checkpoint's sidecar: what the frozen part of ``model`` is.

    Hugging Face fields are read off ``model.config`` when there is one (a PEFT model hands
    attribute lookups down to its base), so no transformers import is needed here.
    """
    config = getattr(model, "config", None)
    frozen = frozen_parameter_names(model)
    state = model.state_dict(keep_vars=True)  # frozen quantized weights: their packed bits
    names = sorted(name for name in frozen if name in state)
    fingerprints = {name: tensor_fingerprint(state[name]) for name in names}
    return {
        "name_or_path": getattr(config, "name_or_path", None) or None,
        "revision": getattr(config, "_commit_hash", None),
        "dtypes": sorted({str(state[name].dtype) for name in fingerprints}),
        "quantization": _quantization(config),
        "tensors": len(fingerprints),
        "fingerprints": fingerprints,
    }


_FIELD_WORDS = {
    "name_or_path": "base model",
    "revision": "base revision",
    "dtypes": "frozen weights' dtype",
    "quantization": "quantization",
}


def describe_difference(saved: Mapping[str, Any], now: Mapping[str, Any]) -> str | None:
    """None when ``now`` is the base ``saved`` names, else what differs, in a few words."""
    for key, words in _FIELD_WORDS.items():
        if saved.get(key) != now.get(key):
            return f"{words} {saved.get(key)!r} then, {now.get(key)!r} now"
    saved_prints, now_prints = saved.get("fingerprints", {}), now.get("fingerprints", {})
    if set(saved_prints) != set(now_prints):
        gone = sorted(set(saved_prints) ^ set(now_prints))
        return f"other frozen parameters ({len(gone)} differ, e.g. {gone[0]!r})"
    changed = [name for name in saved_prints if saved_prints[name] != now_prints[name]]
    if changed:
        return (
            f"frozen weight {changed[0]!r} changed ({len(changed)} of {len(saved_prints)} "
            "frozen tensors differ)"
        )
    return None
