"""Hyperparameter sweep: grid or seeded random search over any experiment's config keys.

A sweep file has one ``sweep:`` section (configs/sweep_example.yaml). Each trial is the
experiment run as a subprocess with dotlist overrides and its own ``run_name``, derived
from its parameter values, so the same sweep always maps a trial to the same run
directory. That is what makes re-running an interrupted sweep safe: finished trials
(``test_results.json`` present) are skipped and unfinished ones resume through the
trainer's own checkpoints. At the end the trials are ranked by the metric and the table
is written as ``summary.json`` and ``summary.csv``.
"""

from __future__ import annotations

import csv
import hashlib
import io
import itertools
import json
import math
import random
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from src.common.atomic_io import atomic_write_bytes
from src.common.paths import (
    DEFAULT_PERSISTENT_DIR,
    LOCAL_FALLBACK_DIR,
    REPO_ROOT,
    resolve_persistent_dir,
)
from src.config import ConfigError, describe_config_error, load_yaml_mapping
from src.runs.files import write_json
from src.runs.layout import RunLayout
from src.sweeps.optuna_space import make_pruner, make_sampler, parse_space
from src.sweeps.runner import Task, TaskResult, run_tasks

MAX_RUN_NAME = 120


@dataclass
class SweepSpec:
    name: str = "sweep"  # prefix of every trial's run_name; names the summary folder
    experiment: str = "experiments/template_experiment.py"  # relative to the repo root
    config: str | None = None  # passed to each trial as --config; None: DEV_MODE decides
    method: str = "grid"  # grid | random
    num_trials: int = 0  # random search only
    seed: int = 0  # random search only: the same seed draws the same trials
    # grid: key -> list of values; random: key -> list (choice) or {min, max, log, type}
    parameters: dict[str, Any] = field(default_factory=dict)
    overrides: list[str] = field(default_factory=list)  # given to every trial
    metric: str = "best_val_loss"  # a key of test_results.json (or training_log.json)
    direction: str = "minimize"  # minimize | maximize
    output_dir: str = DEFAULT_PERSISTENT_DIR  # trials' paths.output_dir
    gpus: list[int] = field(default_factory=list)  # e.g. [0, 1]: one trial per GPU at once
    # An Optuna study (src/sweeps/optuna_study.py): method tpe or cmaes, or any method with
    # n_trials set. The direction then comes from the experiment's trainer.monitor_mode.
    n_trials: int = 0  # trials in the study, all workers together
    pruner: str = "median"  # median | hyperband | none
    pruner_args: dict[str, Any] = field(default_factory=dict)  # e.g. {n_startup_trials: 3}
    sampler_args: dict[str, Any] = field(default_factory=dict)  # e.g. {n_startup_trials: 5}
    storage: str | None = None  # postgresql://...; None: $OPTUNA_STORAGE, else SQLite here
    heartbeat_s: int = 60  # a running trial's worker says it is alive this often
    grace_s: int = 180  # silent this long: the trial is failed and retried by another worker
    max_retry: int = 3  # retries of a trial whose worker vanished


@dataclass
class SweepFile:
    sweep: SweepSpec = field(default_factory=SweepSpec)


@dataclass
class Trial:
    run_name: str
    params: dict[str, Any]

    @property
    def overrides(self) -> list[str]:
        return [f"{key}={format_value(value)}" for key, value in self.params.items()]


