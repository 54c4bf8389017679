"""``RunLayout``: every file and folder of a run directory, named in one place.

<paths.output_dir>/<run_name>/
    config.json          resolved config, secrets redacted
    .run.lock            flock of the process that owns the run
    checkpoints/         step_<N>.pt + step_<N>.json sidecars (the checkpoint format's)
    best_model.pt        weights of the best evaluation so far
    final_model.pt       weights when training ended (the run is finished)
    best_adapter/        a PEFT model's best and final adapters, in place of the two above
    final_adapter/       (save_pretrained: adapter_config.json, adapter_model.safetensors)
    training_log.json    per-epoch history
    test_results.json    test metrics, cost, effective batch
    tensorboard/         event files
    wandb/               the W&B (offline) run
    model.onnx           exports (model.onnx.json beside each); export_hf/ (a LoRA run's
                         adapter, merged model, GGUF; export_hf.json beside it)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

CONFIG = "config.json"
LOCK = ".run.lock"
CHECKPOINTS = "checkpoints"
BEST_MODEL = "best_model.pt"
FINAL_MODEL = "final_model.pt"
BEST_ADAPTER = "best_adapter"
FINAL_ADAPTER = "final_adapter"
TRAINING_LOG = "training_log.json"
TEST_RESULTS = "test_results.json"
TENSORBOARD = "tensorboard"
WANDB = "wandb"
ONNX_MODEL = "model.onnx"


@dataclass(frozen=True)
class RunLayout:
    """The paths of one run directory; creates nothing."""

    root: Path

    @property
    def config(self) -> Path:
        return self.root / CONFIG

    @property
    def lock(self) -> Path:
        return self.root / LOCK

    @property
    def checkpoints(self) -> Path:
        return self.root / CHECKPOINTS

    @property
    def best_model(self) -> Path:
        return self.root / BEST_MODEL

    @property
    def final_model(self) -> Path:
        return self.root / FINAL_MODEL

    @property
    def best_adapter(self) -> Path:
        return self.root / BEST_ADAPTER

    @property
    def final_adapter(self) -> Path:
        return self.root / FINAL_ADAPTER

    @property
    def training_log(self) -> Path:
        return self.root / TRAINING_LOG

    @property
    def test_results(self) -> Path:
        return self.root / TEST_RESULTS

    @property
    def tensorboard(self) -> Path:
        return self.root / TENSORBOARD

    @property
    def wandb(self) -> Path:
        return self.root / WANDB

    @property
    def onnx_model(self) -> Path:
        return self.root / ONNX_MODEL

    def weights(self, which: str) -> Path:
        """``best`` or ``final`` weights."""
        return {"best": self.best_model, "final": self.final_model}[which]

    @property
    def is_finished(self) -> bool:
        """Training ended: final_model.pt, or a PEFT run's final_adapter/, is written."""
        return self.final_model.is_file() or self.final_adapter.is_dir()
