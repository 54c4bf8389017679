# %% [markdown]
# # Character-level language model
# A small GPT trained on this repo's own Markdown and Python: variable-length samples
# padded per batch, a custom step function and optimizer, then text sampled from it.
#
# Run it whole (re-running the same command resumes an interrupted run):
#
#     python experiments/char_lm_experiment.py                            # dev config
#     python experiments/char_lm_experiment.py run_name=wide model.n_embd=128
#     DEV_MODE=False python experiments/char_lm_experiment.py             # prod config
#     python experiments/char_lm_experiment.py --config configs/my.yaml run_name=try2
#
# Or cell by cell in VS Code ("Run Cell" above each `# %%`, or Shift+Enter).
# Configs: configs/char_lm_dev.yaml and configs/char_lm_prod.yaml.

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
from src.data.char_text import CharTextDataConfig
from src.launch import load_experiment_config
from src.models.char_gpt import CharGPTConfig

# As a script: --config PATH and key=value overrides from the command line.
# In a notebook: the dev/prod config picked by DEV_MODE; edit `overrides` to experiment.
overrides: list[str] = []
cfg = load_experiment_config(
    overrides if in_notebook() else None,
    model=CharGPTConfig,
    data=CharTextDataConfig,
    dev_config=REPO_ROOT / "configs" / "char_lm_dev.yaml",
    prod_config=REPO_ROOT / "configs" / "char_lm_prod.yaml",
)
print(f"run '{cfg.run_name}': {cfg.trainer.max_epochs} epochs, batch {cfg.data.batch_size}")

# %% Data: the repo's own text, split on blank lines, cut to at most block_size + 1 chars
from src.data.char_text import build_char_datasets, pad_batch

data = build_char_datasets(cfg.data, cfg.model.block_size, root=REPO_ROOT)
vocab = data.vocab
train_set, val_set, test_set = data.train, data.val, data.test
print(f"data: {data.num_chars:,} chars from {len(data.files)} files, {len(vocab)} ids")
print(f"samples: {len(train_set)} train / {len(val_set)} val / {len(test_set)} test")

# %% Model
from src.common.rng import seed_everything
from src.models.char_gpt import CharGPT

seed_everything(cfg.seed)  # same initial weights for the same seed
model = CharGPT(CharGPTConfig(**cfg.model), vocab_size=len(vocab))
print(f"model: {sum(p.numel() for p in model.parameters()):,} parameters")

# %% Train (resumes automatically if this run has checkpoints)
from functools import partial

from src.common.signals import exit_interrupted
from src.models.char_gpt import lm_step, make_optimizer
from src.trainers.interruptible_trainer import InterruptibleTrainer

trainer = InterruptibleTrainer(
    cfg,
    model,
    train_set,
    val_set,
    collate_fn=pad_batch,  # pads each batch to its longest sample
    step_fn=lm_step,  # {"loss", "perplexity"}: logged as train/ and val/ metrics
    optimizer_fn=partial(make_optimizer, optim_cfg=cfg.optim),
)
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
        f"test_perplexity {test_results['test_perplexity']:.2f} | outputs in {result.run_dir}"
    )

# %% Sample: the best weights on the CPU continue a prompt
import torch

weights_path = result.run_dir / "best_model.pt"
if not weights_path.is_file():
    weights_path = result.run_dir / "final_model.pt"
if weights_path.is_file():
    model.load_state_dict(torch.load(weights_path, map_location="cpu", weights_only=True))
    print(f"sampling from {weights_path.name}")
else:  # interrupted before anything was saved: sample from the weights in memory
    print("no saved weights yet: sampling from the weights in memory")
model = model.cpu()
prompt = "The trainer "
generated = model.generate(
    torch.tensor(vocab.encode(prompt)),
    max_new_tokens=200,
    temperature=0.8,
    top_k=20,
    generator=torch.Generator().manual_seed(cfg.seed),  # the same text each time it is run
)
print("--- sample ---")
print(vocab.decode(generated))
