"""`scripts/remote_train.py`: one command from the laptop to a trained, verified, downloaded run.

    connect -> sync -> install -> train (tmux, streamed) [-> export] -> retrieve -> verify
    -> shutdown

Each stage prints one line when it starts and one when it ends, with its duration. A failure
prints ``remote_train: <stage> failed: <reason>`` (one line), exits with the stage's code
(connect 10, sync 11, install 12, train 13, retrieve 14, verify 15, shutdown 16, export 17;
bad input 2) and never stops or destroys anything. A crashed run is still retrieved and verified. An
interrupted run (exit 75) is retrieved and verified, then remote_train exits 75 without
stopping the instance. Ctrl-C while a run streams detaches (exit 130): training goes on.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from src.cloud.provider import Machine, Provider
from src.common.paths import REPO_ROOT
from src.common.signals import EXIT_INTERRUPTED  # a run was interrupted: outputs home, not stopped
from src.remote.code_sync import ENV_FILE, push_code
from src.remote.connection import Probe, open_session, probe
from src.remote.host import RemoteHost
from src.remote.provider_link import price_line, require_machine, shut_down
from src.remote.runs import FINISHED_ON_PURPOSE, RunSpec, session_name
from src.remote.stages import EXIT_DETACHED, EXIT_USAGE, StageError, StageReporter
from src.storage.output_sync import SyncError, load_settings, transfer, verify_and_record

SCRIPT = "python scripts/remote_train.py"
ATTACH_TAIL_BYTES = 4096
REPORT_TAIL_LINES = 15


class UsageError(ValueError):
    """Bad input: one line, exit 2, nothing done."""


@dataclass
class Experiment:
    path: str  # relative to the repo root, '/'-separated
    args: list[str] = field(default_factory=list)

    def describe(self) -> str:
        return shlex.join([self.path, *self.args])


# -- arguments -------------------------------------------------------------------------------


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


def _extract_config(argv: list[str]) -> tuple[list[str], list[str]]:
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
        "--stop-after", action="store_true", help="Vast.ai: stop the instance once verified"
    )
    shutdown.add_argument(
        "--destroy-after",
        action="store_true",
        help="Vast.ai: destroy the instance once its outputs are verified (destroy gate)",
    )
    parser.add_argument("--no-install", action="store_true", help="skip setup/install_deps.sh")
    parser.add_argument("--with-env", action="store_true", help="also send .env (API keys)")
    parser.add_argument(
        "--verify-all", action="store_true", help="re-hash every retrieved file on both sides"
    )
    parser.add_argument(
        "--export-onnx",
        action="store_true",
        help="on the host, export each finished run to ONNX (scripts/export_onnx.py) before "
        "retrieving it, so model.onnx comes home verified with the run",
    )
    parser.add_argument(
        "--export-args",
        default="",
        metavar="'ARGS'",
        help="options for export_onnx.py, written with '=': --export-args='--int8 --weights final'",
    )
    parser.add_argument("--tmux-socket", help=argparse.SUPPRESS)  # tests: a tmux of their own
    return parser


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
    bad = [arg for arg in args if not _is_override(arg) and not arg.startswith("--config")]
    if bad:
        raise UsageError(
            f"'{bad[0]}' is not key=value: experiment settings look like trainer.max_steps=300"
        )
    return Experiment(relative.as_posix(), list(args))


def _example() -> str:
    return "experiments/template_experiment.py"


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[Experiment]]:
    main_argv, also_groups = split_also(argv)
    main_argv, config = _extract_config(main_argv)
    args = build_parser().parse_intermixed_args(main_argv)
    experiments: list[Experiment] = []
    if args.experiment:
        experiments.append(experiment_of(args.experiment, [*config, *args.overrides]))
    elif args.overrides or config:
        raise UsageError("key=value settings need an experiment before them")
    for group in also_groups:
        experiments.append(experiment_of(group[0], group[1:]))
    modes = [args.status, bool(args.attach), args.monitor, bool(experiments)]
    if sum(modes) != 1:
        raise UsageError(
            f"give an experiment (e.g. {_example()}), or one of --status, --attach RUN_NAME, "
            "--monitor"
        )
    if also_groups and not args.experiment:
        raise UsageError("--also runs after a first experiment: give that one first")
    if (args.stop_after or args.destroy_after) and (args.status or args.monitor):
        raise UsageError("--stop-after / --destroy-after go with a run or --attach")
    if not args.python.strip():
        raise UsageError("--python needs an interpreter, e.g. --python python3")
    if args.export_args and not args.export_onnx:
        raise UsageError("--export-args goes with --export-onnx")
    try:
        args.export_args = shlex.split(args.export_args)
    except ValueError as error:
        raise UsageError(f"--export-args: {error}") from None
    if args.export_onnx and (args.status or args.monitor):
        raise UsageError("--export-onnx goes with a run or --attach")
    if args.port is not None and not 0 < args.port < 65536:
        raise UsageError(f"--port {args.port} is not a TCP port")
    if args.local_dir and Path(args.local_dir).expanduser().exists():
        if not Path(args.local_dir).expanduser().is_dir():
            raise UsageError(f"--local-dir {args.local_dir} exists and is not a folder")
    return args, experiments


def default_local_dir(host: str) -> Path:
    return Path("outputs") / re.sub(r"[^A-Za-z0-9._@-]", "_", host)


def env_key_names(dotenv: Path) -> list[str]:
    """Names (never values) of the variables a .env file sets."""
    try:
        from dotenv import dotenv_values

        return sorted(name for name, value in dotenv_values(dotenv).items() if value)
    except OSError:
        return []


# -- the run ---------------------------------------------------------------------------------


class _CapturingSink:
    """stdout, remembering what went through (the installer's lines decide the stage note)."""

    def __init__(self) -> None:
        self.captured = bytearray()

    def write(self, data: bytes) -> None:
        self.captured.extend(data)
        sys.stdout.buffer.write(data)

    def flush(self) -> None:
        sys.stdout.buffer.flush()


@dataclass
class Outcome:
    states: list[dict[str, Any]]
    failure: str | None = None  # the train stage's failure, if any
    interrupted: bool = False


class RemoteTrain:
    """One invocation: the stages in order, over one SSH connection."""

    def __init__(
        self,
        args: argparse.Namespace,
        experiments: list[Experiment],
        settings: Mapping[str, str],
        reporter: StageReporter,
    ) -> None:
        self.args = args
        self.experiments = experiments
        self.settings = settings
        self.reporter = reporter
        self.host: RemoteHost | None = None
        self.address: tuple[str, int] = ("", 0)
        self.provider: Provider | None = None  # with --stop-after / --destroy-after
        self.machine: Machine | None = None
        self.run_names: list[str] = [args.attach] if args.attach else []
        self.local_dir = Path(args.local_dir or default_local_dir(args.host)).expanduser()

    # -- helpers ---------------------------------------------------------------------------

    def say(self, text: str) -> None:
        self.reporter.line(text)

    def attach_command(self, run_name: str) -> str:
        extra = []
        if self.args.port:
            extra += ["-p", str(self.args.port)]
        for flag in ("remote_dir", "python", "local_dir"):
            value = getattr(self.args, flag)
            if value and not (flag == "python" and value == "python3"):
                extra += [f"--{flag.replace('_', '-')}", value]
        if self.args.export_onnx:
            extra.append("--export-onnx")
            if self.args.export_args:
                extra.append(f"--export-args={shlex.join(self.args.export_args)}")
        return f"{SCRIPT} {shlex.join([self.args.host, '--attach', run_name, *extra])}"

    @property
    def shutdown_action(self) -> str | None:
        return "destroy" if self.args.destroy_after else "stop" if self.args.stop_after else None

    # -- stages ----------------------------------------------------------------------------

    def connect(self) -> Probe:
        args = self.args
        where = f"{args.host}" + (f" port {args.port}" if args.port else "")
        with self.reporter.stage("connect", f"opening SSH to {where}") as stage:
            session = open_session(args.host, args.port, self.settings)
            try:
                found = probe(session, args.remote_dir or f"/workspace/{REPO_ROOT.name}")
                _, hostname, port = session.resolve()
                self.address = (hostname, port)
                remote_dir = found.remote_dir
                self.host = RemoteHost(session, remote_dir, args.python, args.tmux_socket)
                tools = (("tmux", found.has_tmux), ("rsync", found.has_rsync))
                missing = [tool for tool, present in tools if not present]
                if missing:
                    raise StageError(
                        "connect",
                        f"{' and '.join(missing)} not installed on {args.host}: install with "
                        f"apt-get install -y {' '.join(missing)} (training runs in tmux, code "
                        "and outputs travel with rsync)",
                    )
                if self.shutdown_action:
                    flag = f"--{self.shutdown_action}-after"
                    self.provider, self.machine = require_machine(
                        self.settings, hostname, port, flag
                    )
                    stage.note = f"{self.machine.label}; "
            except BaseException:
                session.close()
                raise
            stage.note += f"{hostname}:{port}, code in {remote_dir}"
        return found

    def sync(self) -> None:
        assert self.host is not None
        target = f"{self.args.host}:{self.host.remote_dir}"
        with self.reporter.stage("sync", f"code {REPO_ROOT} -> {target}") as stage:
            host = self.host
            stats = push_code(host.session, REPO_ROOT, host.remote_dir, self.args.with_env)
            stage.note = (
                f"{stats.files_transferred} files sent ({stats.transferred_file_size / 1e6:.2f} MB)"
            )
            dotenv = REPO_ROOT / ENV_FILE
            if self.args.with_env:
                stage.note += ", .env included"
            elif dotenv.is_file() and env_key_names(dotenv):
                names = ", ".join(env_key_names(dotenv))
                stage.note += f"; .env not sent (it sets {names}): --with-env sends it"

    def install(self) -> None:
        assert self.host is not None
        with self.reporter.stage(
            "install", f"setup/install_deps.sh --python {self.args.python}"
        ) as stage:
            sink = _CapturingSink()
            command = self.host.in_repo(
                f"bash setup/install_deps.sh --python {shlex.quote(self.args.python)} 2>&1"
            )
            code, ssh_error = self.host.stream(command, sink)  # type: ignore[arg-type]
            text = sink.captured.decode(errors="replace")
            if code == 255:
                raise StageError("install", f"SSH connection dropped: {ssh_error}")
            if code != 0:
                lines = [line for line in text.splitlines() if line.strip()]
                last = lines[-1] if lines else ssh_error or "no output"
                reason = f"setup/install_deps.sh exited with code {code}: {last}"
                raise StageError("install", reason)
            notes = []
            if "nothing to do" in text:
                notes.append("already installed (requirements unchanged)")
            if "no GPU on this host" in text:
                notes.append("NO GPU on this host: training runs on the CPU")
            elif "WARNING" in text and "GPU" in text:
                notes.append("GPU present but unusable by torch: see the warning above")
            stage.note = "; ".join(notes)

    def start(self) -> tuple[str, bool]:
        """Plan and start the runs; (session, attached to one already running)."""
        assert self.host is not None
        runs: list[RunSpec] = []
        for experiment in self.experiments:
            plan = self.host.agent_json("train", "plan", experiment.path, *experiment.args)
            runs.append(
                RunSpec(
                    plan["run_name"],
                    plan["run_dir"],
                    plan["output_root"],
                    experiment.path,
                    experiment.args,
                )
            )
            if plan.get("needs_keys") and not self.args.with_env:
                self.say(
                    f"note: run '{plan['run_name']}' needs {', '.join(plan['needs_keys'])}; "
                    ".env was not sent: pass --with-env, or set them on the host"
                )
        names = [run.run_name for run in runs]
        self.run_names = names
        duplicate = next((name for name in names if names.count(name) > 1), None)
        if duplicate:
            raise StageError(
                "train",
                f"two experiments would both be run '{duplicate}': give each its own "
                "run_name=... after it",
            )
        session = session_name(runs[0].run_name)
        payload = json.dumps([run.__dict__ for run in runs]).encode()
        answer = self.host.agent_json(
            "train", "start", "--session", session, "--python", self.args.python, stdin=payload
        )
        if "attach" in answer:
            self.say(
                f"run '{names[0]}' is already running on {self.args.host} (tmux session "
                f"{answer['attach']}): following it instead of starting a copy"
            )
            return answer["attach"], True
        self.say(f"started tmux session {session} on {self.args.host}: {', '.join(names)}")
        return session, False

    def follow(self, session: str, attaching: bool) -> Outcome | None:
        """Stream the logs until the runs end; None when the user detached (Ctrl-C)."""
        assert self.host is not None
        tail = ["--tail", str(ATTACH_TAIL_BYTES)] if attaching else []
        command = self.host.agent_command("follow", "--session", session, *tail)
        try:
            code, ssh_error = self.host.stream(command, sys.stdout.buffer)
        except KeyboardInterrupt:
            return None
        sys.stdout.write("\n")
        try:
            answer = self.host.agent_json(
                "train", "status", "--session", session, "--tail", str(REPORT_TAIL_LINES)
            )
        except StageError as error:
            if code != 255:
                raise
            attach = self.attach_command(self.run_names[0] if self.run_names else session)
            raise StageError(
                "train",
                f"lost the SSH connection ({ssh_error or error.reason}); training goes on on "
                f"the host: {attach}",
            ) from None
        states = answer["runs"]
        outcome = Outcome(states)
        if code != 0 and any(s["state"] in ("running", "queued") for s in states):
            first = next(s for s in states if s["state"] in ("running", "queued"))
            outcome.failure = (
                f"lost the connection while following ({ssh_error or f'exit {code}'}); the run "
                f"goes on: {self.attach_command(first['run_name'])}"
            )
        return outcome

    def report(self, outcome: Outcome) -> None:
        """One line per run; the last log lines of one that failed; the train failure."""
        for state in outcome.states:
            name, where = state["run_name"], state["run_dir"]
            if state["state"] == "finished":
                code = state["exit_code"]
                self.say(f"run '{name}': {state['outcome']} (exit {code})")
                if code == EXIT_INTERRUPTED:
                    outcome.interrupted = True
                    self.say("  a checkpoint was saved; the same command resumes it")
                elif code not in FINISHED_ON_PURPOSE:
                    self.say(f"  last lines of {where}/remote_train.log:")
                    for line in state.get("tail", []):
                        self.say(f"  | {line}")
                    outcome.failure = outcome.failure or (
                        f"run '{name}' {state['outcome']} (exit {code}); its outputs are "
                        "retrieved anyway"
                    )
            elif state["state"] == "skipped":
                self.say(f"run '{name}': skipped ({state.get('reason', '')})")
            elif state["state"] in ("lost", "not started"):
                self.say(f"run '{name}': {state['state']}")
                outcome.failure = outcome.failure or (
                    f"run '{name}' ended without an exit code (its tmux session is gone: host "
                    "rebooted, or tmux killed?)"
                )

    def export(self, outcome: Outcome) -> None:
        """``scripts/export_onnx.py`` on the host for each run that ended with exit 0: the
        export checks itself against torch there (where torch is), and model.onnx then
        travels home through the same retrieve and verify as the rest of the run."""
        assert self.host is not None
        done = [s for s in outcome.states if s["state"] == "finished" and s["exit_code"] == 0]
        extra = shlex.join(self.args.export_args)
        with self.reporter.stage("export", f"scripts/export_onnx.py {extra}".rstrip()) as stage:
            for state in done:
                script = shlex.join(
                    [self.args.python, "scripts/export_onnx.py", state["run_dir"]]
                    + self.args.export_args
                )
                sink = _CapturingSink()
                code, ssh_error = self.host.stream(self.host.in_repo(f"{script} 2>&1"), sink)
                if code == 255:
                    raise StageError("export", f"SSH connection dropped: {ssh_error}")
                if code != 0:
                    lines = sink.captured.decode(errors="replace").splitlines()
                    last = next((ln for ln in reversed(lines) if ln.strip()), "no output")
                    raise StageError(
                        "export",
                        f"run '{state['run_name']}': export_onnx.py exited with code {code}: "
                        f"{last.strip()}",
                    )
            skipped = [s["run_name"] for s in outcome.states if s not in done]
            stage.note = f"{len(done)} run(s) exported"
            if skipped:
                stage.note += f"; not exported (did not finish): {', '.join(skipped)}"

    def retrieve_targets(self, states: list[dict[str, Any]]) -> list[tuple[str, Path]]:
        """(remote dir, local dir) pairs: each started run's dir, or with --destroy-after the
        outputs roots, since the destroy gate wants everything under them verified home."""
        started = [s for s in states if s.get("started_at") or s["state"] == "finished"]
        started = [s for s in started if s["state"] != "skipped"]
        if self.args.destroy_after:
            roots = sorted({s["output_root"] for s in states})
            if len(roots) == 1:
                return [(roots[0], self.local_dir)]
            return [(root, self.local_dir / Path(root).name) for root in roots]
        return [(s["run_dir"], self.local_dir / s["run_name"]) for s in started]

    def retrieve_and_verify(self, targets: list[tuple[str, Path]]) -> None:
        assert self.host is not None
        session = self.host.session
        if not targets:
            return
        local_dirs = ", ".join(str(local) for _, local in targets)
        with self.reporter.stage("retrieve", f"rsync -> {local_dirs}") as stage:
            moved, files = 0, 0
            for remote, local in targets:
                try:
                    stats = transfer(session, remote, local.resolve(), show_progress=False)
                except SyncError as error:
                    raise StageError("retrieve", error.reason) from None
                moved += stats.transferred_file_size
                files += stats.files_transferred
            stage.note = f"{files} files moved ({moved / 1e6:.2f} MB)"
        with self.reporter.stage("verify", "sha256 on both sides, manifest") as stage:
            notes = []
            for remote, local in targets:
                try:
                    manifest, path, hashed = verify_and_record(
                        session, remote, local.resolve(), self.settings, self.args.verify_all
                    )
                except SyncError as error:
                    raise StageError("verify", error.reason) from None
                notes.append(
                    f"{len(manifest.files)} files ({manifest.total_bytes / 1e6:.2f} MB) in "
                    f"{local}, {hashed} hashed; manifest {path}"
                )
            stage.note = "; ".join(notes)

    def shutdown(self, outcome: Outcome, targets: list[tuple[str, Path]]) -> None:
        action = self.shutdown_action
        hostname, port = self.address
        if action is None:
            line = price_line(self.settings, hostname, port)
            if line:
                self.say(line)
            return
        assert self.provider is not None and self.machine is not None
        with self.reporter.stage("shutdown", f"{action} {self.machine.label}") as st:
            unfinished = [
                s for s in outcome.states if s.get("exit_code") not in FINISHED_ON_PURPOSE
            ]
            if unfinished:
                first = unfinished[0]
                how = first.get("outcome") or first["state"]
                raise StageError(
                    "shutdown",
                    f"not {'destroying' if action == 'destroy' else 'stopping'} "
                    f"{self.machine.name}: run '{first['run_name']}' {how} (its outputs are "
                    "verified home); resume it, or do it yourself: "
                    f"{self.provider.hand_command(action, self.machine.id)}",
                )
            roots = [remote for remote, _ in targets]
            st.note = shut_down(self.provider, self.machine, action, roots, self.settings)

    # -- modes -----------------------------------------------------------------------------

    def status(self, found: Probe) -> int:
        assert self.host is not None
        if not found.has_code:
            self.say(f"no runs on {self.args.host}: nothing was synced to {self.host.remote_dir}")
            return 0
        answer = self.host.agent_json("connect", "status")
        print_status_table(self.args.host, self.host.remote_dir, answer["runs"], answer["now"])
        return 0

    def monitor(self, found: Probe) -> int:
        assert self.host is not None
        if not found.has_code:
            self.say(f"nothing synced to {self.host.remote_dir} on {self.args.host} yet")
            return 0
        code, ssh_error = self.host.stream(self.host.agent_command("monitor"), sys.stdout.buffer)
        if code != 0:
            raise StageError("connect", f"monitor failed: {ssh_error or f'exit {code}'}")
        return 0

    def find_session(self, found: Probe, run_name: str) -> str:
        assert self.host is not None
        runs = self.host.agent_json("train", "status")["runs"] if found.has_code else []
        matching = [s for s in runs if s["run_name"] == run_name]
        if not matching:
            known = ", ".join(sorted({s["run_name"] for s in runs})) or "none"
            raise UsageError(
                f"no run named '{run_name}' on {self.args.host} (runs there: {known}); "
                "--status lists them"
            )
        return max(matching, key=lambda s: s["created_at"])["session"]

    def run(self) -> int:
        found = self.connect()
        assert self.host is not None
        try:
            if self.args.status:
                return self.status(found)
            if self.args.monitor:
                return self.monitor(found)
            if self.args.attach:
                session = self.find_session(found, self.args.attach)
                attaching = True
                what = f"following run '{self.args.attach}' (tmux session {session})"
            else:
                self.sync()
                if not self.args.no_install:
                    self.install()
                what = ", then ".join(e.describe() for e in self.experiments)
                session, attaching = None, False
            with self.reporter.stage("train", what) as stage:
                if session is None:
                    session, attaching = self.start()
                outcome = self.follow(session, attaching)
                if outcome is None:
                    stage.ended_as = "detached"
                else:
                    self.report(outcome)
                    if outcome.failure:
                        stage.fail(outcome.failure)
            if outcome is None:
                name = self.run_names[0] if self.run_names else session
                self.say(
                    f"detached: training goes on on {self.args.host} (tmux session {session}); "
                    f"follow it, and retrieve it when it ends, with: {self.attach_command(name)}"
                )
                return EXIT_DETACHED
            targets = self.retrieve_targets(outcome.states)
            train_failure = stage.failure
            if train_failure is None and self.args.export_onnx:
                try:
                    self.export(outcome)
                except StageError as error:  # reported; the run itself still comes home
                    self.reporter.error(error)
                    train_failure = error
            if train_failure is None:
                self.retrieve_and_verify(targets)
            else:
                try:  # a crashed run's outputs still come home; the exit code stays train's
                    self.retrieve_and_verify(targets)
                except StageError as error:
                    self.reporter.error(error)
                if self.shutdown_action:
                    self.say(
                        f"the {self.shutdown_action} is skipped: the {train_failure.stage} "
                        "stage failed"
                    )
                return train_failure.exit_code
            self.shutdown(outcome, targets)
            return EXIT_INTERRUPTED if outcome.interrupted else 0
        finally:
            self.host.session.close()


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = max(0.0, seconds)
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def print_status_table(host: str, remote_dir: str, runs: list[dict[str, Any]], now: float) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(highlight=False, width=None if sys.stdout.isatty() else 160)
    if not runs:
        console.print(f"no runs on {host} ({remote_dir})")
        return
    table = Table("run", "state", "step", "age", "experiment", "tmux session", title=host)
    for state in runs:
        shown = state["outcome"] if state["state"] == "finished" else state["state"]
        if state["state"] == "finished":
            age = f"ended {_age(now - state['finished_at'])} ago" if state["finished_at"] else "-"
        else:
            since = state.get("started_at") or state["created_at"]
            age = _age(now - since)
        command = shlex.join([state["experiment"], *state["args"]])
        table.add_row(
            state["run_name"], shown, state["step"] or "-", age, command, state["session"]
        )
    console.print(table)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    reporter = StageReporter()
    try:
        args, experiments = parse_args(argv)
    except UsageError as error:
        reporter.error(error)
        return EXIT_USAGE
    settings = load_settings(os.environ)
    try:
        return RemoteTrain(args, experiments, settings, reporter).run()
    except UsageError as error:
        reporter.error(error)
        return EXIT_USAGE
    except StageError as error:
        reporter.error(error)
        return error.exit_code
    except KeyboardInterrupt:
        reporter.error("interrupted; nothing was stopped or destroyed")
        return EXIT_DETACHED


if __name__ == "__main__":
    sys.exit(main())
