"""The built-in spec builders, registered on import: the template and the char LM.

- ``template``: any model of ``src/models``'s registry (``model.name``) fed
  ``[batch, data.num_features]`` float features (the template experiment).
- ``char_gpt``: ``CharGPT`` on ``[batch, sequence]`` token ids (the char LM experiment).

``src.export.pipeline`` imports this module, so ``export_run`` always knows them.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import torch
from omegaconf import OmegaConf

from src.data.char_text import (
    IGNORE_INDEX,
    PAD_ID,
    CharTextDataConfig,
    build_char_datasets,
    pad_batch,
)
from src.data.synthetic import make_classification, split
from src.export.inference import log_softmax
from src.export.specs import ExportRun, ExportSpec, Predict, register_export_spec
from src.models import MODEL_BUILDERS, build_model
from src.models.char_gpt import CharGPT, CharGPTConfig

EVAL_BATCH = 64  # test-split samples per call of the exported model


# ----- built-in: the template experiment (src/models registry, synthetic features) ---------


def _is_template(config: dict[str, Any]) -> bool:
    data = config["data"]
    return config["model"].get("name") in MODEL_BUILDERS and {
        "num_features",
        "num_classes",
    } <= set(data)


def _template_test_split(data: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
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


_CHAR_GPT_FIELDS = frozenset(item.name for item in dataclasses.fields(CharGPTConfig))


def _is_char_gpt(config: dict[str, Any]) -> bool:
    return set(config["model"]) == _CHAR_GPT_FIELDS


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
