"""scripts/launch_vast.py end to end against the local fake Vast.ai server (no mocks)."""

from __future__ import annotations

import json
import os
import pty
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from src.cloud.vast import cli
from tests.support.fake_vast_server import API_KEY, Canned, FakeVast, running_fake_vast
from tests.support.sshd import free_port

REPO_ROOT = Path(__file__).resolve().parents[1]
FAST = ["--retries", "3", "--retry-delay", "0.01"]


@pytest.fixture
def vast_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[FakeVast]:
    with running_fake_vast() as fake:
        monkeypatch.setenv("VASTAI_API_KEY", API_KEY)
        monkeypatch.setenv("VAST_URL", fake.url)
        monkeypatch.setenv("SYNC_MANIFEST_DIR", str(tmp_path / "manifests"))
        monkeypatch.setenv("SYNC_DOTENV", str(tmp_path / "no.env"))  # not the developer's .env
        yield fake


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = cli.main([*FAST, *argv])
    out, err = capsys.readouterr()
    assert API_KEY not in out and API_KEY not in err  # the key never shows
    return code, out, err


def test_status_shows_active_instances_with_ssh_commands(vast_env: FakeVast, capsys) -> None:
    code, out, _ = run_cli(capsys, "status")
    assert code == 0
    assert "train-a" in out and "train-b" in out and "old-run" not in out
    assert "ssh -p 20022 root@203.0.113.7 -L 8080:localhost:6006" in out  # direct
    assert "ssh -p 31101 root@ssh5.vast.ai -L 8080:localhost:6006" in out  # proxy too
    assert "provisioning" in out and "RTX 4090 x 2" in out
    assert "1 instance(s) not running (stopped, exited or offline) hidden" in out


def test_status_all_includes_stopped_without_an_ssh_command(vast_env: FakeVast, capsys) -> None:
    vast_env.instances[102]["actual_status"] = "exited"
    code, out, _ = run_cli(capsys, "status", "--all")
    assert code == 0 and "old-run" in out and "stopped" in out and "exited" in out
    assert "(not running)" in out
    assert "31103" not in out and "31102" not in out  # nothing to copy that cannot connect
    assert "ssh -p 20022 root@203.0.113.7" in out  # the running one keeps its command
    code, out, _ = run_cli(capsys, "status")
    assert "2 instance(s) not running" in out


def test_status_json(vast_env: FakeVast, capsys) -> None:
    code, out, _ = run_cli(capsys, "status", "--all", "--json")
    rows = {row["id"]: row for row in json.loads(out)}
    assert code == 0 and sorted(rows) == [101, 102, 103, 104]
    assert [s["kind"] for s in rows[101]["ssh"]] == ["direct", "proxy"]
    assert rows[101]["ssh"][0]["command"].endswith("-L 8080:localhost:6006")
    assert rows[102]["ssh"][0]["kind"] == "proxy"  # loading: no ports yet
    assert rows[104]["ssh"] == [] and rows[104]["dph_total"] is None
    assert rows[101]["cost_so_far_usd"] > 0


@pytest.mark.parametrize("status", [410, 200])
def test_status_retired_endpoint_never_looks_empty(vast_env: FakeVast, capsys, status) -> None:
    vast_env.failures.append(Canned(status, {"success": False, "error": "deprecated_endpoint"}))
    code, out, err = run_cli(capsys, "status")
    assert code == 1 and out == ""
    assert "retired" in err and err.count("\n") == 1


@pytest.mark.parametrize("status", [401, 403, 404])
def test_status_auth_errors(vast_env: FakeVast, capsys, status) -> None:
    vast_env.failures.append(Canned(status, {"success": False, "error": "auth_error"}))
    code, out, err = run_cli(capsys, "status")
    assert code == 1 and out == "" and "API key was refused" in err and err.count("\n") == 1
    assert len(vast_env.requests) == 1


def test_status_429_then_success(vast_env: FakeVast, capsys) -> None:
    vast_env.failures.append(Canned(429, "Too Many Requests"))
    code, out, _ = run_cli(capsys, "status")
    assert code == 0 and "train-a" in out


