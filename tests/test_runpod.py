"""RunPod end to end against a local stand-in of its REST API: the launch CLI, the key never
shown, one-line errors, terminate behind the destroy gate (a fake pod served by a real sshd),
the trainer's cost and budget inside a pod, and autostop stopping an idle pod."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from src.cloud import launch
from src.cloud.registry import configured_providers, hourly_rate_here, provider_of_this_machine
from src.cloud.retry import RetryPolicy
from src.cloud.runpod.client import RunPodClient, RunPodMaybeDone
from src.cloud.runpod.provider import RunPodProvider
from src.common.signals import EXIT_BUDGET_REACHED
from src.remote.provider_link import InstanceLink, price_line
from src.remote.stages import StageError
from src.runs.lock import acquire_run_lock
from tests.support.experiment import experiment_env, run_experiment
from tests.support.fake_runpod_server import API_KEY, Canned, FakeRunPod, running_fake_runpod
from tests.support.nvml_state import FAKE_NVML_DIR, gpu, write_state
from tests.support.sshd import SshServer, sshd_server  # noqa: F401 - module fixture
from tests.support.sync_helpers import make_tree, run_sync, sync_env

REPO_ROOT = Path(__file__).resolve().parents[1]
FAST = ["--retries", "2", "--retry-delay", "0.01"]
POD = "abc123xyz"


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[FakeRunPod]:
    with running_fake_runpod() as server:
        monkeypatch.setenv("RUNPOD_API_KEY", API_KEY)
        monkeypatch.setenv("RUNPOD_REST_URL", server.url)
        monkeypatch.setenv("RUNPOD_GRAPHQL_URL", server.graphql_url)
        monkeypatch.setenv("SYNC_DOTENV", str(tmp_path / "no.env"))
        monkeypatch.delenv("RUNPOD_POD_ID", raising=False)
        yield server


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = launch.main(["--provider", "runpod", *FAST, *argv])
    out, err = capsys.readouterr()
    assert API_KEY not in out + err
    return code, out, err


def test_status_shows_gpu_price_cost_volume_and_ssh(fake: FakeRunPod, capsys) -> None:
    code, out, _ = run_cli(capsys, "status")
    assert code == 0
    assert "RTX 4090 x 2" in out and "0.740" in out and "100 GB" in out
    assert "ssh -p 10341 root@203.0.113.7" in out
    assert "2h00m" in out or "2h01m" in out
    assert "$1.48" in out or "$1.49" in out  # 2 h at $0.74
    assert "(no public SSH port)" in out and "stopped789" not in out
    assert "1 pod(s) not running hidden" in out

    code, out, _ = run_cli(capsys, "status", "--all", "--json")
    rows = {row["id"]: row for row in json.loads(out)}
    assert code == 0 and rows["stopped789"]["status"] == "EXITED"
    assert rows[POD]["ssh"][0]["port"] == 10341 and rows[POD]["volume_gb"] == 100
    assert all(r.headers["Authorization"] == f"Bearer {API_KEY}" for r in fake.requests)
    assert all(API_KEY not in r.path for r in fake.requests)


def test_search_sorts_by_price_per_cloud_and_spot(fake: FakeRunPod, capsys) -> None:
    code, out, _ = run_cli(capsys, "search", "--json")
    rows = json.loads(out)
    assert code == 0 and [r["price"] for r in rows] == sorted(r["price"] for r in rows)
    assert ("NVIDIA RTX A5000", "secure") not in {(r["id"], r["cloud"]) for r in rows}
    code, out, _ = run_cli(capsys, "search", "--spot", "--gpu", "4090", "--cloud", "community")
    assert code == 0 and "0.200" in out and "H100" not in out and "spot" in out


def test_create_sends_the_kit_payload_and_waits_for_ssh(fake: FakeRunPod, capsys) -> None:
    code, out, _ = run_cli(
        capsys,
        "create",
        "NVIDIA GeForce RTX 4090",
        "--volume-gb",
        "120",
        "--spot",
        "--autostop",
        "20",
        "--wait",
        "--poll-interval",
        "0.01",
    )
    assert code == 0, out
    body = [r.body for r in fake.requests if r.method == "POST" and r.path == "/v1/pods"][0]
    assert body["gpuTypeIds"] == ["NVIDIA GeForce RTX 4090"] and body["interruptible"] is True
    assert body["volumeInGb"] == 120 and body["volumeMountPath"] == "/workspace"
    assert "22/tcp" in body["ports"] and body["env"]["GPU_TRAIN_KIT_AUTOSTOP_MINUTES"] == "20"
    assert body["name"].startswith("gpu-train-kit-")
    assert "ssh -p 40022 root@192.0.2.50" in out and "keep outputs there" in out


def test_create_timeout_is_not_retried_blindly(fake: FakeRunPod) -> None:
    """The answer is lost but the pod was made: it is found by name, not created twice."""
    fake.failures.append(
        Canned(504, {"error": "gateway timeout"}, method="POST", path_prefix="/v1/pods")
    )
    with RunPodClient(API_KEY, fake.url, retry=RetryPolicy(3, 0.0, 0.0)) as client:
        with pytest.raises(RunPodMaybeDone, match="before creating again"):
            client.create_pod({"name": "unique-1", "imageName": "x", "gpuTypeIds": ["y"]})
    assert fake.count("POST", "/v1/pods") == 1  # never sent twice
    fake.pods["made"] = {"id": "made", "name": "unique-2", "desiredStatus": "RUNNING"}
    fake.failures.append(Canned(504, {"error": "gateway timeout"}, method="POST"))
    with RunPodClient(API_KEY, fake.url, retry=RetryPolicy(3, 0.0, 0.0)) as client:
        assert client.create_pod({"name": "unique-2"})["id"] == "made"


def test_reads_retry_429_and_terminate_checks_state_after_a_timeout(fake: FakeRunPod) -> None:
    fake.failures.append(Canned(429, {"error": "slow down"}, times=2))
    with RunPodClient(API_KEY, fake.url, retry=RetryPolicy(3, 0.0, 0.0)) as client:
        assert len(client.list_pods()) == 3
        fake.failures.append(Canned(502, {"error": "bad gateway"}, method="DELETE"))
        client.terminate_pod("stopped789")  # the first DELETE lost: read, then sent again
    assert fake.count("DELETE") == 2 and "stopped789" not in fake.pods


def test_stop_warns_and_start(fake: FakeRunPod, capsys) -> None:
    code, out, _ = run_cli(capsys, "stop", POD)
    assert code == 0 and "container disk is lost" in out and "/workspace" in out
    assert fake.pods[POD]["desiredStatus"] == "EXITED" and fake.count("DELETE") == 0
    code, out, _ = run_cli(capsys, "start", POD)
    assert code == 0 and fake.pods[POD]["desiredStatus"] == "RUNNING"


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["stop", "nosuchpod"], "pod nosuchpod not found"),
        (["ssh-config", "noport456"], "pod noport456 has no public SSH port"),
        (["terminate", "nosuchpod"], "pod nosuchpod not found"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(fake: FakeRunPod, capsys, argv, expected) -> None:
    code, out, err = run_cli(capsys, *argv)
    assert code == 2 and out == "" and err.count("\n") == 1 and expected in err, err


def test_bad_key_is_one_line_exit_2_and_never_shown(
    fake: FakeRunPod, capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    wrong = "rpa_WRONGKEY0000000000"
    monkeypatch.setenv("RUNPOD_API_KEY", wrong)
    for argv in (["status"], ["search"]):
        code, out, err = run_cli(capsys, *argv)
        assert code == 2 and out == "" and err.count("\n") == 1, err
        assert "key was refused" in err and wrong not in err
    monkeypatch.delenv("RUNPOD_API_KEY")
    code, _, err = run_cli(capsys, "status")
    assert code == 2 and "RUNPOD_API_KEY" in err


def test_launch_needs_a_provider_and_hands_vast_to_launch_vast(
    capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert launch.main(["status"]) == 2
    assert "--provider missing" in capsys.readouterr().err
    seen = []
    monkeypatch.setitem(launch.PROVIDERS, "vast", lambda argv: seen.append(argv) or 0)
    assert launch.main(["--provider=vast", "status", "--all"]) == 0
    assert seen == [["status", "--all"]]


def test_provider_seam(fake: FakeRunPod) -> None:
    provider = next(p for p in configured_providers(os.environ) if p.name == "RunPod")
    machine = provider.machine_at("203.0.113.7", 10341)
    assert machine is not None and machine.id == POD and machine.hourly_rate_usd == 0.74
    assert provider.machine_at("203.0.113.7", 22) is None
    assert provider.claims(POD) == {
        "disk_bw": 1800.0,
        "inet_down": 900.0,
        "gpu_name": "RTX 4090",  # the pod's GPU type as advertised, for check_instance
        "num_gpus": 2.0,
    }
    assert provider.hand_command("destroy", POD).endswith("--provider runpod terminate abc123xyz")
    env = {**os.environ, "RUNPOD_POD_ID": POD}
    here = provider_of_this_machine(env)
    assert isinstance(here, RunPodProvider) and here.this_machine_id == POD
    assert hourly_rate_here(None, env) == 0.74
    gate = provider.destroy("noport456", ["/workspace/persistent"])
    assert not gate.allowed and "no public SSH port" in gate.reason and fake.count("DELETE") == 0


def test_remote_train_link_finds_stops_and_refuses_to_destroy_a_pod(fake: FakeRunPod) -> None:
    """--stop-after / --destroy-after reach RunPod through the seam, with no edit there."""
    settings = {k: v for k, v in os.environ.items() if not k.startswith("VAST")}
    link = InstanceLink.require(settings, "203.0.113.7", 10341, "--destroy-after")
    assert link.describe() == f"RunPod pod {POD}" and link.machine.hourly_rate_usd == 0.74
    assert link.manual_command("destroy").endswith(f"terminate {POD}")
    with pytest.raises(StageError, match="not destroying pod abc123xyz"):
        link.shut_down("destroy", ["/workspace/persistent"], settings)
    assert fake.count("DELETE") == 0
    assert link.shut_down("stop", [], settings).startswith(f"stopped pod {POD}")
    assert fake.pods[POD]["desiredStatus"] == "EXITED"


def test_remote_train_finds_a_pod_by_provider_and_id_behind_any_address(fake: FakeRunPod) -> None:
    """`--provider runpod --pod ID`: a pod reached through RunPod's SSH proxy (an address the
    API does not list) is still found, priced and stopped; an unknown id is one line."""
    settings = {k: v for k, v in os.environ.items() if not k.startswith("VAST")}
    link = InstanceLink.require(
        settings, "ssh.runpod.io", 22, "--stop-after", named=("runpod", POD)
    )
    assert link.describe() == f"RunPod pod {POD}"
    line = price_line(settings, "ssh.runpod.io", 22, named=("runpod", POD))
    assert line is not None and "costs $0.740/h" in line and f"stop {POD}" in line
    assert price_line(settings, "ssh.runpod.io", 22) is None  # by address alone: not found
    with pytest.raises(StageError, match="--provider runpod --machine nosuchpod: ") as raised:
        InstanceLink.require(settings, "h", 22, "--stop-after", named=("runpod", "nosuchpod"))
    assert "\n" not in str(raised.value) and fake.api_key not in str(raised.value)
    no_key = {k: v for k, v in settings.items() if not k.startswith("RUNPOD")}
    with pytest.raises(StageError, match="--provider runpod needs "):
        InstanceLink.require(no_key, "h", 22, "--stop-after", named=("runpod", POD))


# -- terminate behind the destroy gate, against a real sshd ----------------------------------


def test_terminate_only_after_verified_sync(
    sshd_server: SshServer,  # noqa: F811
    fake: FakeRunPod,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    capsys,
) -> None:
    env = sync_env(sshd_server, tmp_path / "manifests")
    for name in ("SYNC_SSH_OPTS", "SYNC_MANIFEST_DIR", "SYNC_DOTENV"):
        monkeypatch.setenv(name, env[name])
    remote, local = tmp_path / "remote", tmp_path / "local"
    monkeypatch.setenv("SYNC_REMOTE_DIR", str(remote))
    fake.pods[POD].update(publicIp="127.0.0.1", portMappings={"22": sshd_server.port})
    make_tree(remote, {"run/ckpt.pt": 100_000, "run/log.txt": 3_000})

    code, out, err = run_cli(capsys, "terminate", POD)
    assert code == 3 and out == "" and err.count("\n") == 1 and "no download manifest" in err

    assert run_sync(sshd_server, local, remote, env).returncode == 0
    (remote / "run" / "log.txt").write_text("training wrote more\n")
    code, _, err = run_cli(capsys, "terminate", POD)
    assert code == 3 and "changed since the sync: run/log.txt" in err
    assert fake.count("DELETE") == 0 and POD in fake.pods

    assert run_sync(sshd_server, local, remote, env).returncode == 0
    code, out, _ = run_cli(capsys, "terminate", POD)
    assert code == 0 and f"terminated pod {POD}" in out
    assert fake.count("DELETE") == 1 and POD not in fake.pods


# -- inside a pod: the trainer's cost and budget, autostop -----------------------------------


def pod_env(fake: FakeRunPod, **extra: str) -> dict[str, str]:
    env = experiment_env(**extra)
    env = {k: v for k, v in env.items() if not k.startswith(("RUNPOD", "CONTAINER"))}
    env.update(
        RUNPOD_POD_ID=POD,
        RUNPOD_API_KEY=API_KEY,
        RUNPOD_REST_URL=fake.url,
        SYNC_DOTENV=os.devnull,
    )
    return env


def test_trainer_cost_follows_the_pod_rate_and_budget_stops_76(
    fake: FakeRunPod, tmp_path: Path
) -> None:
    tiny = REPO_ROOT / "tests" / "support" / "tiny_lm_experiment.py"
    fake.pods[POD]["costPerHr"] = "3600"  # $1 per second
    fake.pods[POD]["adjustedCostPerHr"] = 3600
    args = [f"paths.output_dir={tmp_path}", "run_name=pod", "trainer.max_epochs=6"]
    slow = pod_env(fake, TINY_LM_STEP_SECONDS="0.025")
    result = run_experiment([*args, "cost.budget_usd=2"], env=slow, experiment=tiny)
    assert result.returncode == EXIT_BUDGET_REACHED, result.stderr
    assert "budget reached" in result.stdout and "at $3600.00/h" in result.stdout
    assert any(r.path == f"/v1/pods/{POD}" for r in fake.requests)
    assert API_KEY not in result.stdout + result.stderr


def test_autostop_stops_an_idle_pod_once_and_never_under_a_run_lock(
    fake: FakeRunPod, tmp_path: Path
) -> None:
    state, outputs = tmp_path / "nvml.json", tmp_path / "outputs"
    outputs.mkdir()
    write_state(state, [gpu(util=0)])
    env = pod_env(fake)
    env.update(
        PYTHONPATH=f"{FAKE_NVML_DIR}{os.pathsep}{REPO_ROOT}",
        FAKE_NVML_STATE=str(state),
        HOME=str(tmp_path),
    )
    env = {k: v for k, v in env.items() if not k.startswith("VAST")}
    lock = acquire_run_lock(outputs / "my-run")
    log = tmp_path / "autostop.log"
    args = ["--idle-minutes", "0.01", "--interval", "0.05", "--outputs", str(outputs)]
    process = subprocess.Popen(
        [sys.executable, str(REPO_ROOT / "scripts" / "autostop.py"), *args],
        env=env,
        stdout=log.open("w"),
        stderr=subprocess.PIPE,
        text=True,
    )
    stops = lambda: [r for r in fake.requests if r.path == f"/v1/pods/{POD}/stop"]  # noqa: E731
    try:
        deadline = time.monotonic() + 30
        while "run lock held" not in log.read_text():
            assert process.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        time.sleep(1.0)  # many checks; the idle window is 0.6 s
        assert process.poll() is None and stops() == []
        lock.release()
        _, err = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, err
    assert len(stops()) == 1 and fake.count("DELETE") == 0
    assert fake.pods[POD]["desiredStatus"] == "EXITED"
    assert f"stopped pod {POD}" in log.read_text() and "container disk is lost" in err
    assert API_KEY not in log.read_text() + err
