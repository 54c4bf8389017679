"""scripts/remote_train.py against a real OpenSSH server on 127.0.0.1, real rsync and tmux.

The "host" is a separate directory on this machine: the code reaches it only through
rsync, the outputs come back only through the sync, and training runs in a tmux server of
its own (``--tmux-socket``). The template experiment trains for real (tiny), processes are
killed for real, and the only stand-in is the fake Vast.ai API (instance 101's SSH address
is the test sshd). One sshd, one synced + installed host and one cold run are shared by
the module, so the whole file stays well under 90 s.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from src.remote.args import split_also
from src.remote.cli import main
from src.storage.manifest import hash_cache_path, local_stat_key, read_manifest
from src.storage.output_sync import SshSession
from tests.support.fake_vast_server import API_KEY, FakeVast, running_fake_vast
from tests.support.sshd import SshServer, free_port, start_sshd
from tests.support.sync_helpers import make_tree, run_sync, sync_env

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPT = REPO_ROOT / "scripts" / "remote_train.py"
EXPERIMENT = "experiments/template_experiment.py"
# A few dozen steps of the template on CPU: seconds, most of it importing torch.
TINY = ["trainer.max_steps=12", "data.num_samples=256", "logging.tensorboard=false"]
STAGE_ORDER = ["connect", "sync", "install", "train", "retrieve", "verify"]


@dataclass
class Host:
    server: SshServer
    fake: FakeVast
    root: Path
    remote_dir: Path
    local_dir: Path
    ssh_config: Path
    env: dict[str, str]
    socket: str
    python: str = sys.executable
    extra_hosts: dict[str, str] = field(default_factory=dict)

    @property
    def outputs(self) -> Path:
        """The runs' outputs root on the host (no /workspace here: the repo's outputs/)."""
        return self.remote_dir / "outputs"

    def common(self, local_dir: Path | None = None, python: str | None = None) -> list[str]:
        return [
            "--remote-dir",
            str(self.remote_dir),
            "--python",
            python or self.python,
            "--local-dir",
            str(local_dir or self.local_dir),
            "--tmux-socket",
            self.socket,
        ]

    def command(self, *args: str, host: str = "testhost", python: str | None = None) -> list:
        return [sys.executable, str(SCRIPT), host, *args, *self.common(python=python)]

    def run(
        self,
        *args: str,
        host: str = "testhost",
        python: str | None = None,
        timeout: float = 120,
        **env: str,
    ) -> subprocess.CompletedProcess:
        result = subprocess.run(
            self.command(*args, host=host, python=python),
            env={**self.env, **env},
            cwd=self.root,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        assert API_KEY not in result.stdout + result.stderr
        return result

    def start(self, *args: str) -> Running:
        process = subprocess.Popen(
            self.command(*args),
            env=self.env,
            cwd=self.root,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: killed with its ssh children
        )
        return Running(process)

    def registry(self) -> Path:
        return self.remote_dir / ".remote_runs"

    def experiment_pid(self, session: str, running: Running, timeout: float = 60) -> int:
        """The training process on the host, from the runner's own record."""
        path = self.registry() / f"{session}.0.start"
        deadline = time.monotonic() + timeout
        while not path.exists():
            assert running.process.poll() is None, running.output
            assert time.monotonic() < deadline, f"{path} never appeared"
            time.sleep(0.05)
        return int(json.loads(path.read_text())["pid"])

    def tmux_sessions(self) -> set[str]:
        result = subprocess.run(
            ["tmux", "-L", self.socket, "list-sessions", "-F", "#{session_name}"],
            capture_output=True,
            text=True,
        )
        return set(result.stdout.split()) if result.returncode == 0 else set()


class Running:
    """A remote_train.py started in the background; its output is collected as it comes."""

    def __init__(self, process: subprocess.Popen) -> None:
        self.process = process
        self.output = ""
        self._lock = threading.Lock()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        while chunk := self.process.stdout.read1(4096):
            with self._lock:
                self.output += chunk.decode(errors="replace")

    def wait_for(self, text: str, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.output:
            if self.process.poll() is not None:
                self._reader.join(5)
                if text in self.output:
                    return
                raise AssertionError(
                    f"exited {self.process.returncode} before {text!r}:\n{self.output}"
                )
            assert time.monotonic() < deadline, f"no {text!r} within {timeout} s:\n{self.output}"
            time.sleep(0.05)

    def finish(self, timeout: float = 120) -> int:
        code = self.process.wait(timeout)
        self._reader.join(5)
        assert API_KEY not in self.output
        return code

    def kill_group(self, signum: int = signal.SIGKILL) -> None:
        os.killpg(self.process.pid, signum)


def _keygen(path: Path) -> None:
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)],
        check=True,
        capture_output=True,
    )


