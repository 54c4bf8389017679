"""Residual-stream comparison of base and fine-tuned (SFT) language models, layer by layer.

For one pair: run the configured prompts through the base model, then through the SFT
model, on the same token ids, with hidden states exposed. Per layer (embeddings, then each
block's output) report the cosine similarity of the two residual vectors at each token and
the relative norm of their difference ``|h_sft - h_base| / |h_base|`` (mean, std, min, max
over all tokens of all prompts, plus each prompt's mean), and the KL divergence
KL(base || sft) of the next-token distributions at each position.

The models are loaded one after the other, not together: the base model's states are
moved to CPU (float32) and the model is freed before the SFT model loads, so the GPU only
ever holds one model. The sweep runs each entry in its own process anyway, so whatever a
failed entry leaked dies with it.

Two halves: ``plan_sweep``/``sweep_tasks`` (cheap, no torch) decide what runs where, and
``main`` (``python -m src.sweeps.residual_compare --config C --name N --output F``) runs
one entry. ``scripts/run_residual_sweep.py`` ties them together via ``src.sweeps.runner``.
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import re
import socket
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from src.common.paths import (
    DEFAULT_PERSISTENT_DIR,
    LOCAL_FALLBACK_DIR,
    fallback_reason,
    resolve_persistent_dir,
)
from src.config import EXIT_CONFIG_ERROR, ConfigError, load_config
from src.runs.files import write_json
from src.sweeps.runner import Task, exit_code, run_tasks, summary_table
from src.utils.gpu_monitor import check_guardrail, cuda_index, detect_gpus, requirement_from

DTYPES = ("float32", "bfloat16", "float16")
FALLBACK_DIR = LOCAL_FALLBACK_DIR / "analyses" / "residual_compare"
RESIDUAL_COMPARE_DIR = f"{DEFAULT_PERSISTENT_DIR}/analyses/residual_compare"
TIMESTAMP_FORMAT = "%Y%m%d_%H%M%S"
TIMESTAMP_PATTERN = r"\d{8}_\d{6}"
NORM_EPS = 1e-12


# --------------------------------------------------------------------------- settings


@dataclass
class ResidualModelPair:
    name: str = MISSING  # what --names selects
    base: str = MISSING  # local path or Hugging Face id
    sft: str = MISSING


@dataclass
class ResidualCompareConfig:
    """The ``residual_compare:`` section of a config file (experiments skip it)."""

    models: list[ResidualModelPair] = field(default_factory=list)
    prompts: list[str] = field(
        default_factory=lambda: [
            "The capital of France is",
            "Explain why the sky is blue in one sentence.",
        ]
    )
    dtype: str = "bfloat16"  # float32 | bfloat16 | float16
    device: str = "cuda"  # cuda | cuda:N | cpu
    max_length: int = 256  # tokens per prompt; longer prompts are truncated
    output_dir: str = RESIDUAL_COMPARE_DIR  # falls back to outputs/analyses/... off Vast.ai
    log_dir: str = f"{RESIDUAL_COMPARE_DIR}/logs"
    required_gpu_names: list[str] = field(default_factory=lambda: ["A100", "H100", "H200"])
    min_gpu_memory_gb: float = 40.0  # the guardrail; --force bypasses it


@dataclass
class ResidualSweepFile:
    """What this sweep reads from a config file: only its own section."""

    residual_compare: ResidualCompareConfig = field(default_factory=ResidualCompareConfig)


def load_sweep_config(config_path: str | os.PathLike[str], overrides: list[str]) -> DictConfig:
    """The ``residual_compare`` section of ``config_path`` plus overrides, checked."""
    return load_config(
        config_path, overrides, schema=ResidualSweepFile, sections=("residual_compare",)
    )


# --------------------------------------------------------------------------- planning


@dataclass(frozen=True)
class ModelPair:
    name: str
    base: str
    sft: str


def sanitize_model_id(model_id: str) -> str:
    """File-name form of a model id or path: anything but letters, digits, ``.`` and ``_``
    (spaces, dashes, slashes, ...) becomes ``_``; leading/trailing ``_`` are dropped."""
    return re.sub(r"[^A-Za-z0-9._]", "_", model_id).strip("_") or "model"


def output_filename(timestamp: str, sft: str) -> str:
    return f"residual_compare_{timestamp}_{sanitize_model_id(sft)}.json"


def existing_output(output_dir: Path, sft: str) -> Path | None:
    """The newest result file for this SFT model, if any (what ``--skip-existing`` checks)."""
    pattern = re.compile(
        rf"residual_compare_{TIMESTAMP_PATTERN}_{re.escape(sanitize_model_id(sft))}\.json"
    )
    found = sorted(
        p for p in output_dir.glob("residual_compare_*.json") if pattern.fullmatch(p.name)
    )
    return found[-1] if found else None


def inventory(cfg: DictConfig, source: str) -> list[ModelPair]:
    """The checked model list; a missing field, a duplicate or a bad setting is a ConfigError."""
    section = cfg.residual_compare
    try:
        pairs = [ModelPair(str(m.name), str(m.base), str(m.sft)) for m in section.models]
    except OmegaConfBaseException as error:
        key = getattr(error, "full_key", "residual_compare.models")
        raise ConfigError(
            f"{key} is missing in {source}: each entry needs name, base, sft"
        ) from None
    if not pairs:
        raise ConfigError(
            f"residual_compare.models is empty in {source}: add entries with name, base, sft"
        )
    for label, values in (
        ("name", [p.name for p in pairs]),
        ("sft model", [sanitize_model_id(p.sft) for p in pairs]),
    ):
        duplicates = sorted({v for v in values if values.count(v) > 1})
        if duplicates:
            raise ConfigError(
                f"duplicate {label} in residual_compare.models of {source}: {duplicates[0]}"
            )
    if section.dtype not in DTYPES:
        raise ConfigError(
            f"residual_compare.dtype is {section.dtype!r} in {source}, "
            f"expected one of {'|'.join(DTYPES)}"
        )
    if not re.fullmatch(r"cpu|cuda(:\d+)?", section.device):
        raise ConfigError(
            f"residual_compare.device is {section.device!r} in {source}, "
            "expected cpu, cuda or cuda:N"
        )
    if section.max_length < 1 or not section.prompts:
        raise ConfigError(f"residual_compare needs prompts and max_length >= 1 in {source}")
    return pairs


def select(pairs: list[ModelPair], names: list[str] | None) -> list[ModelPair]:
    """Entries named in ``names`` (all when None), in inventory order; unknown names fail."""
    if not names:
        return pairs
    known = {pair.name for pair in pairs}
    unknown = [name for name in names if name not in known]
    overrides = [name for name in unknown if "=" in name]
    if overrides:  # argparse's --names NAME... swallows key=value written after it
        raise ConfigError(
            f"--names got {overrides[0]!r}, which looks like an override: "
            "put key=value before --names"
        )
    if unknown:
        raise ConfigError(
            f"unknown --names {', '.join(unknown)}; the inventory has {', '.join(sorted(known))}"
        )
    return [pair for pair in pairs if pair.name in names]


@dataclass(frozen=True)
class SweepDirs:
    output_dir: Path
    log_dir: Path
    fell_back: bool = False  # the /workspace defaults were not usable

    def describe(self) -> str:
        """The one line that says where results and logs go, and why when it fell back."""
        where = f"results in {self.output_dir}, logs in {self.log_dir}"
        if self.fell_back:
            return f"/workspace is not usable ({fallback_reason()}): {where}"
        return where


def resolve_dirs(cfg: DictConfig, fallback: Path = FALLBACK_DIR) -> SweepDirs:
    """Absolute results and logs dirs; the /workspace defaults fall back to ``fallback``."""
    section = cfg.residual_compare
    try:
        output_dir = resolve_persistent_dir(
            section.output_dir,
            fallback,
            "residual-compare results",
            setting="residual_compare.output_dir",
            announce=False,
        )
        log_dir = resolve_persistent_dir(
            section.log_dir,
            fallback / "logs",
            "residual-compare logs",
            setting="residual_compare.log_dir",
            announce=False,
        )
    except PermissionError as error:
        raise ConfigError(str(error)) from None
    fell_back = output_dir == fallback or log_dir == fallback / "logs"
    return SweepDirs(output_dir, log_dir, fell_back)


def sweep_tasks(
    pairs: list[ModelPair],
    dirs: SweepDirs,
    config_path: Path,
    overrides: list[str],
    timestamp: str,
) -> list[Task]:
    """One runner task per pair: this module as a subprocess, writing one JSON file."""
    tasks = []
    for pair in pairs:
        output = dirs.output_dir / output_filename(timestamp, pair.sft)
        command = [
            sys.executable,
            "-m",
            "src.sweeps.residual_compare",
            "--config",
            str(config_path),
        ]
        command += ["--name", pair.name, "--output", str(output), *overrides]
        tasks.append(
            Task(
                name=pair.name,
                command=command,
                log_path=dirs.log_dir / f"{sanitize_model_id(pair.name)}.log",
                is_done=lambda sft=pair.sft: existing_output(dirs.output_dir, sft) is not None,
                output=str(output),
            )
        )
    return tasks


def new_timestamp() -> str:
    return datetime.now().strftime(TIMESTAMP_FORMAT)


EXIT_GUARDRAIL = 3


def run_residual_sweep(
    config_path: Path,
    overrides: list[str],
    *,
    names: list[str] | None = None,
    skip_existing: bool = False,
    dry_run: bool = False,
    force: bool = False,
    echo: Callable[[str], None] = print,
) -> int:
    """The whole sweep: check config, guardrail, run entries, print the summary; exit code.

    Config problems raise ConfigError before anything runs or is written.
    """
    cfg = load_sweep_config(config_path, overrides)
    source = f"{config_path} + command-line overrides" if overrides else str(config_path)
    pairs = select(inventory(cfg, source), names)
    section = cfg.residual_compare
    check = check_guardrail(
        detect_gpus(),
        requirement_from(section.required_gpu_names, section.min_gpu_memory_gb),
        cuda_index(section.device),
    )
    if not check.ok and not (force or dry_run):
        print(f"[residual] {check.message}", file=sys.stderr)
        return EXIT_GUARDRAIL
    if not check.ok:
        echo(
            f"[residual] guardrail {'bypassed by --force' if force else 'would refuse'}: "
            f"found {check.found.describe()}"
        )
    dirs = resolve_dirs(cfg)
    echo(f"[residual] {dirs.describe()}")
    tasks = sweep_tasks(pairs, dirs, config_path.resolve(), overrides, new_timestamp())
    results = run_tasks(tasks, skip_done=skip_existing, dry_run=dry_run, echo=echo)
    echo(summary_table(results))
    return 0 if dry_run else exit_code(results)


# --------------------------------------------------------------------------- comparison


def looks_like_local_path(model_id: str) -> bool:
    return model_id.startswith(("/", "./", "../", "~")) or os.path.exists(model_id)


def check_local_paths(pair: ModelPair) -> None:
    """Fail in milliseconds on a typo'd path, before torch/transformers are even imported."""
    for role, model_id in (("base", pair.base), ("sft", pair.sft)):
        if looks_like_local_path(model_id) and not Path(model_id).expanduser().exists():
            raise FileNotFoundError(f"{role} model path not found: {model_id}")


