"""remote_train --rent against the fake Vast.ai API, real sshds on 127.0.0.1 and moto S3.

Each offer the fake API serves has its own SSH port: a real sshd of its own (the same keys),
whose sessions get that machine's environment through ``SetEnv`` (the fake GPU's efficiency,
AWS credentials for moto, a slow step), or no port ever. The "host" disk is a directory here;
a host that vanishes loses it (deleted), its processes (killed) and its API entry (404).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from src.remote.cli import main
from tests.support.experiment import assert_bit_identical, experiment_env, run_experiment
from tests.support.fake_runpod_server import API_KEY as RUNPOD_KEY
from tests.support.fake_runpod_server import running_fake_runpod
from tests.support.fake_vast_server import API_KEY, Canned, FakeVast, running_fake_vast
from tests.support.moto_server import AWS_ENV, MotoS3, running_moto_s3
from tests.support.sshd import SshServer, start_sshd
from tests.support.sync_helpers import sync_env

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPT = REPO_ROOT / "scripts" / "remote_train.py"
TINY_LM = "tests/support/tiny_lm_experiment.py"
BUCKET = "rent-bucket"


def offer(offer_id: int, price: float, port: int | None, disk: float = 100.0) -> dict:
    return {
        "id": offer_id,
        "host_id": f"h{offer_id}",
        "gpu_name": "RTX 4090",
        "num_gpus": 1,
        "dph_total": price,
        "disk_space": disk,
        "geolocation": "US",
        "_ssh_port": port,
    }


@dataclass
class World:
    root: Path
    base: SshServer
    fake: FakeVast
    s3: MotoS3
    env: dict[str, str]
    python: Path
    socket: str
    sshds: list[subprocess.Popen]

    def machine(self, name: str, **environment: str) -> tuple[SshServer, subprocess.Popen]:
        """A rented machine's sshd: its sessions see ``environment`` (and moto's keys)."""
        values = {**AWS_ENV, "OMP_NUM_THREADS": "1", **environment}
        # One SetEnv line: sshd takes the first of a keyword's lines only.
        extra = "SetEnv " + " ".join(f"{key}={value}" for key, value in values.items()) + "\n"
        server, process = start_sshd(self.root / name, extra, keys_from=self.base)
        self.sshds.append(process)
        return server, process

    def tiny_args(self, run_name: str) -> list[str]:
        return [
            "--config",
            "tests/support/tiny_lm.yaml",
            f"run_name={run_name}",
            "data.num_sequences=160",
            f"checkpoint.s3_bucket={BUCKET}",
            "checkpoint.s3_prefix=ckpts",
            f"checkpoint.endpoint_url={self.s3.endpoint_url}",
        ]

    def command(self, name: str, *args: str) -> list[str]:
        return [
            sys.executable,
            str(SCRIPT),
            "--rent",
            "--gpu",
            "RTX 4090",
            TINY_LM,
            *args,
            "--no-install",
            "--remote-dir",
            str(self.remote_dir(name)),
            "--python",
            str(self.python),
            "--local-dir",
            str(self.root / name / "home"),
            "--tmux-socket",
            self.socket,
            "--state-file",
            str(self.state_file(name)),
            "--poll-interval",
            "0.1",
        ]

    def remote_dir(self, name: str) -> Path:
        return self.root / name / "host" / "gpu-train-kit"

    def state_file(self, name: str) -> Path:
        return self.root / name / "rented.json"

    def state(self, name: str) -> dict:
        return json.loads(self.state_file(name).read_text())

    def run(self, name: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        result = subprocess.run(
            self.command(name, *args),
            env=self.env,
            cwd=self.root,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        assert API_KEY not in result.stdout + result.stderr
        (self.root / name / "output.txt").write_text(result.stdout + result.stderr)
        return result

    def deletes(self) -> list[int]:
        return [int(r.path.split("/")[4]) for r in self.fake.requests if r.method == "DELETE"]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    root = tmp_path_factory.mktemp("rent")
    base, base_process = start_sshd(root / "base")
    python = root / "python"  # the host's interpreter: the check sees a fake GPU
    fake_check = REPO_ROOT / "tests" / "support" / "fake_gpu_check.py"
    python.write_text(
        "#!/bin/sh\n"
        'if [ "$1" = scripts/check_instance.py ]; then\n'
        f'  shift; exec {sys.executable} {fake_check} "$@"\nfi\n'
        f'exec {sys.executable} "$@"\n'
    )
    python.chmod(0o755)
    socket_name = f"rent-test-{os.getpid()}"
    sshds = [base_process]
    with running_fake_vast() as fake, running_moto_s3() as s3:
        s3.client().create_bucket(Bucket=BUCKET)
        fake.created_ip = "127.0.0.1"
        fake.polls_until_running = 2
        env = sync_env(base, root / "manifests", VASTAI_API_KEY=API_KEY, VAST_URL=fake.url)
        env.pop("VAST_API_KEY", None)
        env.update(OMP_NUM_THREADS="1", DEV_MODE="True")
        try:
            yield World(root, base, fake, s3, env, python, socket_name, sshds)
        finally:
            subprocess.run(["tmux", "-L", socket_name, "kill-server"], capture_output=True)
            for process in sshds:
                kill_tree(process.pid)


def children_of(pid: int) -> list[int]:
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            fields = (proc / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(proc.name))
    return found


def kill_tree(pid: int) -> None:
    """The sshd and every session under it: the host's network is gone."""
    for child in children_of(pid):
        kill_tree(child)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