@pytest.fixture(scope="module")
def host(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Host]:
    root = tmp_path_factory.mktemp("remote_train")
    server, sshd = start_sshd(root / "sshd")
    other_key = root / "other_key"
    _keygen(other_key)
    stale_known_hosts = root / "stale_known_hosts"
    _keygen(root / "stale_host_key")
    stale_pub = (root / "stale_host_key.pub").read_text().split()
    stale_known_hosts.write_text(f"[127.0.0.1]:{server.port} {stale_pub[0]} {stale_pub[1]}\n")
    silent = socketserver_that_never_answers()
    blocks = {
        "testhost": (server.port, server.client_key, server.known_hosts, "127.0.0.1"),
        "wrong-port": (free_port(), server.client_key, server.known_hosts, "127.0.0.1"),
        "wrong-key": (server.port, other_key, server.known_hosts, "127.0.0.1"),
        "new-host-key": (server.port, server.client_key, stale_known_hosts, "127.0.0.1"),
        "no-answer": (silent.getsockname()[1], server.client_key, server.known_hosts, "127.0.0.1"),
        "unknown-host": (22, server.client_key, server.known_hosts, "nosuchhost.invalid"),
        # A raw address, as launch_vast.py create --check reaches a new instance.
        "127.0.0.1": (server.port, server.client_key, server.known_hosts, "127.0.0.1"),
    }
    ssh_config = root / "ssh_config"
    ssh_config.write_text(
        "".join(
            f"Host {alias}\n    HostName {hostname}\n    Port {port}\n    User {server.user}\n"
            f"    IdentityFile {key}\n    IdentitiesOnly yes\n"
            f"    UserKnownHostsFile {known}\n    StrictHostKeyChecking yes\n    LogLevel ERROR\n"
            for alias, (port, key, known, hostname) in blocks.items()
        )
    )
    socket_name = f"remote-train-test-{os.getpid()}"
    with running_fake_vast() as fake:
        fake.instances[101].update(
            public_ipaddr="127.0.0.1",
            ports={"22/tcp": [{"HostIp": "0.0.0.0", "HostPort": str(server.port)}]},
        )
        env = sync_env(
            server,
            root / "manifests",
            SYNC_SSH_OPTS=f"-F {ssh_config}",
            VASTAI_API_KEY=API_KEY,
            VAST_URL=fake.url,
        )
        env.pop("VAST_API_KEY", None)
        env["OMP_NUM_THREADS"] = "1"  # tiny models on shared cores: far faster
        try:
            yield Host(
                server,
                fake,
                root,
                root / "host" / "gpu-train-kit",
                root / "laptop" / "outputs",
                ssh_config,
                env,
                socket_name,
            )
        finally:
            subprocess.run(["tmux", "-L", socket_name, "kill-server"], capture_output=True)
            stop_orphan_masters(ssh_config)
            silent.close()
            sshd.terminate()
            sshd.wait(10)


def stop_orphan_masters(ssh_config: Path) -> None:
    """The SSH master of a remote_train.py killed with SIGKILL outlives it (ControlPersist):
    stop the ones this module's processes started (found by its own ssh config path)."""
    import shutil

    for proc in Path("/proc").iterdir():
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        words = [word.decode(errors="replace") for word in argv]
        if words[:1] == ["ssh"] and "ControlMaster=yes" in words and str(ssh_config) in words:
            control = next((w for w in words if w.startswith("ControlPath=")), "")
            try:
                os.kill(int(proc.name), signal.SIGTERM)
            except (OSError, ValueError):
                pass
            if control:
                shutil.rmtree(Path(control.split("=", 1)[1]).parent, ignore_errors=True)


def socketserver_that_never_answers():
    import socket

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    return listener


def stage_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("[") and "] " in line]


def assert_stages_done(output: str, stages: list[str]) -> None:
    for stage in stages:
        assert f"[{stage}] done in " in output, output
    positions = [output.index(f"[{stage}] done in ") for stage in stages]
    assert positions == sorted(positions), output


@pytest.fixture(scope="module")
def first_loop(host: Host) -> subprocess.CompletedProcess:
    """The cold call: nothing on the host yet; two experiments, one after the other."""
    started = time.monotonic()
    result = host.run(
        EXPERIMENT,
        "run_name=loop-a",
        *TINY,
        "--also",
        EXPERIMENT,
        "run_name=loop-b",
        *TINY,
    )
    result.seconds = time.monotonic() - started  # type: ignore[attr-defined]
    return result


