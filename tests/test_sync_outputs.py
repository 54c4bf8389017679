"""scripts/sync_outputs.sh against a real OpenSSH server on 127.0.0.1, real rsync, moto S3."""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import subprocess
from pathlib import Path

import pytest

from src.storage.manifest import read_manifest
from tests.support.moto_server import AWS_ENV, running_moto_s3
from tests.support.sshd import SshServer, sshd_server  # noqa: F401 - module fixture
from tests.support.sync_helpers import make_tree, run_sync, sync_env, transferred

TREE = {
    "run1/metrics.jsonl": 40_000,
    "run1/checkpoints/step_100.pt": 1_500_000,
    "run1/checkpoints/step 200.pt": 1_200_000,  # a space in the name
    "run2/config.json": 800,
}


@pytest.fixture
def dirs(tmp_path: Path) -> tuple[Path, Path, Path]:
    remote, local, manifests = tmp_path / "remote", tmp_path / "local", tmp_path / "manifests"
    make_tree(remote, TREE)
    return remote, local, manifests


def only_manifest(manifests: Path):
    (path,) = manifests.glob("*.json")
    return read_manifest(path)


def test_first_sync_then_resync_moves_almost_nothing(sshd_server: SshServer, dirs) -> None:  # noqa: F811
    remote, local, manifests = dirs
    env = sync_env(sshd_server, manifests)
    first = run_sync(sshd_server, local, remote, env)
    assert first.returncode == 0, first.stderr
    for relative in TREE:
        assert (local / relative).read_bytes() == (remote / relative).read_bytes()
    manifest = only_manifest(manifests)
    assert manifest.verified and sorted(e.path for e in manifest.files) == sorted(TREE)
    for entry in manifest.files:
        assert entry.size == TREE[entry.path]
        assert entry.sha256 == hashlib.sha256((remote / entry.path).read_bytes()).hexdigest()
    received, _, tree = transferred(first.stdout)
    assert tree == sum(TREE.values()) and received >= tree

    second = run_sync(sshd_server, local, remote, env)
    assert second.returncode == 0, second.stderr
    received, sent, tree = transferred(second.stdout)
    assert (received + sent) / tree < 0.01, second.stdout


def test_remote_file_changed_during_transfer_fails_verify(sshd_server, dirs) -> None:  # noqa: F811
    remote, local, manifests = dirs
    victim = remote / "run1" / "metrics.jsonl"
    # The remote rsync appends to a file after it has sent it: as if training wrote mid-sync.
    wrapper = f'rsync "$@"; rc=$?; echo late-line >> {shlex.quote(str(victim))}; exit $rc'
    rsync_path = f"sh -c {shlex.quote(wrapper)} rsync"
    env = sync_env(sshd_server, manifests, SYNC_RSYNC_PATH=rsync_path)
    result = run_sync(sshd_server, local, remote, env)
    assert result.returncode == 12
    assert "verify failed: run1/metrics.jsonl: size" in result.stderr
    assert result.stderr.count("\n") == 1
    manifest = only_manifest(manifests)
    assert not manifest.verified and manifest.mismatches


def test_local_corruption_fails_verify(sshd_server, dirs) -> None:  # noqa: F811
    remote, local, manifests = dirs
    env = sync_env(sshd_server, manifests)
    assert run_sync(sshd_server, local, remote, env).returncode == 0
    target = local / "run1" / "checkpoints" / "step_100.pt"
    stat = target.stat()
    data = bytearray(target.read_bytes())
    data[1000] ^= 0xFF  # same size, same mtime: rsync's quick check cannot see it
    target.write_bytes(bytes(data))
    os.utime(target, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    result = run_sync(sshd_server, local, remote, env)
    assert result.returncode == 12
    assert "verify failed: run1/checkpoints/step_100.pt: sha256 differs" in result.stderr
    assert not only_manifest(manifests).verified


def test_wrong_port_names_connect(sshd_server, dirs) -> None:  # noqa: F811
    remote, local, manifests = dirs
    from tests.support.sshd import free_port

    result = run_sync(sshd_server, local, remote, sync_env(sshd_server, manifests), free_port())
    assert result.returncode == 10 and "connect failed" in result.stderr
    assert "Connection refused" in result.stderr and result.stderr.count("\n") == 1
    assert not local.exists() and not manifests.exists()  # nothing half-written


def test_wrong_key_names_connect(sshd_server, dirs, tmp_path: Path) -> None:  # noqa: F811
    remote, local, manifests = dirs
    other_key = tmp_path / "other_key"
    keygen = ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other_key)]
    subprocess.run(keygen, check=True, capture_output=True)
    result = run_sync(sshd_server, local, remote, sync_env(sshd_server, manifests, other_key))
    assert result.returncode == 10 and "connect failed" in result.stderr
    assert "Permission denied" in result.stderr


