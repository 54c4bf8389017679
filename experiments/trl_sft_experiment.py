# %% [markdown]
# # TRL SFTTrainer with LoRA, through `run_interruptible`
# A script written against TRL (or `transformers.Trainer`) keeps its own loop and gets the
# kit's promises from one call in place of `trainer.train()`: signal-safe stops (exit 75),
# resume from the newest *complete* checkpoint, the S3 mirror, the budget (exit 76), cost and
# GPU stats in the Trainer's own logs. docs/hf_trainer.md says what is exact.
#
#     python experiments/trl_sft_experiment.py                  # outputs/trl-sft, CPU, seconds
#     python experiments/trl_sft_experiment.py /workspace/persistent/trl-sft
#     S3_BUCKET=my-bucket BUDGET_USD=5 HOURLY_RATE_USD=2.1 python experiments/trl_sft_experiment.py
#
# Kill it (Ctrl-C, `kill -TERM`, Slurm's USR1) and run the same command again: it resumes.
# The model is tiny-llama (no download) and the data data/samples/sft_chat.jsonl.

# %% Setup
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

args = [] if in_notebook() else sys.argv[1:]
output_dir = Path(args[0]) if args else REPO_ROOT / "outputs" / "trl-sft"
if not torch.cuda.is_available():
    torch.set_num_threads(1)  # a tiny model: thread hand-offs cost more than they give

# %% Data: the sample chats as TRL's conversational prompt/completion pairs
from datasets import Dataset

from src.data.chat import data_file, read_jsonl, record_messages

rows = []
for line, record in read_jsonl(data_file("data/samples/sft_chat.jsonl")):
    messages = record_messages(record, f"line {line}")
    rows.append({"prompt": messages[:-1], "completion": messages[-1:]})
train_set = Dataset.from_list(rows)
print(f"data: {len(train_set)} conversations")

# %% Model and trainer: the frozen tiny base, LoRA adapters from TRL's peft_config
from trl import SFTConfig, SFTTrainer

from src.models.llm import LlmConfig, build_tiny_llama, build_tiny_tokenizer, lora_config

sft_args = SFTConfig(
    output_dir=str(output_dir),
    max_steps=int(os.environ.get("MAX_STEPS", 24)),
    save_steps=8,
    save_total_limit=2,  # run_interruptible prunes: never a checkpoint S3 lacks
    per_device_train_batch_size=8,
    learning_rate=1e-2,  # high: a random tiny base learns only through its adapters
    logging_steps=4,
    max_length=128,
    completion_only_loss=True,  # the prompt's tokens carry no loss
    dataloader_num_workers=0,
    report_to=[],  # "tensorboard" or "wandb": cost/usd and gpu/* go there too
    use_cpu=not torch.cuda.is_available(),
    seed=42,
)
trainer = SFTTrainer(
    model=build_tiny_llama(),
    args=sft_args,
    train_dataset=train_set,
    processing_class=build_tiny_tokenizer(),
    peft_config=lora_config(LlmConfig()),
)

# %% Train: replaces trainer.train(); a stop exits 75 (76: budget) in a script
from src.integrations.hf_trainer import run_interruptible

budget = os.environ.get("BUDGET_USD")
rate = os.environ.get("HOURLY_RATE_USD")
result = run_interruptible(
    trainer,
    s3_bucket=os.environ.get("S3_BUCKET"),
    endpoint_url=os.environ.get("S3_ENDPOINT_URL"),
    budget_usd=float(budget) if budget else None,
    hourly_rate_usd=float(rate) if rate else None,
)
print(f"{result.status} at step {result.global_step}; checkpoint {result.checkpoint}")

# %% The adapter, ready for PeftModel.from_pretrained
if not result.interrupted:
    trainer.save_model(str(output_dir / "final_adapter"))
    print(f"adapter saved in {output_dir / 'final_adapter'}")