def _load_model(model_id: str, dtype: str, device: str) -> Any:
    import torch
    import transformers
    from packaging.version import Version

    # transformers 4.56 renamed torch_dtype to dtype; older releases only know the former.
    key = "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"
    path = str(Path(model_id).expanduser()) if looks_like_local_path(model_id) else model_id
    model = transformers.AutoModelForCausalLM.from_pretrained(path, **{key: getattr(torch, dtype)})
    return model.to(device).eval()


def _release_gpu_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_states(
    model_id: str, token_ids: list[Any], dtype: str, device: str
) -> tuple[list[Any], list[Any]]:
    """Load, run each prompt once, free. Per prompt: hidden [layers+1, T, H] and log-probs
    [T, V], both float32 on CPU."""
    import torch

    model = _load_model(model_id, dtype, device)
    hidden, logprobs = [], []
    with torch.inference_mode():
        for ids in token_ids:
            out = model(input_ids=ids.to(device), output_hidden_states=True)
            hidden.append(torch.stack(out.hidden_states)[:, 0].float().cpu())
            logprobs.append(torch.log_softmax(out.logits[0].float(), dim=-1).cpu())
            del out
    del model  # the last references: only now can the cache be handed back
    _release_gpu_memory()
    return hidden, logprobs


def spread(per_prompt: list[Any]) -> dict[str, Any]:
    """Mean, std, min, max over every token of every prompt, and each prompt's mean."""
    import torch

    values = torch.cat(per_prompt).double()
    return {
        "mean": values.mean().item(),
        "std": values.std(unbiased=False).item(),
        "min": values.min().item(),
        "max": values.max().item(),
        "per_prompt_mean": [v.double().mean().item() for v in per_prompt],
    }