def test_whole_loop_then_a_warm_second_call(host: Host, first_loop) -> None:
    result = first_loop
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stderr == ""
    assert_stages_done(result.stdout, STAGE_ORDER)
    assert "started tmux session loop-a" in result.stdout
    # Every stage says when it starts and when it ends.
    for stage in STAGE_ORDER:
        assert sum(line.startswith(f"[{stage}] ") for line in stage_lines(result.stdout)) == 2
    assert "NO GPU on this host" in result.stdout  # the install stage says so
    for run in ("loop-a", "loop-b"):
        local, remote = host.local_dir / run, host.outputs / run
        assert (local / "final_model.pt").read_bytes() == (remote / "final_model.pt").read_bytes()
        log = (local / "remote_train.log").read_text()
        assert f"{run}: done (exit 0)" in log
        assert (local / "test_results.json").is_file()
    manifests = [read_manifest(p) for p in (host.root / "manifests").glob("*.json")]
    verified = {Path(m.remote_dir).name: m for m in manifests if m.verified}
    assert {"loop-a", "loop-b"} <= verified.keys()
    assert any(e.path == "final_model.pt" for e in verified["loop-a"].files)
    # The code went by rsync and no .git, outputs or caches with it.
    assert (host.remote_dir / "src" / "remote" / "agent.py").is_file()
    assert not (host.remote_dir / ".git").exists()
    # Vast.ai: the price and the stop command; nothing stopped or destroyed.
    assert "costs $0.800/h" in result.stdout
    assert "python scripts/launch_vast.py stop 101" in result.stdout
    assert host.fake.count("DELETE") == 0 and host.fake.count("PUT") == 0


def test_also_runs_in_order_in_one_session(host: Host, first_loop) -> None:
    registry = host.registry()
    session = json.loads((registry / "loop-a.json").read_text())
    assert [run["run_name"] for run in session["runs"]] == ["loop-a", "loop-b"]
    first_end = json.loads((registry / "loop-a.0.exit").read_text())
    second_start = json.loads((registry / "loop-a.1.start").read_text())
    assert first_end["exit_code"] == 0 and first_end["finished_at"] <= second_start["started_at"]
    out = first_loop.stdout
    assert out.index("loop-a: done (exit 0)") < out.index("starting run 'loop-b'")


def test_kill_local_mid_run_then_attach(host: Host, first_loop) -> None:
    """The laptop side is SIGKILLed while its run is going; the run goes on in tmux, a second
    start attaches instead of starting a copy, and --attach follows it to the end.

    The experiment is paused (SIGSTOP) as soon as it is spawned, so that a tiny run can't end
    before the laptop-side steps are done, however fast the machine is; --attach then
    follows all of its training."""
    args = [EXPERIMENT, "run_name=longrun", *TINY]
    first = host.start(*args)
    pid = host.experiment_pid("longrun", first)
    os.kill(pid, signal.SIGSTOP)
    try:
        first.wait_for("[remote_train] ")  # the run's own output reached the laptop
        # A second call: only changed code is sent, and the stamped install is skipped fast.
        sent = int(first.output.split("[sync] done in ")[1].split(": ")[1].split(" files")[0])
        assert sent < 10, first.output  # the first call sent the whole repo
        install_end = first.output.split("[install] done in ")[1].splitlines()[0]
        assert "already installed" in install_end and float(install_end.split(" s")[0]) < 3.0

        first.kill_group(signal.SIGKILL)  # the laptop side dies, its ssh with it
        assert first.finish() == -signal.SIGKILL
        assert "longrun" in host.tmux_sessions()
        os.kill(pid, 0)  # the experiment lives on

        status = host.run("--status")
        assert status.returncode == 0, status.stderr
        rows = {line.split()[1]: line for line in status.stdout.splitlines() if "│" in line}
        assert "running" in rows["longrun"] and "done" in rows["loop-a"], status.stdout

        monitor = host.run("--monitor")
        assert monitor.returncode == 0 and "longrun (running" in monitor.stdout, monitor.stdout

        # The same command again: attaches instead of starting a copy. Ctrl-C detaches.
        again = host.start(*args)
        again.wait_for("following it instead of starting a copy")
        again.kill_group(signal.SIGINT)
        assert again.finish() == 130
        assert "detached: training goes on" in again.output
        assert "--attach longrun" in again.output
        assert host.tmux_sessions() >= {"longrun"}

        attach = host.start("--attach", "longrun")
        attach.wait_for("[train] following run 'longrun'")
    finally:
        os.kill(pid, signal.SIGCONT)
    assert attach.finish() == 0, attach.output
    assert_stages_done(attach.output, ["connect", "train", "retrieve", "verify"])
    # Paused before it trained: everything the trainer printed came through --attach.
    assert "[trainer] starting run 'longrun'" in attach.output.split("following run")[1]
    assert "run 'longrun': done (exit 0)" in attach.output
    local = host.local_dir / "longrun"
    log = (local / "remote_train.log").read_text()
    assert log.count("[trainer] starting run 'longrun'") == 1  # one process trained it
    assert "longrun: done (exit 0)" in log
    assert (local / "final_model.pt").read_bytes() == (
        host.outputs / "longrun" / "final_model.pt"
    ).read_bytes()
    assert len(list(host.registry().glob("longrun*.json"))) == 1