def test_status_500_forever_is_bounded(vast_env: FakeVast, capsys) -> None:
    vast_env.failures.append(Canned(500, {"success": False, "error": "boom"}, times=None))
    code, _, err = run_cli(capsys, "status")
    assert code == 1 and "after 3 attempts" in err and err.count("\n") == 1
    assert len(vast_env.requests) == 3


def test_status_connection_refused_and_timeout(vast_env: FakeVast, capsys, monkeypatch) -> None:
    vast_env.failures.append(Canned(200, {"instances": []}, delay_s=0.5, times=None))
    code, out, err = run_cli(capsys, "--http-timeout", "0.1", "status")
    assert code == 1 and out == "" and "no answer" in err and err.count("\n") == 1
    monkeypatch.setenv("VAST_URL", f"http://127.0.0.1:{free_port()}")  # bound, closed: refused
    code, out, err = run_cli(capsys, "status")
    assert code == 1 and out == "" and "cannot reach" in err and err.count("\n") == 1


def test_wrong_key_in_environment_is_never_printed(vast_env: FakeVast, capsys, monkeypatch) -> None:
    wrong = "leaky-key-9a8b7c6d5e4f"
    monkeypatch.setenv("VASTAI_API_KEY", wrong)
    code = cli.main([*FAST, "status"])
    out, err = capsys.readouterr()
    assert code == 1 and wrong not in out + err and "refused" in err


def test_search_query_and_price_order(vast_env: FakeVast, capsys) -> None:
    code, out, _ = run_cli(
        capsys,
        "search",
        "--gpu",
        "RTX 4090",
        "--max-price",
        "0.6",
        "--min-disk",
        "100",
        "--min-reliability",
        "0.95",
    )
    assert code == 0 and out.index("9002") < out.index("9001") < out.index("9003")
    query = vast_env.requests[-1].body
    assert query["gpu_name"] == {"eq": "RTX 4090"} and query["dph_total"] == {"lte": 0.6}
    assert query["disk_space"] == {"gte": 100.0} and query["reliability2"] == {"gte": 0.95}
    assert query["type"] == "on-demand" and query["order"] == [["dph_total", "asc"]]
    assert query["rentable"] == {"eq": True} and query["num_gpus"] == {"eq": 1}
    code, out, _ = run_cli(capsys, "search", "--interruptible", "--json")
    offers = json.loads(out)
    assert vast_env.requests[-1].body["type"] == "bid"
    assert [o["id"] for o in offers] == [9003, 9002, 9001]  # by min bid, not as served


def test_search_interruptible_max_price_filters_the_bid(vast_env: FakeVast, capsys) -> None:
    code, out, _ = run_cli(capsys, "search", "--interruptible", "--max-price", "0.25")
    query = vast_env.requests[-1].body
    assert code == 0 and query["min_bid"] == {"lte": 0.25} and "dph_total" not in query
    assert query["order"] == [["min_bid", "asc"]]
    assert "0.200" in out and "interruptible (min bid)" in out


@pytest.mark.parametrize(
    "flags,named",
    [
        (["--limit", "0"], "--limit 0 must be at least 1"),
        (["--max-price", "-0.5"], "--max-price -0.5 must be >= 0"),
        (["--num-gpus", "0"], "--num-gpus 0 must be at least 1"),
    ],
)
def test_search_rejects_bad_numbers(vast_env: FakeVast, capsys, flags, named) -> None:
    code, out, err = run_cli(capsys, "search", *flags)
    assert code == 2 and out == "" and named in err and err.count("\n") == 1
    assert vast_env.requests == []


