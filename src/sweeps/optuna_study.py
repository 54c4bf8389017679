"""One worker of an Optuna study: ask a trial, run it as its own process, tell the result.

``scripts/sweep.py`` comes here for ``method: tpe | cmaes`` or any method with ``n_trials``.
The study lives in a database: an SQLite file next to the sweep's outputs by default, or
``sweep.storage`` / ``$OPTUNA_STORAGE`` (``postgresql://...``), which several workers on
several machines share. Each worker loops until the study holds ``n_trials`` trials:

- A trial is the experiment run through ``src/sweeps/optuna_trial.py`` (which reports each
  evaluation to the study and prunes) in its own run directory ``<name>_trial<N>``; the
  runner gives it its log, its own process group and the stop-signal forwarding.
- While a trial runs, the worker records Optuna heartbeats. A worker that vanishes (its
  machine gone, SIGKILL) stops them; after ``grace_s`` any worker fails that trial, and
  Optuna's ``RetryHeartbeatStaleTrialCallback`` enqueues it again with the same parameters and
  reports. The retry keeps the first trial's run directory, so it resumes from its
  checkpoint.
- A trial stopped by SIGTERM/Ctrl-C (checkpoint saved, exit 75) goes back to WAITING: the
  next ``study.ask()`` of any worker (a re-run of this one first) takes it again, as the
  same trial with its number, parameters and earlier reports, and it resumes. So does a
  trial whose worker was SIGKILLed, once a worker on the same machine sees that process
  gone (each trial records its worker's machine and pid).
- ``study.ask()`` takes WAITING trials under a row lock, so two workers never run one trial.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import shlex
import signal
import socket
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import optuna
from omegaconf import OmegaConf
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.trial import FrozenTrial, TrialState

from src.config import ConfigError, default_config_path, load_yaml_mapping
from src.runs.layout import RunLayout
from src.sweeps.hparam import (
    SweepPaths,
    SweepSpec,
    experiment_path,
    format_value,
    repo_path,
    sweep_paths,
)
from src.sweeps.optuna_space import ParamSpace, make_pruner, make_sampler, parse_space
from src.sweeps.runner import EXIT_FAILED, EXIT_INTERRUPTED, Task, TaskResult, run_tasks

STORAGE_ENV = "OPTUNA_STORAGE"  # the study's database when sweep.storage is not set
STUDY_FILE = "study.db"  # the default SQLite file, in <output_dir>/sweeps/<name>/
# What a trial process needs to find its trial (read by src/sweeps/optuna_trial.py).
TRIAL_STORAGE_ENV = "SWEEP_OPTUNA_STORAGE"
TRIAL_STUDY_ENV = "SWEEP_OPTUNA_STUDY"
TRIAL_ID_ENV = "SWEEP_OPTUNA_TRIAL_ID"
TRIAL_PRUNER_ENV = "SWEEP_OPTUNA_PRUNER"  # JSON: {"name": ..., "args": {...}}
PRUNED_ATTR = "sweep:pruned_at_epoch"  # set by the trial process when it prunes
WORKER_ATTR = "sweep:worker"  # {"machine", "pid"} of the worker running the trial
SURPLUS_ATTR = "sweep:surplus"  # asked while another worker took the last of n_trials: not run
MACHINE_ENV = "SWEEP_MACHINE_ID"  # names this machine; default: its hostname
WAIT_SECONDS = 0.2

# Heartbeats and the retry callback are marked experimental; the sweep prints its own lines.
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used with")
optuna.logging.set_verbosity(optuna.logging.WARNING)


def redact(url: str) -> str:
    """A storage URL fit to print: its password hidden."""
    return re.sub(r"(://[^:/@]+:)[^@]*@", r"\1***@", url)


def storage_url(spec: SweepSpec, paths: SweepPaths, *, create: bool = True) -> str:
    """``sweep.storage``, else ``$OPTUNA_STORAGE``, else SQLite next to the sweep's outputs
    (made here unless ``create`` is False: then a missing file is one line, nothing made)."""
    url = spec.storage or os.environ.get(STORAGE_ENV)
    if url:
        return url
    path = paths.summary_dir / STUDY_FILE
    if not create and not path.is_file():
        raise ConfigError(f"no study {spec.name!r}: {path} does not exist (run the sweep first)")
    paths.summary_dir.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{path}"


def with_driver(url: str) -> str:
    """``postgresql://`` with the driver that is installed: SQLAlchemy 2.1 means psycopg 3,
    requirements-dev.txt installs psycopg2-binary."""
    scheme, sep, rest = url.partition("://")
    if scheme not in ("postgresql", "postgres") or importlib.util.find_spec("psycopg"):
        return url
    return f"postgresql+psycopg2{sep}{rest}" if importlib.util.find_spec("psycopg2") else url


def open_storage(url: str, spec: SweepSpec | None = None) -> RDBStorage:
    """The study's database. With ``spec``: heartbeats and the retry of vanished trials."""
    url = with_driver(url)
    kwargs: dict[str, Any] = {}
    if url.startswith("sqlite"):
        kwargs["engine_kwargs"] = {"connect_args": {"timeout": 60}}  # workers and trials share it
    if spec is not None:
        kwargs.update(
            heartbeat_interval=spec.heartbeat_s,
            grace_period=spec.grace_s,
            heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(
                max_retry=spec.max_retry, inherit_intermediate_values=True
            ),
        )
    try:
        return RDBStorage(url, **kwargs)
    except Exception as error:  # a driver missing, a server down, a bad URL: all one line
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ConfigError(f"sweep.storage {redact(url)} cannot be opened: {first}") from None


