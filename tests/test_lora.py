"""A user's LoRA fine-tune (tests/support/lora_experiment.py: a tiny Llama from a config,
PEFT adapters) killed for real and resumed on a fresh machine from moto's S3, and resumed on
a changed base: adapter-sized checkpoints, bit-identical adapters, one line for the wrong
base. The LLM experiments' own kills: tests/test_llm_resume.py.
"""

from __future__ import annotations

import json
import random
import shutil
import signal
from pathlib import Path

import pytest
import torch

from src.common.errors import EXIT_CONFIG_ERROR
from src.common.signals import EXIT_INTERRUPTED
from tests.support.experiment import (
    REPO_ROOT,
    experiment_env,
    newest_checkpoint_step,
    run_experiment,
    start_experiment,
    wait_for_checkpoint,
)
from tests.support.moto_server import AWS_ENV, MotoS3, running_moto_s3

LORA = REPO_ROOT / "tests" / "support" / "lora_experiment.py"
BUCKET = "lora-bucket"
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


def lora_args(output_dir: Path, *extra: str) -> list[str]:
    return [f"paths.output_dir={output_dir}", *extra]


def lora_env(step_seconds: str = "0", **extra: str) -> dict[str, str]:
    return experiment_env(**AWS_ENV, LORA_STEP_SECONDS=step_seconds, **extra)


def assert_same_adapter(left: Path, right: Path) -> None:
    for name in ADAPTER_FILES:
        assert (left / name).read_bytes() == (right / name).read_bytes(), f"{name} differs"


def warning(line: str) -> bool:
    """A library's own warning (PEFT warns about a transformers deprecation), not ours."""
    return "Warning:" in line or line.strip() == "warnings.warn("


