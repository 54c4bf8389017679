"""Several runs side by side, each its own Slurm job: read a cases file, check it, submit.

    python scripts/slurm/launch_parallel.py --config configs/cases.yaml
    python scripts/slurm/launch_parallel.py --config configs/cases.yaml --dry-run

Each case is one ``sbatch`` of a template in scripts/slurm/ with its own ``run_name``,
which is also the job name, so its log is ``<log_dir>/<run_name>_<job id>.out`` and a
requeue or a later resubmission resumes the same run directory. All or nothing: the
file is checked here, then every job is checked by Slurm itself (``sbatch --test-only``:
partition, GPUs, memory, time) before the first is submitted, so a bad case costs one
line and exit 2 with nothing queued.
"""

from __future__ import annotations

import re
import shlex
import subprocess
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from src.common.paths import REPO_ROOT
from src.config import (
    ConfigError,
    ExperimentConfig,
    describe_config_error,
    load_yaml_mapping,
    rename_old_override,
)

DEFAULT_LOG_DIR = "logs"
RUN_NAME = re.compile(r"[A-Za-z0-9._=+-]+")  # a directory, a job name, a log file name
OVERRIDE_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")
# The experiment's own dataclasses replace these sections (experiment_schema), so only the
# experiment can check their keys; every other section is ExperimentConfig's everywhere.
EXPERIMENT_OWN_SECTIONS = {"model", "data"}
# Set per case by the launcher: a second value would break the log name or the run.
LAUNCHER_OPTIONS = {
    "--job-name": "the job name is the case's run_name",
    "-J": "the job name is the case's run_name",
    "--output": "logs go to <log_dir>/<run_name>_<job id>.out (--log-dir)",
    "-o": "logs go to <log_dir>/<run_name>_<job id>.out (--log-dir)",
    "--error": "stderr goes into the same log as stdout",
    "-e": "stderr goes into the same log as stdout",
    "--array": "an array's tasks would share one run_name; write one case per task",
    "-a": "an array's tasks would share one run_name; write one case per task",
    "--parsable": "the launcher adds it",
    "--test-only": "use --dry-run",
    "--wrap": "the job runs the template given as script:",
}


@dataclass
class CaseSpec:
    run_name: str = ""  # required: the run directory, the job name and the log name
    overrides: list[str] = field(default_factory=list)  # after the common ones
    sbatch_args: list[str] = field(default_factory=list)  # after the common ones (they win)


@dataclass
class CasesFile:
    experiment: str = "experiments/template_experiment.py"  # relative to the repo root
    config: str | None = None  # --config for every case; None: DEV_MODE picks dev/prod
    script: str = "scripts/slurm/train.sbatch"  # or scripts/slurm/train_multinode.sbatch
    sbatch_args: list[str] = field(default_factory=list)  # every case, e.g. --gres=gpu:1
    overrides: list[str] = field(default_factory=list)  # every case, e.g. trainer.max_epochs=20
    cases: list[CaseSpec] = field(default_factory=list)


FILE_KEYS = [f.name for f in fields(CasesFile)]
CASE_KEYS = [f.name for f in fields(CaseSpec)]


@dataclass(frozen=True)
class Submission:
    """One case as the command that submits it."""

    run_name: str
    options: list[str]  # sbatch's own: --job-name, --output, then the file's sbatch_args
    job: list[str]  # SCRIPT EXPERIMENT [--config C] [overrides] run_name=NAME

    @property
    def command(self) -> list[str]:
        return ["sbatch", "--parsable", *self.options, *self.job]

    @property
    def test_command(self) -> list[str]:
        """Slurm checks the job and says when it would start; nothing is queued."""
        return ["sbatch", "--test-only", *self.options, *self.job]

    def log_path(self, log_dir: str, job_id: str) -> str:
        return f"{log_dir}/{self.run_name}_{job_id}.out"


@dataclass(frozen=True)
class Submitted:
    run_name: str
    job_id: str
    log: str


def repo_path(path: str) -> Path:
    """Paths in the cases file are relative to the repo root (sbatch runs from there)."""
    return Path(path) if Path(path).is_absolute() else REPO_ROOT / path


