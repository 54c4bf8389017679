"""remote_train's command line: the arguments, the experiments they name, and the command
that attaches to a run again (printed when the user detaches or the connection drops).

Everything here is checked before anything touches the host: bad input is a UsageError, one
line and exit 2.
"""

from __future__ import annotations

import argparse
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

from src.cloud.registry import PROVIDER_KEYS, parse_rent_query
from src.cloud.renting import RentQueryError
from src.common.paths import REPO_ROOT
from src.export.arguments import format_from_options
from src.export.errors import ExportError
from src.export.registry import format_names

SCRIPT = "python scripts/remote_train.py"
RENTED_HOST = "rented"  # --rent's HOST: the machine's address is known once it boots
DEFAULT_BOOT_TIMEOUT_S = 600.0
DEFAULT_MAX_ATTEMPTS = 5
DEFAULT_DISK_GB = 50.0
DEFAULT_SKIP_BAD_HOURS = 24.0


class UsageError(ValueError):
    """Bad input: one line, exit 2, nothing done."""


@dataclass
class Experiment:
    path: str  # relative to the repo root, '/'-separated
    args: list[str] = field(default_factory=list)

    def describe(self) -> str:
        return shlex.join([self.path, *self.args])


def _is_override(token: str) -> bool:
    return "=" in token and not token.startswith("-")


def split_also(argv: list[str]) -> tuple[list[str], list[list[str]]]:
    """(main argv, one [EXPERIMENT, args...] per --also). After ``--also EXPERIMENT``, the
    ``key=value`` tokens (and ``--config PATH``) that follow belong to that experiment."""
    main: list[str] = []
    groups: list[list[str]] = []
    current: list[str] | None = None
    tokens = list(argv)
    while tokens:
        token = tokens.pop(0)
        if token == "--also" or token.startswith("--also="):
            value = token.partition("=")[2] if "=" in token else (tokens.pop(0) if tokens else "")
            if not value or value.startswith("-"):
                raise UsageError("--also needs an experiment file: --also experiments/b.py")
            current = [value]
            groups.append(current)
        elif current is not None and _is_override(token):
            current.append(token)
        elif current is not None and (token == "--config" or token.startswith("--config=")):
            current.append(token)
            if token == "--config" and tokens:
                current.append(tokens.pop(0))
        else:
            current = None
            main.append(token)
    return main, groups


