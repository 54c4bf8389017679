"""The template experiment with what the FSDP tests watch: which training samples each rank
really read, and (optionally) a slower step so a signal lands mid-run.

``FSDP_SEEN_DIR``: each process appends the index of every training sample it reads to
``seen_<rank>_<pid>.txt`` there (``data.num_workers=0``: read in this process, only when the
loop takes the batch). ``FSDP_STEP_SECONDS``: a sleep in every training step.
``FSDP_RANK1_SIGTERM_AT_EVAL_BATCH``: rank 1 alone sends itself SIGTERM at that batch (1 is
the first) of its first validation.
"""

import os
import signal
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT))

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from src.common.rng import seed_everything
from src.common.signals import exit_interrupted
from src.data.synthetic import make_classification, split
from src.launch import load_experiment_config
from src.models import build_model
from src.trainers.interruptible_trainer import InterruptibleTrainer

SEEN_DIR = os.environ.get("FSDP_SEEN_DIR", "")
STEP_SECONDS = float(os.environ.get("FSDP_STEP_SECONDS", "0"))
SIGTERM_AT_EVAL_BATCH = int(os.environ.get("FSDP_RANK1_SIGTERM_AT_EVAL_BATCH", "0"))
eval_batches = 0


class Recorded(Dataset):
    """``dataset``, writing down every index read (one line each, flushed)."""

    def __init__(self, dataset: Dataset, path: Path) -> None:
        self.dataset, self.path = dataset, path

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int):  # noqa: ANN204 - the wrapped dataset's sample
        with open(self.path, "a") as handle:
            handle.write(f"{index}\n")
        return self.dataset[index]


def step(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    global eval_batches
    if STEP_SECONDS and model.training:
        time.sleep(STEP_SECONDS)
    if not model.training and SIGTERM_AT_EVAL_BATCH and os.environ.get("RANK") == "1":
        eval_batches += 1
        if eval_batches == SIGTERM_AT_EVAL_BATCH:
            os.kill(os.getpid(), signal.SIGTERM)
    features, targets = batch
    return F.cross_entropy(model(features), targets)


cfg = load_experiment_config()
data = cfg.data
dataset = make_classification(
    data.num_samples, data.num_features, data.num_classes, data.noise, data.seed
)
train_set, val_set, test_set = split(dataset, data.val_fraction, data.test_fraction, data.seed)
if SEEN_DIR:
    rank = os.environ.get("RANK", "0")
    train_set = Recorded(train_set, Path(SEEN_DIR) / f"seen_{rank}_{os.getpid()}.txt")
seed_everything(cfg.seed)
model = build_model(cfg.model, data.num_features, data.num_classes)
trainer = InterruptibleTrainer(cfg, model, train_set, val_set, step_fn=step)
result = trainer.fit()
if result.interrupted:
    print(f"stopped by {result.stopped_by} at step {result.global_step}; re-run to resume")
    exit_interrupted(result)
results = trainer.test(test_set)
print(f"test_loss {results['test_loss']:.4f}")