@pytest.mark.parametrize(
    ("alias", "expected"),
    [
        ("wrong-port", "connection refused by [127.0.0.1]:"),
        ("wrong-key", "authentication failed at [127.0.0.1]:"),
        ("new-host-key", "changed (a new instance at a reused address?)"),
        ("unknown-host", "unknown host unknown-host"),
        ("no-answer", "timed out connecting to [127.0.0.1]:"),
    ],
)
def test_connection_errors_are_one_line_and_destroy_nothing(
    host: Host, alias: str, expected: str
) -> None:
    result = host.run(
        EXPERIMENT,
        *TINY,
        "--destroy-after",
        host=alias,
        SYNC_SSH_OPTS=f"-F {host.ssh_config} -o ConnectTimeout=1",
    )
    assert result.returncode == 10, result.stdout + result.stderr
    assert result.stderr.startswith("remote_train: connect failed: ")
    assert expected in result.stderr and result.stderr.count("\n") == 1, result.stderr
    assert "[connect] failed in" in result.stdout and "[sync]" not in result.stdout
    assert host.fake.count("DELETE") == 0


def test_install_failure_names_install(host: Host, first_loop) -> None:
    fake_pip = host.root / "host" / "python-without-pip"
    fake_pip.write_text(
        "#!/bin/sh\n"
        'if [ "$1" = -m ] && [ "$2" = pip ]; then\n'
        "  echo 'ERROR: No matching distribution found for omegaconf>=2.3' >&2; exit 1\nfi\n"
        f'exec {sys.executable} "$@"\n'
    )
    fake_pip.chmod(0o755)
    result = host.run(EXPERIMENT, *TINY, "--destroy-after", python=str(fake_pip))
    assert result.returncode == 12, result.stdout + result.stderr
    assert result.stderr.startswith("remote_train: install failed: ")
    assert "No matching distribution" in result.stderr and result.stderr.count("\n") == 1
    assert "[train]" not in result.stdout and host.fake.count("DELETE") == 0


def test_check_prints_the_verdict_before_training(host: Host, first_loop) -> None:
    result = host.run(EXPERIMENT, "run_name=checked", *TINY, "--check", "--no-install")
    assert result.returncode == 0, result.stdout + result.stderr
    assert_stages_done(result.stdout, ["connect", "sync", "check", "train", "retrieve", "verify"])
    out = result.stdout
    assert f"[check] {host.python} scripts/check_instance.py --quick" in out
    assert out.index("disk write:") < out.index("[train] ")
    assert "[check] done in" in out and "no GPU here: measured the disk" in out


def test_check_alone_measures_the_machine_and_trains_nothing(host: Host, first_loop) -> None:
    result = host.run("--check", "--no-install")
    assert result.returncode == 0, result.stdout + result.stderr
    assert_stages_done(result.stdout, ["connect", "sync", "check"])
    assert "[train]" not in result.stdout and "[retrieve]" not in result.stdout
    assert "testhost passed the check; nothing was trained" in result.stdout


@pytest.mark.parametrize("floor", [None, "0.5"], ids=["check", "floor"])
def test_launch_vast_create_check_measures_the_new_instance(
    host: Host, first_loop, floor: str | None
) -> None:
    """create --check: the offer is rented, waited for, then synced, installed and measured
    through remote_train; a floor the (GPU-less) machine misses names the destroy command."""
    host.fake.created_ports = {"22/tcp": [{"HostIp": "0.0.0.0", "HostPort": str(host.server.port)}]}
    host.fake.created_ip = "127.0.0.1"
    check_args = shlex.join(["--no-install", *host.common()])
    result = subprocess.run(
        [
            sys.executable,
            str(REPO_ROOT / "scripts" / "launch_vast.py"),
            *("--retries", "1"),
            "create",
            "9002",
            *("--poll-interval", "0.01"),
            "--check",
            f"--check-args={check_args}",
            *(["--min-gpu-efficiency", floor] if floor else []),
        ],
        env=host.env,
        cwd=host.root,
        capture_output=True,
        text=True,
        timeout=120,
    )
    out = result.stdout
    assert "is running" in out and "checking instance " in out, out + result.stderr
    assert "[check] done in" in out or "[check] failed in" in out, out + result.stderr
    assert API_KEY not in out + result.stderr
    if floor is None:
        assert result.returncode == 0, out + result.stderr
        assert "passed the check; nothing was trained" in out
    else:
        assert result.returncode == 4, out + result.stderr
        assert "check failed: not training on root@127.0.0.1: no GPU here" in result.stderr
        assert "nothing needs downloading: release it with python scripts/launch_vast.py " in (
            result.stderr
        )
    assert host.fake.count("DELETE") == 0


