"""Config loading: schema checks, DEV_MODE, overrides, and one-line errors from the CLI."""

from __future__ import annotations

from pathlib import Path

import pytest

from src.config import (
    DEV_CONFIG,
    PROD_CONFIG,
    REDACTED,
    ConfigError,
    default_config_path,
    load_dotenv_file,
    redact_secrets,
    to_plain_dict,
)
from src.launch.experiment import print_config_error
from src.models.template import load_template_config
from tests.support.experiment import experiment_env, run_experiment


def test_dev_mode_picks_the_file(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DEV_MODE", "True")
    assert load_template_config().run_name == "template-dev"
    monkeypatch.setenv("DEV_MODE", "False")
    assert load_template_config().run_name == "template-prod"
    monkeypatch.setenv("DEV_MODE", "maybe")
    with pytest.raises(ConfigError, match="DEV_MODE='maybe' is not a boolean"):
        load_template_config()


def test_overrides_are_typed() -> None:
    cfg = load_template_config(DEV_CONFIG, ["trainer.max_steps=300", "seed=3", "optim.lr=0.1"])
    assert cfg.trainer.max_steps == 300 and cfg.seed == 3 and cfg.optim.lr == 0.1


@pytest.mark.parametrize("text", ["off", "yes", "1e3", "007"])
def test_a_string_setting_keeps_its_override_text_as_typed(text: str) -> None:
    """YAML alone would read run_name=off as False and 1e3 as 1000.0."""
    cfg = load_template_config(DEV_CONFIG, [f"run_name={text}", f"logging.wandb_project={text}'s"])
    assert cfg.run_name == text and cfg.logging.wandb_project == f"{text}'s"


def test_null_still_clears_an_optional_string_setting() -> None:
    overrides = ["checkpoint.s3_bucket=my-bucket", "checkpoint.s3_bucket=null"]
    cfg = load_template_config(DEV_CONFIG, overrides)
    assert cfg.checkpoint.s3_bucket is None


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
        load_template_config(PROD_CONFIG, overrides)
    assert "\n" not in str(error.value)


def test_old_key_logging_wandb_still_works_and_later_layers_win(tmp_path: Path) -> None:
    config = tmp_path / "old.yaml"
    config.write_text("logging:\n  wandb: true\n")
    assert load_template_config(config).logging.use_wandb is True
    assert load_template_config(config, ["logging.use_wandb=false"]).logging.use_wandb is False
    assert load_template_config(DEV_CONFIG, ["logging.wandb=true"]).logging.use_wandb is True
    config.write_text("logging:\n  wandb: true\n  use_wandb: false\n")
    with pytest.raises(ConfigError, match="sets both 'logging.wandb' and its new name"):
        load_template_config(config)


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("cost.budget_usd=0", "cost.budget_usd"),
        ("cost.hourly_rate_usd=-1", "cost.hourly_rate_usd"),
        ("logging.low_gpu_util_percent=0", "logging.low_gpu_util_percent"),
        ("logging.low_gpu_util_minutes=0", "logging.low_gpu_util_minutes"),
        ("data.batch_size=0", "data.batch_size"),
    ],
)
def test_cost_and_monitor_settings_are_checked(override: str, key: str) -> None:
    with pytest.raises(ConfigError, match=f"bad value for '{key}'"):
        load_template_config(DEV_CONFIG, [override])


def test_bad_file_names_the_key_and_file(tmp_path: Path) -> None:
    config = tmp_path / "mine.yaml"
    config.write_text("trainer:\n  bogus: 1\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'trainer.bogus' in .*mine.yaml"):
        load_template_config(config)
    config.write_text("data:\n  batch_size: many\n")
    with pytest.raises(ConfigError, match=r"'data.batch_size' in .*mine.yaml"):
        load_template_config(config)


