# %% [markdown]
# # LLM preference tuning (DPO) with LoRA, after SFT
# Direct Preference Optimization from an SFT run's adapter: for each prompt the model learns
# to raise the chosen response's log-probability over the rejected one's, relative to a
# reference. The reference is the same model with its adapter switched off (no second copy
# in memory). Reward margin and accuracy are logged as `rewards/...`.
#
# Run the SFT experiment first (its `final_adapter/` is where this starts), then:
#
#     python experiments/llm_dpo_experiment.py                      # dev: tiny-llama, CPU, seconds
#     python experiments/llm_dpo_experiment.py run_name=b05 model.dpo_beta=0.5
#     DEV_MODE=False python experiments/llm_dpo_experiment.py       # prod: after the prod SFT run
#     python experiments/llm_dpo_experiment.py model.init_adapter=/abs/path/to/adapter
#
# Or cell by cell in VS Code ("Run Cell" above each `# %%`, or Shift+Enter).
# Configs: configs/llm_dpo_dev.yaml and configs/llm_dpo_prod.yaml; docs/llm_finetuning.md.

# %% Setup: config, the SFT adapter to start from, Hugging Face cache
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

from src.common.errors import ConfigError
from src.config import in_notebook
from src.data.chat import PreferenceDataConfig
from src.launch import load_experiment_config
from src.models.llm import ADAPTER_CONFIG_FILE, DpoLlmConfig, resolve_init_adapter

# As a script: --config PATH and key=value overrides from the command line.
# In a notebook: the dev/prod config picked by DEV_MODE; edit `overrides` to experiment.
overrides: list[str] = []
cfg = load_experiment_config(
    overrides if in_notebook() else None,
    model=DpoLlmConfig,
    data=PreferenceDataConfig,
    dev_config=REPO_ROOT / "configs" / "llm_dpo_dev.yaml",
    prod_config=REPO_ROOT / "configs" / "llm_dpo_prod.yaml",
)
# A relative init_adapter is a run under paths.output_dir (./outputs when there's no /workspace).
model_cfg = resolve_init_adapter(DpoLlmConfig.from_section(cfg.model), cfg.paths.output_dir)
if model_cfg.init_adapter is None:
    print("model.init_adapter is null: DPO starts from fresh adapters on the base model")
elif not (Path(model_cfg.init_adapter) / ADAPTER_CONFIG_FILE).is_file():
    # As a script: this one line and exit 2.
    raise ConfigError(
        f"model.init_adapter: no SFT adapter at {model_cfg.init_adapter}: run the SFT experiment "
        "first (python experiments/llm_sft_experiment.py), or set model.init_adapter=DIR"
    )
print(f"run '{cfg.run_name}': {model_cfg.name_or_path}, beta {model_cfg.dpo_beta}")
print(f"starting from adapter: {model_cfg.init_adapter}")

# %% Data: preference pairs (prompt, chosen, rejected); only the responses are scored
from src.data.chat import IGNORE_INDEX, PreferenceCollator, build_preference_datasets
from src.models.llm import load_tokenizer

tokenizer = load_tokenizer(model_cfg)
data = build_preference_datasets(cfg.data, tokenizer, root=REPO_ROOT)
train_set, val_set, test_set = data.train, data.val, data.test
print(f"data: {data.num_examples} pairs ({data.num_dropped} too long)")
print(f"pairs: {len(train_set)} train / {len(val_set)} val / {len(test_set)} test")
pair = train_set[0]
for side in ("chosen", "rejected"):
    response_ids = pair[f"{side}_input_ids"][pair[f"{side}_labels"] != IGNORE_INDEX]
    print(f"first pair, {side}: {tokenizer.decode(response_ids)!r}")

# %% Model: the frozen base plus the SFT adapter, trainable
import torch

from src.common.rng import seed_everything
from src.models.llm import build_lora_model

seed_everything(cfg.seed)  # fresh adapters' LoRA A; a loaded adapter needs no randomness
if model_cfg.is_tiny and not torch.cuda.is_available():
    torch.set_num_threads(1)  # a 0.2M-parameter model: thread hand-offs cost more than they give
model = build_lora_model(model_cfg)
trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
total = sum(p.numel() for p in model.parameters())
print(f"model: {trainable:,} trainable of {total:,} parameters ({trainable / total:.2%})")

# %% Train (resumes automatically if this run has checkpoints)
from functools import partial

from src.common.signals import exit_interrupted
from src.models.llm_steps import dpo_step, make_optimizer
from src.trainers.interruptible_trainer import InterruptibleTrainer

trainer = InterruptibleTrainer(
    cfg,
    model,
    train_set,
    val_set,
    collate_fn=PreferenceCollator(tokenizer.pad_token_id),  # chosen and rejected, one length
    # loss, rewards/chosen, rewards/rejected, rewards/margin, rewards/accuracy; the default
    # eval_fn runs the same under no_grad, so val/rewards/accuracy is logged too
    step_fn=partial(dpo_step, beta=model_cfg.dpo_beta),
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
        f"test_rewards/accuracy {test_results['test_rewards/accuracy']:.2f} | "
        f"test_rewards/margin {test_results['test_rewards/margin']:.3f} | "
        f"outputs in {result.run_dir}"
    )

# %% Inspect: how much more the tuned model prefers each test pair's chosen response
from src.models.llm_steps import preference_logps, reference_logps

batch = PreferenceCollator(tokenizer.pad_token_id)([test_set[i] for i in range(len(test_set))])
batch = {key: value.to(trainer.device) for key, value in batch.items()}
model.eval()
with torch.no_grad():
    chosen, rejected = preference_logps(model, batch)
    ref_chosen, ref_rejected = reference_logps(model, batch)
print("log p(chosen) - log p(rejected), per test pair: reference -> tuned")
for index in range(len(test_set)):
    before = (ref_chosen[index] - ref_rejected[index]).item()
    after = (chosen[index] - rejected[index]).item()
    print(f"  pair {index}: {before:+8.2f} -> {after:+8.2f}")
