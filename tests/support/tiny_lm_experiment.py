"""A user's own experiment, written against the documented API only (not the template's).

A tiny transformer classifier on variable-length token sequences: its own model and data
settings (dataclasses), dict batches, a padding collate, random augmentation in
``__getitem__`` (python, numpy and torch draws), a step function returning two metrics, an
optimizer factory with weight-decay groups. The resume tests kill it and demand
bit-identical weights.
"""

# %% Setup
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT))

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from src.common.rng import seed_everything
from src.common.signals import exit_interrupted
from src.config import DataConfig, in_notebook, require
from src.launch import load_experiment_config
from src.trainers.interruptible_trainer import InterruptibleTrainer

CONFIG = Path(__file__).with_name("tiny_lm.yaml")
# The kill tests slow each training step so a signal lands mid-run on a fast or a loaded box.
STEP_SECONDS = float(os.environ.get("TINY_LM_STEP_SECONDS", "0"))
# tests/test_failures.py: a GPU out of memory at this training step call (counted in this
# process), and a slow test set so a signal lands while test() runs.
OOM_AT_CALL = int(os.environ.get("TINY_LM_OOM_AT_CALL", "0"))
# On a GPU: that call really allocates more than any card holds (the driver's own error).
REAL_OOM = os.environ.get("TINY_LM_REAL_OOM") == "1"
TEST_STEP_SECONDS = float(os.environ.get("TINY_LM_TEST_STEP_SECONDS", "0"))
calls = {"train": 0, "testing": False}


@dataclass
class TinyData(DataConfig):
    num_sequences: int = 512
    vocab_size: int = 32
    max_len: int = 24
    augment: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.max_len >= 4, "max_len", self.max_len, "an integer >= 4")


@dataclass
class TinyModel:
    dim: int = 32
    heads: int = 2
    layers: int = 2
    dropout: float = 0.1

    def __post_init__(self) -> None:
        if self.dim % self.heads:
            raise ValueError(f"dim={self.dim} must be divisible by heads={self.heads}")


class Sequences(Dataset):
    """Label: is token 1 more frequent than token 2? Augmentation keeps the label."""

    def __init__(self, settings: TinyData, seed: int, size: int) -> None:
        generator = torch.Generator().manual_seed(seed)
        lengths = torch.randint(4, settings.max_len + 1, (size,), generator=generator)
        self.sequences = [
            torch.randint(1, settings.vocab_size, (int(n),), generator=generator) for n in lengths
        ]
        self.labels = [int((s == 1).sum() > (s == 2).sum()) for s in self.sequences]
        self.augment = settings.augment

    def __len__(self) -> int:
        return len(self.sequences)

    def __getitem__(self, index: int) -> dict:
        tokens = self.sequences[index].clone()
        if self.augment:  # draws from all three RNGs, as real augmentation code does
            shift = random.randint(0, 3)
            noise_position = int(np.random.randint(0, len(tokens)))
            tokens = torch.roll(tokens, shift)
            if torch.rand(()) < 0.3 and tokens[noise_position] not in (1, 2):
                tokens[noise_position] = 3
        return {"input_ids": tokens, "label": torch.tensor(self.labels[index])}


def pad_batch(samples: list[dict]) -> dict:
    longest = max(len(s["input_ids"]) for s in samples)
    ids = torch.zeros(len(samples), longest, dtype=torch.long)
    for row, sample in enumerate(samples):
        ids[row, : len(sample["input_ids"])] = sample["input_ids"]
    return {
        "input_ids": ids,
        "padding_mask": ids == 0,
        "labels": torch.stack([s["label"] for s in samples]),
        "note": "non-tensor values pass through",
    }


class TinyTransformer(nn.Module):
    def __init__(self, settings: TinyModel, vocab_size: int, max_len: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size, settings.dim, padding_idx=0)
        self.position = nn.Parameter(torch.zeros(max_len, settings.dim))
        layer = nn.TransformerEncoderLayer(
            settings.dim, settings.heads, 2 * settings.dim, settings.dropout, batch_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, settings.layers, enable_nested_tensor=False)
        self.head = nn.Linear(settings.dim, 2)

    def forward(self, input_ids: torch.Tensor, padding_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.embed(input_ids) + self.position[: input_ids.shape[1]]
        hidden = self.encoder(hidden, src_key_padding_mask=padding_mask)
        keep = (~padding_mask).unsqueeze(-1).float()
        return self.head((hidden * keep).sum(1) / keep.sum(1))


def step(model: nn.Module, batch: dict) -> dict:
    assert batch["note"] == "non-tensor values pass through"
    if STEP_SECONDS and model.training:
        time.sleep(STEP_SECONDS)
    if model.training:
        calls["train"] += 1
        if calls["train"] == OOM_AT_CALL and REAL_OOM:
            torch.empty(2**44, dtype=torch.uint8, device=batch["input_ids"].device)  # 16 TiB
        if calls["train"] == OOM_AT_CALL:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    if TEST_STEP_SECONDS and calls["testing"]:
        time.sleep(TEST_STEP_SECONDS)
    logits = model(batch["input_ids"], batch["padding_mask"])
    loss = F.cross_entropy(logits, batch["labels"])
    return {"loss": loss, "acc": (logits.argmax(-1) == batch["labels"]).float().mean()}


def make_optimizer(model: nn.Module, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay}]
    return torch.optim.AdamW(groups, lr=lr, weight_decay=0.0)


# %% Run
cfg = load_experiment_config(
    None if not in_notebook() else [],
    model=TinyModel,
    data=TinyData,
    dev_config=CONFIG,
    prod_config=CONFIG,
)
train_set = Sequences(cfg.data, seed=1, size=cfg.data.num_sequences)
val_set = Sequences(cfg.data, seed=2, size=cfg.data.num_sequences // 4)
seed_everything(cfg.seed)
model = TinyTransformer(cfg.model, cfg.data.vocab_size, cfg.data.max_len + 4)
trainer = InterruptibleTrainer(
    cfg,
    model,
    train_set,
    val_set,
    collate_fn=pad_batch,
    step_fn=step,
    optimizer_fn=lambda m: make_optimizer(m, cfg.optim.lr, cfg.optim.weight_decay),
)
result = trainer.fit()
if result.interrupted:
    exit_interrupted(result)  # 75 after a stop signal, 76 once cost.budget_usd is spent
print("testing", flush=True)  # tests/test_failures.py signals once it reads this
calls["testing"] = True
print(f"done at step {result.global_step}: {trainer.test(val_set)}")
