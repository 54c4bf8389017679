# %% [markdown]
# # TRL SFTTrainer with LoRA, through `run_interruptible`
# A script written against TRL (or `transformers.Trainer`) keeps its own loop and gets the
# kit's promises from one call in place of `trainer.train()`: signal-safe stops (exit 75),
# resume from the newest *complete* checkpoint, the S3 mirror, the budget (exit 76), cost and
# GPU stats in the Trainer's own logs. docs/hf_trainer.md says what is exact.
#
#     python experiments/trl_sft_experiment.py                      # dev: tiny-llama, CPU, seconds
#     python experiments/trl_sft_experiment.py run_name=r16 model.lora_r=16 cost.budget_usd=5
#     DEV_MODE=False python experiments/trl_sft_experiment.py       # prod: a hub model, 4-bit
#     python scripts/remote_train.py HOST experiments/trl_sft_experiment.py --export hf
#     sbatch scripts/slurm/train.sbatch experiments/trl_sft_experiment.py
#
# Kill it (Ctrl-C, `kill -TERM`, Slurm's USR1) and run the same command again: it resumes.
# The kit's YAML drives it (configs/trl_sft_dev.yaml, configs/trl_sft_prod.yaml): the run
# directory <paths.output_dir>/<run_name> holds config.json, the Trainer's checkpoint-N
# folders and final_adapter/, so remote_train, Slurm and `scripts/export.py --format hf`
# treat it like any run of the kit.

# %% Setup: config, paths, Hugging Face cache
import os
import sys
from pathlib import Path

try:
    REPO_ROOT = Path(__file__).resolve().parents[1]  # VS Code's Interactive Window sets __file__
except NameError:  # a plain Jupyter kernel: notebookFileRoot is the repo root
    REPO_ROOT = Path.cwd()
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from src.models.hf_cache import use_persistent_hf_cache

use_persistent_hf_cache()  # before transformers is imported: it reads HF_HOME once

import torch

from src.config import in_notebook
from src.data.chat import ChatDataConfig
from src.launch import load_experiment_config
from src.models.llm import LlmConfig
from src.runs.files import prepare_run_dir

# As a script: --config PATH and key=value overrides from the command line.
# In a notebook: the dev/prod config picked by DEV_MODE; edit `overrides` to experiment.
overrides: list[str] = []
cfg = load_experiment_config(
    overrides if in_notebook() else None,
    model=LlmConfig,
    data=ChatDataConfig,
    dev_config=REPO_ROOT / "configs" / "trl_sft_dev.yaml",
    prod_config=REPO_ROOT / "configs" / "trl_sft_prod.yaml",
)
model_cfg = LlmConfig.from_section(cfg.model)
run_dir = prepare_run_dir(cfg)  # <paths.output_dir>/<run_name>, config.json written
if model_cfg.is_tiny and not torch.cuda.is_available():
    torch.set_num_threads(1)  # a tiny model: thread hand-offs cost more than they give
print(f"run '{cfg.run_name}' in {run_dir}: {model_cfg.name_or_path}, LoRA r={model_cfg.lora_r}")

# %% Data: the chats as TRL's conversational prompt/completion pairs, split like the kit's
from datasets import Dataset

from src.data.chat import data_file, prompt_completion_splits

splits = prompt_completion_splits(data_file(cfg.data.path, REPO_ROOT), cfg.data)
train_set, val_set, test_set = (Dataset.from_list(rows) for rows in splits)
print(f"data: {len(train_set)} train / {len(val_set)} val / {len(test_set)} test conversations")

# %% Model and trainer: the frozen base, LoRA adapters from TRL's peft_config
from trl import SFTConfig, SFTTrainer

from src.integrations.hf_args import reporter_environment, trainer_arguments
from src.models.llm import load_base_model, load_tokenizer, lora_config

for key, value in reporter_environment(cfg, run_dir).items():
    os.environ.setdefault(key, value)
sft_args = SFTConfig(
    **trainer_arguments(cfg, run_dir),
    max_length=cfg.data.max_length,
    packing=cfg.data.packing,
    completion_only_loss=True,  # the prompt's tokens carry no loss
)
trainer = SFTTrainer(
    model=load_base_model(model_cfg),
    args=sft_args,
    train_dataset=train_set,
    eval_dataset=val_set,
    processing_class=load_tokenizer(model_cfg),
    peft_config=lora_config(model_cfg),
)

# %% Train: replaces trainer.train(); a stop exits 75 (76: budget) in a script
from src.integrations.hf_trainer import run_interruptible

result = run_interruptible(trainer, config=cfg)  # checkpoint.s3_*, cost.*, logging.gpu_stats
print(f"{result.status} at step {result.global_step}; checkpoint {result.checkpoint}")

# %% The adapters (PeftModel.from_pretrained, `scripts/export.py RUN --format hf`) and the test
from src.integrations.hf_outputs import save_adapters, write_test_results

if not result.interrupted:  # completed, or pruned by a sweep (scripts/sweep.py)
    saved = save_adapters(trainer, run_dir)  # final_adapter/, best_adapter/: whole or not at all
    test = trainer.evaluate(test_set, metric_key_prefix="test")  # every rank: a collective
    write_test_results(trainer, run_dir, test, result)  # test_results.json, as the kit's runs
    if trainer.is_world_process_zero():
        print(f"adapters in {', '.join(map(str, saved))}; test loss {test['test_loss']:.4f}")
