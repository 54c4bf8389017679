"""Config loading: schema checks, DEV_MODE, overrides, and one-line errors from the CLI."""

from __future__ import annotations

from pathlib import Path

import pytest

from src.config import (
    DEV_CONFIG,
    PROD_CONFIG,
    REDACTED,
    ConfigError,
    load_config,
    redact_secrets,
)
from tests.support.experiment import experiment_env, run_experiment


def test_dev_mode_picks_the_file(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DEV_MODE", "True")
    assert load_config().run_name == "template-dev"
    monkeypatch.setenv("DEV_MODE", "False")
    assert load_config().run_name == "template-prod"
    monkeypatch.setenv("DEV_MODE", "maybe")
    with pytest.raises(ConfigError, match="DEV_MODE='maybe' is not a boolean"):
        load_config()


def test_overrides_are_typed() -> None:
    cfg = load_config(DEV_CONFIG, ["trainer.max_steps=300", "seed=3", "optim.lr=0.1"])
    assert cfg.trainer.max_steps == 300 and cfg.seed == 3 and cfg.optim.lr == 0.1


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["trainer.max_stepz=3"], "unknown config key 'trainer.max_stepz'"),
        (["trainer.max_steps=abc"], "bad value for 'trainer.max_steps'"),
        (["trainer.precision=fp8"], "bad value for 'trainer.precision'"),
        (["seed"], "override 'seed' is not key=value"),
        (["run_name=a/b"], "bad value for 'run_name'"),
    ],
)
def test_bad_overrides_raise_one_line(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message) as error:
        load_config(PROD_CONFIG, overrides)
    assert "\n" not in str(error.value)


def test_bad_file_names_the_key_and_file(tmp_path: Path) -> None:
    config = tmp_path / "mine.yaml"
    config.write_text("trainer:\n  bogus: 1\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'trainer.bogus' in .*mine.yaml"):
        load_config(config)
    config.write_text("data:\n  batch_size: many\n")
    with pytest.raises(ConfigError, match=r"'data.batch_size' in .*mine.yaml"):
        load_config(config)


def test_redaction() -> None:
    data = {"api_key": "abc", "nested": {"aws_secret_access_key": "x", "lr": 0.1}, "token": ""}
    assert redact_secrets(data) == {
        "api_key": REDACTED,
        "nested": {"aws_secret_access_key": REDACTED, "lr": 0.1},
        "token": "",
    }


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["trainer.bogus=1"], "unknown config key 'trainer.bogus'"),
        (["data.batch_size=lots"], "bad value for 'data.batch_size'"),
        (["--config", "configs/missing.yaml"], "config file not found: configs/missing.yaml"),
        (["--frobnicate"], "unknown option --frobnicate"),
        (["paths.output_dir=/proc/not-writable"], "is not writable"),
    ],
)
def test_cli_errors_are_one_line_exit_2_and_write_nothing(
    tmp_path: Path, args: list[str], message: str
) -> None:
    output_dir = tmp_path / "outputs"
    full_args = [f"paths.output_dir={output_dir}", "run_name=bad", *args]
    result = run_experiment(full_args, env=experiment_env(), timeout=60)
    assert result.returncode == 2
    error_lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(error_lines) == 1, result.stderr
    assert error_lines[0].startswith("config error: ") and message in error_lines[0]
    assert not (output_dir / "bad").exists()
