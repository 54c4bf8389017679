"""LoRA on a GPU, the two placements a CPU cannot run: QLoRA (a 4-bit bitsandbytes base,
never moved) interrupted and resumed bit-identically, and a base spread over two GPUs by a
``device_map`` trained in place. Skipped without a GPU (without two, for the second); on a
GPU box without bitsandbytes the QLoRA test fails, it does not skip."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
import torch

from src.common.signals import EXIT_INTERRUPTED
from tests.support.experiment import (
    REPO_ROOT,
    newest_checkpoint_step,
    run_experiment,
    start_experiment,
    wait_for_checkpoint,
)

pytestmark = pytest.mark.gpu
SFT = REPO_ROOT / "experiments" / "llm_sft_experiment.py"
QLORA = ["model.load_in_4bit=true", "trainer.precision=bf16", "checkpoint.every_n_steps=4"]


def test_qlora_4bit_sigterm_then_resume_is_bit_identical(tmp_path: Path) -> None:
    reference = run_experiment([f"paths.output_dir={tmp_path}/ref", *QLORA], experiment=SFT)
    assert reference.returncode == 0, reference.stderr
    ref_dir = tmp_path / "ref" / "llm-sft-dev"
    sidecar = json.loads(max((ref_dir / "checkpoints").glob("step_*.json")).read_text())
    assert sidecar["metadata"]["frozen_base"]["quantization"]["load_in_4bit"] is True

    args = [f"paths.output_dir={tmp_path}/killed", *QLORA]
    run_dir = tmp_path / "killed" / "llm-sft-dev"
    process = start_experiment(args, experiment=SFT)
    wait_for_checkpoint(process, run_dir, 8)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=300)
    assert process.returncode == EXIT_INTERRUPTED, err
    assert newest_checkpoint_step(run_dir) < 36
    resumed = run_experiment(args, experiment=SFT)
    assert resumed.returncode == 0, resumed.stderr
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        final = run_dir / "final_adapter" / name
        assert final.read_bytes() == (ref_dir / "final_adapter" / name).read_bytes()


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs (device_map over two)")
def test_a_base_spread_over_two_gpus_trains_in_place(tmp_path: Path) -> None:
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from src.data.chat import ChatCollator, ChatDataConfig, build_chat_datasets
    from src.launch import load_experiment_config
    from src.models.llm import LlmConfig, build_tiny_llama, load_tokenizer, lora_config
    from src.models.llm_steps import sft_step
    from src.trainers.interruptible_trainer import InterruptibleTrainer

    cfg = load_experiment_config(
        [f"paths.output_dir={tmp_path}", "trainer.max_steps=6", "trainer.precision=bf16"],
        model=LlmConfig,
        data=ChatDataConfig,
        dev_config=REPO_ROOT / "configs" / "llm_sft_dev.yaml",
        prod_config=REPO_ROOT / "configs" / "llm_sft_dev.yaml",
    )
    build_tiny_llama().save_pretrained(tmp_path / "tiny")
    split = {"model.embed_tokens": 0, "model.layers.0": 0, "model.layers.1": 1}
    split.update({"model.norm": 1, "model.rotary_emb": 1, "lm_head": 1})
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "tiny", device_map=split)
    model = get_peft_model(base, lora_config(LlmConfig.from_section(cfg.model)))
    tokenizer = load_tokenizer(LlmConfig.from_section(cfg.model))
    data = build_chat_datasets(cfg.data, tokenizer, root=REPO_ROOT)
    trainer = InterruptibleTrainer(
        cfg,
        model,
        data.train,
        data.val,
        collate_fn=ChatCollator(tokenizer.pad_token_id),
        step_fn=sft_step,
    )
    assert trainer.placement.kept_by.startswith("placed by device_map")
    assert {d.index for d in trainer.placement.devices} == {0, 1}
    result = trainer.fit()
    assert result.global_step == 6
    devices = {p.device for p in model.parameters()}
    assert devices == {torch.device("cuda", 0), torch.device("cuda", 1)}
    assert (result.run_dir / "final_adapter" / "adapter_model.safetensors").is_file()
