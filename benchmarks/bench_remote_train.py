"""remote_train over SSH: one ControlMaster connection against a fresh connection per command,
and the wall time of each stage for the template experiment.

A local OpenSSH server on 127.0.0.1 (the tests' fixture) plays the host; its "remote" is a
separate directory. Part 1 runs ten consecutive remote commands (``test -d DIR``) through
one master connection (``src.storage.output_sync.SshSession``, what remote_train and
sync_outputs use) and through ten fresh ``ssh`` connections, alternating, and prints the
ratio of the medians. Part 2 runs ``scripts/remote_train.py`` twice with the template
experiment: cold (empty host: whole repo sent, no install stamp) and warm (same host, new
run name), and prints each stage's time as remote_train reports it.

    python benchmarks/bench_remote_train.py              # both parts
    python benchmarks/bench_remote_train.py --rounds 5 --skip-stages
"""

from __future__ import annotations

import argparse
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from src.storage.output_sync import SshSession
from tests.support.sshd import SshServer, start_sshd

COMMANDS = 10
TEMPLATE = [
    "experiments/template_experiment.py",
    "trainer.max_steps=24",
    "data.num_samples=512",
    "logging.tensorboard=false",
]


def ten_through_master(server: SshServer, probe_dir: str) -> float:
    """Seconds for ten commands over one master, including opening and closing it."""
    start = time.perf_counter()
    with SshSession(server.target, server.port, server.ssh_options()) as session:
        session.start()
        for _ in range(COMMANDS):
            assert session.run(f"test -d {shlex.quote(probe_dir)}").returncode == 0
    return time.perf_counter() - start


def ten_fresh(server: SshServer, probe_dir: str) -> float:
    """Seconds for ten commands, each over its own new SSH connection (handshake + auth)."""
    base = ["ssh", *server.ssh_options(), "-p", str(server.port), "-o", "BatchMode=yes"]
    start = time.perf_counter()
    for _ in range(COMMANDS):
        result = subprocess.run(
            [*base, server.target, f"test -d {shlex.quote(probe_dir)}"],
            stdin=subprocess.DEVNULL,
            capture_output=True,
        )
        assert result.returncode == 0, result.stderr
    return time.perf_counter() - start


def control_master(server: SshServer, probe_dir: str, rounds: int) -> None:
    master, fresh = [], []
    for _ in range(rounds):
        master.append(ten_through_master(server, probe_dir))
        fresh.append(ten_fresh(server, probe_dir))
    m, f = statistics.median(master), statistics.median(fresh)
    print(f"ten remote commands, median of {rounds} alternating rounds:")
    print(f"  one ControlMaster connection : {m:6.3f} s ({m / COMMANDS * 1000:5.1f} ms/command)")
    print(f"  a fresh connection each      : {f:6.3f} s ({f / COMMANDS * 1000:5.1f} ms/command)")
    print(f"  ratio master / fresh         : {m / f:.2f}x  ({f / m:.1f}x faster)")


def write_ssh_config(server: SshServer, path: Path) -> None:
    path.write_text(
        f"Host bench-host\n    HostName 127.0.0.1\n    Port {server.port}\n"
        f"    User {server.user}\n    IdentityFile {server.client_key}\n"
        f"    IdentitiesOnly yes\n    UserKnownHostsFile {server.known_hosts}\n"
        "    StrictHostKeyChecking yes\n    LogLevel ERROR\n"
    )


def stage_times(server: SshServer, tmp: Path) -> None:
    config = tmp / "ssh_config"
    write_ssh_config(server, config)
    socket = f"bench-remote-train-{time.time_ns()}"
    env = {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "HOME": str(Path.home()),
        "SYNC_SSH_OPTS": f"-F {config}",
        "SYNC_MANIFEST_DIR": str(tmp / "manifests"),
        "SYNC_DOTENV": str(tmp / "no.env"),  # no API key: no Vast.ai lookups
        "PYTHONUNBUFFERED": "1",
    }
    rows = []
    try:
        for label, run_name in (("cold (empty host)", "bench-cold"), ("warm", "bench-warm")):
            command = [
                sys.executable,
                str(REPO_ROOT / "scripts" / "remote_train.py"),
                "bench-host",
                *TEMPLATE,
                f"run_name={run_name}",
                "--remote-dir",
                str(tmp / "host" / "repo"),
                "--python",
                sys.executable,
                "--local-dir",
                str(tmp / "laptop"),
                "--tmux-socket",
                socket,
            ]
            start = time.perf_counter()
            result = subprocess.run(command, env=env, capture_output=True, text=True)
            total = time.perf_counter() - start
            if result.returncode != 0:
                raise SystemExit(f"remote_train failed ({label}): {result.stderr}")
            times = dict(re.findall(r"^\[(\w+)\] done in ([\d.]+) s", result.stdout, re.M))
            sent = re.search(r"\[sync\] done in [\d.]+ s: (\d+) files sent", result.stdout)
            rows.append((label, times, total, sent.group(1) if sent else "?"))
    finally:
        subprocess.run(["tmux", "-L", socket, "kill-server"], capture_output=True)
    stages = ["connect", "sync", "install", "train", "retrieve", "verify"]
    print("\nremote_train stage wall times (s), template experiment, loopback:")
    print(f"  {'':18}" + "".join(f"{name:>9}" for name in stages) + f"{'total':>9}  files sent")
    for label, times, total, sent in rows:
        cells = "".join(f"{float(times.get(name, 'nan')):9.2f}" for name in stages)
        print(f"  {label:18}{cells}{total:9.2f}  {sent}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="rounds of ten commands each way")
    parser.add_argument("--skip-stages", action="store_true", help="only the SSH comparison")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-remote-train-") as tmp_name:
        tmp = Path(tmp_name)
        server, process = start_sshd(tmp / "sshd")
        try:
            control_master(server, str(tmp), args.rounds)
            if not args.skip_stages:
                stage_times(server, tmp)
        finally:
            process.terminate()
            process.wait()


if __name__ == "__main__":
    main()