def load_cases(path: str | Path) -> CasesFile:
    """Read and check a cases file; any problem is a ConfigError of one line."""
    path = Path(path)
    file_cfg = load_yaml_mapping(
        path,
        f"cases file not found: {path} (start from configs/cases.yaml)",
        f"{path} is not a mapping of keys: start from configs/cases.yaml",
    )
    cases = file_cfg.get("cases")
    if cases is not None and not (
        isinstance(cases, ListConfig) and all(isinstance(case, DictConfig) for case in cases)
    ):
        raise ConfigError(
            f"{path}: cases must be a list of mappings, e.g. - {{run_name: seed1, overrides: "
            "[seed=1]}"
        )
    try:
        merged = OmegaConf.merge(OmegaConf.structured(CasesFile), file_cfg)
        spec: CasesFile = OmegaConf.to_object(merged)  # type: ignore[assignment]
    except OmegaConfBaseException as error:
        raise ConfigError(_describe_schema_error(error, str(path))) from None
    check_cases(spec, str(path))
    return spec


def _describe_schema_error(error: OmegaConfBaseException, source: str) -> str:
    key = getattr(error, "full_key", None) or getattr(error, "key", None)
    if "not in" in str(error) or "Missing key" in str(error):
        return (
            f"unknown key '{key}' in {source}: the keys are {', '.join(FILE_KEYS)}; "
            f"a case's are {', '.join(CASE_KEYS)}"
        )
    return describe_config_error(error, source)


def check_cases(spec: CasesFile, source: str) -> None:
    """Everything that can be wrong before Slurm is asked: names, files, arguments."""

    def fail(message: str) -> None:
        raise ConfigError(f"{source}: {message}")

    if not spec.cases:
        fail("cases is empty: add at least one, e.g. - {run_name: seed1, overrides: [seed=1]}")
    for key in ("experiment", "script") + (("config",) if spec.config else ()):
        path = repo_path(getattr(spec, key))
        if not path.is_file():
            fail(f"{key}: {path} does not exist (give a path from the repo root)")
    seen: set[str] = set()
    for index, case in enumerate(spec.cases):
        where = f"cases[{index}]"
        if not case.run_name:
            fail(f"{where} has no run_name: give each case its own, e.g. run_name: lr3e-4-seed1")
        if not RUN_NAME.fullmatch(case.run_name):
            fail(f"{where}.run_name {case.run_name!r} may hold only letters, digits and . _ = + -")
        if case.run_name in seen:
            fail(
                f"{where}.run_name {case.run_name!r} is used twice: two jobs would share one "
                "run directory; give each case its own run_name"
            )
        seen.add(case.run_name)
        where = f"case {case.run_name!r}"
        check_overrides([*spec.overrides, *case.overrides], f"{source} ({where})")
        for arg in [*spec.sbatch_args, *case.sbatch_args]:
            problem = sbatch_arg_problem(arg)
            if problem:
                fail(f"{where}: sbatch_args item {arg!r}: {problem}")


def check_overrides(overrides: Sequence[str], source: str) -> None:
    """``key=value`` items; keys outside ``model.``/``data.`` are checked against the schema.

    ``model.*`` and ``data.*`` belong to the experiment's own dataclasses: the job checks
    them when it starts (a typo there is one line in the job's log and exit 2).
    """
    checkable = []
    for item in overrides:
        key, sep, _ = item.partition("=")
        if not sep or not OVERRIDE_KEY.fullmatch(key):
            raise ConfigError(f"{source}: override {item!r} is not key=value, e.g. optim.lr=3e-4")
        if key == "run_name":
            raise ConfigError(
                f"{source}: override {item!r}: set the case's run_name: instead (it also "
                "names the job and its log)"
            )
        if key.split(".")[0] not in EXPERIMENT_OWN_SECTIONS:
            checkable.append(rename_old_override(item))
    try:
        schema = OmegaConf.structured(ExperimentConfig)
        OmegaConf.merge(schema, OmegaConf.from_dotlist(checkable))
    except OmegaConfBaseException as error:
        raise ConfigError(describe_config_error(error, source)) from None


def sbatch_arg_problem(arg: str) -> str | None:
    """Why ``arg`` can't be one of a case's sbatch options, or None when it can."""
    if not arg.startswith("-"):
        return "not an option: write each as one item --key=value, e.g. --time=04:00:00"
    name = arg.split("=", 1)[0]
    if name in LAUNCHER_OPTIONS:
        return f"set by the launcher ({LAUNCHER_OPTIONS[name]})"
    if len(name) > 2 and not name.startswith("--"):  # -t04:00:00: ambiguous to read back
        return "write the long form --key=value, e.g. --time=04:00:00"
    return None


