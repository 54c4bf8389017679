"""scripts/autostop.py as it runs on an instance: a real process, the stand-in NVML module
switched between busy and idle phases, real run locks, the local fake Vast.ai API."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from src.cloud.autostop import Check, IdleWatch, busy_reason, watch
from src.runs.lock import acquire_run_lock, held_run_locks
from src.utils.gpu_monitor import GpuStats
from tests.support.fake_vast_server import API_KEY, FakeVast, running_fake_vast
from tests.support.nvml_state import FAKE_NVML_DIR, gpu, write_state

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPT = REPO_ROOT / "scripts" / "autostop.py"
INSTANCE = 101  # running in the fake server's sample data


@pytest.fixture
def vast() -> Iterator[FakeVast]:
    with running_fake_vast() as fake:
        yield fake


def autostop_env(vast: FakeVast, state: Path, on_vast: bool = True) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VAST", "CONTAINER"))}
    env.update(
        PYTHONPATH=f"{FAKE_NVML_DIR}{os.pathsep}{REPO_ROOT}",
        FAKE_NVML_STATE=str(state),
        VASTAI_API_KEY=API_KEY,
        VAST_URL=vast.url,
        PYTHONUNBUFFERED="1",
        HOME=str(state.parent),  # no ~/.vast_api_key of the machine running the tests
    )
    if on_vast:
        env["CONTAINER_ID"] = str(INSTANCE)
    return env


def start_autostop(
    env: dict[str, str], outputs: Path, *extra: str, log: Path | None = None
) -> subprocess.Popen:
    args = ["--idle-minutes", "0.01", "--interval", "0.05", "--outputs", str(outputs), *extra]
    return subprocess.Popen(
        [sys.executable, str(SCRIPT), *args],
        env=env,
        stdout=log.open("w") if log else subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for_line(log: Path, text: str, process: subprocess.Popen, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while text not in log.read_text():
        assert process.poll() is None, f"autostop ended: {log.read_text()}"
        assert time.monotonic() < deadline, f"no {text!r} in {log.read_text()}"
        time.sleep(0.05)


def stop_requests(vast: FakeVast) -> list:
    return [r for r in vast.requests if r.method == "PUT" and r.path.startswith("/api/v0/inst")]


def test_stops_only_after_the_idle_window_never_under_a_run_lock_never_deletes(
    vast: FakeVast, tmp_path: Path
) -> None:
    state, outputs = tmp_path / "nvml.json", tmp_path / "outputs"
    outputs.mkdir()
    write_state(state, [gpu(util=97, procs=(4242,))])  # training
    log = tmp_path / "autostop.log"
    process = start_autostop(autostop_env(vast, state), outputs, log=log)
    try:
        wait_for_line(log, "busy: GPU 0 has 1 compute process", process)
        time.sleep(1.0)  # 20 checks, each busy; the idle window is 0.6 s
        assert process.poll() is None and stop_requests(vast) == []

        lock = acquire_run_lock(outputs / "my-run")  # a run between steps: no GPU process
        write_state(state, [gpu(util=0)])
        wait_for_line(log, "busy: run lock held by a live process (my-run)", process)
        time.sleep(1.0)
        assert process.poll() is None and stop_requests(vast) == [], "stopped under a run lock"

        lock.release()  # the run ended; the GPU is idle from now on
        _, err = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
    out = log.read_text()
    assert process.returncode == 0, err
    assert [r.body for r in stop_requests(vast)] == [{"state": "stopped"}]
    assert stop_requests(vast)[0].path == f"/api/v0/instances/{INSTANCE}/"
    assert vast.count("DELETE") == 0
    assert vast.instances[INSTANCE]["actual_status"] == "stopped"
    lines = out.splitlines()
    assert "idle: no GPU work and no run lock" in lines[-2], out
    assert lines[-1] == f"autostop: stopped instance {INSTANCE}: GPU released, disk kept"
    assert API_KEY not in out + err


def test_dry_run_says_what_it_would_do_and_stops_nothing(vast: FakeVast, tmp_path: Path) -> None:
    state, outputs = tmp_path / "nvml.json", tmp_path / "outputs"
    outputs.mkdir()
    write_state(state, [gpu(util=0)])
    process = start_autostop(autostop_env(vast, state), outputs, "--dry-run")
    out, err = process.communicate(timeout=30)
    assert process.returncode == 0, err
    assert f"would stop instance {INSTANCE} now" in out
    assert vast.requests == []


@pytest.mark.parametrize(
    ("on_vast", "no_driver", "expected"),
    [
        (False, False, "not on a Vast.ai instance"),
        (True, True, "cannot read the GPUs (Driver Not Loaded)"),
    ],
)
def test_cannot_work_here_is_one_line_and_exit_2(
    vast: FakeVast, tmp_path: Path, on_vast: bool, no_driver: bool, expected: str
) -> None:
    state = tmp_path / "nvml.json"
    write_state(state, [gpu(util=0)], no_driver=no_driver)
    process = start_autostop(autostop_env(vast, state, on_vast=on_vast), tmp_path)
    out, err = process.communicate(timeout=30)
    assert process.returncode == 2
    assert err.count("\n") == 1 and expected in err, err
    assert vast.requests == []


def test_held_run_locks_sees_only_live_holders(tmp_path: Path) -> None:
    live = acquire_run_lock(tmp_path / "live")
    acquire_run_lock(tmp_path / "ended").release()  # a lock file whose holder is gone
    try:
        assert held_run_locks(tmp_path) == [tmp_path / "live"]
    finally:
        live.release()
    assert held_run_locks(tmp_path) == []


def test_watch_restarts_the_window_on_any_busy_check_and_retries_a_failed_stop() -> None:
    now = [0.0]
    checks = iter([None, None, "GPU 0 at 80% utilization", None, None, None, None, None])
    stops: list[float] = []

    def stop() -> None:
        stops.append(now[0])
        if len(stops) == 1:
            raise RuntimeError("Vast.ai API PUT: 503 Service Unavailable")

    echoed: list[str] = []
    watch(
        25.0,
        lambda: Check(next(checks)),
        stop,
        interval_s=10.0,
        echo=echoed.append,
        clock=lambda: now[0],
        sleep=lambda s: now.__setitem__(0, now[0] + s),
    )
    # idle at 0 and 10, busy at 20, idle again from 30: due at 60, retried at 70
    assert stops == [60.0, 70.0]
    assert any("stop failed (Vast.ai API PUT: 503" in line for line in echoed)
    watcher = IdleWatch(5.0, clock=lambda: 0.0)
    assert not watcher.expired(watcher.observe(Check("busy")))


def test_busy_reason() -> None:
    def stats(util: float | None, procs: int | None) -> GpuStats:
        return GpuStats(0, "H100", util, 1.0, 80.0, 40.0, 70.0, procs)

    assert busy_reason([stats(2, 0)], [], 5) is None
    assert busy_reason([stats(None, None)], [], 5) is None  # nothing reported: not busy
    assert busy_reason([stats(50, 0)], [], 5) == "GPU 0 at 50% utilization"
    assert busy_reason([stats(0, 3)], [], 5) == "GPU 0 has 3 compute process(es)"
    assert "run lock" in str(busy_reason([stats(0, 0)], [Path("/o/run")], 5))
