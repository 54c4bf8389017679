"""The whole loop: a fake Vast.ai instance whose SSH address is a real sshd on 127.0.0.1.

destroy must refuse until a sync has verified the outputs root (SYNC_REMOTE_DIR, here
tmp/remote), refuse again as soon as a remote file changes (or a new one appears, or the local
copy rots), refuse a sync of an empty, unrelated or sub folder, and only then send the DELETE.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from src.cloud.vast import cli
from tests.support.fake_vast_server import API_KEY, FakeVast, running_fake_vast
from tests.support.sshd import SshServer, free_port, sshd_server  # noqa: F401 - module fixture
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
        for name in ("SYNC_SSH_OPTS", "SYNC_MANIFEST_DIR", "SYNC_DOTENV"):
            monkeypatch.setenv(name, env[name])
        monkeypatch.setenv("SYNC_REMOTE_DIR", str(tmp_path / "remote"))
        monkeypatch.setenv("VASTAI_API_KEY", API_KEY)
        monkeypatch.setenv("VAST_URL", fake.url)
        yield fake, env


def destroy(capsys: pytest.CaptureFixture[str], instance_id: int, *extra: str) -> tuple[int, str]:
    code = cli.main([*FAST, "destroy", str(instance_id), *extra])
    out, err = capsys.readouterr()
    assert API_KEY not in out + err
    if code == 3:
        assert err.count("\n") == 1 and out == "", err  # a refusal is one line
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
    resync = f"sync_outputs.sh -p {sshd_server.port} {sshd_server.target} {local} {remote} again"
    assert resync in text  # the exact command that fixes it

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
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """ssh-config writes the alias; the sync uses it; destroy goes through it (its key)."""
    import subprocess

    fake, env = instance_on_sshd
    config = tmp_path / "ssh_config"
    # Known hosts come from the catch-all; the key only from the block ssh-config writes.
    config.write_text(
        "Host other\n    HostName example.org\n\n"
        f"Host *\n    UserKnownHostsFile {sshd_server.known_hosts}\n"
        "    StrictHostKeyChecking yes\n    LogLevel ERROR\n"
    )
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
    # No -i anywhere: only the alias's IdentityFile can log in, for the sync and for destroy.
    monkeypatch.setenv("SYNC_SSH_OPTS", f"-F {config}")
    env = {**env, "SYNC_SSH_OPTS": f"-F {config}"}
    result = subprocess.run(
        [str(SYNC_SCRIPT), "-q", "vast-test", str(local), str(remote)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    # The alias is then re-pointed elsewhere: destroy still checks the address that was synced.
    text = config.read_text().replace(f"Port {sshd_server.port}", f"Port {free_port()}")
    config.write_text(text)
    code, text = destroy(capsys, 102)
    assert code == 0 and "destroyed instance 102" in text and fake.count("DELETE") == 1


def test_empty_unrelated_or_sub_folder_syncs_do_not_unlock_destroy(
    sshd_server: SshServer,  # noqa: F811
    instance_on_sshd,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    fake, env = instance_on_sshd
    remote, local = tmp_path / "remote", tmp_path / "local"
    make_tree(remote, {"run1/log.txt": 1_000, "run2/ckpt.pt": 50_000})
    (tmp_path / "empty").mkdir()

    assert run_sync(sshd_server, local / "e", tmp_path / "empty", env).returncode == 0
    code, text = destroy(capsys, 101)
    assert code == 3 and f"do not cover {remote}" in text
    command = f"sync_outputs.sh -p {sshd_server.port} root@127.0.0.1 ./outputs {remote}"
    assert command in text  # the exact command to run

    assert run_sync(sshd_server, local / "r1", remote / "run1", env).returncode == 0
    code, text = destroy(capsys, 101)
    assert code == 3 and f"do not cover {remote}" in text and "run1" in text

    # An empty outputs root synced, then training writes: the 0-file manifest is stale.
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    assert run_sync(sshd_server, local / "f", fresh, env).returncode == 0
    (fresh / "ckpt.pt").write_bytes(b"x" * 10)
    code, text = destroy(capsys, 101, "--remote-dir", str(fresh))
    assert code == 3 and "brought 0 files but it now holds 1 (e.g. ckpt.pt)" in text
    assert fake.count("DELETE") == 0 and 101 in fake.instances

    assert run_sync(sshd_server, local / "all", remote, env).returncode == 0
    code, text = destroy(capsys, 101)
    assert code == 0 and "2 files under" in text and fake.count("DELETE") == 1


def test_symlinked_folder_on_the_remote_is_protected(
    sshd_server: SshServer,  # noqa: F811
    instance_on_sshd,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    fake, env = instance_on_sshd
    remote, local, elsewhere = tmp_path / "remote", tmp_path / "local", tmp_path / "elsewhere"
    make_tree(elsewhere, {"ckpt.pt": 100_000})
    remote.mkdir()
    (remote / "run1").symlink_to(elsewhere, target_is_directory=True)
    assert run_sync(sshd_server, local, remote, env).returncode == 0
    assert (local / "run1" / "ckpt.pt").read_bytes() == (elsewhere / "ckpt.pt").read_bytes()
    (elsewhere / "ckpt.pt").write_bytes(b"newer checkpoint")
    code, text = destroy(capsys, 101)
    assert code == 3 and "changed since the sync: run1/ckpt.pt" in text
    assert fake.count("DELETE") == 0
    assert run_sync(sshd_server, local, remote, env).returncode == 0
    code, text = destroy(capsys, 101)
    assert code == 0 and "1 files under" in text and fake.count("DELETE") == 1


def test_missing_ssh_binary_is_one_line(
    sshd_server: SshServer,  # noqa: F811
    instance_on_sshd,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fake, env = instance_on_sshd
    make_tree(tmp_path / "remote", {"a.bin": 100})
    assert run_sync(sshd_server, tmp_path / "local", tmp_path / "remote", env).returncode == 0
    (tmp_path / "no-tools").mkdir()
    monkeypatch.setenv("PATH", str(tmp_path / "no-tools"))
    code, text = destroy(capsys, 101)
    assert code == 3 and "cannot run ssh" in text and "install openssh-client" in text
    assert fake.count("DELETE") == 0