def format_value(value: Any) -> str:
    """How a value appears in a dotlist override and in a run_name (repr keeps floats exact)."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return repr(value)
    return str(value)


def load_sweep(path: str | Path, overrides: list[str] | None = None) -> SweepSpec:
    """Read and check a sweep file; any problem is a one-line ConfigError."""
    path = Path(path)
    no_section = f"{path} has no sweep: section; start from configs/sweep_example.yaml"
    file_cfg = load_yaml_mapping(path, f"sweep file not found: {path}", no_section)
    if "sweep" not in file_cfg:
        raise ConfigError(no_section)
    source = f"{path} + command-line overrides" if overrides else str(path)
    try:
        cfg = OmegaConf.merge(OmegaConf.structured(SweepFile), file_cfg)
        cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(list(overrides or [])))
        spec = SweepSpec(**OmegaConf.to_container(cfg.sweep, resolve=True))  # type: ignore[arg-type]
    except OmegaConfBaseException as error:
        raise ConfigError(describe_config_error(error, source)) from None
    _validate(spec, source)
    return spec


OPTUNA_ONLY_METHODS = ("tpe", "cmaes")


def uses_optuna(spec: SweepSpec) -> bool:
    """An Optuna study (tpe, cmaes, or n_trials set); else the plain grid/random sweep."""
    return spec.method in OPTUNA_ONLY_METHODS or spec.n_trials > 0


def _validate(spec: SweepSpec, source: str) -> None:
    def fail(message: str) -> None:
        raise ConfigError(f"{source}: {message}")

    if spec.method not in {"grid", "random", *OPTUNA_ONLY_METHODS}:
        fail(f"sweep.method is {spec.method!r}, expected tpe, random, grid or cmaes")
    if not re.fullmatch(r"[A-Za-z0-9._=+-]+", spec.name):
        fail(f"sweep.name {spec.name!r} may hold only letters, digits and . _ = + -")
    if not spec.parameters:
        fail("sweep.parameters is empty: list at least one key, e.g. optim.lr: [1e-3, 3e-3]")
    if not experiment_path(spec).is_file():
        fail(f"sweep.experiment {experiment_path(spec)} does not exist")
    if spec.config is not None and not repo_path(spec.config).is_file():
        fail(f"sweep.config {repo_path(spec.config)} does not exist")
    if any(gpu < 0 for gpu in spec.gpus) or len(set(spec.gpus)) != len(spec.gpus):
        fail(f"sweep.gpus {spec.gpus} must be distinct GPU indices >= 0, e.g. [0, 1]")
    if uses_optuna(spec):
        _validate_study(spec, fail)
        return
    if spec.direction not in {"minimize", "maximize"}:
        fail(f"sweep.direction is {spec.direction!r}, expected minimize or maximize")
    if spec.method == "random" and spec.num_trials < 1:
        fail("sweep.num_trials must be >= 1 for random search")
    for key, values in spec.parameters.items():
        if isinstance(values, list):
            if not values:
                fail(f"sweep.parameters.{key} is an empty list")
        elif spec.method == "grid":
            fail(f"sweep.parameters.{key}: grid search needs a list of values")
        elif not (isinstance(values, dict) and {"min", "max"} <= values.keys()):
            fail(f"sweep.parameters.{key}: use a list, or {{min, max}} (optional log, type)")
        elif values.get("log") and float(values["min"]) <= 0:
            fail(f"sweep.parameters.{key}: log scale needs min > 0")


def _validate_study(spec: SweepSpec, fail: Callable[[str], None]) -> None:
    """An Optuna sweep's own settings; the search space through parse_space."""
    if spec.n_trials < 1:
        fail(f"sweep.n_trials must be >= 1 for an Optuna study (method {spec.method})")
    if spec.gpus:
        fail(
            "sweep.gpus: an Optuna sweep runs one trial at a time; start one sweep.py per GPU "
            "with CUDA_VISIBLE_DEVICES=N instead (they share the study)"
        )
    if spec.heartbeat_s < 1 or spec.grace_s <= spec.heartbeat_s:
        fail("sweep.heartbeat_s must be >= 1 and sweep.grace_s larger than it")
    try:
        space = parse_space(spec.parameters, spec.method)
        make_sampler(spec.method, space, spec.seed, dict(spec.sampler_args))
        make_pruner(spec.pruner, dict(spec.pruner_args))
    except ConfigError as error:
        fail(str(error))


def repo_path(path: str) -> Path:
    return Path(path) if Path(path).is_absolute() else REPO_ROOT / path


def experiment_path(spec: SweepSpec) -> Path:
    return repo_path(spec.experiment)


def _sample(values: Any, rng: random.Random) -> Any:
    if isinstance(values, list):
        return rng.choice(values)
    low, high = float(values["min"]), float(values["max"])
    if values.get("log"):
        value = math.exp(rng.uniform(math.log(low), math.log(high)))
    else:
        value = rng.uniform(low, high)
    if values.get("type") == "int":
        return int(round(value))
    return float(f"{value:.4g}")  # short, stable run names; plenty for a search


def trial_run_name(spec: SweepSpec, params: dict[str, Any]) -> str:
    """``<name>_key=value_...``; hashed when too long. Same params, same name, same run dir."""
    body = "_".join(f"{key}={format_value(value)}" for key, value in params.items())
    name = re.sub(r"[^A-Za-z0-9._=+-]", "-", f"{spec.name}_{body}")
    if len(name) > MAX_RUN_NAME:
        name = f"{spec.name}_{hashlib.sha1(body.encode()).hexdigest()[:10]}"
    return name


def expand_trials(spec: SweepSpec) -> list[Trial]:
    """Every grid point, or ``num_trials`` seeded draws (duplicates dropped)."""
    keys = list(spec.parameters)
    if spec.method == "grid":
        grid = itertools.product(*spec.parameters.values())
        combos = [dict(zip(keys, values, strict=True)) for values in grid]
    else:
        rng = random.Random(spec.seed)
        draws = range(spec.num_trials)
        combos = [{key: _sample(spec.parameters[key], rng) for key in keys} for _ in draws]
    trials: dict[str, Trial] = {}
    for params in combos:
        run_name = trial_run_name(spec, params)
        trials.setdefault(run_name, Trial(run_name, params))
    return list(trials.values())


@dataclass
class SweepPaths:
    output_dir: Path  # the trials' paths.output_dir
    summary_dir: Path  # <output_dir>/sweeps/<name>/ with summary.* and logs/

    @property
    def log_dir(self) -> Path:
        return self.summary_dir / "logs"