def test_min_gpu_efficiency_refuses_a_machine_without_a_gpu(host: Host, first_loop) -> None:
    result = host.run(
        EXPERIMENT, "run_name=refused", *TINY, "--min-gpu-efficiency", "0.8", "--destroy-after"
    )
    assert result.returncode == 18, result.stdout + result.stderr
    assert result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith(
        "remote_train: check failed: not training on testhost: no GPU here, and "
        "--min-gpu-efficiency needs one; nothing has trained there, so nothing needs "
        "downloading: release it with python scripts/launch_vast.py destroy 101"
    )
    assert "[train]" not in result.stdout and host.fake.count("DELETE") == 0
    assert not (host.outputs / "refused").exists()


def test_crash_is_reported_retrieved_and_destroys_nothing(host: Host, first_loop) -> None:
    running = host.start(
        EXPERIMENT, "run_name=crashing", "trainer.max_steps=100000", "--destroy-after"
    )
    os.kill(host.experiment_pid("crashing", running), signal.SIGKILL)  # as the OOM killer would
    assert running.finish() == 13, running.output
    assert "crashed (killed by SIGKILL: out of memory?)" in running.output
    assert "last lines of" in running.output and "| [remote_train] " in running.output
    assert "remote_train: train failed: run 'crashing' crashed" in running.output
    assert_stages_done(running.output, ["retrieve", "verify"])  # a crash still comes home
    assert "crashed" in (host.local_dir / "crashing" / "remote_train.log").read_text()
    assert "[shutdown]" not in running.output and host.fake.count("DELETE") == 0


def test_ctrl_c_in_the_tmux_pane_interrupts_and_refuses_destroy(host: Host, first_loop) -> None:
    running = host.start(
        EXPERIMENT, "run_name=paned", "trainer.max_steps=100000", "--destroy-after"
    )
    running.wait_for("[trainer] starting run 'paned'")
    # Someone attached to the session and pressed Ctrl-C: the runner forwards it, the trainer
    # saves a checkpoint and exits 75, and the runner records that.
    subprocess.run(["tmux", "-L", host.socket, "send-keys", "-t", "paned", "C-c"], check=True)
    assert running.finish() == 16, running.output
    assert "run 'paned': interrupted (exit 75)" in running.output
    assert_stages_done(running.output, ["train", "retrieve", "verify"])
    assert "shutdown failed: not destroying instance 101: run 'paned' interrupted" in (
        running.output
    )
    assert host.fake.count("DELETE") == 0
    checkpoints = list((host.local_dir / "paned" / "checkpoints").glob("step_*.pt"))
    assert checkpoints, "the stop checkpoint came home"


def test_retrieve_failure_names_retrieve(host: Host, first_loop) -> None:
    link = host.outputs / "loop-a" / "latest.pt"
    link.symlink_to("checkpoints/step_gone.pt")  # a dangling link: rsync -L can't copy it
    try:
        result = host.run("--attach", "loop-a", "--destroy-after")
    finally:
        link.unlink()
    assert result.returncode == 14, result.stdout + result.stderr
    assert result.stderr.startswith("remote_train: retrieve failed: remote symlink ")
    assert "latest.pt points to nothing" in result.stderr and result.stderr.count("\n") == 1
    assert "[verify]" not in result.stdout and host.fake.count("DELETE") == 0


def test_stop_after(host: Host, first_loop) -> None:
    result = host.run("--attach", "loop-b", "--stop-after")
    assert result.returncode == 0, result.stdout + result.stderr
    assert_stages_done(result.stdout, ["connect", "train", "retrieve", "verify", "shutdown"])
    assert "stopped instance 101" in result.stdout
    # PUTs to instances (renting is a PUT to /asks/, which create --check tests do too)
    puts = [r for r in host.fake.requests if r.method == "PUT" and "/asks/" not in r.path]
    assert len(puts) == 1 and puts[0].body == {"state": "stopped"}
    host.fake.instances[101].update(actual_status="running", intended_status="running")