def compare_states(
    base: tuple[list[Any], list[Any]], sft: tuple[list[Any], list[Any]]
) -> dict[str, Any]:
    """Per-layer cosine and relative difference norm, and next-token KL(base || sft)."""
    import torch
    import torch.nn.functional as F

    base_hidden, base_logprobs = base
    sft_hidden, sft_logprobs = sft
    if (
        base_hidden[0].shape[0] != sft_hidden[0].shape[0]
        or base_hidden[0].shape[-1] != sft_hidden[0].shape[-1]
    ):
        raise ValueError(
            f"base and sft differ in shape: {tuple(base_hidden[0].shape)} vs "
            f"{tuple(sft_hidden[0].shape)} (layers+1, tokens, hidden)"
        )
    layers = []
    for layer in range(base_hidden[0].shape[0]):
        cosines, rel_norms = [], []
        for h_base, h_sft in zip(base_hidden, sft_hidden, strict=True):
            b, s = h_base[layer], h_sft[layer]
            cosines.append(F.cosine_similarity(s, b, dim=-1))
            rel_norms.append((s - b).norm(dim=-1) / b.norm(dim=-1).clamp_min(NORM_EPS))
        layers.append(
            {
                "layer": layer,
                "label": "embeddings" if layer == 0 else f"block_{layer - 1}",
                "cosine_similarity": spread(cosines),
                "relative_diff_norm": spread(rel_norms),
            }
        )
    vocab = min(base_logprobs[0].shape[-1], sft_logprobs[0].shape[-1])
    kls = []
    for lp_base, lp_sft in zip(base_logprobs, sft_logprobs, strict=True):
        if lp_base.shape[-1] != lp_sft.shape[-1]:  # SFT added tokens: compare the shared vocab
            lp_base = torch.log_softmax(lp_base[:, :vocab], dim=-1)
            lp_sft = torch.log_softmax(lp_sft[:, :vocab], dim=-1)
        kls.append((lp_base.exp() * (lp_base - lp_sft)).sum(dim=-1).clamp_min(0.0))
    kl = {"direction": "KL(base || sft)", "vocab_compared": vocab, **spread(kls)}
    note = "layer 0 is the embeddings; the last entry is as transformers returns it (for most "
    note += "models after the final norm)"
    return {"layers": layers, "layers_note": note, "next_token_kl": kl}