def test_no_api_key_is_one_line_exit_2(vast_env: FakeVast, capsys, monkeypatch, tmp_path) -> None:
    for name in ("VASTAI_API_KEY", "VAST_API_KEY", "XDG_CONFIG_HOME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "empty-home"))  # no vastai CLI key file
    code, out, err = run_cli(capsys, "status")
    assert code == 2 and out == "" and err.count("\n") == 1
    assert "no Vast.ai API key" in err and "VASTAI_API_KEY" in err
    assert vast_env.requests == []


@pytest.mark.parametrize("bad_key", ["vast-kéy-123456", "vast-key\nsecond-line-9876"])
def test_unsendable_key_is_one_line_never_echoed(vast_env, capsys, monkeypatch, bad_key) -> None:
    monkeypatch.setenv("VASTAI_API_KEY", bad_key)
    code = cli.main([*FAST, "status"])
    out, err = capsys.readouterr()
    assert code == 2 and out == "" and err.count("\n") == 1
    assert "can't be sent in an HTTP header" in err and "stray characters" in err
    for part in bad_key.split("\n"):
        assert part not in out + err
    assert vast_env.requests == []


def test_create_wait_prints_ssh_command(vast_env: FakeVast, capsys) -> None:
    vast_env.created_ports = {"22/tcp": [{"HostIp": "0.0.0.0", "HostPort": "41000"}]}
    code, out, _ = run_cli(
        capsys, "create", "9002", "--disk", "100", "--wait", "--poll-interval", "0.01"
    )
    assert code == 0 and "on-demand" in out
    assert "ssh -p 41000 root@192.0.2.50 -L 8080:localhost:6006" in out
    assert "loading" in out  # progress was shown
    payload = [r for r in vast_env.requests if "/asks/" in r.path][0].body
    assert payload["runtype"] == "ssh_direc ssh_proxy" and payload["disk"] == 100.0
    assert "setup/install_deps.sh" in payload["onstart"] and "price" not in payload


def test_create_autostop_goes_into_the_onstart_environment(vast_env: FakeVast, capsys) -> None:
    code, out, _ = run_cli(capsys, "create", "9002", "--autostop", "20")
    payload = [r for r in vast_env.requests if "/asks/" in r.path][0].body
    assert code == 0 and payload["env"] == {"GPU_TRAIN_KIT_AUTOSTOP_MINUTES": "20"}
    assert "scripts/autostop.py" in payload["onstart"]
    assert "stops itself after 20 idle minutes" in out
    vast_env.requests.clear()
    code, _, err = run_cli(capsys, "create", "9002", "--autostop", "0")
    assert code == 2 and "--autostop 0 must be minutes > 0" in err and err.count("\n") == 1
    assert vast_env.count("PUT") == 0


def test_onstart_script_starts_autostop_with_the_minutes(tmp_path: Path) -> None:
    """The real setup/onstart.sh under bash, with a stand-in repo that records what runs."""
    repo = tmp_path / "repo"
    (repo / "setup").mkdir(parents=True)
    (repo / "scripts").mkdir()
    (repo / "setup" / "install_deps.sh").write_text('echo deps >> "$0.ran"\n')
    record = tmp_path / "autostop-args"
    (repo / "scripts" / "autostop.py").write_text(
        f"import sys; open({str(record)!r}, 'w').write(' '.join(sys.argv[1:]))\n"
    )
    env = {**os.environ, "GPU_TRAIN_KIT_DIR": str(repo), "GPU_TRAIN_KIT_AUTOSTOP_MINUTES": "15"}
    subprocess.run(["bash", str(REPO_ROOT / "setup" / "onstart.sh")], env=env, check=True)
    deadline = time.monotonic() + 10
    while not record.exists() and time.monotonic() < deadline:  # it runs detached
        time.sleep(0.05)
    assert record.read_text() == "--idle-minutes 15"
    assert (repo / "setup" / "install_deps.sh.ran").read_text() == "deps\n"


def test_create_bid_says_interruptible(vast_env: FakeVast, capsys) -> None:
    code, out, _ = run_cli(capsys, "create", "9001", "--bid", "0.25")
    payload = [r for r in vast_env.requests if "/asks/" in r.path][0].body
    assert code == 0 and payload["price"] == 0.25 and "interruptible" in out


def test_create_wait_gives_up_with_a_clear_line(vast_env: FakeVast, capsys) -> None:
    vast_env.polls_until_running = 10_000
    code, _, err = run_cli(
        capsys, "create", "9002", "--wait", "--timeout", "0.2", "--poll-interval", "0.05"
    )
    assert code == 1 and "not running with SSH after 0.2 s" in err and err.count("\n") == 1


@pytest.mark.parametrize(
    "canned",
    [
        Canned(
            200, {"success": True, "new_contract": 777}, delay_s=0.5, path_prefix="/api/v0/asks/"
        ),
        Canned(502, "Bad Gateway", path_prefix="/api/v0/asks/"),
    ],
    ids=["read-timeout", "http-502"],
)
def test_create_is_never_retried_when_it_may_have_rented(vast_env, capsys, canned) -> None:
    vast_env.failures.append(canned)
    code, out, err = run_cli(capsys, "--http-timeout", "0.2", "create", "9002")
    assert code == 1 and out == "" and err.count("\n") == 1
    assert "may have gone through" in err and "launch_vast.py status" in err
    assert vast_env.count("PUT", "/api/v0/asks/") == 1  # exactly one rental attempt


def test_create_429_is_retried(vast_env: FakeVast, capsys) -> None:
    vast_env.failures.append(Canned(429, "slow down", path_prefix="/api/v0/asks/"))
    code, out, _ = run_cli(capsys, "create", "9002")
    assert code == 0 and "created instance 500" in out
    assert vast_env.count("PUT", "/api/v0/asks/") == 2


def test_create_rejects_bad_disk(vast_env: FakeVast, capsys) -> None:
    code, _, err = run_cli(capsys, "create", "9002", "--disk", "0")
    assert code == 2 and "--disk" in err and vast_env.count("PUT") == 0


def test_stop_and_start(vast_env: FakeVast, capsys) -> None:
    assert run_cli(capsys, "stop", "101")[0] == 0
    assert vast_env.requests[-1].body == {"state": "stopped"}
    assert run_cli(capsys, "start", "101")[0] == 0
    assert vast_env.requests[-1].body == {"state": "running"}


def test_destroy_refused_without_manifest_sends_no_delete(vast_env: FakeVast, capsys) -> None:
    code, _, err = run_cli(capsys, "destroy", "101")
    assert code == 3 and "no download manifest" in err and "sync_outputs.sh" in err
    assert vast_env.count("DELETE") == 0 and 101 in vast_env.instances


def test_destroy_force_without_terminal_refuses(vast_env: FakeVast, capsys, monkeypatch) -> None:
    read_end, write_end = os.pipe()
    os.close(write_end)
    with os.fdopen(read_end) as not_a_tty:
        monkeypatch.setattr(sys, "stdin", not_a_tty)
        code, _, err = run_cli(capsys, "destroy", "101", "--force")
    assert code == 3 and "needs a terminal" in err and vast_env.count("DELETE") == 0


@pytest.mark.parametrize("typed,deleted", [("101", True), ("102", False)])
def test_destroy_force_needs_the_typed_id(vast_env, capsys, monkeypatch, typed, deleted) -> None:
    master, slave = pty.openpty()
    os.write(master, f"{typed}\n".encode())
    with os.fdopen(slave) as terminal:
        monkeypatch.setattr(sys, "stdin", terminal)
        code, _, _ = run_cli(capsys, "destroy", "101", "--force")
    os.close(master)
    assert (code == 0) is deleted
    assert vast_env.count("DELETE") == (1 if deleted else 0)


def test_destroy_unknown_instance(vast_env: FakeVast, capsys) -> None:
    code, _, err = run_cli(capsys, "destroy", "999")
    assert code == 1 and "not found" in err and vast_env.count("DELETE") == 0


def test_script_runs_as_a_subprocess(vast_env: FakeVast) -> None:
    result = subprocess.run(
        [sys.executable, "scripts/launch_vast.py", *FAST, "status", "--json"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert {row["id"] for row in json.loads(result.stdout)} == {101, 102, 104}
    assert API_KEY not in result.stdout + result.stderr