def monitor_direction(spec: SweepSpec) -> tuple[str, str]:
    """(trainer.monitor, "minimize" or "maximize") of the experiment's config and overrides."""
    path = repo_path(spec.config) if spec.config is not None else default_config_path()
    cfg = load_yaml_mapping(path, f"experiment config not found: {path}", f"{path} is not a map")
    monitor = str(OmegaConf.select(cfg, "trainer.monitor", default="val/loss"))
    mode = str(OmegaConf.select(cfg, "trainer.monitor_mode", default="min"))
    for item in spec.overrides:
        key, _, value = item.partition("=")
        if key == "trainer.monitor":
            monitor = value
        elif key == "trainer.monitor_mode":
            mode = value
    if {"trainer.monitor", "trainer.monitor_mode"} & set(spec.parameters):
        raise ConfigError("sweep.parameters: trainer.monitor and monitor_mode cannot be searched")
    if mode not in {"min", "max"}:
        raise ConfigError(f"trainer.monitor_mode is {mode!r} in {path}, expected min or max")
    return monitor, "minimize" if mode == "min" else "maximize"


def first_number(trial: FrozenTrial) -> int:
    """The number of the trial this one continues (a retry's original), else its own."""
    return int(trial.system_attrs.get("failed_trial", trial.number))


def trial_run_name(spec: SweepSpec, trial: FrozenTrial) -> str:
    """``<name>_trial<N>``: a retry keeps its original's run directory and checkpoints."""
    return f"{spec.name}_trial{first_number(trial)}"


def trial_arguments(spec: SweepSpec, params: dict[str, Any], run_name: str, output_dir: Path):
    """The experiment's command-line arguments for one trial (after the experiment path)."""
    args = ["--config", str(repo_path(spec.config))] if spec.config is not None else []
    args += [*spec.overrides, *(f"{key}={format_value(value)}" for key, value in params.items())]
    return [*args, f"run_name={run_name}", f"paths.output_dir={output_dir}"]


def reproduce_command(spec: SweepSpec, trial: FrozenTrial, paths: SweepPaths) -> str:
    """The plain experiment command that trains this trial again, in a new run directory
    (no study, no pruning)."""
    run_name = f"{trial_run_name(spec, trial)}-again"
    args = trial_arguments(spec, trial.params, run_name, paths.output_dir)
    return shlex.join(["python", spec.experiment, *args])


