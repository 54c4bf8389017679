"""``--merge``: the adapter merged into its base, written as a plain Hugging Face model, and
checked against the adapter model before it is kept.

1. the base the run's config names, reloaded in the export dtype (bf16 by default) and never
   quantized: a QLoRA run's 4-bit base is loaded unquantized, since merging into 4-bit
   weights would round the adapter away; then the adapter (``PeftModel.from_pretrained``);
2. the adapter model's logits on a few random token batches (the reference), and the base's
   with the adapter off (how far the adapter moves them: the scale an error is judged by);
3. ``merge_and_unload``, then ``save_pretrained`` (safetensors shards up to
   ``max_shard_size``), the tokenizer, the generation config;
4. the written directory loaded back with ``AutoModelForCausalLM.from_pretrained`` on the
   same batches: refused (CheckFailedError) when the largest error, relative to the largest
   reference logit, is above the tolerance.

Runs on the CPU: the base, merged in place, is in memory once (the reload comes after it is
freed), so the peak is about one copy of the model in the export dtype.
"""

from __future__ import annotations

import gc
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import peft
import torch
import transformers
from peft import PeftModel
from transformers import AutoModelForCausalLM, GenerationConfig, PreTrainedModel
from transformers.utils import logging as transformers_logging

from src.common.errors import ConfigError
from src.export.errors import CheckFailedError, ExportError, describe_error
from src.export.format import AdapterRun, Log
from src.models.llm import DTYPES, LlmConfig, load_base_model, load_tokenizer

CHECK_SHAPES = ((1, 16), (2, 32), (4, 8))  # (batch, tokens) of the random token batches
CHECK_SEED = 0
GENERATION_CONFIG = "generation_config.json"


@dataclass
class MergeReport:
    """The merged model against the adapter model, one entry per random token batch."""

    tolerance: float
    adapter_effect: float  # max |adapter model - base| logit: how much the adapter changes
    cases: list[dict[str, Any]] = field(default_factory=list)

    @property
    def max_abs_error(self) -> float:
        return max(case["max_abs_error"] for case in self.cases)

    @property
    def max_rel_error(self) -> float:
        largest = max(case["max_abs_logit"] for case in self.cases)
        return self.max_abs_error / largest if largest > 0 else float(self.max_abs_error > 0)

    def summary(self) -> str:
        return (
            f"max abs error {self.max_abs_error:.3e}, relative {self.max_rel_error:.2e} of the "
            f"largest logit (tolerance {self.tolerance:g}; the adapter itself moves logits by "
            f"up to {self.adapter_effect:.3g}) over {len(self.cases)} random token batches"
        )

    def as_json(self) -> dict[str, Any]:
        return {
            "tolerance": self.tolerance,
            "relative_to": "the largest |adapter model logit| over the batches",
            "max_abs_error": self.max_abs_error,
            "max_rel_error": self.max_rel_error,
            "adapter_effect": self.adapter_effect,
            "cases": self.cases,
        }


def llm_config_of(run: AdapterRun) -> LlmConfig:
    """The run's ``model:`` section as an ``LlmConfig`` (a DPO run's extra keys ignored),
    for the base alone, loaded here on the CPU."""
    section = dict(run.config.get("model") or {})
    if "name_or_path" not in section:
        raise ExportError(
            f"{run.run_dir}/config.json names no base model (model.name_or_path): --format hf "
            "exports runs of the LLM experiments (src/models/llm.py's LlmConfig)"
        )
    known = {entry.name for entry in fields(LlmConfig)}
    try:
        cfg = LlmConfig(**{key: value for key, value in section.items() if key in known})
        return replace(cfg, device_map=None, init_adapter=None)
    except (ConfigError, TypeError, ValueError) as error:
        raise ExportError(f"{run.run_dir}/config.json: model: {error}") from None


def load_adapter_model(cfg: LlmConfig, adapter_dir: Path, dtype: torch.dtype) -> PeftModel:
    """The base in ``dtype`` (unquantized) with the adapter, in eval mode on the CPU."""
    try:
        base = load_base_model(cfg, dtype=dtype, quantize=False)
        with warnings.catch_warnings():
            # PEFT 0.21 asks transformers 5 a deprecated question while wrapping; not ours.
            warnings.filterwarnings(
                "ignore", message=".*is_gradient_checkpointing", category=FutureWarning
            )
            model = PeftModel.from_pretrained(base, str(adapter_dir))
    except Exception as error:  # a hub id that does not resolve, no network, a bad adapter
        raise ExportError(
            f"cannot load the base {cfg.name_or_path} with {adapter_dir.name}/: "
            f"{type(error).__name__}: {describe_error(error)}"
        ) from None
    return model.eval()


