"""How the exporter rebuilds a run's model and feeds it: ``ExportSpec`` and its registry.

The run directory holds only weights (a state_dict) and ``config.json``; the code that
turns them back into a module lives with the experiment. A *spec builder* is that code:
``build(run: ExportRun) -> ExportSpec``. Two are built in, picked from the run's config:

- ``template``: any model of ``src/models``'s registry (``model.name``) fed
  ``[batch, data.num_features]`` float features (the template experiment).
- ``char_gpt``: ``CharGPT`` on ``[batch, sequence]`` token ids (the char LM experiment).

Your own model: write a builder in an importable module (``src/models/my_model.py``; not in
``experiments/``, whose files train when imported) and either pass it by name,

    python scripts/export_onnx.py outputs/my-run --spec src.models.my_model:onnx_spec

or register it, so ``export_run`` (in a process that imported the module: a notebook, a
post-training hook) finds it from the run's config by itself::

    register_export_spec("my_model", matches=lambda cfg: "my_width" in cfg["model"],
                         build=onnx_spec)
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from src.export.inference import log_softmax

# onnxruntime's side of a check: input name -> array in, the model's outputs out.
Predict = Callable[[dict[str, np.ndarray]], list[np.ndarray]]
EVAL_BATCH = 64


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
    ``metadata``: extra JSON for ``model.onnx.json`` (the char LM's vocabulary, say).
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


# ----- built-in: the template experiment (src/models registry, synthetic features) ---------


def _is_template(config: dict[str, Any]) -> bool:
    from src.models import MODEL_BUILDERS

    data = config["data"]
    return config["model"].get("name") in MODEL_BUILDERS and {
        "num_features",
        "num_classes",
    } <= set(data)


def _template_test_split(data: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    from src.data.synthetic import make_classification, split

    dataset = make_classification(
        data["num_samples"], data["num_features"], data["num_classes"], data["noise"], data["seed"]
    )
    _, _, test_set = split(dataset, data["val_fraction"], data["test_fraction"], data["seed"])
    features, labels = dataset.tensors
    indices = torch.tensor(test_set.indices)
    return features[indices].numpy(), labels[indices].numpy()


def classification_metrics(logits: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    log_probs = log_softmax(logits.astype(np.float64))
    loss = -log_probs[np.arange(len(labels)), labels].mean()
    return {"loss": float(loss), "accuracy": float((logits.argmax(-1) == labels).mean())}


def template_spec(run: ExportRun) -> ExportSpec:
    from omegaconf import OmegaConf

    from src.models import build_model

    data = run.config["data"]
    num_features = int(data["num_features"])
    model = build_model(OmegaConf.create(run.config["model"]), num_features, data["num_classes"])
    model.load_state_dict(run.state_dict)

    def make_inputs(batch: int, _seq: int | None, generator: torch.Generator):
        return (torch.randn(batch, num_features, generator=generator),)

    def evaluate(predict: Predict) -> dict[str, float]:
        features, labels = _template_test_split(data)
        logits = np.concatenate(
            [
                predict({"features": features[start : start + EVAL_BATCH]})[0]
                for start in range(0, len(features), EVAL_BATCH)
            ]
        )
        return classification_metrics(logits, labels)

    return ExportSpec(
        model=model,
        input_names=["features"],
        output_names=["logits"],
        example_inputs=make_inputs(2, None, torch.Generator().manual_seed(0)),
        make_inputs=make_inputs,
        evaluate=evaluate,
        metadata={"num_classes": int(data["num_classes"]), "output": "logits"},
    )


# ----- built-in: the char LM experiment (CharGPT on token ids) -----------------------------


def _char_gpt_fields() -> set[str]:
    from src.models.char_gpt import CharGPTConfig

    return {item.name for item in dataclasses.fields(CharGPTConfig)}


def _is_char_gpt(config: dict[str, Any]) -> bool:
    return set(config["model"]) == _char_gpt_fields()


def lm_metrics(
    logits: np.ndarray, targets: np.ndarray, ignore_index: int
) -> tuple[float, int, int]:
    """(summed next-token NLL, tokens, correct) over targets that are not padding."""
    mask = targets != ignore_index
    log_probs = log_softmax(logits.astype(np.float64))
    picked = np.take_along_axis(log_probs, np.where(mask, targets, 0)[..., None], axis=-1)[..., 0]
    correct = (logits.argmax(-1) == targets) & mask
    return float(-(picked * mask).sum()), int(mask.sum()), int(correct.sum())


def char_gpt_spec(run: ExportRun) -> ExportSpec:
    from src.data.char_text import (
        IGNORE_INDEX,
        PAD_ID,
        CharTextDataConfig,
        build_char_datasets,
        pad_batch,
    )
    from src.models.char_gpt import CharGPT, CharGPTConfig

    model_cfg = CharGPTConfig(**run.config["model"])
    vocab_size = int(run.state_dict["token_embedding.weight"].shape[0])  # from the data
    model = CharGPT(model_cfg, vocab_size=vocab_size)
    model.load_state_dict(run.state_dict)
    block = model_cfg.block_size

    def make_inputs(batch: int, seq_len: int | None, generator: torch.Generator):
        length = seq_len or block
        return (torch.randint(1, vocab_size, (batch, length), generator=generator),)

    # The vocabulary comes from the corpus, which is rebuilt from the config: the same ids
    # only if the matched files have not changed since training (same size is the check).
    metadata: dict[str, Any] = {"block_size": block, "pad_id": PAD_ID, "output": "logits"}
    evaluate = None
    try:
        data = build_char_datasets(CharTextDataConfig(**run.config["data"]), block)
    except (ValueError, OSError) as error:
        metadata["vocab_note"] = f"corpus not rebuilt: {error}"
    else:
        if len(data.vocab) != vocab_size:
            metadata["vocab_note"] = (
                f"the corpus now gives {len(data.vocab)} ids, the weights have {vocab_size}: "
                "its files changed since training, so no vocab and no test-split metrics"
            )
        else:
            metadata["vocab"] = "".join(data.vocab.chars)  # id = index + 1; 0 is padding

            def evaluate(predict: Predict) -> dict[str, float]:
                nll, tokens, correct = 0.0, 0, 0
                samples = [data.test[i] for i in range(len(data.test))]
                for start in range(0, len(samples), EVAL_BATCH):
                    batch = pad_batch(samples[start : start + EVAL_BATCH])
                    logits = predict({"input_ids": batch["input_ids"].numpy()})[0]
                    part = lm_metrics(logits, batch["targets"].numpy(), IGNORE_INDEX)
                    nll, tokens, correct = nll + part[0], tokens + part[1], correct + part[2]
                loss = nll / max(1, tokens)
                return {
                    "loss": loss,
                    "perplexity": float(np.exp(loss)),
                    "accuracy": correct / max(1, tokens),
                }

    return ExportSpec(
        model=model,
        input_names=["input_ids"],
        output_names=["logits"],
        example_inputs=make_inputs(2, min(8, block), torch.Generator().manual_seed(0)),
        make_inputs=make_inputs,
        seq_lengths=tuple(sorted({1, min(7, block), block})),
        evaluate=evaluate,
        metadata=metadata,
    )


register_export_spec("template", _is_template, template_spec)
register_export_spec("char_gpt", _is_char_gpt, char_gpt_spec)
