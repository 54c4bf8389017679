"""A real OpenSSH server on 127.0.0.1 for tests: generated keys, its own config, a free port.

Runs Debian's ``/usr/sbin/sshd -D`` as the current user (root in CI, so root login is allowed
with the generated key only). A missing sshd is an error, not a skip: CI installs
openssh-server (setup/install_test_deps.sh).
"""

from __future__ import annotations

import shlex
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

SSHD = Path("/usr/sbin/sshd")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _keygen(path: Path) -> None:
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)],
        check=True,
        capture_output=True,
    )


@dataclass
class SshServer:
    port: int
    user: str
    client_key: Path
    known_hosts: Path
    workdir: Path

    @property
    def target(self) -> str:
        return f"{self.user}@127.0.0.1"

    def ssh_options(self, key: Path | None = None) -> list[str]:
        """Options that make ssh trust only this server and use only the test key."""
        return [
            "-F",
            "/dev/null",
            "-i",
            str(key or self.client_key),
            "-o",
            "IdentitiesOnly=yes",
            "-o",
            f"UserKnownHostsFile={self.known_hosts}",
            "-o",
            "StrictHostKeyChecking=yes",
            "-o",
            "LogLevel=ERROR",
        ]

    def ssh_opts_env(self, key: Path | None = None) -> str:
        return shlex.join(self.ssh_options(key))

    def logins(self) -> int:
        """Successful authentications so far (one per SSH connection)."""
        log = self.workdir / "sshd.log"
        return log.read_text(errors="replace").count("Accepted publickey") if log.exists() else 0


def _wait_listening(port: int, process: subprocess.Popen, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"sshd exited with code {process.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"sshd did not listen on port {port} within {timeout} s")


def start_sshd(
    workdir: Path, extra_config: str = "", keys_from: SshServer | None = None
) -> tuple[SshServer, subprocess.Popen]:
    """A new sshd. ``extra_config``: more sshd_config lines (``SetEnv NAME=value`` for the
    sessions). ``keys_from``: the same host and client keys as that server, its known_hosts
    file extended with this port, so one set of SSH options reaches both (as several rented
    machines reached with one key)."""
    if not SSHD.exists():
        raise RuntimeError(f"{SSHD} not found: apt-get install openssh-server (CI does)")
    workdir.mkdir(parents=True, exist_ok=True)
    if keys_from is None:
        host_key = workdir / "host_ed25519"
        client_key = workdir / "client_ed25519"
        _keygen(host_key)
        _keygen(client_key)
    else:
        host_key = keys_from.workdir / "host_ed25519"
        client_key = keys_from.client_key
    authorized = workdir / "authorized_keys"
    authorized.write_text(client_key.with_suffix(".pub").read_text())
    authorized.chmod(0o600)
    port = free_port()
    user = subprocess.run(["id", "-un"], capture_output=True, text=True, check=True).stdout.strip()
    config = workdir / "sshd_config"
    config.write_text(
        f"Port {port}\n"
        "ListenAddress 127.0.0.1\n"
        f"HostKey {host_key}\n"
        f"AuthorizedKeysFile {authorized}\n"
        f"PidFile {workdir / 'sshd.pid'}\n"
        "PermitRootLogin prohibit-password\n"
        "PasswordAuthentication no\n"
        "KbdInteractiveAuthentication no\n"
        "PubkeyAuthentication yes\n"
        "StrictModes no\n"
        "UsePAM no\n"
        "MaxStartups 100\n"
        "MaxSessions 100\n"
        "Subsystem sftp internal-sftp\n"
        "LogLevel INFO\n"  # "Accepted publickey" lines: tests count SSH logins
        f"{extra_config}"
    )
    known_hosts = keys_from.known_hosts if keys_from is not None else workdir / "known_hosts"
    public_host_key = host_key.with_suffix(".pub").read_text().split()
    line = f"[127.0.0.1]:{port} {public_host_key[0]} {public_host_key[1]}\n"
    with open(known_hosts, "a") as handle:
        handle.write(line)
    Path("/run/sshd").mkdir(exist_ok=True)  # Debian's sshd insists on its privsep dir
    process = subprocess.Popen(
        [str(SSHD), "-D", "-e", "-f", str(config)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=open(workdir / "sshd.log", "wb"),  # noqa: SIM115 - closed with the process
    )
    _wait_listening(port, process)
    return SshServer(port, user, client_key, known_hosts, workdir), process


@pytest.fixture(scope="module")
def sshd_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SshServer]:
    server, process = start_sshd(tmp_path_factory.mktemp("sshd"))
    try:
        yield server
    finally:
        process.terminate()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
