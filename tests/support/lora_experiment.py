"""A user's own LoRA fine-tune, written against the documented API only.

The model and data live in tests/support/lora_parts.py (a tiny Llama from a config, PEFT
LoRA adapters). The LoRA tests kill this script, resume it on this machine and on a fresh
one (S3), change its frozen base, and demand bit-identical adapters.
"""

# %% Setup
import os
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT))

import torch

from src.common.rng import seed_everything
from src.common.signals import exit_interrupted
from src.config import in_notebook
from src.launch import load_experiment_config
from src.trainers.interruptible_trainer import InterruptibleTrainer
from tests.support.lora_parts import CONFIG, LoraModel, PatternData, Patterns, build_model

STEP_SECONDS = float(os.environ.get("LORA_STEP_SECONDS", "0"))  # so a signal lands mid-run
PERTURB_BASE = os.environ.get("LORA_PERTURB_BASE") == "1"  # one frozen weight changed


def step(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    if STEP_SECONDS and model.training:
        time.sleep(STEP_SECONDS)
    return model(**batch).loss


# %% Run
cfg = load_experiment_config(
    None if not in_notebook() else [],
    model=LoraModel,
    data=PatternData,
    dev_config=CONFIG,
    prod_config=CONFIG,
)
train_set = Patterns(cfg.data, seed=1, size=cfg.data.num_sequences)
val_set = Patterns(cfg.data, seed=2, size=cfg.data.num_sequences // 4)
seed_everything(cfg.seed)  # the same LoRA initialisation for the same seed
model = build_model(cfg.model, cfg.data.vocab_size, seed=cfg.seed, perturb_base=PERTURB_BASE)
trainer = InterruptibleTrainer(cfg, model, train_set, val_set, step_fn=step)
result = trainer.fit()
if result.interrupted:
    exit_interrupted(result)  # 75 after a stop signal; re-running resumes
print(f"done at step {result.global_step}: {trainer.test(val_set)}")