def extract_config(argv: list[str]) -> tuple[list[str], list[str]]:
    """Pull the experiment's own ``--config PATH`` out of the main argv."""
    rest, config = [], []
    tokens = list(argv)
    while tokens:
        token = tokens.pop(0)
        if token == "--config":
            if not tokens:
                raise UsageError("--config needs a path: --config configs/prod_config.yaml")
            config += [token, tokens.pop(0)]
        elif token.startswith("--config="):
            config.append(token)
        else:
            rest.append(token)
    return rest, config


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="remote_train.py",
        description="Sync the code to HOST, install, train EXPERIMENT detached in tmux, stream "
        "its log, retrieve and verify the run directory, then optionally stop or destroy the "
        "Vast.ai instance. Docs: README.md and docs/vast_and_sync.md.",
    )
    parser.add_argument("host", help="~/.ssh/config alias or user@host (e.g. vastai-instance-1)")
    parser.add_argument("experiment", nargs="?", help="e.g. experiments/template_experiment.py")
    parser.add_argument("overrides", nargs="*", help="key=value for the experiment")
    parser.add_argument(
        "--also",
        metavar="EXPERIMENT",
        help="run this experiment (with the key=value that follow it) after, in the same "
        "tmux session; repeatable",
    )
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--status", action="store_true", help="runs on the host and their state")
    mode.add_argument("--attach", metavar="RUN_NAME", help="follow a run, then retrieve it")
    mode.add_argument("--monitor", action="store_true", help="GPU table and log tails")
    parser.add_argument("-p", "--port", type=int, help="SSH port (default: ~/.ssh/config)")
    parser.add_argument(
        "--remote-dir", help=f"where the code goes (default /workspace/{REPO_ROOT.name})"
    )
    parser.add_argument("--python", default="python3", help="the host's interpreter")
    parser.add_argument("--local-dir", help="where outputs come home (default ./outputs/HOST)")
    shutdown = parser.add_mutually_exclusive_group()
    shutdown.add_argument(
        "--stop-after", action="store_true", help="stop the instance/pod once verified"
    )
    shutdown.add_argument(
        "--destroy-after",
        action="store_true",
        help="destroy the instance/pod once its outputs are verified (destroy gate)",
    )
    parser.add_argument(
        "--provider",
        choices=sorted(PROVIDER_KEYS),
        help="with --machine: whose machine HOST is (else found by its SSH address)",
    )
    parser.add_argument(
        "--machine",
        "--pod",
        "--instance",
        dest="machine",
        metavar="ID",
        help="the instance/pod id behind HOST, for --stop-after/--destroy-after and its price",
    )
    parser.add_argument("--no-install", action="store_true", help="skip setup/install_deps.sh")
    parser.add_argument(
        "--check",
        action="store_true",
        help="after the install, measure the machine (scripts/check_instance.py --quick) and "
        "print its verdict before training",
    )
    parser.add_argument(
        "--min-gpu-efficiency",
        type=float,
        metavar="F",
        help="with --check: refuse to train when a GPU delivers less than F (0-1] of its "
        "bf16 peak (implies --check)",
    )
    parser.add_argument("--with-env", action="store_true", help="also send .env (API keys)")
    parser.add_argument(
        "--verify-all", action="store_true", help="re-hash every retrieved file on both sides"
    )
    export = parser.add_mutually_exclusive_group()
    export.add_argument(
        "--export",
        metavar="FORMAT",
        help="on the host, export each finished run (scripts/export.py --format FORMAT) before "
        f"retrieving it, so its files come home verified with the run; formats: "
        f"{', '.join(format_names())}",
    )
    export.add_argument(
        "--export-onnx",
        dest="export",
        action="store_const",
        const="onnx",
        help="the same as --export onnx",
    )
    parser.add_argument(
        "--export-args",
        default="",
        metavar="'ARGS'",
        help="options for scripts/export.py, written with '=': "
        "--export-args='--int8 --weights final'",
    )
    rent = parser.add_argument_group(
        "renting (--rent QUERY EXPERIMENT: find, create, check, train, bring home, destroy)"
    )
    rent.add_argument(
        "--boot-timeout",
        type=float,
        default=DEFAULT_BOOT_TIMEOUT_S,
        metavar="S",
        help="per boot stage (an SSH port mapped, then answering): give up on the machine "
        "after this many seconds (default 600)",
    )
    rent.add_argument(
        "--max-total-usd", type=float, metavar="USD", help="never spend more over all machines"
    )
    rent.add_argument(
        "--max-attempts",
        type=int,
        default=DEFAULT_MAX_ATTEMPTS,
        help="machines to try at most (default 5)",
    )
    rent.add_argument(
        "--disk", type=float, metavar="GB", help="disk to rent (default: QUERY's --min-disk or 50)"
    )
    rent.add_argument("--keep", action="store_true", help="keep the machine running at the end")
    rent.add_argument(
        "--skip-bad-hours",
        type=float,
        default=DEFAULT_SKIP_BAD_HOURS,
        metavar="H",
        help="skip a host that failed within this many hours (default 24)",
    )
    rent.add_argument(
        "--state-file",
        help="the rent state file (default: RENT_STATE_FILE or "
        "~/.config/gpu-train-kit/rented.json)",
    )
    rent.add_argument("--poll-interval", type=float, default=5.0, help=argparse.SUPPRESS)
    parser.add_argument("--tmux-socket", help=argparse.SUPPRESS)  # tests: a tmux of their own
    return parser


RENT_ONLY = ("max_total_usd", "disk", "keep", "state_file")