def trial_results(run_dir: Path) -> dict[str, Any]:
    try:
        results = json.loads(RunLayout(run_dir).test_results.read_text())
    except (OSError, ValueError):
        return {}
    return results if isinstance(results, dict) else {}


def objective_value(results: dict[str, Any], monitor: str) -> float | None:
    """The trial's value: the best ``trainer.monitor`` of its run (test_results.json)."""
    value = results.get(f"best_{monitor.replace('/', '_')}")
    if isinstance(value, int | float) and math.isfinite(value):
        return float(value)
    return None


def retried_numbers(trials: list[FrozenTrial]) -> set[int]:
    """Failed trials that a retry continues: they do not count towards n_trials."""
    return {number for t in trials for number in t.system_attrs.get("retry_history", [])}


def counted_trials(trials: list[FrozenTrial]) -> list[FrozenTrial]:
    """The trials that make up n_trials: not the failed ones a retry continues, nor the
    surplus ones (asked at the same instant as the last counted one, never run)."""
    retried = retried_numbers(trials)
    return [t for t in trials if t.number not in retried and not t.system_attrs.get(SURPLUS_ATTR)]


def is_surplus(trials: list[FrozenTrial], number: int, target: int) -> bool:
    """Trial ``number`` comes after ``target`` counted trials. The database numbers trials in
    the order they were asked, so of two workers that both saw one trial left and asked at the
    same instant, the later number is the surplus; an earlier trial never becomes one."""
    earlier = [t for t in counted_trials(trials) if t.number < number]
    return len(earlier) >= target


@dataclass
class StudySetup:
    spec: SweepSpec
    paths: SweepPaths
    url: str
    storage: RDBStorage
    study: optuna.Study
    space: list[ParamSpace]
    monitor: str
    direction: str


def open_study(spec: SweepSpec, *, create: bool = True) -> StudySetup:
    """Check the experiment's direction, open the storage and create or load the study."""
    monitor, direction = monitor_direction(spec)
    space = parse_space(spec.parameters, spec.method)
    paths = sweep_paths(spec)
    url = storage_url(spec, paths, create=create)
    storage = open_storage(url, spec)
    # Re-seeded by the trials already there: a re-run or a second worker does not draw the
    # first trials' parameters again.
    existing = {s.study_name: s for s in storage.get_all_studies()}.get(spec.name)
    seed = spec.seed + (storage.get_n_trials(existing._study_id) if existing is not None else 0)
    sampler = make_sampler(spec.method, space, seed, dict(spec.sampler_args))
    pruner = make_pruner(spec.pruner, dict(spec.pruner_args))
    if existing is not None and existing.direction.name.lower() != direction:
        raise ConfigError(
            f"study {spec.name!r} in {redact(url)} was created to {existing.direction.name.lower()}"
            f" but trainer.monitor_mode now asks to {direction}: use another sweep.name"
        )
    if existing is None and not create:
        raise ConfigError(f"no study {spec.name!r} in {redact(url)}")
    study = optuna.create_study(
        storage=storage,
        study_name=spec.name,
        sampler=sampler,
        pruner=pruner,
        direction=direction,
        load_if_exists=True,
    )
    return StudySetup(spec, paths, url, storage, study, space, monitor, direction)