def test_export_failure_names_export_still_retrieves_and_destroys_nothing(
    host: Host, first_loop
) -> None:
    result = host.run(
        "--attach", "loop-a", "--destroy-after", "--export-onnx", "--export-args=--spec nosuch:fn"
    )
    assert result.returncode == 17, result.stdout + result.stderr
    assert result.stderr.startswith("remote_train: export failed: run 'loop-a': export.py")
    assert result.stderr.count("\n") == 1, result.stderr
    assert_stages_done(result.stdout, ["retrieve", "verify"])  # the run still comes home
    assert "the destroy is skipped: the export stage failed" in result.stdout
    assert "[shutdown]" not in result.stdout and host.fake.count("DELETE") == 0
    assert not (host.outputs / "loop-a" / "model.onnx").exists()  # nothing half-written


def test_export_onnx_on_the_host_comes_home_verified(host: Host, first_loop) -> None:
    result = host.run("--attach", "loop-b", "--export", "onnx")  # --export-onnx: the alias
    assert result.returncode == 0, result.stdout + result.stderr
    assert_stages_done(result.stdout, ["train", "export", "retrieve", "verify"])
    assert result.stdout.index("[export] done in") < result.stdout.index("[retrieve] done in")
    assert "2 run(s) exported" in result.stdout  # loop-b's tmux session holds loop-a too
    local, remote = host.local_dir / "loop-b", host.outputs / "loop-b"
    assert (local / "model.onnx").read_bytes() == (remote / "model.onnx").read_bytes()
    meta = json.loads((local / "model.onnx.json").read_text())
    assert meta["sha256"] == hashlib.sha256((local / "model.onnx").read_bytes()).hexdigest()
    manifests = map(read_manifest, (host.root / "manifests").glob("*.json"))
    covering = [m for m in manifests if Path(m.remote_dir) == remote and m.verified]
    assert any(e.path == "model.onnx" for m in covering for e in m.files), "model.onnx unverified"
    assert "2 export(s) match their sidecars" in result.stdout  # both runs' model.onnx, home


def test_a_trl_experiment_trains_remotely_and_its_adapter_export_comes_home(
    host: Host, first_loop
) -> None:
    """A TRL SFTTrainer script through run_interruptible: the plan reads its own dev config,
    it trains in tmux, the adapter is exported on the host and comes home verified."""
    run = "trl-remote"
    result = host.run(
        "experiments/trl_sft_experiment.py",
        f"run_name={run}",
        "trainer.max_steps=4",
        "checkpoint.every_n_steps=2",
        "logging.tensorboard=false",
        "--export",
        "hf",
        timeout=240,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert_stages_done(result.stdout, ["train", "export", "retrieve", "verify"])
    local, remote = host.local_dir / run, host.outputs / run
    for name in (
        "final_adapter/adapter_model.safetensors",
        "export_hf/adapter/adapter_model.safetensors",
        "test_results.json",
        "checkpoint-4/checkpoint_record.json",
    ):
        assert (local / name).read_bytes() == (remote / name).read_bytes(), name
    assert json.loads((local / "test_results.json").read_text())["global_step"] == 4
    assert f"{run}: done (exit 0)" in (local / "remote_train.log").read_text()


def test_a_sweep_runs_detached_and_its_study_and_trials_come_home(host: Host, first_loop) -> None:
    """remote_train HOST scripts/sweep.py: one worker of the repo's example study in tmux,
    named after the sweep; the whole outputs root (the study beside its trials) comes home."""
    sweep = [
        "scripts/sweep.py",
        "--config",
        "configs/sweep_optuna.yaml",
        "sweep.name=remote-sweep",
        "sweep.n_trials=2",
        "sweep.overrides=[trainer.max_steps=6,data.num_samples=256,logging.tensorboard=false]",
    ]
    refused = host.run(*sweep, "--export", "onnx")
    assert refused.returncode != 0 and "--export exports experiment runs" in refused.stderr
    result = host.run(*sweep, timeout=240)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "started tmux session remote-sweep" in result.stdout
    assert_stages_done(result.stdout, ["train", "retrieve", "verify"])
    summary = Path("sweeps") / "remote-sweep" / "summary.json"
    trials = [f"remote-sweep_trial{n}/final_model.pt" for n in (0, 1)]
    for name in (summary, *trials):
        assert (host.local_dir / name).read_bytes() == (host.outputs / name).read_bytes(), name
    assert len(json.loads((host.local_dir / summary).read_text())["trials"]) == 2
    log = (host.local_dir / "sweeps" / "remote-sweep" / "remote_train.log").read_text()
    assert "remote-sweep: done (exit 0)" in log
    manifests = [read_manifest(p) for p in (host.root / "manifests").glob("*.json")]
    assert any(Path(m.remote_dir) == host.outputs and m.verified for m in manifests)


def test_destroy_only_after_a_verified_retrieve(host: Host, first_loop) -> None:
    saved = dict(host.fake.instances[101])
    local = host.root / "laptop" / "all-outputs"
    result = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            "testhost",
            "--attach",
            "loop-a",
            "--destroy-after",
            *host.common(local),
        ],
        env=host.env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    try:
        assert result.returncode == 0, result.stdout + result.stderr
        out = result.stdout
        assert out.index("[verify] done in") < out.index("[shutdown] destroy Vast.ai instance 101")
        assert "destroyed instance 101" in out
        assert host.fake.count("DELETE") == 1 and 101 not in host.fake.instances
        # What the gate saw: the whole outputs root, verified, at home.
        manifest = next(
            m
            for m in map(read_manifest, (host.root / "manifests").glob("*.json"))
            if Path(m.remote_dir) == host.outputs
        )
        assert manifest.verified and (local / "loop-a" / "final_model.pt").is_file()
    finally:
        host.fake.instances[101] = saved


