"""The shared runner with real subprocesses: failures, skipping, dry runs, slots, signals."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from src.common.signals import EXIT_INTERRUPTED
from src.sweeps.runner import Task, exit_code, format_table, run_tasks, summary_table

PY = sys.executable


def script_task(name: str, code: str, tmp_path: Path, **kwargs) -> Task:
    return Task(name, [PY, "-c", code], tmp_path / "logs" / f"{name}.log", **kwargs)


def test_failure_is_logged_and_the_rest_still_run(tmp_path: Path) -> None:
    tasks = [
        script_task("first", "print('one')", tmp_path),
        script_task(
            "broken", "import sys; print('bad input: x', file=sys.stderr); sys.exit(4)", tmp_path
        ),
        script_task("last", "print('three')", tmp_path),
    ]
    results = run_tasks(tasks, echo=lambda line: None)
    assert [r.status for r in results] == ["ok", "failed", "ok"]
    assert results[1].returncode == 4 and results[1].message == "bad input: x"
    assert "three" in (tmp_path / "logs" / "last.log").read_text()
    assert "bad input: x" in (tmp_path / "logs" / "broken.log").read_text()
    assert exit_code(results) == 1
    table = summary_table(results)
    assert re.search(r"broken\s+failed\s+4", table) and "bad input: x" in table


def test_done_tasks_are_skipped_and_not_started(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    task = script_task(
        "once", f"open({str(marker)!r}, 'a').write('x')", tmp_path, is_done=marker.exists
    )
    assert run_tasks([task], echo=lambda line: None)[0].status == "ok"
    again = run_tasks([task], echo=lambda line: None)
    assert again[0].status == "skipped" and marker.read_text() == "x"
    assert exit_code(again) == 0
    # Without skip_done (residual sweep without --skip-existing) it runs again.
    run_tasks([task], skip_done=False, echo=lambda line: None)
    assert marker.read_text() == "xx"


def test_dry_run_starts_nothing_and_writes_nothing(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    printed: list[str] = []
    task = script_task("dry", f"open({str(marker)!r}, 'w')", tmp_path, output="where/it/goes")
    results = run_tasks([task], dry_run=True, echo=printed.append)
    assert results[0].status == "dry-run"
    assert not marker.exists() and not (tmp_path / "logs").exists()
    assert any(str(marker) in line for line in printed) and "where/it/goes" in "".join(printed)


def test_slots_run_one_task_per_gpu_at_the_same_time(tmp_path: Path) -> None:
    code = (
        "import json, os, sys, time; start = time.time(); time.sleep(0.6); "
        "json.dump({'gpu': os.environ.get('CUDA_VISIBLE_DEVICES'), 'start': start, "
        f"'end': time.time()}}, open(os.path.join({str(tmp_path)!r}, sys.argv[1]), 'w'))"
    )
    tasks = [Task(n, [PY, "-c", code, n], tmp_path / f"{n}.log") for n in ("a", "b", "c")]
    results = run_tasks(tasks, slots=["0", "1"], echo=lambda line: None)
    assert [r.status for r in results] == ["ok"] * 3
    runs = {n: json.loads((tmp_path / n).read_text()) for n in ("a", "b", "c")}
    assert {runs["a"]["gpu"], runs["b"]["gpu"]} == {"0", "1"}
    assert runs["a"]["start"] < runs["b"]["end"] and runs["b"]["start"] < runs["a"]["end"]
    assert runs["c"]["start"] >= min(runs["a"]["end"], runs["b"]["end"])  # waited for a slot


DRIVER = Path(__file__).parent / "support" / "sweep_runner_driver.py"


def _runner_process(tmp_path: Path, child_code: str) -> subprocess.Popen:
    return subprocess.Popen(
        [PY, str(DRIVER), str(tmp_path), child_code, "first", "second"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


# The child: writes its pid, then waits for SIGTERM; on it records how many it got and exits 75.
CHILD = (
    "import os, signal, sys, time; from pathlib import Path\n"
    "d = Path(os.environ['SWEEP_TEST_DIR']); got = []\n"
    "signal.signal(signal.SIGTERM, lambda s, f: got.append(s))\n"
    "(d / (sys.argv[1] + '.pid')).write_text(str(os.getpid()))\n"
    "deadline = time.time() + 20\n"
    "while not got and time.time() < deadline: time.sleep(0.01)\n"
    "time.sleep(0.2); (d / (sys.argv[1] + '.signals')).write_text(str(len(got)))\n"
    "sys.exit(75 if got else 0)\n"
)


def _wait_for(path: Path, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.01)


def test_sigterm_to_the_sweep_group_reaches_the_child_once(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("SWEEP_TEST_DIR", str(tmp_path))
    runner = _runner_process(tmp_path, CHILD)
    _wait_for(tmp_path / "first.pid")
    os.killpg(runner.pid, signal.SIGTERM)  # what `docker stop` or a terminal does
    out, _ = runner.communicate(timeout=30)
    assert runner.returncode == EXIT_INTERRUPTED, out
    assert (tmp_path / "first.signals").read_text() == "1"  # forwarded once, not twice
    assert not (tmp_path / "second.pid").exists()  # no new task after the stop
    assert re.search(r"first\s+interrupted\s+75", out) and re.search(r"second\s+not-run", out)


def test_sigkill_of_the_runner_still_stops_the_child_gracefully(
    tmp_path: Path, monkeypatch
) -> None:
    monkeypatch.setenv("SWEEP_TEST_DIR", str(tmp_path))
    runner = _runner_process(tmp_path, CHILD)
    _wait_for(tmp_path / "first.pid")
    os.kill(runner.pid, signal.SIGKILL)
    runner.communicate(timeout=30)
    _wait_for(tmp_path / "first.signals")  # PR_SET_PDEATHSIG delivered SIGTERM to the orphan
    assert (tmp_path / "first.signals").read_text() == "1"


def test_format_table_aligns_columns() -> None:
    table = format_table([{"a": 1.23456, "b": None}, {"a": "long value", "b": 2}], ["a", "b"])
    assert table.splitlines() == [
        "a           b",
        "----------  -",
        "1.235       -",
        "long value  2",
    ]