def sweep_paths(spec: SweepSpec) -> SweepPaths:
    try:
        output_dir = resolve_persistent_dir(
            spec.output_dir, LOCAL_FALLBACK_DIR, "sweep outputs", setting="sweep.output_dir"
        )
    except PermissionError as error:
        raise ConfigError(str(error)) from None
    return SweepPaths(output_dir, output_dir / "sweeps" / spec.name)


def build_tasks(spec: SweepSpec, trials: list[Trial], paths: SweepPaths) -> list[Task]:
    command = [sys.executable, str(experiment_path(spec))]
    if spec.config is not None:
        command += ["--config", str(repo_path(spec.config))]
    tasks = []
    for trial in trials:
        run_dir = paths.output_dir / trial.run_name
        args = [*spec.overrides, *trial.overrides]
        args += [f"run_name={trial.run_name}", f"paths.output_dir={paths.output_dir}"]
        tasks.append(
            Task(
                name=trial.run_name,
                command=command + args,
                log_path=paths.log_dir / f"{trial.run_name}.log",
                is_done=lambda run_dir=run_dir: RunLayout(run_dir).test_results.is_file(),
                output=str(run_dir),
            )
        )
    return tasks


def read_metric(run_dir: Path, metric: str) -> float | None:
    """``metric`` from test_results.json, else from the last training_log.json record."""
    layout = RunLayout(run_dir)
    for path, pick in ((layout.test_results, lambda d: d), (layout.training_log, lambda d: d[-1])):
        try:
            value = pick(json.loads(path.read_text())).get(metric)
        except (OSError, ValueError, IndexError, AttributeError, KeyError):
            continue
        if isinstance(value, int | float) and math.isfinite(value):
            return float(value)
    return None


def summarize(
    spec: SweepSpec, trials: list[Trial], results: list[TaskResult], paths: SweepPaths
) -> list[dict[str, Any]]:
    """One row per trial, best first; trials without a metric (failed, unfinished) last."""
    rows = []
    for trial, result in zip(trials, results, strict=True):
        status = "ok (done before)" if result.status == "skipped" else result.status
        rows.append(
            {
                "run_name": trial.run_name,
                "status": status,
                spec.metric: read_metric(paths.output_dir / trial.run_name, spec.metric),
                **trial.params,
                "seconds": round(result.seconds, 1) if result.returncode is not None else None,
                "message": result.message,
                "log": str(paths.log_dir / f"{trial.run_name}.log"),
            }
        )
    sign = 1 if spec.direction == "minimize" else -1
    rows.sort(key=lambda row: (row[spec.metric] is None, sign * (row[spec.metric] or 0.0)))
    for rank, row in enumerate(rows, start=1):
        row["rank"] = rank if row[spec.metric] is not None else None
    return rows


def table_columns(spec: SweepSpec) -> list[str]:
    return ["rank", "run_name", "status", spec.metric, *spec.parameters, "seconds", "message"]


def write_summary(spec: SweepSpec, rows: list[dict[str, Any]], paths: SweepPaths) -> Path:
    """summary.json (with the sweep spec) and summary.csv, both written atomically."""
    paths.summary_dir.mkdir(parents=True, exist_ok=True)
    spec_dict = {key: getattr(spec, key) for key in SweepSpec.__dataclass_fields__}
    write_json(
        paths.summary_dir / "summary.json",
        {"sweep": spec_dict, "metric": spec.metric, "direction": spec.direction, "trials": rows},
    )
    buffer = io.StringIO()
    columns = [*table_columns(spec), "log"]
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_bytes(paths.summary_dir / "summary.csv", buffer.getvalue().encode())
    return paths.summary_dir


@dataclass
class SweepOutcome:
    results: list[TaskResult]
    rows: list[dict[str, Any]]  # summary rows, best first
    summary_dir: Path


def run_sweep(
    spec: SweepSpec, *, dry_run: bool = False, echo: Callable[[str], None] = print
) -> SweepOutcome:
    """Run (or with ``dry_run`` only print) every trial, then rank and save the summary."""
    trials = expand_trials(spec)
    paths = sweep_paths(spec)
    slots = [str(gpu) for gpu in spec.gpus] or [None]
    mode = f"one per GPU on {len(slots)} GPUs" if spec.gpus else "one at a time"
    echo(f"[sweep] {spec.name}: {len(trials)} trials ({spec.method}), {mode}")
    tasks = build_tasks(spec, trials, paths)
    results = run_tasks(tasks, skip_done=True, dry_run=dry_run, slots=slots, echo=echo)
    rows = summarize(spec, trials, results, paths)
    finished = [row for row in rows if row["status"].startswith("ok")]
    if finished and all(row[spec.metric] is None for row in finished):
        echo(
            f"[sweep] warning: no finished trial reports sweep.metric '{spec.metric}' in "
            "test_results.json or training_log.json; the ranking is empty. Check its spelling"
        )
    if not dry_run:
        write_summary(spec, rows, paths)
    return SweepOutcome(results, rows, paths.summary_dir)