def test_missing_remote_dir_names_connect(sshd_server, dirs) -> None:  # noqa: F811
    remote, local, manifests = dirs
    result = run_sync(sshd_server, local, remote / "nope", sync_env(sshd_server, manifests))
    assert result.returncode == 10 and "does not exist" in result.stderr
    assert "REMOTE_DIR" in result.stderr


def test_transfer_failure_names_transfer(sshd_server, dirs) -> None:  # noqa: F811
    remote, local, manifests = dirs
    env = sync_env(sshd_server, manifests, SYNC_RSYNC_PATH="/nonexistent/rsync")
    result = run_sync(sshd_server, local, remote, env)
    assert result.returncode == 11 and "transfer failed: rsync exited" in result.stderr
    assert not manifests.exists()


def test_missing_arguments_is_one_line(sshd_server, tmp_path: Path) -> None:  # noqa: F811
    from tests.support.sync_helpers import SYNC_SCRIPT

    env = sync_env(sshd_server, tmp_path)
    result = subprocess.run([str(SYNC_SCRIPT)], env=env, capture_output=True, text=True)
    assert result.returncode == 2
    assert "missing HOST, LOCAL_DIR, REMOTE_DIR" in result.stderr and "SYNC_HOST" in result.stderr


def test_defaults_come_from_dotenv(sshd_server, dirs) -> None:  # noqa: F811
    from tests.support.sync_helpers import SYNC_SCRIPT

    remote, local, manifests = dirs
    manifests.mkdir()
    dotenv = manifests / "sync.env"
    dotenv.write_text(
        f"SYNC_HOST={sshd_server.target}\nSYNC_LOCAL_DIR={local}\nSYNC_REMOTE_DIR={remote}\n"
    )
    env = sync_env(sshd_server, manifests, SYNC_DOTENV=str(dotenv))
    result = subprocess.run(
        [str(SYNC_SCRIPT), "-q", "-p", str(sshd_server.port)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert (local / "run2" / "config.json").is_file()


def test_s3_upload_lands_in_moto_and_matches(sshd_server, dirs) -> None:  # noqa: F811
    remote, local, manifests = dirs
    with running_moto_s3() as s3:
        s3.client().create_bucket(Bucket="outputs-bucket")
        env = sync_env(
            sshd_server,
            manifests,
            S3_BUCKET="outputs-bucket",
            S3_PREFIX="runs/exp1",
            S3_ENDPOINT_URL=s3.endpoint_url,
            **AWS_ENV,
        )
        result = run_sync(sshd_server, local, remote, env)
        assert result.returncode == 0, result.stderr
        client = s3.client()
        listed = client.list_objects_v2(Bucket="outputs-bucket", Prefix="runs/exp1/")
        keys = sorted(item["Key"] for item in listed["Contents"])
        assert keys == sorted(f"runs/exp1/{p}" for p in TREE)
        for relative in TREE:
            body = client.get_object(Bucket="outputs-bucket", Key=f"runs/exp1/{relative}")
            assert body["Body"].read() == (remote / relative).read_bytes()
        # Unchanged files are not uploaded again.
        again = run_sync(sshd_server, local, remote, env)
        assert again.returncode == 0 and "uploaded 4 files" in again.stdout
        output = result.stdout + result.stderr + again.stdout + again.stderr
        for secret in AWS_ENV.values():
            if secret != "us-east-1":
                assert secret not in output
        manifest_text = "".join(p.read_text() for p in manifests.glob("*.json"))
        assert AWS_ENV["AWS_SECRET_ACCESS_KEY"] not in manifest_text
        assert json.loads(manifest_text)["verified"] is True


def test_s3_failure_names_upload_and_hides_credentials(sshd_server, dirs) -> None:  # noqa: F811
    remote, local, manifests = dirs
    with running_moto_s3() as s3:
        env = sync_env(
            sshd_server,
            manifests,
            S3_BUCKET="no-such-bucket",
            S3_ENDPOINT_URL=s3.endpoint_url,
            **AWS_ENV,
        )
        result = run_sync(sshd_server, local, remote, env)
    assert result.returncode == 13 and "upload failed" in result.stderr
    assert "NoSuchBucket" in result.stderr or "does not exist" in result.stderr
    assert AWS_ENV["AWS_SECRET_ACCESS_KEY"] not in result.stdout + result.stderr
    assert AWS_ENV["AWS_ACCESS_KEY_ID"] not in result.stdout + result.stderr


def test_one_ssh_login_per_sync(sshd_server: SshServer, dirs) -> None:  # noqa: F811
    """ControlMaster: the master's login carries rsync and the checksum step too."""
    remote, local, manifests = dirs
    before = sshd_server.logins()
    result = run_sync(sshd_server, local, remote, sync_env(sshd_server, manifests))
    assert result.returncode == 0, result.stderr
    assert sshd_server.logins() - before == 1


def test_progress_is_shown_unless_quiet(sshd_server: SshServer, dirs) -> None:  # noqa: F811
    from tests.support.sync_helpers import SYNC_SCRIPT

    remote, local, manifests = dirs
    command = [str(SYNC_SCRIPT), "-p", str(sshd_server.port), sshd_server.target]
    env = sync_env(sshd_server, manifests)
    loud = subprocess.run(
        [*command, str(local), str(remote)], env=env, capture_output=True, text=True, timeout=120
    )
    assert loud.returncode == 0, loud.stderr
    assert "100%" in loud.stdout and "to-chk=" in loud.stdout  # rsync --info=progress2
    quiet = run_sync(sshd_server, tmp := local.parent / "quiet", remote, env)
    assert quiet.returncode == 0 and "to-chk=" not in quiet.stdout and (tmp / "run2").is_dir()


def test_symlinked_folder_is_downloaded_and_verified(sshd_server, tmp_path: Path) -> None:  # noqa: F811
    remote, local, manifests = tmp_path / "remote", tmp_path / "local", tmp_path / "manifests"
    elsewhere = tmp_path / "elsewhere"  # outside the synced tree, as on a second disk
    make_tree(elsewhere, {"ckpt.pt": 300_000, "sub/opt.pt": 1_000})
    make_tree(remote, {"run2/config.json": 800})
    (remote / "run1").symlink_to(elsewhere, target_is_directory=True)
    (remote / "latest.pt").symlink_to(elsewhere / "ckpt.pt")
    result = run_sync(sshd_server, local, remote, sync_env(sshd_server, manifests))
    assert result.returncode == 0, result.stderr
    manifest = only_manifest(manifests)
    expected = ["latest.pt", "run1/ckpt.pt", "run1/sub/opt.pt", "run2/config.json"]
    assert manifest.verified and [e.path for e in manifest.files] == expected
    for relative in expected[:3]:
        copy = local / relative
        assert copy.is_file() and not copy.is_symlink() and not copy.parent.is_symlink()
    assert (local / "run1" / "ckpt.pt").read_bytes() == (elsewhere / "ckpt.pt").read_bytes()


@pytest.mark.parametrize("kind", ["dangling", "loop"])
def test_broken_symlinks_stop_the_sync_with_one_line(sshd_server, tmp_path: Path, kind) -> None:  # noqa: F811
    remote, local, manifests = tmp_path / "remote", tmp_path / "local", tmp_path / "manifests"
    make_tree(remote, {"run1/a.bin": 100})
    if kind == "dangling":
        (remote / "run1" / "latest").symlink_to(remote / "run1" / "deleted.pt")
    else:
        (remote / "run1" / "again").symlink_to("..", target_is_directory=True)
    result = run_sync(sshd_server, local, remote, sync_env(sshd_server, manifests))
    assert result.returncode == 11 and result.stderr.count("\n") == 1, result.stderr
    if kind == "dangling":
        assert "run1/latest points to nothing" in result.stderr
    else:
        assert "loop" in result.stderr and "run1/again" in result.stderr
    assert not manifests.exists() and not (local / "run1").exists()
