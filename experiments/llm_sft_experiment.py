# %% [markdown]
# # LLM supervised fine-tuning (SFT) with LoRA
# A Hugging Face causal LM with LoRA adapters (PEFT) trained on chat examples: only the
# assistant's answers train (prompt tokens carry label -100), batches padded or packed, then
# the best adapter answers a prompt. DPO comes after: experiments/llm_dpo_experiment.py.
#
# Run it whole (re-running the same command resumes an interrupted run):
#
#     python experiments/llm_sft_experiment.py                      # dev: tiny-llama, CPU, seconds
#     python experiments/llm_sft_experiment.py run_name=r16 model.lora_r=16 model.lora_alpha=32
#     DEV_MODE=False python experiments/llm_sft_experiment.py       # prod: a hub model, 4-bit
#     python experiments/llm_sft_experiment.py data.path=/workspace/my_chats.jsonl run_name=mine
#
# Or cell by cell in VS Code ("Run Cell" above each `# %%`, or Shift+Enter).
# Configs: configs/llm_sft_dev.yaml and configs/llm_sft_prod.yaml; docs/llm_finetuning.md.

# %% Setup: config, paths, Hugging Face cache
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

from src.config import in_notebook
from src.data.chat import ChatDataConfig
from src.launch import load_experiment_config
from src.models.llm import LlmConfig

# As a script: --config PATH and key=value overrides from the command line.
# In a notebook: the dev/prod config picked by DEV_MODE; edit `overrides` to experiment.
overrides: list[str] = []
cfg = load_experiment_config(
    overrides if in_notebook() else None,
    model=LlmConfig,
    data=ChatDataConfig,
    dev_config=REPO_ROOT / "configs" / "llm_sft_dev.yaml",
    prod_config=REPO_ROOT / "configs" / "llm_sft_prod.yaml",
)
model_cfg = LlmConfig.from_section(cfg.model)
print(f"run '{cfg.run_name}': {model_cfg.name_or_path}, LoRA r={model_cfg.lora_r}")

# %% Data: chat JSONL, rendered with the chat template, prompts masked out of the loss
from src.data.chat import IGNORE_INDEX, ChatCollator, build_chat_datasets
from src.models.llm import load_tokenizer

tokenizer = load_tokenizer(model_cfg)
data = build_chat_datasets(cfg.data, tokenizer, root=REPO_ROOT)
train_set, val_set, test_set = data.train, data.val, data.test
layout = f"packed into {cfg.data.max_length}-token blocks" if cfg.data.packing else "padded"
print(f"data: {data.num_examples} examples ({data.num_dropped} too long), {layout}")
print(f"samples: {len(train_set)} train / {len(val_set)} val / {len(test_set)} test")
example = train_set[0]
answer_ids = example["input_ids"][example["labels"] != IGNORE_INDEX]
print(f"first sample trains on: {tokenizer.decode(answer_ids)!r}")

# %% Model: the frozen base plus fresh LoRA adapters
import torch

from src.common.rng import seed_everything
from src.models.llm import build_lora_model

seed_everything(cfg.seed)  # LoRA A's initial weights; tiny-llama's base is fixed anyway
if model_cfg.is_tiny and not torch.cuda.is_available():
    torch.set_num_threads(1)  # a 0.2M-parameter model: thread hand-offs cost more than they give
model = build_lora_model(model_cfg)
trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
total = sum(p.numel() for p in model.parameters())
print(f"model: {trainable:,} trainable of {total:,} parameters ({trainable / total:.2%})")

# %% Train (resumes automatically if this run has checkpoints)
from functools import partial

from src.common.signals import exit_interrupted
from src.models.llm_steps import make_optimizer, sft_eval, sft_step
from src.trainers.interruptible_trainer import InterruptibleTrainer

trainer = InterruptibleTrainer(
    cfg,
    model,
    train_set,
    val_set,
    collate_fn=ChatCollator(tokenizer.pad_token_id),  # pads each batch to its longest
    step_fn=sft_step,  # the model's own loss on answer tokens
    eval_fn=sft_eval,  # loss and perplexity: val/loss, val/perplexity
    optimizer_fn=partial(make_optimizer, optim_cfg=cfg.optim),  # adapters only
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

# %% Generate: the best adapter answers a prompt
from peft import PeftModel

from src.models.llm import load_base_model

adapter_dir = result.run_dir / "best_adapter"
if not adapter_dir.is_dir():
    adapter_dir = result.run_dir / "final_adapter"
if adapter_dir.is_dir():
    chat_model = PeftModel.from_pretrained(load_base_model(model_cfg), str(adapter_dir))
    print(f"generating with {adapter_dir.name}")
else:  # no adapter saved yet (interrupted early): the weights in memory
    chat_model = model
    print("no saved adapter yet: generating with the weights in memory")
if not (model_cfg.load_in_4bit or model_cfg.device_map):  # those are placed already
    chat_model = chat_model.to(trainer.device)
chat_model.eval()
messages = [{"role": "user", "content": "What is the capital of France?"}]
if tokenizer.chat_template:
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
else:  # the plain layout src/data/chat.py trains on without a template
    prompt = f"{tokenizer.bos_token or ''}### user\n{messages[0]['content']}\n\n### assistant\n"
inputs = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")
inputs = inputs.to(chat_model.get_input_embeddings().weight.device)
with torch.no_grad():
    generated = chat_model.generate(
        **inputs,
        max_new_tokens=48,
        do_sample=False,  # greedy: the same answer each time it is run
        pad_token_id=tokenizer.pad_token_id,
    )
answer = tokenizer.decode(generated[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
print(f"--- {messages[0]['content']} ---")
print(answer)
