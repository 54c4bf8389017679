"""A small MLP classifier: the template's model. Swap in your own in src/models/."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from src.config import require


@dataclass
class MLPConfig:
    """The template experiment's ``model:`` section (``name`` picks a builder in MODEL_BUILDERS)."""

    name: str = "mlp"
    hidden_dim: int = 64
    num_layers: int = 2
    dropout: float = 0.1

    def __post_init__(self) -> None:
        require(self.hidden_dim >= 1, "hidden_dim", self.hidden_dim, "an integer >= 1")
        require(self.num_layers >= 1, "num_layers", self.num_layers, "an integer >= 1")
        require(0 <= self.dropout < 1, "dropout", self.dropout, "a number in [0, 1)")


class MLPClassifier(nn.Module):
    def __init__(
        self, num_features: int, num_classes: int, hidden_dim: int, num_layers: int, dropout: float
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = num_features
        for _ in range(num_layers):
            layers += [nn.Linear(width, hidden_dim), nn.GELU(), nn.Dropout(dropout)]
            width = hidden_dim
        layers.append(nn.Linear(width, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.net(features)