def checkpoint_bytes(run_dir: Path) -> dict[int, int]:
    return {
        int(path.stem.split("_")[1]): path.stat().st_size
        for path in (run_dir / "checkpoints").glob("step_*.pt")
    }


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The LoRA run, never interrupted."""
    output_dir = tmp_path_factory.mktemp("lora-reference")
    result = run_experiment(lora_args(output_dir), lora_env(), experiment=LORA)
    assert result.returncode == 0, result.stderr
    return output_dir / "lora"


def test_checkpoints_hold_what_trains_and_the_adapter_loads_in_peft(reference: Path) -> None:
    from peft import PeftModel

    from src.checkpoints.trainable import load_trainable_state
    from tests.support.lora_parts import build_reference_model

    model, base_bytes = build_reference_model()
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    bound = 1.2 * (3 * trainable) + 2 * 2**20  # parameters + AdamW's two moments, + 2 MB
    sizes = checkpoint_bytes(reference)
    assert sizes and max(sizes.values()) <= bound, (sizes, bound)
    assert max(sizes.values()) < base_bytes / 4  # the frozen base is not in there
    sidecar = json.loads((reference / "checkpoints" / f"step_{max(sizes):09d}.json").read_text())
    assert sidecar["metadata"]["frozen_base"]["name_or_path"] == "tests/tiny-llama"
    assert not (reference / "final_model.pt").exists()  # a PEFT run's weights are adapters

    # The final adapter, loaded the way PEFT users do, is the trained model.
    newest = torch.load(reference / "checkpoints" / f"step_{max(sizes):09d}.pt", weights_only=True)
    load_trainable_state(model, newest["model"])
    fresh, _ = build_reference_model()
    loaded = PeftModel.from_pretrained(fresh.get_base_model(), reference / "final_adapter")
    tokens = torch.randint(0, 4096, (2, 12), generator=torch.Generator().manual_seed(0))
    model.eval()
    loaded.eval()
    with torch.no_grad():
        trained_logits = model(input_ids=tokens).logits
        assert torch.equal(loaded(input_ids=tokens).logits, trained_logits)
        with model.disable_adapter():
            assert not torch.equal(model(input_ids=tokens).logits, trained_logits)


def test_sigterm_then_resume_on_a_fresh_machine_from_s3_is_bit_identical(
    tmp_path: Path, reference: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in AWS_ENV.items():
        monkeypatch.setenv(name, value)
    with running_moto_s3() as s3:
        s3.reset()
        s3.client().create_bucket(Bucket=BUCKET)
        run_s3_resume(tmp_path, reference, s3)


def run_s3_resume(tmp_path: Path, reference: Path, s3: MotoS3) -> None:
    args = lora_args(
        tmp_path,
        f"checkpoint.s3_bucket={BUCKET}",
        f"checkpoint.endpoint_url={s3.endpoint_url}",
    )
    run_dir = tmp_path / "lora"
    target = random.Random().choice(range(4, 24, 4))  # a random step of either epoch
    process = start_experiment(args, lora_env("0.03"), experiment=LORA)
    wait_for_checkpoint(process, run_dir, target)
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=120)
    assert process.returncode == EXIT_INTERRUPTED, err
    stopped_at = newest_checkpoint_step(run_dir)
    assert target <= stopped_at < 32
    assert f"S3 mirror up to date: step {stopped_at}" in out
    shutil.rmtree(run_dir)  # the instance is gone, and its disk with it

    resumed = run_experiment(args, lora_env(), experiment=LORA)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming from s3://{BUCKET}/" in resumed.stdout
    assert_same_adapter(run_dir / "final_adapter", reference / "final_adapter")
    assert_same_adapter(run_dir / "best_adapter", reference / "best_adapter")


def test_a_changed_base_is_refused_in_one_line_and_nothing_is_touched(
    tmp_path: Path, reference: Path
) -> None:
    run_dir = tmp_path / "lora"
    shutil.copytree(reference, run_dir)
    before = {p.name: p.read_bytes() for p in (run_dir / "checkpoints").iterdir()}

    result = run_experiment(lora_args(tmp_path), lora_env(LORA_PERTURB_BASE="1"), experiment=LORA)
    assert result.returncode == EXIT_CONFIG_ERROR, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip() and not warning(line)]
    assert len(lines) == 1, result.stderr
    assert "another frozen base" in lines[0]
    assert "layers.1.mlp.up_proj.weight" in lines[0]
    assert {p.name: p.read_bytes() for p in (run_dir / "checkpoints").iterdir()} == before


def test_gradient_checkpointing_trains_the_same_adapter(tmp_path: Path) -> None:
    """trainer.gradient_checkpointing=true (non-reentrant, through PEFT and transformers)
    recomputes activations; the adapter it trains is the one trained without it."""
    from src.common.rng import seed_everything
    from src.launch import load_experiment_config
    from src.trainers.interruptible_trainer import InterruptibleTrainer
    from tests.support.lora_parts import CONFIG, LoraModel, PatternData, Patterns, build_model

    adapters = {}
    for switch in ("false", "true"):
        cfg = load_experiment_config(
            [f"paths.output_dir={tmp_path}", f"run_name=gc-{switch}", "trainer.max_steps=4"]
            + [f"trainer.gradient_checkpointing={switch}", "model.dropout=0.0"],
            model=LoraModel,
            data=PatternData,
            dev_config=CONFIG,
            prod_config=CONFIG,
        )
        seed_everything(cfg.seed)
        model = build_model(cfg.model, cfg.data.vocab_size, seed=cfg.seed)
        trainer = InterruptibleTrainer(
            cfg,
            model,
            Patterns(cfg.data, seed=1, size=64),
            Patterns(cfg.data, seed=2, size=16),
            step_fn=lambda m, batch: m(**batch).loss,
        )
        assert model.base_model.model.is_gradient_checkpointing == (switch == "true")
        assert trainer.fit().global_step == 4
        adapters[switch] = (tmp_path / f"gc-{switch}" / "final_adapter").resolve()
    assert_same_adapter(adapters["false"], adapters["true"])