@contextmanager
def no_progress_bars() -> Iterator[None]:
    """transformers' bars off while a local directory is written or read: the export's own
    lines say what happens, and stderr keeps only a failure's one line (a download of the
    base, before, still shows its progress)."""
    enabled = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            transformers_logging.enable_progress_bar()


def merge_weights(model: PeftModel) -> PreTrainedModel:
    """The adapter folded into the base's weights, the PEFT wrapper gone."""
    return model.merge_and_unload()


def check_batches(vocab_size: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(CHECK_SEED)
    return [torch.randint(0, vocab_size, shape, generator=generator) for shape in CHECK_SHAPES]


def logits_of(model: torch.nn.Module, batches: list[torch.Tensor]) -> list[torch.Tensor]:
    with torch.no_grad():
        return [model(input_ids=tokens).logits.float() for tokens in batches]


def save_merged(model: PreTrainedModel, cfg: LlmConfig, merged_dir: Path, shard: str) -> None:
    """safetensors shards, the tokenizer (with its chat template), the generation config."""
    model.save_pretrained(merged_dir, max_shard_size=shard)  # safetensors: the default
    if list(merged_dir.glob("*.bin")) or not list(merged_dir.glob("*.safetensors")):
        raise ExportError(f"save_pretrained wrote no safetensors into {merged_dir.name}/")
    load_tokenizer(cfg).save_pretrained(merged_dir)
    if not (merged_dir / GENERATION_CONFIG).is_file():
        GenerationConfig.from_model_config(model.config).save_pretrained(merged_dir)


def load_merged(merged_dir: Path, dtype: torch.dtype, trust_remote_code: bool) -> Any:
    """The written model, loaded back the way its users will."""
    model = AutoModelForCausalLM.from_pretrained(
        merged_dir, dtype=dtype, trust_remote_code=trust_remote_code
    )
    return model.eval()


def merge_and_check(
    run: AdapterRun,
    merged_dir: Path,
    dtype_name: str,
    tolerance: float,
    max_shard_size: str,
    log: Log,
) -> dict[str, Any]:
    """Write the merged model into ``merged_dir`` (created here) and check it; the sidecar's
    ``merged`` metadata. CheckFailedError above ``tolerance``."""
    cfg = llm_config_of(run)
    dtype = DTYPES[dtype_name]
    unquantized = (
        " (its QLoRA base reloaded unquantized: never merged into 4-bit weights)"
        if cfg.load_in_4bit
        else ""
    )
    log(f"merge: {run.adapter_dir.name}/ into {cfg.name_or_path} in {dtype_name}{unquantized}")
    model = load_adapter_model(cfg, run.adapter_dir, dtype)
    batches = check_batches(model.get_input_embeddings().num_embeddings)
    expected = logits_of(model, batches)
    with model.disable_adapter():
        without_adapter = logits_of(model, batches)
    adapter_effect = max(
        (a - b).abs().max().item() for a, b in zip(expected, without_adapter, strict=True)
    )
    del without_adapter
    merged = merge_weights(model)
    commit = getattr(merged.config, "_commit_hash", None)
    merged_dir.mkdir()
    with no_progress_bars():
        save_merged(merged, cfg, merged_dir, max_shard_size)
        del model, merged
        gc.collect()
        reloaded = load_merged(merged_dir, dtype, cfg.trust_remote_code)
    got = logits_of(reloaded, batches)
    del reloaded
    gc.collect()
    report = MergeReport(tolerance, adapter_effect)
    for tokens, want, have in zip(batches, expected, got, strict=True):
        report.cases.append(
            {
                "shape": list(tokens.shape),
                "max_abs_error": (have - want).abs().max().item(),
                "max_abs_logit": want.abs().max().item(),
            }
        )
    log(f"merged vs adapter model ({dtype_name}): {report.summary()}")
    if not report.max_rel_error <= tolerance:  # a NaN is refused too
        raise CheckFailedError(
            f"the merged model disagrees with the adapter model: max abs error "
            f"{report.max_abs_error:.3e}, relative {report.max_rel_error:.2e} > --tolerance "
            f"{tolerance:g} ({dtype_name}); nothing was written"
        )
    return {
        "dir": merged_dir.name,
        "dtype": dtype_name,
        "base": {"name_or_path": cfg.name_or_path, "revision": cfg.revision, "commit": commit},
        "base_trained_in_4bit": cfg.load_in_4bit,
        "max_shard_size": max_shard_size,
        "shards": len(list(merged_dir.glob("*.safetensors"))),
        "check": report.as_json(),
        "tools": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "peft": peft.__version__,
        },
    }
