"""How the exporter rebuilds a run's model and feeds it: ``ExportSpec`` and its registry.

The run directory holds only weights (a state_dict) and ``config.json``; the code that
turns them back into a module lives with the experiment. A *spec builder* is that code:
``build(run: ExportRun) -> ExportSpec``. Every export format starts from one. Two are built
in (``src.export.builtin_specs``), picked from the run's config: ``template`` (the template
experiment's models) and ``char_gpt`` (the char LM).

Your own model: write a builder in an importable module (``src/models/my_model.py``; not in
``experiments/``, whose files train when imported) and either pass it by name,

    python scripts/export_onnx.py outputs/my-run --spec src.models.my_model:onnx_spec

or register it, so ``export_run`` (in a process that imported the module: a notebook, a
post-training hook) finds it from the run's config by itself::

    register_export_spec("my_model", matches=lambda cfg: "my_width" in cfg["model"],
                         build=onnx_spec)
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

# The exported model's side of a check: input name -> array in, its outputs out.
Predict = Callable[[dict[str, np.ndarray]], list[np.ndarray]]


@dataclass
class ExportRun:
    """What a spec builder gets: the run as it is on disk."""

    run_dir: Path
    config: dict[str, Any]  # config.json: the resolved config, secrets redacted
    state_dict: dict[str, torch.Tensor]  # best_model.pt or final_model.pt, on the CPU
    weights: str  # "best" or "final"


@dataclass
class ExportSpec:
    """One model, ready to export: the module with its weights, and how to make inputs.

    ``make_inputs(batch, seq_len, generator)`` returns random inputs in ``input_names``
    order; the check runs torch and onnxruntime on them for every batch size in
    ``batch_sizes`` (and every length in ``seq_lengths``, which marks axis 1 of every input
    and output as a dynamic ``sequence`` axis). ``example_inputs`` are traced by the
    exporter: a batch of 2, not 1, so the batch axis is not specialised to a constant.
    ``evaluate(predict)``: metrics on the run's test split through ``predict`` (used by
    ``--int8`` to compare the fp32 and int8 models); None when the data can't be rebuilt.
    ``metadata``: extra JSON for each exported file's sidecar (the char LM's vocabulary, say).
    """

    model: nn.Module
    input_names: list[str]
    output_names: list[str]
    example_inputs: tuple[torch.Tensor, ...]
    make_inputs: Callable[[int, int | None, torch.Generator], tuple[torch.Tensor, ...]]
    batch_sizes: tuple[int, ...] = (1, 3, 64)
    seq_lengths: tuple[int, ...] | None = None
    dynamic_axes: dict[str, dict[int, str]] | None = None  # None: batch (+ sequence) everywhere
    evaluate: Callable[[Predict], dict[str, float]] | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    def axes(self) -> dict[str, dict[int, str]]:
        """Dynamic axes for every input and output (both exporters take this form)."""
        if self.dynamic_axes is not None:
            return self.dynamic_axes
        axes = {0: "batch", 1: "sequence"} if self.seq_lengths else {0: "batch"}
        return {name: dict(axes) for name in [*self.input_names, *self.output_names]}


SpecBuilder = Callable[[ExportRun], ExportSpec]


@dataclass(frozen=True)
class SpecEntry:
    name: str
    matches: Callable[[dict[str, Any]], bool]  # the run's config -> is this my model?
    build: SpecBuilder


_REGISTRY: dict[str, SpecEntry] = {}


def register_export_spec(
    name: str, matches: Callable[[dict[str, Any]], bool], build: SpecBuilder
) -> None:
    """Make ``export_run`` pick ``build`` for runs whose config ``matches`` (first match
    wins, in registration order; registering a name again replaces it)."""
    _REGISTRY[name] = SpecEntry(name, matches, build)


def unregister_export_spec(name: str) -> None:
    _REGISTRY.pop(name, None)


def find_spec(config: dict[str, Any]) -> SpecEntry | None:
    for entry in _REGISTRY.values():
        try:
            if entry.matches(config):
                return entry
        except (KeyError, TypeError, AttributeError):
            continue  # a config of another shape is simply not this spec's model
    return None


def registered_names() -> list[str]:
    return list(_REGISTRY)


def load_spec_builder(reference: str) -> SpecBuilder:
    """``"package.module:function"`` -> the function; ValueError with one line if not."""
    module_name, _, attribute = reference.partition(":")
    if not module_name or not attribute:
        raise ValueError(
            f"--spec {reference!r} is not module:function, e.g. src.models.my_model:onnx_spec"
        )
    try:
        module = importlib.import_module(module_name)
    except Exception as error:  # any failure while importing it is the user's to see
        raise ValueError(
            f"cannot import {module_name!r} for --spec ({type(error).__name__}: {error}): "
            "name a module importable from the repo root, e.g. src.models.my_model:onnx_spec"
        ) from None
    builder = getattr(module, attribute, None)
    if not callable(builder):
        raise ValueError(
            f"{module_name} has no function {attribute!r} for --spec: name the function "
            "that builds your ExportSpec"
        )
    return builder
