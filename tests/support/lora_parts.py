"""The pieces of a user's LoRA fine-tune (tests/support/lora_experiment.py runs them): a tiny
Llama built from a config (no download; the same weights for the same seed), PEFT LoRA on its
attention projections, a causal-LM task on token patterns with dict batches."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from omegaconf import OmegaConf
from peft import LoraConfig, get_peft_model
from torch.utils.data import Dataset
from transformers import LlamaConfig, LlamaForCausalLM

from src.config import DataConfig
from tests.support.experiment import REPO_ROOT

CONFIG = REPO_ROOT / "tests" / "support" / "lora.yaml"


@dataclass
class PatternData(DataConfig):
    num_sequences: int = 256
    length: int = 16
    vocab_size: int = 4096


@dataclass
class LoraModel:
    hidden: int = 64
    layers: int = 2
    r: int = 8
    alpha: int = 16
    dropout: float = 0.1
    targets: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])


class Patterns(Dataset):
    """Arithmetic sequences mod vocab_size: the next token follows from the last two."""

    def __init__(self, settings: PatternData, seed: int, size: int) -> None:
        generator = torch.Generator().manual_seed(seed)
        starts = torch.randint(1, settings.vocab_size, (size,), generator=generator)
        steps = torch.randint(1, 5, (size,), generator=generator)
        positions = torch.arange(settings.length)
        self.ids = (starts[:, None] + steps[:, None] * positions) % settings.vocab_size

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict:
        return {"input_ids": self.ids[index], "labels": self.ids[index]}


def build_model(
    settings: LoraModel, vocab_size: int, seed: int, perturb_base: bool = False
) -> torch.nn.Module:
    with torch.random.fork_rng():  # the base's weights never depend on the global RNG
        torch.manual_seed(seed)
        config = LlamaConfig(
            vocab_size=vocab_size,
            hidden_size=settings.hidden,
            intermediate_size=2 * settings.hidden,
            num_hidden_layers=settings.layers,
            num_attention_heads=2,
            num_key_value_heads=2,
            max_position_embeddings=64,
        )
        base = LlamaForCausalLM(config)
    base.config.name_or_path = "tests/tiny-llama"
    if perturb_base:  # one frozen weight changed: another base under the same name
        with torch.no_grad():
            base.model.layers[1].mlp.up_proj.weight[3, 5] += 1e-3
    lora = LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=list(settings.targets),
        task_type="CAUSAL_LM",
    )
    return get_peft_model(base, lora)


def build_reference_model() -> tuple[torch.nn.Module, int]:
    """(the LoRA model with lora.yaml's settings, its frozen base's bytes), as the run builds it."""
    settings = OmegaConf.load(CONFIG)
    model_settings = LoraModel(**settings.model)
    model = build_model(model_settings, settings.data.vocab_size, seed=settings.seed)
    frozen = sum(p.numel() * p.element_size() for p in model.parameters() if not p.requires_grad)
    return model, frozen
