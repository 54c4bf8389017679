"""The whole loop: a fake Vast.ai instance whose SSH address is a real sshd on 127.0.0.1.

destroy must refuse until a sync has verified the outputs, refuse again as soon as a remote
file changes (or a new one appears, or the local copy rots), and only then send the DELETE.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from src.vast import cli
from tests.support.fake_vast_server import API_KEY, FakeVast, running_fake_vast
from tests.support.sshd import SshServer, sshd_server  # noqa: F401 - module fixture
from tests.support.sync_helpers import SYNC_SCRIPT, make_tree, run_sync, sync_env

FAST = ["--retries", "2", "--retry-delay", "0.01"]


@pytest.fixture
def instance_on_sshd(
    sshd_server: SshServer,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> Iterator[tuple[FakeVast, dict]]:
    """Instance 101's direct address and instance 102's proxy address both point at sshd."""
    env = sync_env(sshd_server, tmp_path / "manifests")
    with running_fake_vast() as fake:
        fake.instances[101].update(
            public_ipaddr="127.0.0.1",
            ports={"22/tcp": [{"HostIp": "0.0.0.0", "HostPort": str(sshd_server.port)}]},
        )
        fake.instances[102].update(
            actual_status="running",
            ssh_host="127.0.0.1",
            ssh_port=sshd_server.port,
            public_ipaddr=None,
        )
        for name in ("SYNC_SSH_OPTS", "SYNC_MANIFEST_DIR"):
            monkeypatch.setenv(name, env[name])
        monkeypatch.setenv("VASTAI_API_KEY", API_KEY)
        monkeypatch.setenv("VAST_URL", fake.url)
        yield fake, env


def destroy(capsys: pytest.CaptureFixture[str], instance_id: int) -> tuple[int, str]:
    code = cli.main([*FAST, "destroy", str(instance_id)])
    out, err = capsys.readouterr()
    assert API_KEY not in out + err
    return code, out + err


def test_destroy_only_after_verified_sync(
    sshd_server: SshServer,  # noqa: F811
    instance_on_sshd,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    fake, env = instance_on_sshd
    remote, local = tmp_path / "remote", tmp_path / "local"
    make_tree(remote, {"run/ckpt.pt": 200_000, "run/log.txt": 5_000})

    code, text = destroy(capsys, 101)
    assert code == 3 and "no download manifest" in text

    assert run_sync(sshd_server, local, remote, env).returncode == 0
    (remote / "run" / "log.txt").write_text("training wrote more\n")
    code, text = destroy(capsys, 101)
    assert code == 3 and "changed since the sync: run/log.txt" in text

    assert run_sync(sshd_server, local, remote, env).returncode == 0
    (remote / "run" / "new_ckpt.pt").write_bytes(b"x" * 100)
    code, text = destroy(capsys, 101)
    assert code == 3 and "run/new_ckpt.pt: new on the remote" in text

    assert run_sync(sshd_server, local, remote, env).returncode == 0
    ckpt = local / "run" / "ckpt.pt"
    stat = ckpt.stat()
    ckpt.write_bytes(b"\0" * stat.st_size)  # same size and mtime: only a checksum sees it
    os.utime(ckpt, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    code, text = destroy(capsys, 101)
    assert code == 3 and "local copy" in text and "run/ckpt.pt: sha256 differs" in text

    assert run_sync(sshd_server, local, remote, env).returncode == 12  # the sync sees it too
    code, text = destroy(capsys, 101)
    assert code == 3 and "failed verification" in text
    assert fake.count("DELETE") == 0 and 101 in fake.instances

    ckpt.unlink()
    assert run_sync(sshd_server, local, remote, env).returncode == 0
    code, text = destroy(capsys, 101)
    assert code == 0 and "destroyed instance 101" in text
    assert fake.count("DELETE") == 1 and 101 not in fake.instances


def test_ssh_config_alias_then_sync_then_destroy_via_proxy(
    sshd_server: SshServer,  # noqa: F811
    instance_on_sshd,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """ssh-config writes the alias; the sync uses it; destroy matches the proxy address."""
    import subprocess

    fake, env = instance_on_sshd
    config = tmp_path / "ssh_config"
    config.write_text("Host other\n    HostName example.org\n")
    code = cli.main(
        [
            *FAST,
            "ssh-config",
            "102",
            "--alias",
            "vast-test",
            "--config",
            str(config),
            "--identity-file",
            str(sshd_server.client_key),
        ]
    )
    assert code == 0 and "Host vast-test" in config.read_text()
    assert config.read_text().startswith("Host other\n    HostName example.org\n\nHost vast-test\n")
    capsys.readouterr()

    remote, local = tmp_path / "remote", tmp_path / "local"
    make_tree(remote, {"out/a.bin": 10_000})
    env = {
        **env,
        "SYNC_SSH_OPTS": f"-F {config} " + env["SYNC_SSH_OPTS"].replace("-F /dev/null ", ""),
    }
    result = subprocess.run(
        [str(SYNC_SCRIPT), "-q", "vast-test", str(local), str(remote)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    code, text = destroy(capsys, 102)
    assert code == 0 and "destroyed instance 102" in text and fake.count("DELETE") == 1
