"""What a Slurm batch script runs: the experiment, the time-limit notice, the requeue.

scripts/slurm/train.sbatch and train_multinode.sbatch ``exec`` this module, so it *is* the
batch shell: ``#SBATCH --signal=B:USR1@120`` and ``scancel --signal=USR1 --batch JOBID``
reach this process and nothing else. It

1. names the run after the job (``run_name=<experiment>-<job id>``) unless the command
   line names it. SLURM_JOB_ID survives a requeue (SLURM_RESTART_COUNT counts them), so
   every restart runs the same command on the same run directory and resumes it;
2. starts the experiment: plain python for one process, ``torchrun --standalone`` for one
   rank per GPU Slurm gave, ``srun`` + torchrun (c10d rendezvous on the first node) across
   nodes;
3. on USR1 passes the stop on to the ranks (the trainer saves a checkpoint and exits 75),
   waits for them, then ``scontrol requeue``s the job and exits. The restart resumes.

Only a stop that followed the notice is requeued: exit 76 (``cost.budget_usd`` reached)
never is, since the restart would stop again at once; nor is a crash or a full disk
(exit 74: either would fail again) or a SIGTERM (``scancel`` means stop; a preempting
Slurm requeues by itself).
The module imports no torch, so the notice is handled from the first second.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import BinaryIO

from src.common.errors import EXIT_DISK_FULL
from src.common.signals import EXIT_BUDGET_REACHED, EXIT_INTERRUPTED

EXIT_USAGE = 2
SINGLE, TORCHRUN, MULTINODE = "single", "torchrun", "multinode"
NOTICE = signal.SIGUSR1  # what `--signal=B:USR1@120` sends; the trainer's extra_stop_signal
POLL_SECONDS = 0.1
RDZV_BASE_PORT = 29500
# torchrun reports any rank's non-zero exit as its own exit 1; the rank's code is in the
# failure report it prints last ("Root Cause (first observed failure): ... exitcode : 75").
_ROOT_CAUSE = re.compile(r"Root Cause \(first observed failure\):.*?exitcode\s*:\s*(-?\d+)", re.S)
_STDERR_TAIL_BYTES = 64 * 1024
USAGE = (
    "usage: sbatch scripts/slurm/train.sbatch EXPERIMENT.py [--config PATH] [key=value ...] "
    "(from the repo root)"
)


class UsageError(ValueError):
    """A bad command line: one line to print, exit 2, nothing started."""


@dataclass(frozen=True)
class SlurmJob:
    """The parts of Slurm's job environment this module uses; empty outside a job."""

    job_id: str | None = None
    array_job_id: str | None = None
    array_task_id: str | None = None
    restart_count: int = 0
    num_nodes: int = 1
    gpus_on_node: int | None = None
    cpus_per_task: str | None = None
    node_name: str = ""

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> SlurmJob:
        gpus = env.get("SLURM_GPUS_ON_NODE", "").strip()
        return cls(
            job_id=env.get("SLURM_JOB_ID") or None,
            array_job_id=env.get("SLURM_ARRAY_JOB_ID") or None,
            array_task_id=env.get("SLURM_ARRAY_TASK_ID") or None,
            restart_count=int(env.get("SLURM_RESTART_COUNT") or 0),
            num_nodes=int(env.get("SLURM_JOB_NUM_NODES") or env.get("SLURM_NNODES") or 1),
            gpus_on_node=int(gpus) if gpus.isdigit() else None,
            cpus_per_task=env.get("SLURM_CPUS_PER_TASK") or None,
            node_name=env.get("SLURMD_NODENAME", ""),
        )

    @property
    def stable_id(self) -> str | None:
        """What names the run: the same across requeues. An array task is ``<array>_<task>``
        (its own SLURM_JOB_ID is stable too, but the array form is the one squeue shows)."""
        if self.array_job_id and self.array_task_id:
            return f"{self.array_job_id}_{self.array_task_id}"
        return self.job_id


@dataclass(frozen=True)
class Plan:
    """The command one batch job runs, and how it passes a stop on."""

    mode: str  # SINGLE | TORCHRUN | MULTINODE
    command: list[str]
    run_name: str
    run_name_derived: bool  # True: from the job id; False: given on the command line
    processes_per_node: int


@dataclass(frozen=True)
class Outcome:
    """What the batch job ends with: its exit code, whether it requeued, the line it prints."""

    exit_code: int
    requeue: bool
    message: str