@pytest.fixture(scope="module")
def failover(world: World) -> subprocess.CompletedProcess:
    """Cheapest first: an offer whose disk is too small (skipped), one that never gets an
    SSH port, one whose GPU delivers 20% of its peak, then a good one."""
    good, _ = world.machine("good", FAKE_GPU_EFFICIENCY="0.9")
    weak, _ = world.machine("weak", FAKE_GPU_EFFICIENCY="0.2")
    world.fake.offers = [
        offer(9100, 0.01, good.port),  # taken by someone else meanwhile: refused
        offer(9104, 0.05, good.port, disk=10),
        offer(9101, 0.10, None),
        offer(9102, 0.20, weak.port),
        offer(9103, 0.30, good.port),
    ]
    world.fake.requests.clear()
    gone = {"success": False, "error": "no_such_ask", "msg": "offer no longer available"}
    world.fake.failures.append(Canned(400, gone, path_prefix="/api/v0/asks/9100/"))
    result = world.run(
        "failover",
        "--min-disk",
        "40",
        *world.tiny_args("tiny"),
        "--boot-timeout",
        "2",
        "--min-gpu-efficiency",
        "0.5",
    )
    result.port = good.port  # type: ignore[attr-defined]
    result.instances = {  # type: ignore[attr-defined]
        offer_id: world.fake.instance_of_offer(offer_id) for offer_id in (9101, 9102, 9103)
    }
    return result


def test_a_rented_run_boots_checks_trains_comes_home_and_is_destroyed(
    world: World, failover
) -> None:
    out = failover.stdout
    assert failover.returncode == 0, out + failover.stderr
    good = failover.instances[9103]
    assert f"[rent] created instance {good} from offer 9103" in out
    for stage in ("connect", "sync", "check", "train", "retrieve", "verify", "shutdown"):
        assert f"[{stage}] done in" in out.split(f"instance {good} from offer")[1], stage
    assert out.index("[verify] done in") < out.index(f"destroyed instance {good}")
    run_dir = world.root / "failover" / "home" / "tiny"
    assert (run_dir / "final_model.pt").is_file() and (run_dir / "test_results.json").is_file()
    assert sorted(world.deletes()) == sorted(failover.instances.values())
    assert world.deletes()[-1] == good  # through the gate, after the verify:
    (delete,) = [r for r in world.fake.requests if r.method == "DELETE" and str(good) in r.path]
    (manifest,) = (world.root / "manifests").glob(f"root_127.0.0.1_{failover.port}_*.json")
    assert json.loads(manifest.read_text())["verified"]
    assert manifest.stat().st_mtime <= delete.at
    assert world.state("failover")["machines"] == {}  # nothing left billing
    assert "skipping offer 9104" in out and "smaller than the 40 GB" in out
    assert "could not rent offer 9100" in out and "offer no longer available" in out
    assert "done: 3 machine(s)" in out


def test_an_offer_that_never_gets_an_ssh_port_is_timed_out_destroyed_and_recorded(
    world: World, failover
) -> None:
    out = failover.stdout
    lost = failover.instances[9101]
    assert f"instance {lost}: running running" in out  # the provider's state, shown
    assert f"instance {lost} failed: no SSH port after 2 s" in out
    assert world.deletes()[0] == lost
    bad = world.state("failover")["bad_hosts"]
    assert bad["vast:h9101"]["reason"].startswith("no SSH port after 2 s")
    assert bad["vast:h9101"]["offer"] == "9101" and bad["vast:h9101"]["at"] > 0


