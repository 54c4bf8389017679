"""A small GPT-style character-level language model, with its step function and optimizer.

The model follows nanoGPT's ``model.py`` (pre-LayerNorm blocks, tied input/output
embeddings, GPT-2 initialisation) at a size that trains on a laptop CPU in dev mode.
``lm_step`` and ``make_optimizer`` are what ``InterruptibleTrainer`` takes as
``step_fn`` and ``optimizer_fn``, kept here so tests and notebooks import the same ones.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from src.config import require
from src.data.char_text import IGNORE_INDEX

ADAM_BETAS = (0.9, 0.95)  # nanoGPT/GPT-3: a shorter second-moment memory is steadier for LMs


@dataclass
class CharGPTConfig:
    """The experiment's ``model:`` section; the vocabulary size comes from the data."""

    n_layer: int = 2
    n_head: int = 4
    n_embd: int = 64
    block_size: int = 64  # longest context, in characters
    dropout: float = 0.0
    bias: bool = True  # biases in Linear and LayerNorm; False is slightly faster

    def __post_init__(self) -> None:
        # Checked here so a bad value is one config error at start-up, not a crash mid-build.
        for name in ("n_layer", "n_head", "n_embd", "block_size"):
            require(getattr(self, name) >= 1, name, getattr(self, name), "an integer >= 1")
        require(
            self.n_embd % self.n_head == 0,
            "n_embd",
            self.n_embd,
            f"a multiple of n_head={self.n_head}",
        )
        require(0.0 <= self.dropout < 1.0, "dropout", self.dropout, "a number in [0, 1)")


class CausalSelfAttention(nn.Module):
    def __init__(self, config: CharGPTConfig) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.dropout = config.dropout
        self.qkv = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, time, channels = x.shape
        q, k, v = self.qkv(x).split(channels, dim=2)
        # [B, T, C] -> [B, heads, T, head_dim], the layout scaled_dot_product_attention expects
        q, k, v = (t.view(batch, time, self.n_head, -1).transpose(1, 2) for t in (q, k, v))
        # is_causal also makes right-padding harmless: real tokens never attend to later pads.
        y = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True
        )
        y = y.transpose(1, 2).contiguous().view(batch, time, channels)
        return self.resid_dropout(self.proj(y))


class MLP(nn.Module):
    def __init__(self, config: CharGPTConfig) -> None:
        super().__init__()
        self.fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.proj(F.gelu(self.fc(x))))


class Block(nn.Module):
    """Pre-LayerNorm: the residual path stays an identity, so deep stacks train stably."""

    def __init__(self, config: CharGPTConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class CharGPT(nn.Module):
    """Token + position embeddings, ``n_layer`` blocks, final LayerNorm, tied output head."""

    def __init__(self, config: CharGPTConfig, vocab_size: int) -> None:
        super().__init__()
        if vocab_size < 2:
            raise ValueError(f"vocab_size must be >= 2, got {vocab_size}")
        self.config = config
        self.vocab_size = vocab_size
        self.token_embedding = nn.Embedding(vocab_size, config.n_embd)
        self.position_embedding = nn.Embedding(config.block_size, config.n_embd)
        self.dropout = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.lm_head = nn.Linear(config.n_embd, vocab_size, bias=False)
        # Tied: one matrix maps ids to vectors and back, fewer parameters and better small LMs.
        self.lm_head.weight = self.token_embedding.weight
        self.apply(self._init_weights)
        # GPT-2: scale the projections that write into the residual stream by depth, so its
        # variance does not grow with n_layer.
        for name, param in self.named_parameters():
            if name.endswith("proj.weight"):
                nn.init.normal_(param, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """``input_ids`` [B, T] -> logits [B, T, vocab_size]."""
        length = input_ids.shape[1]
        if length > self.config.block_size:
            raise ValueError(
                f"sequence length {length} exceeds block_size {self.config.block_size}"
            )
        positions = torch.arange(length, device=input_ids.device)
        x = self.dropout(self.token_embedding(input_ids) + self.position_embedding(positions))
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))

    @torch.no_grad()
    def generate(
        self,
        prompt_ids: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Prompt followed by ``max_new_tokens`` sampled ids ([T] in, [T + n] out; [B, T] too).

        The context is cropped to the last ``block_size`` ids, and the padding id 0 is never
        sampled. Pass a seeded ``generator`` (on the model's device) for repeatable text.
        """
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if prompt_ids.numel() == 0:
            raise ValueError("prompt_ids is empty: give at least one token")
        was_training = self.training
        self.eval()  # dropout off while sampling, restored afterwards
        ids = prompt_ids.unsqueeze(0) if prompt_ids.dim() == 1 else prompt_ids
        ids = ids.to(self.token_embedding.weight.device)
        for _ in range(max_new_tokens):
            logits = self(ids[:, -self.config.block_size :])[:, -1, :].float() / temperature
            logits[:, 0] = -math.inf  # padding is not text
            if top_k is not None:
                kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
                logits = logits.masked_fill(logits < kth, -math.inf)
            next_id = torch.multinomial(logits.softmax(dim=-1), 1, generator=generator)
            ids = torch.cat([ids, next_id], dim=1)
        self.train(was_training)
        return ids.squeeze(0) if prompt_ids.dim() == 1 else ids


def lm_step(model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Next-character cross-entropy over real tokens (pads carry IGNORE_INDEX), and perplexity."""
    logits = model(batch["input_ids"])
    loss = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]),
        batch["targets"].reshape(-1),
        ignore_index=IGNORE_INDEX,
    )
    return {"loss": loss, "perplexity": loss.detach().exp()}


def make_optimizer(model: nn.Module, optim_cfg: Any) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices (dim >= 2) only, as nanoGPT does.

    Decaying biases and LayerNorm gains only pulls them towards zero with no regularising
    benefit. ``optim_cfg`` needs ``lr`` and ``weight_decay`` (the config's ``optim:``).
    Tied weights are one parameter, so ``model.parameters()`` yields them once.
    """
    params = [param for param in model.parameters() if param.requires_grad]
    decay = [param for param in params if param.dim() >= 2]
    no_decay = [param for param in params if param.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": float(optim_cfg.weight_decay)},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=float(optim_cfg.lr), betas=ADAM_BETAS)