def given_run_name(args: Sequence[str]) -> str | None:
    """The ``run_name=`` override on the command line (the last one wins, as in omegaconf)."""
    names = [arg.split("=", 1)[1] for arg in args if arg.startswith("run_name=")]
    return names[-1] if names else None


def derived_run_name(experiment: str, job: SlurmJob) -> str:
    """``<experiment file stem>-<job id>``: unique per submission, unchanged by a requeue."""
    if job.stable_id is None:
        raise UsageError("not inside a Slurm job (no SLURM_JOB_ID): pass run_name=NAME")
    return f"{Path(experiment).stem}-{job.stable_id}"


def processes_per_node(job: SlurmJob, env: Mapping[str, str]) -> int:
    """One rank per GPU Slurm gave this node (``--gres=gpu:N``), one on a CPU node.

    NPROC_PER_NODE overrides (several CPU ranks, or fewer ranks than GPUs).
    """
    override = env.get("NPROC_PER_NODE", "").strip()
    if override:
        if not override.isdigit() or int(override) < 1:
            raise UsageError(f"NPROC_PER_NODE={override!r} is not a whole number >= 1")
        return int(override)
    return job.gpus_on_node or 1


def rendezvous_port(job: SlurmJob, env: Mapping[str, str]) -> int:
    """RDZV_PORT, else 29500 + job id mod 1000: two jobs sharing a first node don't collide."""
    given = env.get("RDZV_PORT", "").strip()
    if given:
        if not given.isdigit() or not 0 < int(given) < 65536:
            raise UsageError(f"RDZV_PORT={given!r} is not a port number")
        return int(given)
    return RDZV_BASE_PORT + (int(job.job_id or 0) % 1000)