def take_rent(argv: list[str]) -> tuple[list[str], object | None]:
    """``--rent QUERY ...``: (the argv with a placeholder HOST, the provider's query), or the
    argv unchanged and None without --rent."""
    if "--rent" not in argv:
        return argv, None
    argv = [token for token in argv if token != "--rent"]
    key = "vast"
    for index, token in enumerate(argv):
        if token == "--provider" and index + 1 < len(argv):
            key = argv[index + 1]
        elif token.startswith("--provider="):
            key = token.partition("=")[2]
    if key not in PROVIDER_KEYS:
        raise UsageError(f"--provider {key}: choose one of {', '.join(sorted(PROVIDER_KEYS))}")
    try:
        query, rest = parse_rent_query(key, argv)
    except RentQueryError as error:
        raise UsageError(str(error)) from None
    return [RENTED_HOST, *rest], query


def check_rent_args(args: argparse.Namespace, experiments: list[Experiment]) -> None:
    """--rent's settings, or the rent-only flags given without it: UsageError."""
    if args.rent_query is None:
        given = [name for name in RENT_ONLY if getattr(args, name) not in (None, False)]
        if given:
            raise UsageError(f"--{given[0].replace('_', '-')} goes with --rent")
        return
    if not experiments or args.status or args.attach or args.monitor:
        raise UsageError(f"--rent needs an experiment: --rent QUERY {_example()} [key=value ...]")
    if args.machine:
        raise UsageError("--rent creates its own machine: leave out --machine")
    if args.keep and (args.destroy_after or args.stop_after):
        raise UsageError("--keep, --stop-after and --destroy-after exclude each other")
    if args.boot_timeout <= 0:
        raise UsageError(f"--boot-timeout {args.boot_timeout:g} must be > 0 seconds")
    if args.max_attempts < 1:
        raise UsageError(f"--max-attempts {args.max_attempts} must be at least 1")
    if args.max_total_usd is not None and args.max_total_usd <= 0:
        raise UsageError(f"--max-total-usd {args.max_total_usd:g} must be > 0 (e.g. 5)")
    if args.disk is not None and args.disk <= 0:
        raise UsageError(f"--disk {args.disk:g} must be a positive number of GB")
    if args.skip_bad_hours < 0:
        raise UsageError(f"--skip-bad-hours {args.skip_bad_hours:g} must be >= 0")
    if args.disk is None:
        args.disk = getattr(args.rent_query, "min_disk", None) or DEFAULT_DISK_GB
    args.provider = args.provider or "vast"
    args.check = True  # a rented machine is measured before it trains


def _without_config_paths(args: list[str]) -> list[str]:
    """``args`` less ``--config PATH`` / ``--config=PATH`` (the path is no override)."""
    rest: list[str] = []
    tokens = list(args)
    while tokens:
        token = tokens.pop(0)
        if token == "--config":
            if tokens:
                tokens.pop(0)
        elif not token.startswith("--config="):
            rest.append(token)
    return rest


def experiment_of(path_text: str, args: list[str], repo_root: Path = REPO_ROOT) -> Experiment:
    """The experiment as a path inside the repo (it is synced with it); UsageError if not."""
    path = Path(path_text).expanduser()
    candidates = [path] if path.is_absolute() else [Path.cwd() / path, repo_root / path]
    found = next((c.resolve() for c in candidates if c.is_file()), None)
    if found is None:
        raise UsageError(f"experiment {path_text} not found: give a file such as {_example()}")
    try:
        relative = found.relative_to(repo_root.resolve())
    except ValueError:
        raise UsageError(
            f"experiment {path_text} is outside the repo ({repo_root}): only the repo is synced, "
            "so put the file under experiments/"
        ) from None
    bad = [arg for arg in _without_config_paths(args) if not _is_override(arg)]
    if bad:
        raise UsageError(
            f"'{bad[0]}' is not key=value: experiment settings look like trainer.max_steps=300"
        )
    return Experiment(relative.as_posix(), list(args))


