# %% [markdown]
# # Template experiment
# The shortest complete example: synthetic data, a small MLP, interruptible training.
#
# Run it whole (re-running the same command resumes an interrupted run):
#
#     python experiments/template_experiment.py                          # dev config
#     python experiments/template_experiment.py run_name=seed3 seed=3     # a new run
#     DEV_MODE=False python experiments/template_experiment.py           # prod config
#     python experiments/template_experiment.py --config configs/my.yaml run_name=try2
#
# Or cell by cell in VS Code ("Run Cell" above each `# %%`, or Shift+Enter).
# Copy this file to start a new experiment; keep the logic in src/.

# %% Setup: config, paths, device
import sys
from pathlib import Path

try:
    REPO_ROOT = Path(__file__).resolve().parents[1]  # VS Code's Interactive Window sets __file__
except NameError:  # a plain Jupyter kernel: notebookFileRoot is the repo root
    REPO_ROOT = Path.cwd()
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from src.config import in_notebook
from src.launch import load_experiment_config

# As a script: --config PATH and key=value overrides from the command line.
# In a notebook: the dev/prod config picked by DEV_MODE; edit `overrides` to experiment.
overrides: list[str] = []
cfg = load_experiment_config(overrides if in_notebook() else None)
print(f"run '{cfg.run_name}': {cfg.trainer.max_epochs} epochs, batch {cfg.data.batch_size}")

# %% Data: generated locally, identical on every machine for the same data.seed
from src.data.synthetic import make_classification, split

dataset = make_classification(
    cfg.data.num_samples, cfg.data.num_features, cfg.data.num_classes, cfg.data.noise, cfg.data.seed
)
train_set, val_set, test_set = split(
    dataset, cfg.data.val_fraction, cfg.data.test_fraction, cfg.data.seed
)
print(f"data: {len(train_set)} train / {len(val_set)} val / {len(test_set)} test")

# %% Model
from src.common.rng import seed_everything
from src.models import build_model

seed_everything(cfg.seed)  # same initial weights for the same seed
model = build_model(cfg.model, cfg.data.num_features, cfg.data.num_classes)
print(f"model: {sum(p.numel() for p in model.parameters()):,} parameters")

# %% Train (resumes automatically if this run has checkpoints)
from src.common.signals import exit_interrupted
from src.trainers.interruptible_trainer import InterruptibleTrainer

trainer = InterruptibleTrainer(cfg, model, train_set, val_set)
result = trainer.fit()
if result.interrupted:
    print(f"stopped by {result.stopped_by} at step {result.global_step}; re-run to resume")
    if not in_notebook():
        exit_interrupted(result)  # 75: stopped by a signal, 76: budget spent; re-run resumes

# %% Evaluate on the test set (best weights) and write test_results.json
if not result.interrupted:
    test_results = trainer.test(test_set)
    print(
        f"test_loss {test_results['test_loss']:.4f} | "
        f"test_acc {test_results['test_accuracy']:.3f} | outputs in {result.run_dir}"
    )

# %% Inspect: per-epoch history (training_log.json) and what the run directory holds
for record in trainer.state.history:
    print(
        f"epoch {record['epoch']}: train {record['train_loss']:.4f} "
        f"val {record['val_loss']:.4f} acc {record['val_accuracy']:.3f}"
    )
print(sorted(path.name for path in result.run_dir.iterdir()))
print(f"TensorBoard: tensorboard --logdir {result.run_dir.parent}")
