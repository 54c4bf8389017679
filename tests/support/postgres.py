"""A throwaway PostgreSQL server on 127.0.0.1 for tests (setup/install_test_deps.sh installs it).

The server runs as an unprivileged user (``nobody`` when the tests run as root, since
PostgreSQL refuses root) from a fresh ``initdb`` in a temporary directory, trusts local
connections and listens on a free loopback port. ``postgres_server()`` yields its URL.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path


def postgres_bin() -> Path | None:
    """The directory holding initdb and pg_ctl, or None when PostgreSQL is not installed."""
    found = shutil.which("initdb")
    if found:
        return Path(found).parent
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    return Path(versions[-1]).parent if versions else None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _as_server_user(command: list[str]) -> list[str]:
    if os.geteuid() != 0:
        return command
    return ["runuser", "-u", "nobody", "--", *command]


@contextlib.contextmanager
def postgres_server() -> Iterator[str]:
    """Start a server; yield ``postgresql://postgres@127.0.0.1:PORT/postgres``; stop it."""
    bin_dir = postgres_bin()
    assert bin_dir is not None, "PostgreSQL is not installed: run setup/install_test_deps.sh"
    root = Path(tempfile.mkdtemp(prefix="pg-test-"))  # not under pytest's root-only tmp dirs
    data_dir = root / "data"
    if os.geteuid() == 0:
        nobody = pwd.getpwnam("nobody")
        os.chown(root, nobody.pw_uid, nobody.pw_gid)
    port = _free_port()
    run = {"check": True, "capture_output": True, "text": True, "timeout": 60}
    try:
        subprocess.run(
            _as_server_user(
                [str(bin_dir / "initdb"), "-D", str(data_dir), "-U", "postgres", "-A", "trust"]
            ),
            **run,
        )
        options = f"-h 127.0.0.1 -p {port} -k {data_dir} -c fsync=off"
        subprocess.run(
            _as_server_user(
                [str(bin_dir / "pg_ctl"), "-D", str(data_dir), "-o", options, "-w", "start"]
                + ["-l", str(root / "server.log")]
            ),
            **run,
        )
        yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
    finally:
        if (data_dir / "postmaster.pid").exists():
            subprocess.run(
                _as_server_user([str(bin_dir / "pg_ctl"), "-D", str(data_dir), "-m", "immediate"])
                + ["stop"],
                capture_output=True,
                timeout=60,
            )
        shutil.rmtree(root, ignore_errors=True)