def test_verify_all_catches_what_the_hash_cache_cannot_see(host: Host, tmp_path: Path) -> None:
    remote, local, manifests = tmp_path / "remote", tmp_path / "local", tmp_path / "manifests"
    make_tree(remote, {"run/ckpt.pt": 300_000, "run/log.txt": 4_000})
    env = sync_env(host.server, manifests)
    assert run_sync(host.server, local, remote, env).returncode == 0
    again = run_sync(host.server, local, remote, env)
    assert again.returncode == 0 and ", 0 hashed;" in again.stdout  # all from the cache

    ckpt = local / "run" / "ckpt.pt"

    def rot_in_place(byte: int) -> None:
        before = ckpt.stat()
        with open(ckpt, "r+b") as handle:  # same inode, same size
            handle.seek(1000)
            handle.write(bytes([byte]))
        os.utime(ckpt, ns=(before.st_atime_ns, before.st_mtime_ns))  # mtime forced back

    def sync_verify_all() -> subprocess.CompletedProcess:
        script = REPO_ROOT / "scripts" / "sync_outputs.sh"
        where = [str(host.server.port), host.server.target, str(local), str(remote)]
        command = [str(script), "-q", "--verify-all", "-p", *where]
        return subprocess.run(command, env=env, capture_output=True, text=True)

    original = ckpt.read_bytes()[1000]
    rot_in_place(original ^ 0xFF)
    # ctime moved, so even the cached verify re-reads it; --verify-all of course too.
    assert run_sync(host.server, local, remote, env).returncode == 12
    result = sync_verify_all()
    assert result.returncode == 12 and "run/ckpt.pt: sha256 differs" in result.stderr

    rot_in_place(original)
    assert run_sync(host.server, local, remote, env).returncode == 0
    # Rot no stat can see (the disk changed the bytes under an identical stat): forge that by
    # giving the cache the file's current stat key after the change.
    rot_in_place(original ^ 0x0F)
    (manifest_file,) = manifests.glob("*.json")
    cache_file = hash_cache_path(manifest_file)
    cache = json.loads(cache_file.read_text())
    cache["local"]["run/ckpt.pt"][0] = local_stat_key(ckpt.stat())
    cache_file.write_text(json.dumps(cache))
    trusted = run_sync(host.server, local, remote, env)
    assert trusted.returncode == 0, trusted.stderr  # the cache is trusted: its stated limit
    result = sync_verify_all()
    assert result.returncode == 12 and "run/ckpt.pt: sha256 differs" in result.stderr
    assert not read_manifest(manifest_file).verified


def test_code_sync_sends_the_code_and_nothing_else(host: Host, tmp_path: Path) -> None:
    from src.remote.code_sync import push_code

    repo = tmp_path / "repo"
    for relative in (
        "src/model.py",
        "experiments/x.py",
        ".env.example",
        "data/env/keep.txt",
        ".env",
        ".git/HEAD",
        ".venv/bin/python",
        "src/__pycache__/model.cpython-311.pyc",
        "outputs/run/final_model.pt",
        "checkpoints/step_1.pt",
        "wandb/run/log",
        ".deps-installed-requirements",
    ):
        (repo / relative).parent.mkdir(parents=True, exist_ok=True)
        (repo / relative).write_text("x")
    options = ["-F", str(host.ssh_config)]
    for with_env, target in ((False, tmp_path / "host-a"), (True, tmp_path / "host-b")):
        with SshSession("testhost", None, options) as session:
            session.start()
            stats = push_code(session, repo, str(target / "code"), with_env=with_env)
        sent = sorted(
            p.relative_to(target / "code").as_posix()
            for p in (target / "code").rglob("*")
            if p.is_file()
        )
        expected = ["data/env/keep.txt", ".env.example", "experiments/x.py", "src/model.py"]
        assert sent == sorted(expected + ([".env"] if with_env else [])), sent
        assert stats.files_transferred == len(sent)