def _example() -> str:
    return "experiments/template_experiment.py"


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[Experiment]]:
    argv, rent_query = take_rent(list(argv))
    main_argv, also_groups = split_also(argv)
    main_argv, config = extract_config(main_argv)
    args = build_parser().parse_intermixed_args(main_argv)
    args.rent_query = rent_query
    experiments: list[Experiment] = []
    if args.experiment:
        experiments.append(experiment_of(args.experiment, [*config, *args.overrides]))
    elif args.overrides or config:
        raise UsageError("key=value settings need an experiment before them")
    for group in also_groups:
        experiments.append(experiment_of(group[0], group[1:]))
    check_only = args.check or args.min_gpu_efficiency is not None
    modes = [args.status, bool(args.attach), args.monitor, bool(experiments)]
    if sum(modes) == 0 and check_only:
        modes.append(True)  # `remote_train HOST --check`: measure the machine, train nothing
    if sum(modes) != 1:
        raise UsageError(
            f"give an experiment (e.g. {_example()}), or one of --status, --attach RUN_NAME, "
            "--monitor, --check"
        )
    if also_groups and not args.experiment:
        raise UsageError("--also runs after a first experiment: give that one first")
    if (args.stop_after or args.destroy_after) and (args.status or args.monitor):
        raise UsageError("--stop-after / --destroy-after go with a run or --attach")
    if not args.python.strip():
        raise UsageError("--python needs an interpreter, e.g. --python python3")
    if args.export and args.export not in format_names():
        raise UsageError(
            f"--export {args.export}: no such export format; choose {', '.join(format_names())}"
        )
    if args.export_args and not args.export:
        raise UsageError("--export-args goes with --export FORMAT")
    try:
        args.export_args = shlex.split(args.export_args)
    except ValueError as error:
        raise UsageError(f"--export-args: {error}") from None
    if args.export:
        try:  # checked here: a typo found after hours of training on the host costs more
            format_from_options(args.export, args.export_args)
        except ExportError as error:
            raise UsageError(f"--export-args for --export {args.export}: {error}") from None
    if args.export and (args.status or args.monitor):
        raise UsageError("--export goes with a run or --attach")
    check_rent_args(args, experiments)
    if args.rent_query is None and bool(args.provider) != bool(args.machine):
        raise UsageError("--provider and --machine go together, e.g. --provider runpod --pod ID")
    if args.min_gpu_efficiency is not None:
        if not 0 < args.min_gpu_efficiency <= 1:
            raise UsageError(
                f"--min-gpu-efficiency must be in (0, 1], got {args.min_gpu_efficiency} "
                "(e.g. 0.8: at least 80% of the GPU's bf16 peak)"
            )
        args.check = True
    if args.check and (args.status or args.monitor or args.attach):
        raise UsageError("--check / --min-gpu-efficiency go with a run (before training) or alone")
    if args.port is not None and not 0 < args.port < 65536:
        raise UsageError(f"--port {args.port} is not a TCP port")
    if args.local_dir and Path(args.local_dir).expanduser().exists():
        if not Path(args.local_dir).expanduser().is_dir():
            raise UsageError(f"--local-dir {args.local_dir} exists and is not a folder")
    return args, experiments


def default_local_dir(host: str) -> Path:
    return Path("outputs") / re.sub(r"[^A-Za-z0-9._@-]", "_", host)


def attach_command(args: argparse.Namespace, run_name: str) -> str:
    """The command that follows ``run_name`` again with the same options."""
    extra = []
    if args.port:
        extra += ["-p", str(args.port)]
    for flag in ("remote_dir", "python", "local_dir"):
        value = getattr(args, flag)
        if value and not (flag == "python" and value == "python3"):
            extra += [f"--{flag.replace('_', '-')}", value]
    if args.export:
        extra += ["--export", args.export]
        if args.export_args:
            extra.append(f"--export-args={shlex.join(args.export_args)}")
    return f"{SCRIPT} {shlex.join([args.host, '--attach', run_name, *extra])}"