class _Heartbeat:
    """Records the running trial's heartbeat every ``interval`` seconds from a thread."""

    def __init__(self, storage: RDBStorage, trial_id: int, interval: float) -> None:
        self.storage, self.trial_id, self.interval = storage, trial_id, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, daemon=True, name="sweep-heartbeat")

    def _beat(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.storage.record_heartbeat(self.trial_id)
            except Exception:  # a database hiccup: the next beat tries again
                pass

    def __enter__(self) -> _Heartbeat:
        self.storage.record_heartbeat(self.trial_id)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


@contextmanager
def _stop_flag() -> Iterator[list[str]]:
    """SIGINT/SIGTERM between trials: finish the loop instead of dying with a trial asked."""
    flag: list[str] = []

    def handle(signum: int, frame: FrameType | None) -> None:
        flag.append(signal.Signals(signum).name)

    previous = {sig: signal.signal(sig, handle) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield flag
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@dataclass
class WorkerOutcome:
    setup: StudySetup
    ran: list[int]  # trial numbers this worker ran (or resumed)
    failed: bool  # a trial failed here
    interrupted: bool  # stopped by a signal: run again to go on

    @property
    def exit_code(self) -> int:
        if self.failed:
            return EXIT_FAILED
        return EXIT_INTERRUPTED if self.interrupted else 0


def run_study(spec: SweepSpec, echo: Callable[[str], None] = print) -> WorkerOutcome:
    """Run trials of the study until it holds ``n_trials`` (all workers together)."""
    setup = open_study(spec)
    study, storage = setup.study, setup.storage
    echo(
        f"[sweep] {spec.name}: Optuna study ({spec.method}, pruner {spec.pruner}, "
        f"{setup.direction} {setup.monitor}), {spec.n_trials} trials, storage {redact(setup.url)}"
    )
    outcome = WorkerOutcome(setup, [], False, False)
    target = spec.n_trials
    if spec.method == "grid":  # every point once at most
        target = min(target, math.prod(len(param.choices) for param in setup.space))
    waiting_said = False
    with _stop_flag() as stop:
        while not stop:
            _reclaim_orphans(setup, study.get_trials(deepcopy=False), echo)
            optuna.storages.fail_stale_trials(study)
            trials = study.get_trials(deepcopy=False)
            has_waiting = any(t.state == TrialState.WAITING for t in trials)
            if not has_waiting and len(counted_trials(trials)) >= target:
                running = [t.number for t in trials if t.state == TrialState.RUNNING]
                if not running:
                    break
                if not waiting_said:  # one of them may belong to a worker that vanished
                    echo(f"[sweep] waiting for trials {running} running elsewhere")
                    waiting_said = True
                time.sleep(WAIT_SECONDS)
                continue
            trial = study.ask()
            if is_surplus(study.get_trials(deepcopy=False), trial.number, target):
                storage.set_trial_system_attr(trial._trial_id, SURPLUS_ATTR, True)
                storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
                echo(f"[sweep] trial {trial.number}: not run, another worker took the last one")
                continue
            storage.record_heartbeat(trial._trial_id)  # at once: a retried trial's is old
            worker = {"machine": machine_id(), "pid": os.getpid()}
            storage.set_trial_system_attr(trial._trial_id, WORKER_ATTR, worker)
            params = {param.name: param.suggest(trial) for param in setup.space}
            frozen = storage.get_trial(trial._trial_id)
            result = _run_trial(setup, frozen, params, echo)
            outcome.ran.append(trial.number)
            if result.status in ("interrupted", "not-run"):
                storage.set_trial_state_values(trial._trial_id, TrialState.WAITING)
                echo(f"[sweep] trial {trial.number}: back to waiting; re-run to resume it")
                outcome.interrupted = True
                break
            if not _tell(setup, frozen, result, echo):
                outcome.failed = True
        if stop:
            outcome.interrupted = True
    return outcome


def machine_id() -> str:
    return os.environ.get(MACHINE_ENV) or socket.gethostname()


def _worker_alive(pid: int) -> bool:
    """Is the sweep worker ``pid`` still running (not a process that reused its id)?"""
    try:
        return b"sweep" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except FileNotFoundError:
        return False
    except OSError:  # no /proc: any process with that id counts as alive
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True


def _reclaim_orphans(
    setup: StudySetup, trials: list[FrozenTrial], echo: Callable[[str], None]
) -> None:
    """A running trial whose worker was on this machine and is gone (SIGKILL, a crash) goes
    back to WAITING at once, so a re-run resumes it under its own number; another machine's
    trial waits for its heartbeat to go stale (then the retry callback takes it)."""
    here = machine_id()
    for trial in trials:
        worker = trial.system_attrs.get(WORKER_ATTR)
        if trial.state != TrialState.RUNNING or not isinstance(worker, dict):
            continue
        if worker.get("machine") != here or worker.get("pid") == os.getpid():
            continue
        if _worker_alive(int(worker["pid"])):
            continue
        latest = setup.storage.get_trial(trial._trial_id)  # no other re-run took it meanwhile
        if latest.state == TrialState.RUNNING and latest.system_attrs.get(WORKER_ATTR) == worker:
            setup.storage.set_trial_state_values(trial._trial_id, TrialState.WAITING)
            pid = worker["pid"]
            echo(f"[sweep] trial {trial.number}: its worker (pid {pid}) is gone; resuming it")


def _run_trial(
    setup: StudySetup, trial: FrozenTrial, params: dict[str, Any], echo: Callable[[str], None]
) -> TaskResult:
    spec, paths = setup.spec, setup.paths
    run_name = trial_run_name(spec, trial)
    run_dir = paths.output_dir / run_name
    again = " (resumed)" if run_dir.is_dir() else ""  # an earlier attempt started it
    shown = ", ".join(f"{key}={format_value(value)}" for key, value in params.items())
    echo(f"[sweep] trial {trial.number}{again}: {shown}")
    command = [sys.executable, "-m", "src.sweeps.optuna_trial", str(experiment_path(spec))]
    pruner = json.dumps({"name": spec.pruner, "args": dict(spec.pruner_args)})
    task = Task(
        name=run_name,
        command=command + trial_arguments(spec, params, run_name, paths.output_dir),
        log_path=paths.log_dir / f"{run_name}.log",
        is_done=lambda: RunLayout(run_dir).test_results.is_file(),
        env={
            TRIAL_STORAGE_ENV: setup.url,
            TRIAL_STUDY_ENV: spec.name,
            TRIAL_ID_ENV: str(trial._trial_id),
            TRIAL_PRUNER_ENV: pruner,
        },
        output=str(run_dir),
    )
    with _Heartbeat(setup.storage, trial._trial_id, spec.heartbeat_s):
        [result] = run_tasks([task], skip_done=True, echo=echo)
    return result


def _tell(
    setup: StudySetup, trial: FrozenTrial, result: TaskResult, echo: Callable[[str], None]
) -> bool:
    """Record a finished trial: complete with its value, pruned, or failed (False)."""
    study, spec = setup.study, setup.spec
    if result.status in ("ok", "skipped"):
        chain = {*trial.system_attrs.get("retry_history", []), trial.number}
        pruned_at = [
            t.system_attrs[PRUNED_ATTR]
            for t in study.get_trials(deepcopy=False)
            if t.number in chain and PRUNED_ATTR in t.system_attrs
        ]
        if pruned_at:
            _tell_quietly(study, trial.number, state=TrialState.PRUNED)
            # The report's step: the epoch, or a Trainer run's evaluation count.
            echo(f"[sweep] trial {trial.number}: pruned at report {pruned_at[0]}")
            return True
        run_dir = setup.paths.output_dir / trial_run_name(spec, trial)
        value = objective_value(trial_results(run_dir), setup.monitor)
        if value is not None:
            _tell_quietly(study, trial.number, values=value)
            echo(f"[sweep] trial {trial.number}: complete, best {setup.monitor} {value:.6g}")
            return True
        message = f"no finite best_{setup.monitor.replace('/', '_')} in test_results.json"
        setup.storage.set_trial_user_attr(trial._trial_id, "message", message)
    else:
        setup.storage.set_trial_user_attr(trial._trial_id, "message", result.message)
        message = result.message
    _tell_quietly(study, trial.number, state=TrialState.FAIL)
    echo(f"[sweep] trial {trial.number}: failed: {message}")
    return False


def _tell_quietly(study: optuna.Study, number: int, **outcome: Any) -> None:
    """``study.tell``, where the grid sampler's "every point taken" stop request (meant for
    ``study.optimize``) is no error: the trial's state is stored before it is raised."""
    try:
        study.tell(number, **outcome)
    except RuntimeError as error:
        if "Study.stop" not in str(error):
            raise
