"""Models: the registry (``model.name`` picks a builder here), the template's MLP and settings,
the char GPT, and Hugging Face causal LMs with LoRA (``llm.py``; ``llm_steps.py``: SFT and DPO
steps; ``hf_cache.py`` puts the hub cache on the volume).
"""

from __future__ import annotations

from collections.abc import Callable

from omegaconf import DictConfig
from torch import nn

from src.models.mlp import MLPClassifier


def _build_mlp(model_cfg: DictConfig, num_features: int, num_classes: int) -> nn.Module:
    return MLPClassifier(
        num_features=num_features,
        num_classes=num_classes,
        hidden_dim=model_cfg.hidden_dim,
        num_layers=model_cfg.num_layers,
        dropout=model_cfg.dropout,
    )


MODEL_BUILDERS: dict[str, Callable[[DictConfig, int, int], nn.Module]] = {"mlp": _build_mlp}


def build_model(model_cfg: DictConfig, num_features: int, num_classes: int) -> nn.Module:
    if model_cfg.name not in MODEL_BUILDERS:
        known = ", ".join(sorted(MODEL_BUILDERS))
        raise ValueError(f"unknown model.name {model_cfg.name!r}: choose one of {known}")
    return MODEL_BUILDERS[model_cfg.name](model_cfg, num_features, num_classes)
