"""The host side of remote_train: ``python -m src.remote.agent COMMAND`` in the synced repo.

The laptop calls it over its open SSH connection; answers meant for the laptop are one JSON
line on stdout, errors one line on stderr with exit code 1 (2: bad input).

    plan EXPERIMENT [ARGS...]        run name, run dir and needed keys of a command
    start --session S --python PY    (runs as JSON on stdin) start in tmux, or say which
                                     session already runs one of them ({"attach": S})
    run --session S                  inside tmux: the runner (src/remote/runner.py)
    follow --session S [--tail N]    stream the session's logs until its runs end
    status [--session S] [--tail N]  every recorded run and its state, as JSON
    monitor                          GPU table and the tails of running runs' logs
"""

from __future__ import annotations

import argparse
import fcntl
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, BinaryIO

from src.remote import tmux
from src.remote.runner import run_session
from src.remote.runs import Registry, RunSpec, SessionSpec, tail_lines

ACTIVE_STATES = {"running", "queued"}


def _answer(data: Any) -> int:
    print(json.dumps(data), flush=True)
    return 0


def _fail(message: str, code: int = 1) -> int:
    print(message, file=sys.stderr, flush=True)
    return code


def cmd_plan(repo: Path, args: argparse.Namespace) -> int:
    from src.config import ConfigError  # lazy: `status` works on a host before the install
    from src.remote.plan import plan_run  # lazy: needs omegaconf, which the install brings

    if not (repo / args.experiment).is_file():
        return _fail(f"experiment {args.experiment} not found in {repo}", 2)
    try:
        return _answer(plan_run(args.experiment, args.args, repo))
    except ConfigError as error:
        return _fail(str(error), 2)


def active_session_of(registry: Registry, run_names: set[str], socket: str | None) -> str | None:
    """The live session in which one of ``run_names`` is running or waiting, if any."""
    live = tmux.live_sessions(socket)
    for spec in reversed(registry.sessions()):
        if spec.session not in live:
            continue
        for index, run in enumerate(spec.runs):
            if run.run_name in run_names:
                if registry.run_state(spec, index, True)["state"] in ACTIVE_STATES:
                    return spec.session
    return None