def hardware(device: str) -> dict[str, Any]:
    import torch
    import transformers

    return {
        "device": device,
        "gpus": detect_gpus().as_dict(),
        "hostname": socket.gethostname(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cuda": torch.version.cuda,
    }


def compare_pair(
    pair: ModelPair, prompts: list[str], dtype: str, device: str, max_length: int
) -> dict[str, Any]:
    """Everything one output file holds: inputs, per-layer numbers, hardware, timings."""
    check_local_paths(pair)
    import torch
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # per-shard bars would drown the log file

    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device {device} requested but CUDA is not available here")
    started, clock = datetime.now().isoformat(timespec="seconds"), time.perf_counter()
    base_path = str(Path(pair.base).expanduser()) if looks_like_local_path(pair.base) else pair.base
    tokenizer = AutoTokenizer.from_pretrained(base_path)
    # The base tokenizer encodes once; both models see identical token ids.
    token_ids = [
        tokenizer(prompt, return_tensors="pt", truncation=True, max_length=max_length).input_ids
        for prompt in prompts
    ]
    seconds: dict[str, float] = {}
    print(f"[residual] {pair.name}: base {pair.base}", flush=True)
    base = run_states(pair.base, token_ids, dtype, device)
    seconds["base"] = time.perf_counter() - clock
    print(f"[residual] {pair.name}: sft {pair.sft}", flush=True)
    sft = run_states(pair.sft, token_ids, dtype, device)
    seconds["sft"] = time.perf_counter() - clock - seconds["base"]
    numbers = compare_states(base, sft)
    seconds["total"] = time.perf_counter() - clock
    return {
        "name": pair.name,
        "base": pair.base,
        "sft": pair.sft,
        "inputs": {
            "prompts": list(prompts),
            "tokens_per_prompt": [int(ids.shape[-1]) for ids in token_ids],
            "dtype": dtype,
            "device": device,
            "max_length": max_length,
            "tokenizer": pair.base,
        },
        **numbers,
        "hardware": hardware(device),
        "started_at": started,
        "seconds": {key: round(value, 3) for key, value in seconds.items()},
    }


def main(argv: list[str] | None = None) -> int:
    """One entry, as the sweep's subprocess: exit 0 with the JSON written, else 1 or 2."""
    parser = argparse.ArgumentParser(description="compare one base/SFT pair (used by the sweep)")
    parser.add_argument("--config", required=True)
    parser.add_argument("--name", required=True)
    parser.add_argument("--output", required=True, type=Path)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    try:
        cfg = load_sweep_config(args.config, args.overrides)
        (pair,) = select(inventory(cfg, args.config), [args.name])
    except ConfigError as error:
        print(f"config error: {error}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    section = cfg.residual_compare
    try:
        prompts = list(OmegaConf.to_container(section.prompts))  # type: ignore[arg-type]
        record = compare_pair(pair, prompts, section.dtype, section.device, section.max_length)
        args.output.parent.mkdir(parents=True, exist_ok=True)
        write_json(args.output, record)
    except Exception as error:  # the whole entry failed: keep the traceback, end on one line
        traceback.print_exc()
        print(f"error: {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}")
        return 1
    print(f"[residual] {pair.name}: wrote {args.output} in {record['seconds']['total']:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