def merge_sbatch_args(common: Sequence[str], own: Sequence[str]) -> list[str]:
    """The common options, each replaced by the case's own of the same name, then the rest.

    sbatch would take the later of two anyway; one of each keeps the printed commands clear.
    """
    merged = {arg.split("=", 1)[0]: arg for arg in common}
    merged.update({arg.split("=", 1)[0]: arg for arg in own})
    return list(merged.values())


def plan_submissions(spec: CasesFile, log_dir: str = DEFAULT_LOG_DIR) -> list[Submission]:
    """One ``sbatch --parsable`` command per case, in the file's order."""
    submissions = []
    config = ["--config", spec.config] if spec.config else []
    for case in spec.cases:
        options = [
            f"--job-name={case.run_name}",
            f"--output={log_dir}/%x_%j.out",
            *merge_sbatch_args(spec.sbatch_args, case.sbatch_args),
        ]
        job = [
            spec.script,
            spec.experiment,
            *config,
            *spec.overrides,
            *case.overrides,
            f"run_name={case.run_name}",
        ]
        submissions.append(Submission(case.run_name, options, job))
    return submissions


Runner = Callable[[list[str]], subprocess.CompletedProcess]


def default_runner(env: Mapping[str, str] | None = None) -> Runner:
    """sbatch from the repo root: the templates ``cd`` to the submit directory."""

    def run(command: list[str]) -> subprocess.CompletedProcess:
        return subprocess.run(
            command,
            cwd=REPO_ROOT,
            env=None if env is None else dict(env),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    return run


def _first_line(result: subprocess.CompletedProcess) -> str:
    lines = [line.strip() for line in (result.stderr + result.stdout).splitlines()]
    return next((line for line in lines if line), f"exit {result.returncode}, no output")


def submit_all(
    submissions: Sequence[Submission], log_dir: str = DEFAULT_LOG_DIR, run: Runner | None = None
) -> list[Submitted]:
    """Ask Slurm to check every job (``--test-only``), then submit them all.

    A job Slurm would refuse (no such partition, more GPUs or memory than a node has)
    is a ConfigError before anything is queued. ``sbatch`` is missing: a ConfigError too.
    """
    run = run or default_runner()
    try:
        for submission in submissions:
            checked = run(submission.test_command)
            if checked.returncode != 0:
                raise ConfigError(
                    f"case {submission.run_name!r}: Slurm refuses the job: {_first_line(checked)} "
                    "(fix sbatch_args; nothing was submitted)"
                )
    except FileNotFoundError:
        raise ConfigError(
            "sbatch not found: run this on the cluster's login node (or a node with the Slurm "
            "client commands)"
        ) from None
    # Slurm fails a job whose log directory is missing, and writes no log to say so.
    repo_path(log_dir).mkdir(parents=True, exist_ok=True)
    submitted = []
    for submission in submissions:
        result = run(submission.command)
        if result.returncode != 0:
            done = ", ".join(f"{s.run_name}={s.job_id}" for s in submitted) or "none"
            raise SubmitError(
                f"sbatch failed for case {submission.run_name!r}: {_first_line(result)} "
                f"(submitted before it: {done})",
                submitted,
            )
        job_id = result.stdout.strip().split(";")[0]  # --parsable: "id" or "id;cluster"
        submitted.append(
            Submitted(submission.run_name, job_id, submission.log_path(log_dir, job_id))
        )
    return submitted


class SubmitError(RuntimeError):
    """sbatch failed part way (after Slurm had accepted every job in --test-only)."""

    def __init__(self, message: str, submitted: list[Submitted]) -> None:
        super().__init__(message)
        self.submitted = submitted


def describe_submitted(submitted: Sequence[Submitted]) -> str:
    """The job ids and the commands to watch them, to print."""
    width = max(len(job.run_name) for job in submitted)
    lines = [f"submitted {len(submitted)} job(s):"]
    for job in submitted:
        lines.append(f"  {job.job_id:>8}  {job.run_name:<{width}}  tail -f {job.log}")
    ids = [job.job_id for job in submitted]
    lines.append(f"watch:  squeue -j {','.join(ids)}")
    lines.append(f"cancel: scancel {' '.join(ids)}   (the runs keep their checkpoints)")
    return "\n".join(lines)


def describe_dry_run(submissions: Sequence[Submission], log_dir: str = DEFAULT_LOG_DIR) -> str:
    """What would be submitted, runnable as it is from the repo root.

    ``mkdir`` first: Slurm fails a job whose log directory is missing, without a word.
    """
    commands = [["mkdir", "-p", log_dir], *(submission.command for submission in submissions)]
    return "\n".join(shlex.join(command) for command in commands)