def cmd_start(repo: Path, args: argparse.Namespace) -> int:
    registry = Registry(repo)
    runs = [RunSpec(**run) for run in json.loads(sys.stdin.read())]
    registry.path.mkdir(parents=True, exist_ok=True)
    # One start at a time on this host: the check and the tmux start must not interleave.
    with open(registry.path / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        running = active_session_of(registry, {run.run_name for run in runs}, args.tmux_socket)
        if running is not None:
            return _answer({"attach": running})
        if args.session in tmux.live_sessions(args.tmux_socket):
            return _answer({"attach": args.session})
        for run in runs:
            Path(run.run_dir).mkdir(parents=True, exist_ok=True)
            run.log_offset = run.log_path.stat().st_size if run.log_path.exists() else 0
        registry.save(SessionSpec(args.session, args.python, runs))
        command = [args.python, "-m", "src.remote.agent"]
        command += ["--tmux-socket", args.tmux_socket] if args.tmux_socket else []
        problem = tmux.new_session(
            args.tmux_socket, args.session, str(repo), [*command, "run", "--session", args.session]
        )
    if problem == "duplicate":
        return _answer({"attach": args.session})
    if problem:
        return _fail(f"tmux could not start the session: {problem}")
    return _answer({"started": args.session})


def cmd_run(repo: Path, args: argparse.Namespace) -> int:
    return run_session(repo, args.session)


def follow(
    registry: Registry,
    session: str,
    socket: str | None,
    out: BinaryIO,
    tail_bytes: int | None = None,
    poll_s: float = 0.2,
) -> int:
    """Copy each run's new log bytes to ``out`` until the session's runs have ended (or its
    tmux session died). ``tail_bytes``: attaching: runs that ended already are not replayed,
    the current one is shown from its last ``tail_bytes``."""
    spec = registry.load(session)
    if spec is None:
        return _fail(f"no session {session} on this host", 2)
    last_check, alive = 0.0, True

    def is_alive() -> bool:
        nonlocal last_check, alive
        if time.monotonic() - last_check > 1.0:
            alive, last_check = session in tmux.live_sessions(socket), time.monotonic()
        return alive

    for index, run in enumerate(spec.runs):
        start_file = registry.state_file(session, index, "start")
        exit_file = registry.state_file(session, index, "exit")
        while not start_file.exists() and not exit_file.exists():
            if not is_alive() and not exit_file.exists():
                return 0
            time.sleep(poll_s)
        offset = run.log_offset
        if tail_bytes is not None:
            if exit_file.exists():
                continue  # ended before we attached: the summary reports it
            size = run.log_path.stat().st_size if run.log_path.exists() else 0
            offset = max(offset, size - tail_bytes)
            tail_bytes = None
        while True:
            # Checked before reading: once the run has ended, this read gets its last bytes.
            ended = exit_file.exists() or not is_alive()
            try:
                with open(run.log_path, "rb") as log:
                    log.seek(offset)
                    while chunk := log.read(65536):
                        out.write(chunk)
                        offset += len(chunk)
                    out.flush()
            except FileNotFoundError:
                pass
            if ended:
                break
            time.sleep(poll_s)
        if not exit_file.exists():
            return 0  # the session died without recording an exit: status says "lost"
    return 0


def cmd_follow(repo: Path, args: argparse.Namespace) -> int:
    try:
        return follow(Registry(repo), args.session, args.tmux_socket, sys.stdout.buffer, args.tail)
    except BrokenPipeError:  # the laptop went away: training goes on
        return 0


def run_states(registry: Registry, socket: str | None, session: str | None, tail: int) -> list:
    live = tmux.live_sessions(socket)
    states = []
    for spec in registry.sessions():
        if session is not None and spec.session != session:
            continue
        for index, run in enumerate(spec.runs):
            state = registry.run_state(spec, index, spec.session in live)
            if tail:
                state["tail"] = tail_lines(run.log_path, tail)
            states.append(state)
    return states


def cmd_status(repo: Path, args: argparse.Namespace) -> int:
    registry = Registry(repo)
    if args.session is not None and registry.load(args.session) is None:
        return _fail(f"no session {args.session} on this host", 2)
    return _answer(
        {
            "now": time.time(),
            "runs": run_states(registry, args.tmux_socket, args.session, args.tail),
        }
    )


def cmd_monitor(repo: Path, args: argparse.Namespace) -> int:
    try:
        from src.telemetry.gpus import print_gpu_status  # lazy: rich/pynvml may be missing

        print_gpu_status()
    except Exception as error:  # noqa: BLE001 - no rich/pynvml here: nvidia-smi says it too
        try:
            result = subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=30)
            print(result.stdout or result.stderr, end="")
        except (OSError, subprocess.TimeoutExpired):
            print(f"no GPU status: no nvidia-smi and {type(error).__name__}: {error}")
    running = [
        state
        for state in run_states(Registry(repo), args.tmux_socket, None, args.tail)
        if state["state"] == "running"
    ]
    if not running:
        print("no run is running (--status lists the finished ones)")
    for state in running:
        step = f", step {state['step']}" if state["step"] else ""
        print(f"--- {state['run_name']} (running{step}): {state['run_dir']}/remote_train.log")
        for line in state.get("tail", []):
            print(line)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m src.remote.agent")
    parser.add_argument("--tmux-socket", help="tmux -L socket name (tests)")
    sub = parser.add_subparsers(dest="command", required=True)
    plan = sub.add_parser("plan")
    plan.add_argument("experiment")
    plan.add_argument("args", nargs=argparse.REMAINDER)
    start = sub.add_parser("start")
    start.add_argument("--session", required=True)
    start.add_argument("--python", required=True)
    run = sub.add_parser("run")
    run.add_argument("--session", required=True)
    follow_parser = sub.add_parser("follow")
    follow_parser.add_argument("--session", required=True)
    follow_parser.add_argument("--tail", type=int, help="attach: last N bytes of the log")
    status = sub.add_parser("status")
    status.add_argument("--session")
    status.add_argument("--tail", type=int, default=0, help="last N log lines per run")
    monitor = sub.add_parser("monitor")
    monitor.add_argument("--tail", type=int, default=5)
    return parser


COMMANDS = {
    "plan": cmd_plan,
    "start": cmd_start,
    "run": cmd_run,
    "follow": cmd_follow,
    "status": cmd_status,
    "monitor": cmd_monitor,
}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return COMMANDS[args.command](Path.cwd(), args)


if __name__ == "__main__":
    sys.exit(main())