def plan_job(
    argv: Sequence[str],
    env: Mapping[str, str],
    python: str = sys.executable,
    cwd: Path | None = None,
) -> Plan:
    """``[--multinode] EXPERIMENT [args...]`` and the job's environment -> what to run.

    Torchrun options are spelled with underscores: older torch versions know only those.
    """
    args = list(argv)
    multinode = bool(args) and args[0] == "--multinode"
    if multinode:
        args = args[1:]
    if not args or args[0].startswith("-"):
        raise UsageError(USAGE)
    experiment, experiment_args = args[0], args[1:]
    if not (Path(cwd or Path.cwd()) / experiment).is_file():
        raise UsageError(
            f"experiment file not found: {experiment} (give a path from the repo root, "
            "e.g. experiments/template_experiment.py)"
        )
    job = SlurmJob.from_env(env)
    run_name = given_run_name(experiment_args)
    derived = run_name is None
    if run_name is None:
        run_name = derived_run_name(experiment, job)
        experiment_args.append(f"run_name={run_name}")
    nproc = processes_per_node(job, env)
    script = [experiment, *experiment_args]
    if multinode:
        host = env.get("RDZV_HOST", "").strip()
        if not host:
            raise UsageError(
                "RDZV_HOST is not set: train_multinode.sbatch sets it to the first node"
            )
        srun = ["srun", f"--nodes={job.num_nodes}", "--ntasks-per-node=1"]
        if job.cpus_per_task:  # Slurm 22.05+ no longer passes the job's value on to srun
            srun.append(f"--cpus-per-task={job.cpus_per_task}")
        torchrun = [
            python,
            "-m",
            "torch.distributed.run",
            f"--nnodes={job.num_nodes}",
            f"--nproc_per_node={nproc}",
            "--rdzv_backend=c10d",
            f"--rdzv_endpoint={host}:{rendezvous_port(job, env)}",
            f"--rdzv_id={job.stable_id or 'local'}",
        ]
        return Plan(MULTINODE, [*srun, *torchrun, *script], run_name, derived, nproc)
    if nproc == 1:
        return Plan(SINGLE, [python, *script], run_name, derived, nproc)
    torchrun = [python, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    return Plan(TORCHRUN, [*torchrun, *script], run_name, derived, nproc)


def exit_status(returncode: int) -> int:
    """A shell-style status: death by signal N is 128 + N (Popen reports it as -N)."""
    return 128 - returncode if returncode < 0 else returncode


def torchrun_first_failure(stderr_tail: str) -> int | None:
    """The exit status of the rank torchrun saw fail first, from its failure report."""
    codes = _ROOT_CAUSE.findall(stderr_tail)
    return exit_status(int(codes[-1])) if codes else None


def decide(code: int, notice: str | None, mode: str, run_name: str) -> Outcome:
    """What the batch job does once training has exited with ``code``.

    ``notice``: the first stop signal this process received (``SIGUSR1``, ``SIGTERM``) or
    None. Requeue only a stop that followed the USR1 notice: that is the one case where the
    run checkpointed because time ran out and wants more of it.
    """
    resume = f"submit the same command with run_name={run_name} to resume"
    if code == 0:
        return Outcome(0, False, "training finished")
    if code == EXIT_BUDGET_REACHED:
        return Outcome(
            code,
            False,
            "cost.budget_usd reached (exit 76): not requeued, a restart would stop again at "
            f"once; raise cost.budget_usd and {resume}",
        )
    if code == EXIT_DISK_FULL:
        return Outcome(
            code,
            False,
            "disk full (exit 74): not requeued, a restart would fail again; make room (the "
            f"line above names the file and the fixes) and {resume}",
        )
    if notice == NOTICE.name:
        # Exit 75: checkpoint saved. Killed by the forwarded USR1 itself: the process had not
        # installed its handler yet (still starting), so it had nothing new to save.
        stopped = code in (EXIT_INTERRUPTED, 128 + NOTICE.value)
        # Across nodes the ranks' codes stay behind srun and the torchrun agents (exit 1
        # after a SIGTERM): a non-zero exit after the notice is taken as the stop.
        if stopped or mode == MULTINODE:
            return Outcome(EXIT_INTERRUPTED, True, f"stopped after {notice} (exit {code})")
        return Outcome(
            code, False, f"exit {code} after {notice} is not a clean stop: not requeued; {resume}"
        )
    if notice is not None:
        saved = "checkpoint saved; " if code == EXIT_INTERRUPTED else ""
        return Outcome(
            code,
            False,
            f"stopped by {notice} (exit {code}; {saved}scancel, the time limit or preemption): "
            f"not requeued by this script (a preempting Slurm requeues by itself); {resume}",
        )
    if code == EXIT_INTERRUPTED:
        message = f"training stopped (exit 75) without a Slurm notice: not requeued; {resume}"
        return Outcome(code, False, message)
    return Outcome(code, False, f"training failed (exit {code}): not requeued; see the log above")


def child_pids(parent: int) -> list[int]:
    """Direct children of ``parent`` (torchrun's ranks), read from /proc."""
    children = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as handle:
                stat = handle.read()
        except OSError:  # exited meanwhile
            continue
        # Field 2 (the command name) may hold spaces and ")": the ppid is the second field
        # after its closing parenthesis.
        fields = stat.rsplit(b")", 1)[-1].split()
        if len(fields) > 1 and int(fields[1]) == parent:
            children.append(int(entry.name))
    return children


class _StderrTail(threading.Thread):
    """Copies torchrun's stderr to ours as it comes and keeps its end for the failure report."""

    def __init__(self, stream: BinaryIO) -> None:
        super().__init__(daemon=True)
        self.stream = stream
        self.tail = b""

    def run(self) -> None:
        sink = sys.stderr.buffer
        while chunk := os.read(self.stream.fileno(), 65536):
            sink.write(chunk)
            sink.flush()
            self.tail = (self.tail + chunk)[-_STDERR_TAIL_BYTES:]


class Supervisor:
    """Runs the plan's command and turns Slurm's signals into the ranks' stop."""

    def __init__(self, plan: Plan, job: SlurmJob, env: Mapping[str, str] | None = None) -> None:
        self.plan = plan
        self.job = job
        self.env = dict(os.environ if env is None else env)
        self.notice: str | None = None  # the first stop signal received
        self._pending: list[signal.Signals] = []  # received, not yet passed on
        self._signalled: dict[signal.Signals, set[int]] = {}
        self._scancelled = False

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        sig = signal.Signals(signum)
        if sig == signal.SIGINT:
            return  # a terminal's Ctrl-C reaches the training processes directly
        if self.notice is None:
            self.notice = sig.name
        self._pending.append(sig)
        os.write(2, f"\n[slurm] {sig.name} received: passing the stop on to training\n".encode())

    def run(self) -> int:
        for sig in (NOTICE, signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)
        tail = None
        process = subprocess.Popen(
            self.plan.command,
            env=self.env,
            stdin=subprocess.DEVNULL,
            stderr=subprocess.PIPE if self.plan.mode == TORCHRUN else None,
        )
        if process.stderr is not None:
            tail = _StderrTail(process.stderr)
            tail.start()
        while process.poll() is None:
            self._forward(process.pid)
            time.sleep(POLL_SECONDS)
        code = exit_status(process.returncode)
        if tail is not None:
            tail.join(timeout=5)  # a rank's leftover child may still hold the pipe open
            first_failure = torchrun_first_failure(tail.tail.decode(errors="replace"))
            if code != 0 and first_failure is not None:
                print(f"[slurm] torchrun exited {code}; the first rank to stop: {first_failure}")
                code = first_failure
        return self.finish(decide(code, self.notice, self.plan.mode, self.plan.run_name))

    def _forward(self, child: int) -> None:
        """Pass each received stop signal on to the training processes, once per process.

        Repeated each poll: torchrun may start its ranks after the signal came.
        """
        for sig in dict.fromkeys(self._pending):
            if self.plan.mode == MULTINODE:
                self._stop_steps(sig)
                continue
            targets = [child] if self.plan.mode == SINGLE else child_pids(child)
            done = self._signalled.setdefault(sig, set())
            for pid in targets:
                if pid not in done:
                    done.add(pid)
                    try:
                        os.kill(pid, sig)
                    except ProcessLookupError:
                        pass

    def _stop_steps(self, sig: signal.Signals) -> None:
        """Across nodes: SIGTERM to every process of the srun step, on every node.

        Not USR1: each node's torchrun agent would die of it (older torch can't catch it)
        and leave its ranks behind. On SIGTERM an agent passes the stop to its ranks and
        waits for them. ``scancel`` without ``--batch`` spares the batch step: this process
        and srun, which would turn a SIGTERM of its own into SIGKILL for the ranks. A
        SIGTERM from Slurm itself already reached every step.
        """
        if sig != NOTICE or self._scancelled or self.job.job_id is None:
            return
        self._scancelled = True
        subprocess.run(["scancel", "--signal=TERM", self.job.job_id], env=self.env, check=False)

    def finish(self, outcome: Outcome) -> int:
        print(f"[slurm] {outcome.message}", flush=True)
        if not outcome.requeue:
            return outcome.exit_code
        if self.job.job_id is None:
            print("[slurm] not inside a Slurm job: nothing to requeue; run it again to resume")
            return outcome.exit_code
        result = subprocess.run(
            ["scontrol", "requeue", self.job.job_id],
            env=self.env,
            capture_output=True,
            text=True,
            check=False,
        )
        if result.returncode != 0:
            why = (result.stderr or result.stdout).strip().splitlines() or ["no output"]
            print(
                f"[slurm] scontrol requeue {self.job.job_id} failed ({why[-1]}); submit the "
                f"same command with run_name={self.plan.run_name} to resume",
                flush=True,
            )
            return outcome.exit_code
        print(
            f"[slurm] requeued job {self.job.job_id}: restart {self.job.restart_count + 1} "
            f"resumes run {self.plan.run_name} from its checkpoint (Slurm holds a requeued "
            "job for its credential lifetime, 2 minutes by default, before it starts again)",
            flush=True,
        )
        return outcome.exit_code


def describe(plan: Plan, job: SlurmJob) -> str:
    """The start line: which job, which restart, which run, how many processes."""
    where = f"job {job.stable_id} restart {job.restart_count}" if job.job_id else "no Slurm job"
    node = f" on {job.node_name}" if job.node_name else ""
    named = "from the job id; pass run_name=... to choose" if plan.run_name_derived else "given"
    ranks = f"{plan.processes_per_node} process(es)"
    if plan.mode == MULTINODE:
        ranks += f" per node x {job.num_nodes} nodes"
    return f"[slurm] {where}{node}: run_name={plan.run_name} ({named}), {ranks}"


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the sbatch templates: ``python -m src.slurm.batch_job [--multinode] ...``."""
    env = dict(os.environ)
    try:
        plan = plan_job(sys.argv[1:] if argv is None else argv, env)
    except UsageError as error:
        print(f"[slurm] {error}", file=sys.stderr)
        return EXIT_USAGE
    job = SlurmJob.from_env(env)
    print(describe(plan, job), flush=True)
    print(f"[slurm] $ {shlex.join(plan.command)}", flush=True)
    return Supervisor(plan, job, env).run()


if __name__ == "__main__":
    sys.exit(main())
