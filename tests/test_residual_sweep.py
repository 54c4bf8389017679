"""Residual-compare sweep on tiny local Llamas: numbers, files, flags, guardrail, failures."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from src.common.paths import VOLUME_ROOT
from src.config import ConfigError
from src.sweeps.residual_compare import (
    ModelPair,
    compare_pair,
    compare_states,
    existing_output,
    load_sweep_config,
    output_filename,
    resolve_dirs,
    run_residual_sweep,
    sanitize_model_id,
)
from src.utils.gpu_monitor import check_guardrail, detect_gpus
from tests.support.residual_tiny_models import NUM_LAYERS, PROMPTS, build_tiny_model

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPT = REPO_ROOT / "scripts" / "run_residual_sweep.py"
MISSING_MODEL = "/nonexistent/models/sft-model"


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("tiny_models")
    return {
        "a": str(build_tiny_model(root / "base-a", 0)),
        "b": str(build_tiny_model(root / "sft-b", 1)),
    }


def write_config(tmp_path: Path, models: list[dict[str, str]], **section: object) -> Path:
    settings = {
        "models": models,
        "prompts": PROMPTS,
        "dtype": "float32",
        "device": "cpu",
        "max_length": 16,
        "output_dir": str(tmp_path / "results"),
        "log_dir": str(tmp_path / "logs"),
        **section,
    }
    path = tmp_path / "residual.yaml"
    path.write_text(yaml.safe_dump({"residual_compare": settings}))
    return path


def run_script(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "DEV_MODE": "True"}
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def files_under(*dirs: Path) -> list[Path]:
    return [path for d in dirs if d.exists() for path in d.rglob("*") if path.is_file()]


def all_numbers(record: dict) -> list[float]:
    numbers = []
    for layer in record["layers"]:
        for metric in ("cosine_similarity", "relative_diff_norm"):
            stats = layer[metric]
            numbers += [stats[k] for k in ("mean", "std", "min", "max")] + stats["per_prompt_mean"]
    kl = record["next_token_kl"]
    return numbers + [kl[k] for k in ("mean", "std", "min", "max")] + kl["per_prompt_mean"]


def test_compare_states_numbers_on_known_tensors() -> None:
    """Hand-checkable inputs: sft = 2 * base (cosine 1, |2b - b| / |b| = 1) and a known KL."""
    base_hidden = torch.tensor([[[1.0, 0.0], [0.0, 2.0]], [[3.0, 4.0], [1.0, 1.0]]])  # [L, T, H]
    sft_hidden = base_hidden.clone()
    sft_hidden[1] = torch.tensor([[0.0, 1.0], [-1.0, -1.0]])  # orthogonal, then opposite
    sft_hidden[0] = 2 * base_hidden[0]
    p = torch.tensor([[0.5, 0.5], [0.9, 0.1]])
    q = torch.tensor([[0.25, 0.75], [0.9, 0.1]])
    numbers = compare_states(([base_hidden], [p.log()]), ([sft_hidden], [q.log()]))

    scaled, rotated = numbers["layers"]
    assert scaled["cosine_similarity"]["min"] == pytest.approx(1.0)
    assert scaled["relative_diff_norm"]["mean"] == pytest.approx(1.0)
    # Layer 1: token 0 cos((3,4),(0,1)) = 0.8, |(-3,-3)|/5; token 1 cos -1, |(-2,-2)|/|(1,1)| = 2
    assert rotated["cosine_similarity"]["min"] == pytest.approx(-1.0)
    assert rotated["cosine_similarity"]["max"] == pytest.approx(0.8)
    assert rotated["relative_diff_norm"]["mean"] == pytest.approx((18**0.5 / 5 + 2) / 2)
    expected_kl = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)  # KL(p||q), token 0
    assert numbers["next_token_kl"]["max"] == pytest.approx(expected_kl)
    assert numbers["next_token_kl"]["min"] == pytest.approx(0.0, abs=1e-7)
    assert numbers["next_token_kl"]["direction"] == "KL(base || sft)"


def test_models_load_in_the_configured_dtype(models: dict[str, str]) -> None:
    from src.sweeps.residual_compare import _load_model

    model = _load_model(models["a"], "bfloat16", "cpu")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    record = compare_pair(
        ModelPair("bf16", models["a"], models["b"]), PROMPTS, "bfloat16", "cpu", 16
    )
    assert record["inputs"]["dtype"] == "bfloat16"
    assert all(math.isfinite(x) for x in all_numbers(record))


def test_self_comparison_gives_cosine_one_and_zero_difference(models: dict[str, str]) -> None:
    record = compare_pair(
        ModelPair("self", models["a"], models["a"]), PROMPTS, "float32", "cpu", 16
    )
    assert len(record["layers"]) == NUM_LAYERS + 1
    for layer in record["layers"]:
        assert layer["cosine_similarity"]["mean"] == pytest.approx(1.0, abs=1e-6)
        assert layer["cosine_similarity"]["min"] == pytest.approx(1.0, abs=1e-6)
        assert layer["relative_diff_norm"]["max"] == 0.0
    assert record["next_token_kl"]["max"] == pytest.approx(0.0, abs=1e-7)
    assert record["inputs"]["tokens_per_prompt"] == [5, 6, 2]


def test_different_weights_give_finite_differences(models: dict[str, str]) -> None:
    record = compare_pair(ModelPair("ab", models["a"], models["b"]), PROMPTS, "float32", "cpu", 16)
    assert all(math.isfinite(x) for x in all_numbers(record))
    for layer in record["layers"]:
        assert layer["cosine_similarity"]["mean"] < 0.99
        assert layer["relative_diff_norm"]["mean"] > 0.01
        assert len(layer["cosine_similarity"]["per_prompt_mean"]) == len(PROMPTS)
    assert record["next_token_kl"]["mean"] > 0
    assert record["hardware"]["device"] == "cpu" and record["seconds"]["total"] > 0


def test_sweep_reports_missing_model_finishes_others_then_skips_existing(
    models: dict[str, str], tmp_path: Path
) -> None:
    inventory = [
        {"name": "self", "base": models["a"], "sft": models["a"]},
        {"name": "missing", "base": models["a"], "sft": MISSING_MODEL},
        {"name": "differ", "base": models["a"], "sft": models["b"]},
    ]
    config = write_config(tmp_path, inventory, min_gpu_memory_gb=100000)  # refuses everywhere
    first = run_script("--config", str(config), "--force")
    assert first.returncode == 1, first.stdout + first.stderr
    assert "guardrail bypassed by --force" in first.stdout
    assert "sft model path not found: /nonexistent/models/sft-model" in first.stdout
    results = sorted((tmp_path / "results").glob("*.json"))
    assert [p.name.split("_", 4)[-1] for p in results] == [
        f"{sanitize_model_id(models['a'])}.json",
        f"{sanitize_model_id(models['b'])}.json",
    ]
    assert sorted(p.name for p in (tmp_path / "logs").iterdir()) == [
        "differ.log",
        "missing.log",
        "self.log",
    ]
    same = json.loads(existing_output(tmp_path / "results", models["a"]).read_text())
    assert same["layers"][-1]["relative_diff_norm"]["max"] == 0.0
    differ = json.loads(existing_output(tmp_path / "results", models["b"]).read_text())
    assert len(differ["layers"]) == NUM_LAYERS + 1
    assert all(math.isfinite(x) for x in all_numbers(differ))
    assert differ["inputs"]["prompts"] == PROMPTS and differ["sft"] == models["b"]

    again = run_script(
        "--config", str(config), "--force", "--skip-existing", "--names", "self", "differ"
    )
    assert again.returncode == 0, again.stdout + again.stderr
    assert "started" not in again.stdout and again.stdout.count("skipped") == 2
    assert sorted((tmp_path / "results").glob("*.json")) == results


def test_dry_run_with_names_starts_nothing_and_writes_nothing(
    models: dict[str, str], tmp_path: Path
) -> None:
    inventory = [
        {"name": "self", "base": models["a"], "sft": models["a"]},
        {"name": "differ", "base": models["a"], "sft": models["b"]},
    ]
    result = run_script(
        "--config", str(write_config(tmp_path, inventory)), "--dry-run", "--names", "differ"
    )
    assert result.returncode == 0, result.stderr
    assert "[dry-run] differ:" in result.stdout and "[dry-run] self" not in result.stdout
    assert f"_{sanitize_model_id(models['b'])}.json" in result.stdout
    assert files_under(tmp_path / "results", tmp_path / "logs") == []


def test_guardrail_refuses_and_says_what_it_found(models: dict[str, str], tmp_path: Path) -> None:
    inventory = [{"name": "self", "base": models["a"], "sft": models["a"]}]
    config = write_config(tmp_path, inventory, min_gpu_memory_gb=100000)  # no GPU has this
    result = run_script("--config", str(config))
    assert result.returncode == 3
    assert "refusing to start" in result.stderr and "--force" in result.stderr
    assert f"found {detect_gpus().describe()}" in result.stderr
    assert files_under(tmp_path / "results", tmp_path / "logs") == []


def test_default_guardrail_refuses_on_a_machine_without_gpu(tmp_path: Path, capsys) -> None:
    config = write_config(tmp_path, [{"name": "x", "base": "org/base", "sft": "org/sft"}])
    expected = check_guardrail(detect_gpus())  # default: A100/H100/H200 with >= 40 GB
    printed: list[str] = []
    if expected.ok:  # a big GPU: the guardrail lets it through (dry run: nothing downloads)
        assert run_residual_sweep(config, [], dry_run=True, echo=printed.append) == 0
        assert not any("refus" in line for line in printed)
        return
    assert run_residual_sweep(config, [], echo=printed.append) == 3
    assert printed == []
    assert capsys.readouterr().err == f"[residual] {expected.message}\n"
    if detect_gpus().count == 0:
        assert "found no GPU" in expected.message
    assert files_under(tmp_path / "results", tmp_path / "logs") == []


def test_bad_input_is_one_line_and_exit_2(tmp_path: Path) -> None:
    config = write_config(tmp_path, [{"name": "x", "base": "org/base", "sft": "org/sft"}])
    result = run_script("--config", str(config), "--names", "nope", "--force")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        "config error: unknown --names nope; the inventory has x"
    )
    assert files_under(tmp_path / "results", tmp_path / "logs") == []


def test_override_after_names_is_one_line_not_an_unknown_name(tmp_path: Path) -> None:
    config = write_config(tmp_path, [{"name": "x", "base": "org/base", "sft": "org/sft"}])
    result = run_script("--config", str(config), "--force", "--names", "x", "seed=3")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "config error: --names got 'seed=3', which looks like an override: "
        "put key=value before --names"
    ]


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ({"models": []}, "residual_compare.models is empty"),
        ({"models": [{"name": "x", "base": "b"}]}, "sft is missing"),
        ({"dtype": "int8"}, "residual_compare.dtype is 'int8'"),
        ({"device": "tpu"}, "residual_compare.device is 'tpu'"),
        (
            {
                "models": [
                    {"name": "x", "base": "b", "sft": "s"},
                    {"name": "x", "base": "c", "sft": "t"},
                ]
            },
            "duplicate name",
        ),
    ],
)
def test_config_problems_are_caught_before_anything_runs(
    tmp_path: Path, section: dict, message: str
) -> None:
    models = section.pop("models", [{"name": "x", "base": "org/base", "sft": "org/sft"}])
    config = write_config(tmp_path, models, **section)
    with pytest.raises(ConfigError, match=message):
        run_residual_sweep(config, [], force=True, echo=lambda line: None)
    assert files_under(tmp_path / "results", tmp_path / "logs") == []


def test_log_dir_falls_back_when_workspace_is_missing(tmp_path: Path, capsys) -> None:
    cfg = load_sweep_config(REPO_ROOT / "configs" / "dev_config.yaml", [])  # /workspace defaults
    dirs = resolve_dirs(cfg, fallback=tmp_path / "fallback")
    assert capsys.readouterr().err == ""  # the sweep prints dirs.describe(): one line, not three
    if VOLUME_ROOT.is_dir():  # on a Vast.ai-style box the volume itself is used
        assert str(dirs.log_dir).startswith(str(VOLUME_ROOT)) and not dirs.fell_back
    else:
        assert dirs.output_dir == tmp_path / "fallback" and dirs.fell_back
        assert dirs.log_dir == tmp_path / "fallback" / "logs" and dirs.log_dir.is_dir()
        assert dirs.describe() == (
            f"/workspace is not usable (no /workspace volume here): results in "
            f"{tmp_path / 'fallback'}, logs in {tmp_path / 'fallback' / 'logs'}"
        )


def test_explicit_unwritable_dir_is_an_error_not_a_silent_move(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    cfg = load_sweep_config(write_config(tmp_path, [], log_dir=str(blocker / "logs")), [])
    with pytest.raises(
        ConfigError, match=r"not writable: choose another with residual_compare\.log_dir="
    ):
        resolve_dirs(cfg, fallback=tmp_path / "fallback")


def test_sanitized_file_names(tmp_path: Path) -> None:
    assert (
        sanitize_model_id("meta-llama/Llama-3.1-8B-Instruct") == "meta_llama_Llama_3.1_8B_Instruct"
    )
    assert sanitize_model_id("my model/sft v2") == "my_model_sft_v2"
    assert sanitize_model_id("/data/ckpt-100") == "data_ckpt_100"
    name = output_filename("20250101_120000", "Qwen/Qwen2.5-7B-Instruct")
    assert name == "residual_compare_20250101_120000_Qwen_Qwen2.5_7B_Instruct.json"
    (tmp_path / name).write_text("{}")
    assert existing_output(tmp_path, "Qwen/Qwen2.5-7B-Instruct") == tmp_path / name
    assert existing_output(tmp_path, "Qwen2.5-7B-Instruct") is None  # no suffix match