def test_bad_input_is_one_line_before_connecting(capsys: pytest.CaptureFixture[str]) -> None:
    cases = [
        (["h"], "give an experiment"),
        (["h", "experiments/nope.py"], "experiments/nope.py not found"),
        (["h", EXPERIMENT, "max_steps"], "'max_steps' is not key=value"),
        (["h", "--status", EXPERIMENT], "give an experiment"),
        (["h", EXPERIMENT, "--also"], "--also needs an experiment file"),
        (["h", "--also", EXPERIMENT], "--also runs after a first experiment"),
        (["h", "/etc/hostname"], "outside the repo"),
        (["h", EXPERIMENT, "--export-args=--int8"], "--export-args goes with --export FORMAT"),
        (["h", "--status", "--export-onnx"], "--export goes with a run or --attach"),
        (["h", EXPERIMENT, "--export", "tflite"], "--export tflite: no such export format"),
        (["h", EXPERIMENT, "--export-onnx", "--export-args=--spec 'x"], "--export-args: "),
        (["h", EXPERIMENT, "--export", "hf", "--export-args=--gguf-type q4"], "hf: argument "),
        (["h", EXPERIMENT, "--min-gpu-efficiency", "1.5"], "must be in (0, 1], got 1.5"),
        (["h", "--status", "--check"], "--check / --min-gpu-efficiency go with a run"),
        (["h", "--attach", "x", "--check"], "--check / --min-gpu-efficiency go with a run"),
        (["h", EXPERIMENT, "--provider", "runpod"], "--provider and --machine go together"),
        (["h", EXPERIMENT, "--pod", "abc"], "--provider and --machine go together"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, (argv, err)
    main_argv, groups = split_also(["h", "a.py", "x=1", "--also", "b.py", "y=2", "--no-install"])
    assert main_argv == ["h", "a.py", "x=1", "--no-install"] and groups == [["b.py", "y=2"]]


def test_report_words_for_each_ending(capsys: pytest.CaptureFixture[str]) -> None:
    from src.remote.args import parse_args
    from src.remote.pipeline import Outcome, RemoteTrain
    from src.remote.runs import describe_exit, exit_code_of
    from src.remote.stages import StageReporter

    assert exit_code_of(-signal.SIGKILL) == (137, "SIGKILL")
    assert describe_exit(137, "SIGKILL") == "crashed (killed by SIGKILL: out of memory?)"
    args, experiments = parse_args(["h", EXPERIMENT])
    train = RemoteTrain(args, experiments, {}, StageReporter())

    def state(code: int) -> dict:
        return {
            "run_name": f"r{code}",
            "run_dir": "/x",
            "state": "finished",
            "exit_code": code,
            "outcome": describe_exit(code),
            "tail": ["Traceback", "RuntimeError: boom"],
        }

    for code, interrupted, failure in ((0, False, None), (75, True, None), (76, False, None)):
        outcome = Outcome([state(code)])
        train.report(outcome)
        assert (outcome.interrupted, outcome.failure) == (interrupted, failure)
    outcome = Outcome([state(1)])
    train.report(outcome)
    assert outcome.failure and "r1' crashed (exit 1)" in outcome.failure
    out = capsys.readouterr().out
    assert "run 'r76': stopped (budget reached) (exit 76)" in out
    assert "  | RuntimeError: boom" in out and "resumes it" in out


def test_config_path_with_a_space_is_the_experiments_own() -> None:
    """``--config PATH`` (space-separated) reaches the experiment, not the key=value check."""
    from src.remote.args import parse_args

    for form in (["--config", "configs/dev_config.yaml"], ["--config=configs/dev_config.yaml"]):
        _, experiments = parse_args(["h", EXPERIMENT, *form, "seed=3"])
        assert experiments[0].args == [*form, "seed=3"]
        _, experiments = parse_args(["h", EXPERIMENT, "--also", EXPERIMENT, *form, "seed=3"])
        assert experiments[1].args == [*form, "seed=3"]


def test_the_plan_keeps_a_run_name_as_typed_and_reads_a_sweep_file() -> None:
    from src.remote.plan import plan_run

    plan = plan_run(EXPERIMENT, ["run_name=off", "paths.output_dir=/tmp/x"], REPO_ROOT)
    assert (plan["run_name"], plan["run_dir"]) == ("off", "/tmp/x/off")  # not YAML's False
    assert plan["retrieve"] == plan["run_dir"]
    args = ["--config", "configs/sweep_optuna.yaml", "sweep.output_dir=/tmp/x"]
    plan = plan_run("scripts/sweep.py", args, REPO_ROOT)
    assert plan["run_name"] == "optuna-example"
    assert plan["run_dir"] == "/tmp/x/sweeps/optuna-example" and plan["retrieve"] == "/tmp/x"
