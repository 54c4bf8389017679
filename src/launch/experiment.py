"""The experiment file's entry: its config from the command line (or defaults in a notebook),
checked against this machine, the run directory guarded and locked before anything trains.

As a script a ConfigError becomes one line on stderr and exit code 2 (``sys.excepthook``
too, for one raised later by the trainer), a full disk one line and exit 74, GPU out of
memory one line and exit 1; ``--debug`` on the command line (or ``LOGLEVEL=DEBUG``) adds the
traceback. In a Jupyter kernel errors are raised so the cell shows them without killing
the kernel.
"""

from __future__ import annotations

import os
import sys
import threading
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from src.common.errors import (
    EXIT_CONFIG_ERROR,
    EXIT_FAILED,
    ONE_LINE_ERRORS,
    ConfigError,
    is_disk_full,
)
from src.common.paths import resolve_output_dir
from src.common.signals import exit_cleanly_after_training
from src.config import (
    DEV_CONFIG,
    PROD_CONFIG,
    experiment_schema,
    in_notebook,
    load_config,
    parse_cli,
)
from src.launch.opening import open_run
from src.models import MODEL_BUILDERS
from src.models.mlp import MLPConfig
from src.models.template import TEMPLATE_SCHEMA
from src.runs.lock import discard_unused_run_dirs
from src.utils.gpu_monitor import cuda_index


def check_runtime(cfg: DictConfig) -> None:
    """What only this machine can answer: is the model known, is the requested GPU here."""
    if OmegaConf.get_type(cfg.model) is MLPConfig and cfg.model.name not in MODEL_BUILDERS:
        known = ", ".join(sorted(MODEL_BUILDERS))
        raise ConfigError(f"unknown model.name {cfg.model.name!r}: choose one of {known}")
    index = cuda_index(cfg.trainer.device)
    if index is not None:
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if index >= count:
            raise ConfigError(
                f"trainer.device={cfg.trainer.device} but this machine has {count} CUDA GPU(s): "
                "use trainer.device=auto (GPU if there is one, else CPU) or cpu"
            )


def check_output_dir(cfg: DictConfig) -> None:
    """Fail before any run starts if outputs could not be written (checked, not assumed)."""
    try:
        run_dir = resolve_output_dir(cfg.paths.output_dir) / cfg.run_name
    except PermissionError as error:
        raise ConfigError(str(error)) from None
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(
            f"run directory {run_dir} exists but is a file: choose another run_name or move it"
        )


def print_config_error(error: ConfigError) -> None:
    """The one line, once per machine: under torchrun every rank reads the same config and
    fails the same way, so only each node's first rank (LOCAL_RANK 0) prints it."""
    if int(os.environ.get("LOCAL_RANK", "0")) == 0:
        print(error.line, file=sys.stderr)


DEBUG_FLAG = "--debug"  # on an experiment's command line: tracebacks with the one lines
_debug = {"on": False}


def debugging() -> bool:
    """``--debug`` was given, or ``LOGLEVEL=DEBUG`` is set: show tracebacks."""
    return _debug["on"] or os.environ.get("LOGLEVEL", "").upper() == "DEBUG"


def take_debug_flag(argv: list[str]) -> list[str]:
    """``argv`` without ``--debug``, remembering whether it was there."""
    _debug["on"] = DEBUG_FLAG in argv
    return [arg for arg in argv if arg != DEBUG_FLAG]


def exit_on_known_error(exc_type: type, error: BaseException, traceback: Any) -> None:
    """sys.excepthook for scripts: a ConfigError raised later (by the trainer, which checks
    what only the model can answer, such as trainer.monitor) is still one line and exit 2;
    a full disk (74) and GPU out of memory (1) are one line too. By then ``fit`` has waited
    for its checkpoint writes, so exiting at once loses nothing."""
    if issubclass(exc_type, ConfigError):
        discard_unused_run_dirs()  # "nothing written": not even an empty run directory
        print_config_error(error)  # type: ignore[arg-type]
        _exit_now(EXIT_CONFIG_ERROR)  # raised before training: no write is pending
    if issubclass(exc_type, ONE_LINE_ERRORS) or issubclass(exc_type, torch.cuda.OutOfMemoryError):
        if debugging():
            sys.__excepthook__(exc_type, error, traceback)
        line = getattr(error, "line", None) or f"GPU out of memory: {str(error).splitlines()[0]}"
        print(line, file=sys.stderr)
        _exit_now(getattr(error, "exit_code", EXIT_FAILED))
    sys.__excepthook__(exc_type, error, traceback)


def quiet_disk_full_in_threads(args: threading.ExceptHookArgs) -> None:
    """threading.excepthook for scripts: a writer thread (TensorBoard's) that died of a full
    disk prints nothing; the main thread meets the same error and says it in one line."""
    if is_disk_full(args.exc_value) and not debugging():
        return
    threading.__excepthook__(args)


def _exit_now(code: int) -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def load_experiment_config(
    argv: list[str] | None = None,
    *,
    model: type | None = None,
    data: type | None = None,
    dev_config: str | os.PathLike[str] | None = None,
    prod_config: str | os.PathLike[str] | None = None,
) -> DictConfig:
    """Config for an experiment file, from the command line or (in a notebook) from defaults.

    ``model`` / ``data``: the experiment's own settings dataclasses (``data`` extends
    DataConfig); they are loaded, overridden and checked like the built-in sections.
    Without them: the template experiment's (``src.models.template.TEMPLATE_SCHEMA``).
    ``dev_config`` / ``prod_config``: the files DEV_MODE chooses between.

    As a script a ConfigError becomes one line on stderr and exit code 2, and the run
    directory is locked for this process (a second process on the same run exits at once);
    in a kernel errors are raised so the cell shows them without killing the kernel.
    """
    if (model or data) and (dev_config is None or prod_config is None):
        raise TypeError(
            "an experiment with its own model/data settings needs its own config files: pass "
            "dev_config= and prod_config= (the template's files hold the template's settings)"
        )
    notebook = in_notebook()
    if argv is None:
        argv = [] if notebook else sys.argv[1:]
    argv = take_debug_flag(list(argv))
    if not notebook:
        sys.excepthook = exit_on_known_error
        threading.excepthook = quiet_disk_full_in_threads
        exit_cleanly_after_training()  # a signal during test() or the final writes: 75, not -15
    try:
        config_path, overrides = parse_cli(argv)
        cfg = load_config(
            config_path,
            overrides,
            schema=experiment_schema(model, data) if model or data else TEMPLATE_SCHEMA,
            dev_config=Path(dev_config or DEV_CONFIG),
            prod_config=Path(prod_config or PROD_CONFIG),
        )
        check_runtime(cfg)
        check_output_dir(cfg)
        # The guard, then the lock: held by the script's first rank until the process exits.
        hold = not notebook and int(os.environ.get("RANK", "0")) == 0
        open_run(cfg, int(os.environ.get("WORLD_SIZE", "1")), lock="hold" if hold else "none")
        return cfg
    except ConfigError as error:
        if notebook:
            raise
        print_config_error(error)
        raise SystemExit(EXIT_CONFIG_ERROR) from None
