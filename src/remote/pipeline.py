"""remote_train's stages, in order, over one SSH connection:

    connect -> sync -> install -> train (tmux, streamed) [-> export] -> retrieve -> verify
    -> shutdown

``RemoteTrain.run`` is the whole invocation; ``--status``, ``--monitor`` and ``--attach``
are its other modes. Each stage reports through ``StageReporter`` (``stages``) and fails
with a StageError naming itself. The cloud instance (stop, destroy, its price) is reached
only through ``provider_link``.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from dotenv import dotenv_values

from src.common.errors import EXIT_BELOW_EFFICIENCY
from src.common.paths import REPO_ROOT
from src.common.signals import EXIT_INTERRUPTED  # a run was interrupted: outputs home, not stopped
from src.export.arguments import format_from_options
from src.export.sidecar import check_against_sidecar
from src.remote.args import Experiment, UsageError, attach_command, default_local_dir
from src.remote.code_sync import ENV_FILE, push_code
from src.remote.connection import Probe, open_session, probe
from src.remote.host import RemoteHost
from src.remote.provider_link import InstanceLink, price_line
from src.remote.runs import FINISHED_ON_PURPOSE, RunSpec, session_name
from src.remote.stages import EXIT_DETACHED, StageError, StageReporter
from src.remote.status_table import print_status_table
from src.runs.layout import RunLayout
from src.storage.output_sync import SyncError, transfer, verify_and_record

EXPORT_SCRIPT = "scripts/export.py"  # run on the host, in the synced repo
CHECK_SCRIPT = "scripts/check_instance.py"
ATTACH_TAIL_BYTES = 4096
REPORT_TAIL_LINES = 15


def env_key_names(dotenv: Path) -> list[str]:
    """Names (never values) of the variables a .env file sets."""
    try:
        return sorted(name for name, value in dotenv_values(dotenv).items() if value)
    except OSError:
        return []


class _CapturingSink:
    """stdout, remembering what went through (the installer's lines decide the stage note)."""

    def __init__(self) -> None:
        self.captured = bytearray()

    def write(self, data: bytes) -> None:
        self.captured.extend(data)
        sys.stdout.buffer.write(data)

    def flush(self) -> None:
        sys.stdout.buffer.flush()


def local_copy_of(remote_path: str, targets: list[tuple[str, Path]]) -> Path | None:
    """Where ``remote_path`` (a run directory on the host) lands here, given the retrieve's
    (remote dir, local dir) pairs; None when no pair covers it."""
    for remote, local in targets:
        try:
            relative = PurePosixPath(remote_path).relative_to(PurePosixPath(remote))
        except ValueError:
            continue
        return local / relative
    return None


def check_exports_home(
    export: str, export_args: list[str], run_dirs: list[str], targets: list[tuple[str, Path]]
) -> int:
    """Each exported run's export files, home, against their sidecars (every file's sha256
    and size; a directory export holding nothing else); the number of exports checked.
    StageError("verify") naming the first file that differs."""
    export_format = format_from_options(export, export_args)
    checked = 0
    for run_dir in run_dirs:
        local_run = local_copy_of(run_dir, targets)
        if local_run is None:
            continue
        for target in export_format.targets(RunLayout(local_run)):
            problems = check_against_sidecar(target)
            if problems:
                more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
                raise StageError(
                    "verify", f"export {problems[0]}{more}: export the run again on the host"
                )
            checked += 1
    return checked


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
        self.instance: InstanceLink | None = None  # with --stop-after / --destroy-after
        self.run_names: list[str] = [args.attach] if args.attach else []
        self.local_dir = Path(args.local_dir or default_local_dir(args.host)).expanduser()
        self.exported: list[str] = []  # the host's run dirs the export stage exported
        self.last_outcome: Outcome | None = None  # how the runs ended, once followed

    # -- helpers ---------------------------------------------------------------------------

    @property
    def named_machine(self) -> tuple[str, str] | None:
        """``--provider KEY --machine ID`` when given (else the SSH address finds it)."""
        return (self.args.provider, self.args.machine) if self.args.machine else None

    def say(self, text: str) -> None:
        self.reporter.line(text)

    def attach_command(self, run_name: str) -> str:
        return attach_command(self.args, run_name)

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
                    self.instance = InstanceLink.require(
                        self.settings, hostname, port, flag, self.named_machine
                    )
                    stage.note = f"{self.instance.describe()}; "
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

    def check(self) -> None:
        """scripts/check_instance.py on the host, its verdict lines shown; with
        --min-gpu-efficiency a machine below it fails this stage before any training."""
        assert self.host is not None
        options = ["--quick"]
        if self.args.min_gpu_efficiency is not None:
            options += ["--min-gpu-efficiency", str(self.args.min_gpu_efficiency)]
        script = shlex.join([self.args.python, CHECK_SCRIPT, *options])
        with self.reporter.stage("check", script) as stage:
            sink = _CapturingSink()
            code, ssh_error = self.host.stream(self.host.in_repo(f"{script} 2>&1"), sink)  # type: ignore[arg-type]
            lines = [line for line in sink.captured.decode(errors="replace").splitlines()]
            overall = next((ln for ln in reversed(lines) if ln.startswith("[check] ")), "")
            if code == 255:
                raise StageError("check", f"SSH connection dropped: {ssh_error}")
            no_gpu = overall.startswith("[check] no GPU here")
            if no_gpu and self.args.min_gpu_efficiency is not None:
                code = EXIT_BELOW_EFFICIENCY
                overall = "[check] no GPU here, and --min-gpu-efficiency needs one"
            if code == EXIT_BELOW_EFFICIENCY:
                release = ""
                # --rent releases the machine itself, at once: no command to hand over.
                if self.instance is not None and getattr(self.args, "rent_query", None) is None:
                    action = self.shutdown_action or "destroy"
                    release = (
                        f"; nothing has trained there, so nothing needs downloading: release it "
                        f"with {self.instance.manual_command(action)}"
                    )
                raise StageError(
                    "check",
                    f"not training on {self.args.host}: {overall.removeprefix('[check] ')}"
                    f"{release}",
                )
            if code != 0:
                last = next((ln for ln in reversed(lines) if ln.strip()), ssh_error or "no output")
                raise StageError("check", f"{CHECK_SCRIPT} exited with code {code}: {last}")
            summary = [ln for ln in lines if ln.startswith("[check] ") and "delivers" in ln]
            stage.note = summary[-1].removeprefix("[check] ") if summary else overall

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
                    retrieve=plan.get("retrieve", ""),
                )
            )
            if self.args.export and plan.get("retrieve") == plan["output_root"]:
                raise StageError(
                    "train",
                    f"--export exports experiment runs, not the sweep '{plan['run_name']}': "
                    "export its best trial afterwards (python scripts/export.py RUN_DIR ...)",
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
        """``scripts/export.py --format FORMAT`` on the host for each run that ended with exit
        0: the export checks itself against torch there (where torch is), and its files then
        travel home through the same retrieve and verify as the rest of the run."""
        assert self.host is not None
        done = [s for s in outcome.states if s["state"] == "finished" and s["exit_code"] == 0]
        options = ["--format", self.args.export, *self.args.export_args]
        with self.reporter.stage("export", shlex.join([EXPORT_SCRIPT, *options])) as stage:
            for state in done:
                script = shlex.join([self.args.python, EXPORT_SCRIPT, state["run_dir"], *options])
                sink = _CapturingSink()
                code, ssh_error = self.host.stream(self.host.in_repo(f"{script} 2>&1"), sink)
                if code == 255:
                    raise StageError("export", f"SSH connection dropped: {ssh_error}")
                if code != 0:
                    lines = sink.captured.decode(errors="replace").splitlines()
                    last = next((ln for ln in reversed(lines) if ln.strip()), "no output")
                    raise StageError(
                        "export",
                        f"run '{state['run_name']}': {Path(EXPORT_SCRIPT).name} exited with "
                        f"code {code}: {last.strip()}",
                    )
                self.exported.append(state["run_dir"])
            skipped = [s["run_name"] for s in outcome.states if s not in done]
            stage.note = f"{len(done)} run(s) exported"
            if skipped:
                stage.note += f"; not exported (did not finish): {', '.join(skipped)}"

    def retrieve_targets(self, states: list[dict[str, Any]]) -> list[tuple[str, Path]]:
        """(remote dir, local dir) pairs: each started run's dir (a sweep's: its outputs root),
        or with --destroy-after the outputs roots, since the destroy gate wants everything
        under them verified home."""
        started = [s for s in states if s.get("started_at") or s["state"] == "finished"]
        started = [s for s in started if s["state"] != "skipped"]
        if self.args.destroy_after:
            roots = sorted({s["output_root"] for s in states})
            if len(roots) == 1:
                return [(roots[0], self.local_dir)]
            return [(root, self.local_dir / Path(root).name) for root in roots]
        targets: dict[str, Path] = {}
        for state in started:
            remote = state.get("retrieve") or state["run_dir"]
            whole_root = remote == state["output_root"]  # a sweep: its trials sit beside it
            targets[remote] = self.local_dir if whole_root else self.local_dir / state["run_name"]
        inside = {r for r in targets for other in targets if r.startswith(other.rstrip("/") + "/")}
        return [(remote, local) for remote, local in targets.items() if remote not in inside]

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
            if self.exported:
                resolved = [(remote, local.resolve()) for remote, local in targets]
                checked = check_exports_home(
                    self.args.export, self.args.export_args, self.exported, resolved
                )
                notes.append(f"{checked} export(s) match their sidecars")
            stage.note = "; ".join(notes)

    def shutdown(self, outcome: Outcome, targets: list[tuple[str, Path]]) -> None:
        action = self.shutdown_action
        hostname, port = self.address
        if action is None:
            line = price_line(self.settings, hostname, port, self.named_machine)
            if line:
                self.say(line)
            return
        instance = self.instance
        assert instance is not None
        with self.reporter.stage("shutdown", f"{action} {instance.describe()}") as st:
            unfinished = [
                s for s in outcome.states if s.get("exit_code") not in FINISHED_ON_PURPOSE
            ]
            if unfinished:
                first = unfinished[0]
                how = first.get("outcome") or first["state"]
                raise StageError(
                    "shutdown",
                    f"not {'destroying' if action == 'destroy' else 'stopping'} "
                    f"{instance.machine.name}: run '{first['run_name']}' {how} (its outputs are "
                    f"verified home); resume it, or do it yourself: "
                    f"{instance.manual_command(action)}",
                )
            roots = [remote for remote, _ in targets]
            st.note = instance.shut_down(action, roots, self.settings)

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

    def prepare_host(self) -> None:
        """sync, install, check, over the open connection: the host is ready to train."""
        self.sync()
        if not self.args.no_install:
            self.install()
        if self.args.check:
            self.check()

    def close(self) -> None:
        if self.host is not None:
            self.host.session.close()

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
                what = f"following run '{self.args.attach}' (tmux session {session})"
                return self.train_and_bring_home(session, what)
            self.prepare_host()
            if not self.experiments:  # --check alone: the machine is measured, and passed
                self.say(f"{self.args.host} passed the check; nothing was trained")
                return 0
            return self.train_and_bring_home()
        finally:
            self.close()

    def train_and_bring_home(self, session: str | None = None, what: str | None = None) -> int:
        """train (start, or follow ``session``) [-> export] -> retrieve -> verify -> shutdown,
        over the open connection; the exit code. ``remote_train --rent`` calls it after
        ``connect`` and ``prepare_host`` on each machine it rents."""
        attaching = session is not None
        what = what or ", then ".join(e.describe() for e in self.experiments)
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
        self.last_outcome = outcome
        targets = self.retrieve_targets(outcome.states)
        train_failure = stage.failure
        if train_failure is None and self.args.export:
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
                    f"the {self.shutdown_action} is skipped: the {train_failure.stage} stage failed"
                )
            return train_failure.exit_code
        self.shutdown(outcome, targets)
        return EXIT_INTERRUPTED if outcome.interrupted else 0
