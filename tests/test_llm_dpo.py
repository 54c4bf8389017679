"""DPO on the tiny Llama, in-process: a fresh adapter's loss is exactly log 2, the reference
is the base model (adapter off, same module), and a short InterruptibleTrainer run on the
sample preferences lowers the loss and prefers the chosen responses."""

from __future__ import annotations

import json
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import pytest
import torch

from src.common.paths import REPO_ROOT
from src.config import experiment_schema, load_config
from src.data.chat import PreferenceCollator, PreferenceDataConfig, build_preference_datasets
from src.models.llm import DpoLlmConfig, build_lora_model, build_tiny_tokenizer, load_base_model
from src.models.llm_steps import (
    dpo_step,
    make_optimizer,
    preference_logps,
    reference_logps,
    sequence_logps,
)
from src.trainers.interruptible_trainer import InterruptibleTrainer


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """A 0.2M-parameter model runs several times faster on one thread on a small CPU box."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def pairs_batch() -> dict[str, torch.Tensor]:
    tokenizer = build_tiny_tokenizer()
    data = build_preference_datasets(PreferenceDataConfig(max_length=128), tokenizer)
    return PreferenceCollator(tokenizer.pad_token_id)([data.train[i] for i in range(6)])


def test_sequence_logps_sums_response_tokens_only() -> None:
    logits = torch.randn(2, 5, 7)
    labels = torch.tensor([[-100, -100, 3, 4, -100], [-100, 1, 2, 6, 0]])
    logps = sequence_logps(logits, labels)
    log_softmax = logits.log_softmax(-1)
    expected_first = log_softmax[0, 1, 3] + log_softmax[0, 2, 4]  # token t from logits t-1
    expected_second = sum(log_softmax[1, t - 1, labels[1, t]] for t in range(1, 5))
    assert torch.allclose(logps, torch.stack([expected_first, expected_second]))


def test_a_fresh_adapter_gives_exactly_log_2(pairs_batch: dict[str, torch.Tensor]) -> None:
    torch.manual_seed(0)
    model = build_lora_model(DpoLlmConfig())  # LoRA B = 0: the policy is the reference
    metrics = dpo_step(model, pairs_batch, beta=0.1)
    assert torch.equal(metrics["loss"].detach(), torch.tensor(2.0).log())
    assert metrics["rewards/margin"] == 0 and metrics["rewards/accuracy"] == 0
    metrics["loss"].backward()  # gradients reach the adapters only
    assert all((p.grad is not None) == p.requires_grad for _, p in model.named_parameters())


def test_the_reference_is_the_base_model_with_the_adapter_off(
    pairs_batch: dict[str, torch.Tensor],
) -> None:
    torch.manual_seed(0)
    model = build_lora_model(DpoLlmConfig(lora_dropout=0.0))
    with torch.no_grad():  # a trained-looking adapter: B no longer zero
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.5)
    model.eval()
    base = load_base_model(DpoLlmConfig()).eval()  # a second, separate copy, for the check
    ref_chosen, ref_rejected = reference_logps(model, pairs_batch)
    with torch.no_grad():
        base_chosen, base_rejected = preference_logps(base, pairs_batch)
        policy_chosen, _ = preference_logps(model, pairs_batch)
    assert torch.equal(ref_chosen, base_chosen) and torch.equal(ref_rejected, base_rejected)
    assert not torch.allclose(policy_chosen, base_chosen)  # the adapter is back on after
    assert not ref_chosen.requires_grad


def test_dpo_through_the_trainer_learns_the_sample_preferences(tmp_path: Path) -> None:
    cfg = load_config(
        REPO_ROOT / "configs" / "llm_dpo_dev.yaml",
        [
            f"paths.output_dir={tmp_path}",
            "model.init_adapter=null",  # fresh adapters: the start is exactly log 2
            "trainer.max_steps=24",
            "checkpoint.every_n_steps=12",
            "trainer.log_every_n_steps=6",
            "trainer.progress_bar=false",
            "logging.tensorboard=false",
        ],
        schema=experiment_schema(DpoLlmConfig, PreferenceDataConfig),
    )
    model_cfg = DpoLlmConfig.from_section(cfg.model)
    tokenizer = build_tiny_tokenizer()
    data = build_preference_datasets(cfg.data, tokenizer)
    torch.manual_seed(cfg.seed)
    model = build_lora_model(model_cfg)
    trainer = InterruptibleTrainer(
        cfg,
        model,
        data.train,
        data.val,
        collate_fn=PreferenceCollator(tokenizer.pad_token_id),
        step_fn=partial(dpo_step, beta=model_cfg.dpo_beta),
        optimizer_fn=partial(make_optimizer, optim_cfg=cfg.optim),
    )
    result = trainer.fit()
    assert not result.interrupted and result.global_step == 24
    log = json.loads((result.run_dir / "training_log.json").read_text())
    start = float(torch.tensor(2.0).log())
    assert log[0]["val_loss"] < start  # already below log 2 after the first epoch
    assert log[-1]["val_loss"] < log[0]["val_loss"] < start
    assert log[-1]["val_loss"] < 0.5 * start
    assert log[-1]["val_rewards/accuracy"] == 1.0 and log[-1]["val_rewards/margin"] > 0.5
    results = trainer.test(data.test)
    assert results["test_rewards/accuracy"] >= 0.8 and results["test_loss"] < 0.5 * start