def test_dev_mode_from_dotenv_and_the_environment_wins(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dotenv = tmp_path / ".env"
    dotenv.write_text("DEV_MODE=False\n")
    monkeypatch.setenv("DEV_MODE", "x")  # remembered, so teardown removes what .env sets
    monkeypatch.delenv("DEV_MODE")
    load_dotenv_file(dotenv)
    assert default_config_path() == PROD_CONFIG
    monkeypatch.setenv("DEV_MODE", "True")
    load_dotenv_file(dotenv)
    assert default_config_path() == DEV_CONFIG


def test_secret_copied_by_interpolation_is_scrubbed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "aws-secret-Zq8mN3pX")
    monkeypatch.setenv("HF_TOKEN", "hf_token_value_123")
    cfg = load_template_config(
        DEV_CONFIG,
        [
            "paths.output_dir=/x/${oc.env:AWS_SECRET_ACCESS_KEY}/y",
            "logging.wandb_project=${oc.env:HF_TOKEN}",
        ],
    )
    plain = to_plain_dict(cfg)
    assert plain["paths"]["output_dir"] == f"/x/{REDACTED}/y"
    assert plain["logging"]["wandb_project"] == REDACTED
    assert "aws-secret" not in str(plain) and "hf_token_value" not in str(plain)


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
        (["trainer.log_every_n_steps=0"], "'trainer.log_every_n_steps'"),
        (["trainer.extra_stop_signal=SIGFOO"], "'trainer.extra_stop_signal'"),
        (["trainer.device=tpu"], "'trainer.device'"),
        (["trainer.device=cuda:99"], "trainer.device=cuda:99 but this machine has"),
        (["model.name=resnet"], "unknown model.name 'resnet': choose one of mlp"),
        (["optim.lr=-1"], "'optim.lr'"),
        (["data.num_samples=0"], "'data.num_samples'"),
        (["model.dropout=1.5"], "'model.dropout'"),
        (["cost.budget_usd=5"], "cost.budget_usd=5.0 needs the machine's price"),
    ],
)
def test_cli_errors_are_one_line_exit_2_and_write_nothing(
    tmp_path: Path, args: list[str], message: str
) -> None:
    output_dir = tmp_path / "outputs"
    full_args = [f"paths.output_dir={output_dir}", "run_name=bad", *args]
    assert_one_line_config_error(full_args, message)
    assert not (output_dir / "bad").exists()


def assert_one_line_config_error(args: list[str], message: str) -> None:
    result = run_experiment(args, env=experiment_env(), timeout=60)
    assert result.returncode == 2, result.stdout + result.stderr
    error_lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(error_lines) == 1, result.stderr
    assert error_lines[0].startswith("config error: ") and message in error_lines[0]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("trainer:\n  bogus: 1\n", "unknown config key 'trainer.bogus' in "),
        ("data:\n  batch_size: many\n", "bad value for 'data.batch_size' in "),
        ("data: {batch_size: [1\n", "cannot parse "),
    ],
)
def test_bad_yaml_file_from_the_cli(tmp_path: Path, text: str, message: str) -> None:
    config = tmp_path / "mine.yaml"
    config.write_text(text)
    output_dir = tmp_path / "outputs"
    args = ["--config", str(config), f"paths.output_dir={output_dir}"]
    assert_one_line_config_error(args, message)
    assert not output_dir.exists() or not any(output_dir.iterdir())


def test_run_directory_that_is_a_file_is_a_config_error(tmp_path: Path) -> None:
    (tmp_path / "taken").write_text("not a directory")
    args = [f"paths.output_dir={tmp_path}", "run_name=taken"]
    assert_one_line_config_error(args, "exists but is a file")
    assert (tmp_path / "taken").read_text() == "not a directory"


def test_config_error_is_printed_once_per_machine_under_torchrun(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Every rank fails on the same config: only LOCAL_RANK 0 prints the line."""
    error = ConfigError("data.batch_size must be >= 1")
    for local_rank, printed in (("1", ""), ("0", f"{error.line}\n")):
        monkeypatch.setenv("LOCAL_RANK", local_rank)
        print_config_error(error)
        assert capsys.readouterr().err == printed
    monkeypatch.delenv("LOCAL_RANK")
    print_config_error(error)  # plain python: no torchrun variables
    assert capsys.readouterr().err == f"{error.line}\n"
