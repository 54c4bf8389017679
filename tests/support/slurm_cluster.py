"""A real one-node Slurm for the tests: munged, slurmctld and slurmd started as root.

Everything (config, keys, sockets, state, spool, logs) lives in one temp directory and the
client commands find it through SLURM_CONF, so nothing on the machine is touched and a
system Slurm, if any, is left alone. Debian's `slurm-wlm` and `munge` provide the daemons
(setup/install_slurm.sh). A component that is missing or does not come up raises
SlurmUnavailable with the reason and the daemon's log: the tests fail on it, never skip.

    python -m tests.support.slurm_cluster   # start one by hand, print SLURM_CONF; Ctrl-C or
                                            # SIGTERM stops it
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

SBIN_DIRS = ("/usr/sbin", "/usr/local/sbin")
START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0
# A requeued job waits cred_expire + 1 s before it may start again (slurmd refuses the old
# job's revoked credential until then); Slurm's default is 120 s, too long for a test.
CRED_EXPIRE_S = 5


class SlurmUnavailable(RuntimeError):
    """Slurm cannot run here; the message says what is missing or what failed."""


def find_program(name: str) -> str:
    """``name`` on PATH or in an sbin directory (root's PATH may lack /usr/sbin)."""
    found = shutil.which(name) or next(
        (f"{d}/{name}" for d in SBIN_DIRS if os.access(f"{d}/{name}", os.X_OK)), None
    )
    if found is None:
        raise SlurmUnavailable(
            f"{name} not found: run `bash setup/install_slurm.sh` (apt: slurm-wlm, munge)"
        )
    return found


def free_ports(count: int) -> list[int]:
    """``count`` distinct free ports: all held open at once, so none is handed out twice."""
    probes = [socket.socket() for _ in range(count)]
    try:
        for probe in probes:
            probe.bind(("127.0.0.1", 0))
        return [probe.getsockname()[1] for probe in probes]
    finally:
        for probe in probes:
            probe.close()


def slurm_conf(root: Path, node: str, ctld_port: int, slurmd_port: int, cpus: int) -> str:
    """One node, one partition; the plugins the issue names, no accounting, no cgroups."""
    return f"""\
ClusterName=gtk-test
SlurmctldHost={node}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={root}/munge/munge.socket,cred_expire={CRED_EXPIRE_S}
CredType=cred/munge
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
JobRequeue=1
ReturnToService=2
SlurmdParameters=config_overrides
SchedulerType=sched/builtin
SchedulerParameters=sched_interval=1
MpiDefault=none
SwitchType=switch/none
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
KillWait=5
MinJobAge=600
NodeName={node} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory=2000 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""


@dataclass
class SlurmCluster:
    """The running cluster: where it lives, how to reach it, and the daemons to stop."""

    root: Path
    node: str
    env: dict[str, str]  # os.environ + SLURM_CONF: give it to every client command
    daemons: dict[str, subprocess.Popen] = field(default_factory=dict)

    def run(self, *args: str, timeout: float = 30, check: bool = True) -> str:
        """A client command (sinfo, squeue, scontrol, scancel, sbatch); its stdout."""
        result = subprocess.run(
            args, env=self.env, capture_output=True, text=True, timeout=timeout, check=False
        )
        if check and result.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} failed ({result.returncode}): {result.stderr}")
        return result.stdout

    def job(self, job_id: str) -> dict[str, str]:
        """``scontrol show job``'s fields (JobState, Restarts, ExitCode, ...)."""
        fields: dict[str, str] = {}
        for token in self.run("scontrol", "-o", "show", "job", job_id).split():
            key, sep, value = token.partition("=")
            if sep:
                fields.setdefault(key, value)
        return fields

    def log(self, daemon: str, lines: int = 20) -> str:
        path = self.root / "log" / f"{daemon}.log"
        out = self.root / "log" / f"{daemon}.out"
        text = "".join(p.read_text(errors="replace") for p in (path, out) if p.is_file())
        return "\n".join(text.splitlines()[-lines:])

    def node_state(self) -> str:
        return self.run("sinfo", "-h", "-n", self.node, "-o", "%T", check=False).strip()

    def stop(self) -> None:
        """Cancel every job, wait for them to go, then stop the daemons we started."""
        if "slurmctld" in self.daemons and self.daemons["slurmctld"].poll() is None:
            jobs = self.run("squeue", "-h", "-o", "%i", check=False).split()
            if jobs:
                self.run("scancel", *jobs, check=False)
                deadline = time.monotonic() + STOP_TIMEOUT_S
                while (
                    time.monotonic() < deadline
                    and self.run("squeue", "-h", "-o", "%i", check=False).split()
                ):
                    time.sleep(0.2)
        for name in ("slurmd", "slurmctld", "munged"):
            process = self.daemons.pop(name, None)
            if process is None or process.poll() is not None:
                continue
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def start_cluster(root: Path, cpus: int = 2, timeout: float = START_TIMEOUT_S) -> SlurmCluster:
    """Start munged, slurmctld and slurmd under ``root``; return once the node is idle."""
    if os.geteuid() != 0:
        raise SlurmUnavailable("the test Slurm runs its daemons as root; run the tests as root")
    programs = {name: find_program(name) for name in ("munged", "slurmctld", "slurmd")}
    for client in ("sbatch", "squeue", "sinfo", "scontrol", "scancel", "srun"):
        find_program(client)
    node = socket.gethostname().split(".")[0] or "localhost"
    for sub in ("munge", "state", "spool", "log"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    (root / "munge").chmod(0o700)  # munged refuses a key anyone else can read
    key = root / "munge" / "munge.key"
    key.write_bytes(os.urandom(128))
    key.chmod(0o400)
    conf = root / "slurm.conf"
    conf.write_text(slurm_conf(root, node, *free_ports(2), cpus))
    env = {**os.environ, "SLURM_CONF": str(conf)}
    cluster = SlurmCluster(root, node, env)

    def daemon(name: str, *args: str) -> None:
        out = open(root / "log" / f"{name}.out", "wb")  # noqa: SIM115 - the daemon keeps it
        cluster.daemons[name] = subprocess.Popen(
            [programs[name], *args],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # a Ctrl-C in pytest reaches the tests, not the daemons
        )

    try:
        munge = root / "munge"
        daemon(
            "munged",
            "--foreground",
            "--force",
            f"--socket={munge}/munge.socket",
            f"--key-file={key}",
            f"--pid-file={munge}/munged.pid",
            f"--log-file={root}/log/munged.log",
            f"--seed-file={munge}/munged.seed",
        )
        _wait_for(lambda: (munge / "munge.socket").exists(), cluster, "munged", timeout)
        daemon("slurmctld", "-D", "-c", "-i", "-f", str(conf))
        daemon("slurmd", "-D", "-f", str(conf), "-N", node)
        _wait_for(lambda: cluster.node_state() == "idle", cluster, "slurmctld", timeout)
    except BaseException:
        cluster.stop()
        raise
    return cluster


def _wait_for(
    ready: Callable[[], bool], cluster: SlurmCluster, daemon: str, timeout: float
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ready():
            return
        dead = [name for name, process in cluster.daemons.items() if process.poll() is not None]
        if dead:
            raise SlurmUnavailable(
                f"{dead[0]} exited with {cluster.daemons[dead[0]].returncode} while starting:\n"
                f"{cluster.log(dead[0])}"
            )
        time.sleep(0.1)
    state = cluster.node_state() or "unknown"
    raise SlurmUnavailable(
        f"Slurm did not come up within {timeout:.0f}s (node {cluster.node} is {state}):\n"
        f"{cluster.log(daemon)}\n{cluster.log('slurmd')}"
    )


if __name__ == "__main__":
    import tempfile

    # SIGTERM too (a background job ignores Ctrl-C): the daemons run in their own sessions,
    # so only this process can stop them.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    with tempfile.TemporaryDirectory(prefix="slurm-") as tmp:
        started = start_cluster(Path(tmp))
        print(
            f"export SLURM_CONF={started.env['SLURM_CONF']}   # Ctrl-C or SIGTERM stops the cluster"
        )
        try:
            signal.pause()
        except KeyboardInterrupt:
            pass
        finally:
            started.stop()