def test_an_offer_whose_check_fails_is_destroyed_before_training(world: World, failover) -> None:
    out = failover.stdout
    weak = failover.instances[9102]
    part = out.split(f"created instance {weak}")[1].split("created instance")[0]
    assert "[check] failed in" in part and "below --min-gpu-efficiency 0.50" in part
    assert f"destroyed instance {weak} (failed before training" in part
    assert "[train]" not in part and "[retrieve]" not in part
    assert world.deletes()[1] == weak
    reason = world.state("failover")["bad_hosts"]["vast:h9102"]["reason"]
    assert reason.endswith("the weakest GPU delivers 0.20 of its bf16 peak"), reason


def test_a_host_that_vanishes_mid_run_is_replaced_and_the_run_resumes_from_s3(
    world: World, failover
) -> None:
    name = "vanish"
    flaky, flaky_process = world.machine("flaky", TINY_LM_STEP_SECONDS="0.15")
    steady, _ = world.machine("steady")
    world.fake.offers = [offer(9201, 0.10, flaky.port), offer(9202, 0.20, steady.port)]
    world.fake.requests.clear()
    args = world.tiny_args("resumed")
    process = subprocess.Popen(
        world.command(name, *args),
        env=world.env,
        cwd=world.root,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    output: list[str] = []
    reader = threading.Thread(target=lambda: output.extend(iter(process.stdout.readline, "")))
    reader.start()
    reference_dir = world.root / "reference"
    reference = run_experiment(
        [*args[:-3], f"paths.output_dir={reference_dir}"],
        experiment_env(OMP_NUM_THREADS="1"),
        experiment=REPO_ROOT / TINY_LM,
    )
    assert reference.returncode == 0, reference.stderr
    s3 = world.s3.client()
    deadline = time.monotonic() + 90
    while True:
        listed = s3.list_objects_v2(Bucket=BUCKET, Prefix="ckpts/resumed/checkpoints/")
        keys = [item["Key"] for item in listed.get("Contents", [])]
        if any(key.endswith("step_000000005.pt") for key in keys):
            break
        assert process.poll() is None and time.monotonic() < deadline, "".join(output)
        time.sleep(0.05)
    # The host vanishes: off the API, its processes and network gone, its disk with them.
    world.fake.vanish(world.fake.instance_of_offer(9201))
    subprocess.run(["tmux", "-L", world.socket, "kill-server"], capture_output=True)
    kill_tree(flaky_process.pid)
    shutil.rmtree(world.remote_dir(name))
    code = process.wait(timeout=120)
    reader.join(5)
    out = "".join(output)
    assert code == 0, out
    assert "vanished mid-run: the next machine resumes from s3://rent-bucket/ckpts" in out
    assert "resuming from s3://rent-bucket/ckpts/resumed/checkpoints/step_" in out
    home = world.root / name / "home" / "resumed"
    assert_bit_identical(home / "final_model.pt", reference_dir / "resumed" / "final_model.pt")
    state = world.state(name)
    assert state["machines"] == {} and state["bad_hosts"]["vast:h9201"]["reason"] == (
        "vanished mid-run"
    )
    assert world.deletes() == [world.fake.next_id - 1]  # the second machine, through the gate


def test_max_attempts_and_max_total_usd_stop_the_loop_in_one_line(world: World) -> None:
    world.fake.offers = [offer(9300 + i, 0.1 * (i + 1), None) for i in range(3)]
    world.fake.requests.clear()
    args = world.tiny_args("never")
    result = world.run("attempts", *args, "--boot-timeout", "0.5", "--max-attempts", "2")
    assert result.returncode == 19, result.stdout + result.stderr
    assert result.stderr.count("\n") == 1, result.stderr
    assert "rent failed: stopped after 2 machine(s) (--max-attempts 2)" in result.stderr
    assert len(world.deletes()) == 2 and world.state("attempts")["machines"] == {}
    assert world.fake.count("PUT", "/api/v0/asks/") == 2  # each machine made was destroyed

    world.fake.offers = [offer(9400, 3600.0, None)]  # a dollar a second
    world.fake.requests.clear()
    result = world.run("budget", *args, "--boot-timeout", "60", "--max-total-usd", "0.5")
    assert result.returncode == 19, result.stdout + result.stderr
    assert result.stderr.count("\n") == 1, result.stderr
    # Checked at each poll: a loaded machine may overshoot by a poll or two ($1/s here).
    assert re.search(
        r"rent failed: stopped: \$[0-2]\.\d\d spent of --max-total-usd 0\.5;", (result.stderr)
    ), result.stderr
    assert len(world.deletes()) == 1 and world.state("budget")["machines"] == {}
    assert world.fake.count("PUT", "/api/v0/asks/") == 1


def test_ctrl_c_keeps_the_machine_listed_with_its_destroy_command(world: World) -> None:
    world.fake.offers = [offer(9500, 0.5, None)]
    world.fake.requests.clear()
    process = subprocess.Popen(
        world.command("ctrl-c", *world.tiny_args("never"), "--boot-timeout", "60"),
        env=world.env,
        cwd=world.root,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 60
    while not (world.state_file("ctrl-c").exists() and _booting(world.state("ctrl-c"))):
        assert process.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    time.sleep(0.3)
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=30)
    assert process.returncode == 130, out + err
    instance = world.fake.instance_of_offer(9500)
    assert f"kept instance {instance}" in err and err.count("\n") == 1, err
    assert f"python scripts/launch_vast.py destroy {instance}" in err
    assert world.deletes() == []
    (entry,) = world.state("ctrl-c")["machines"].values()
    assert entry["id"] == str(instance)

    listed = rented(world, "ctrl-c")
    assert listed.returncode == 0, listed.stderr
    assert f"Vast.ai instance {instance}" in listed.stdout and "$0.500/h" in listed.stdout
    assert f"destroy: python scripts/launch_vast.py destroy {instance}" in listed.stdout
    world.fake.vanish(instance)  # destroyed by hand: the next listing drops it
    assert "gone, no longer billed" in rented(world, "ctrl-c").stdout
    assert world.state("ctrl-c")["machines"] == {}


def rented(world: World, name: str) -> subprocess.CompletedProcess:
    """``remote_train.py --rented`` on that test's state file."""
    command = [sys.executable, str(SCRIPT), "--rented", "--state-file", str(world.state_file(name))]
    return subprocess.run(command, env=world.env, capture_output=True, text=True, timeout=60)


def _booting(state: dict) -> bool:
    return any(entry.get("state") == "booting" for entry in state["machines"].values())


def test_bad_settings_fail_before_anything_with_one_line(
    world: World, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("VASTAI_API_KEY", API_KEY)
    monkeypatch.setenv("VAST_URL", world.fake.url)
    monkeypatch.setenv("RENT_STATE_FILE", str(world.root / "bad" / "rented.json"))
    tiny = ["--config", "tests/support/tiny_lm.yaml"]
    good = [*tiny, f"checkpoint.s3_bucket={BUCKET}"]
    cases = [
        (["--rent", TINY_LM, *tiny], "--rent needs checkpoint.s3_bucket"),
        (["--rent", "--provider", "runpod", "--cloud", "x", TINY_LM, *good], "argument --cloud"),
        (["--rent", "--max-price", "-1", TINY_LM, *good], "--max-price -1 must be >= 0"),
        (["--rent", "--num-gpus", "x", TINY_LM, *good], "--rent QUERY: argument --num-gpus"),
        (["--rent", TINY_LM, *good, "--max-attempts", "0"], "--max-attempts 0 must be at"),
        (["--rent", TINY_LM, *good, "--boot-timeout", "0"], "--boot-timeout 0 must be > 0"),
        (["--rent", TINY_LM, *good, "--max-total-usd", "-2"], "--max-total-usd -2 must be"),
        (["--rent", TINY_LM, *good, "--keep", "--destroy-after"], "--keep, --stop-after and"),
        (["--rent", "--status"], "--rent needs an experiment"),
        (["h", TINY_LM, *good, "--max-total-usd", "5"], "--max-total-usd goes with --rent"),
    ]
    world.fake.requests.clear()
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, (argv, err)
    monkeypatch.delenv("VASTAI_API_KEY")
    monkeypatch.setenv("HOME", str(world.root / "bad"))
    monkeypatch.setenv("SYNC_DOTENV", str(world.root / "bad" / "no.env"))
    assert main(["--rent", TINY_LM, *good]) == 2
    assert "--provider vast needs" in capsys.readouterr().err
    assert world.fake.requests == [] and not (world.root / "bad" / "rented.json").exists()


def test_a_crash_between_create_and_its_answer_still_lists_the_offer(
    world: World, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The entry is written before the create call: a laptop that dies during the call leaves
    a line that says which offer may now bill, and how to look."""
    from src.remote.rent_state import RentState

    monkeypatch.setenv("VASTAI_API_KEY", API_KEY)
    monkeypatch.setenv("VAST_URL", world.fake.url)
    path = world.root / "crash" / "rented.json"
    RentState(path).creating("vast", "9600", 0.25, "h9600")  # then the laptop died
    assert main(["--rented", "--state-file", str(path)]) == 0
    out = capsys.readouterr().out
    assert "Vast.ai offer 9600: a create was sent" in out
    assert "check python scripts/launch_vast.py status" in out and "$0.250/h" in out


def test_runpod_rents_through_the_same_seam(world: World) -> None:
    """RunPod: GPU types per cloud are the offers, cheapest first; a pod whose check fails is
    terminated at once and its GPU type and cloud recorded."""
    weak, _ = world.machine("runpod-weak", FAKE_GPU_EFFICIENCY="0.2")
    with running_fake_runpod() as runpod:
        runpod.new_pod_ssh = ("127.0.0.1", weak.port)
        env = {
            **world.env,
            "RUNPOD_API_KEY": RUNPOD_KEY,
            "RUNPOD_REST_URL": runpod.url,
            "RUNPOD_GRAPHQL_URL": runpod.graphql_url,
        }
        command = world.command("runpod", "--provider", "runpod", *world.tiny_args("never"))
        extra = ["--min-gpu-efficiency", "0.5", "--max-attempts", "1", "--boot-timeout", "20"]
        result = subprocess.run(
            [*command, *extra], env=env, capture_output=True, text=True, timeout=120
        )
        out = result.stdout
        assert result.returncode == 19, out + result.stderr
        assert RUNPOD_KEY not in out + result.stderr
        assert "created pod new000001 from offer NVIDIA GeForce RTX 4090@community" in out
        assert "$0.340/h" in out and "[check] failed in" in out and "[train]" not in out
        assert "destroyed pod new000001 (failed before training" in out
        assert "stopped after 1 machine(s) (--max-attempts 1)" in result.stderr
        assert runpod.count("DELETE", "/v1/pods/new000001") == 1
        created = [r.body for r in runpod.requests if r.method == "POST" and r.path == "/v1/pods"]
        assert created[0]["cloudType"] == "COMMUNITY" and created[0]["volumeInGb"] == 50
    state = world.state("runpod")
    assert state["machines"] == {}
    assert (
        "below --min-gpu-efficiency"
        in (state["bad_hosts"]["runpod:NVIDIA GeForce RTX 4090@community"]["reason"])
    )


class _Tty:
    def __init__(self, answer: str) -> None:
        self.answer = answer

    def isatty(self) -> bool:
        return True

    def readline(self) -> str:
        return self.answer + "\n"


def test_ctrl_c_at_a_terminal_destroys_only_a_machine_that_never_trained(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import argparse

    from src.cloud.renting import Offer
    from src.remote import rent as rent_module
    from src.remote.rent_state import RentState
    from src.remote.stages import StageReporter

    assert rent_module.ask_keep_or_destroy("? ", _Tty("d")) == "destroy"
    assert rent_module.ask_keep_or_destroy("? ", _Tty("")) == "keep"  # the default

    class Provider:
        machine_kind = "instance"

        def hand_command(self, action: str, machine_id: str) -> str:
            return f"launch_vast.py {action} {machine_id}"

    class Renter:
        provider = Provider()
        released: list[str] = []

        def release_unused(self, machine_id: str) -> None:
            self.released.append(machine_id)

    state = RentState(tmp_path / "rented.json")
    args = argparse.Namespace(provider="vast", max_total_usd=None)
    renter = Renter()
    for trained, answer in ((False, "d"), (True, "d")):
        rent = rent_module.Rent(args, [], {}, StageReporter(), renter, state, "s3://b/p")
        key = state.created(state.creating("vast", "1", 0.5, "h1"), "77")
        rent.held = rent_module.Held(key, "77", Offer("1", "h1", "X", 0.5, 100), 0.0, None, trained)
        monkeypatch.setattr(rent_module.sys, "stdin", _Tty(answer))
        assert rent.interrupted() == 130
        err = capsys.readouterr().err
        if trained:
            assert "kept instance 77 (its run goes on)" in err and "destroy 77" in err
            assert list(state.machines()) == [key]  # still listed
        else:
            assert renter.released == ["77"] and state.machines() == {}
