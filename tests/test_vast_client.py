"""The Vast.ai client against a real local HTTP server: shapes, pagination, errors, retries."""

from __future__ import annotations

import logging
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from src.cloud.provider import CredentialsMissing, Provider
from src.cloud.registry import hourly_rate_here, provider_of_this_machine
from src.cloud.retry import RetryPolicy
from src.cloud.vast.client import (
    VastAuthError,
    VastClient,
    VastError,
    VastKeyError,
    find_api_key,
    resolve_base_url,
)
from src.cloud.vast.environment import instance_id_from_env
from src.cloud.vast.instances import ssh_addresses, view_of
from src.cloud.vast.provider import VastProvider
from tests.support.fake_vast_server import API_KEY, NOW, Canned, FakeVast, running_fake_vast

FAST = RetryPolicy(attempts=3, base_delay=0.01, max_delay=0.02)


@pytest.fixture
def vast() -> Iterator[FakeVast]:
    with running_fake_vast() as fake:
        yield fake


def client_for(fake: FakeVast, **kwargs) -> VastClient:
    kwargs.setdefault("retry", FAST)
    return VastClient(API_KEY, fake.url, **kwargs)


def test_pagination_follows_next_token_until_null(vast: FakeVast) -> None:
    with client_for(vast) as client:
        instances = client.list_instances()
    assert [i["id"] for i in instances] == [101, 102, 103, 104]
    listing = [r for r in vast.requests if r.path == "/api/v1/instances/"]
    assert len(listing) == 2  # page size 2 on the server
    assert "after_token" not in listing[0].query
    assert listing[1].query["after_token"] == ["102"]
    assert all(r.headers["Authorization"] == f"Bearer {API_KEY}" for r in listing)
    assert all(API_KEY not in r.path and API_KEY not in str(r.query) for r in vast.requests)


def test_limit_is_capped_at_25(vast: FakeVast) -> None:
    with client_for(vast) as client:
        list(client.iter_instances(page_limit=100))
    assert vast.requests[0].query["limit"] == ["25"]


@pytest.mark.parametrize("status", [410, 200])
def test_retired_listing_is_an_error_not_an_empty_list(vast: FakeVast, status: int) -> None:
    vast.failures.append(
        Canned(status, {"success": False, "error": "deprecated_endpoint", "msg": "gone"})
    )
    with client_for(vast) as client, pytest.raises(VastError) as raised:
        client.list_instances()
    assert "retired" in str(raised.value) and "not an empty list" in str(raised.value)


def test_old_v0_listing_endpoint_answers_retired(vast: FakeVast) -> None:
    with client_for(vast) as client, pytest.raises(VastError, match="retired"):
        client.request("GET", "/api/v0/instances/", params={"owner": "me"})


def test_success_false_with_http_200_raises(vast: FakeVast) -> None:
    vast.failures.append(Canned(200, {"success": False, "error": "insufficient_credit"}))
    with client_for(vast) as client, pytest.raises(VastError, match="insufficient_credit"):
        client.current_user()


def test_listing_without_instances_key_is_not_zero_instances(vast: FakeVast) -> None:
    vast.failures.append(Canned(200, {"success": True}))
    with client_for(vast) as client, pytest.raises(VastError, match="no 'instances' list"):
        client.list_instances()


@pytest.mark.parametrize(
    "status,body",
    [
        (401, {"success": False, "error": "auth_error", "msg": "Invalid user key"}),
        (403, {"success": False, "error": "auth_error"}),
        (404, {"success": False, "error": "auth_error", "msg": "no user"}),
    ],
)
def test_auth_errors_are_not_retried(vast: FakeVast, status: int, body: dict) -> None:
    vast.failures.append(Canned(status, body))
    with client_for(vast) as client, pytest.raises(VastAuthError) as raised:
        client.list_instances()
    assert "API key was refused" in str(raised.value) and "VASTAI_API_KEY" in str(raised.value)
    assert len(vast.requests) == 1


def test_wrong_key_is_refused_and_never_echoed(vast: FakeVast) -> None:
    wrong = "wrong-key-0123456789abcdef"
    with VastClient(wrong, vast.url, retry=FAST) as client:
        with pytest.raises(VastAuthError) as raised:
            client.list_instances()
    assert wrong not in str(raised.value)


def test_429_with_text_body_then_success(vast: FakeVast) -> None:
    vast.failures.append(Canned(429, "Too Many Requests", times=2))
    delays: list[float] = []
    with client_for(vast, sleep=delays.append) as client:
        assert len(client.list_instances()) == 4
    assert len(delays) == 2 and delays == sorted(delays)


def test_retry_after_header_is_honoured_but_capped(vast: FakeVast) -> None:
    vast.failures.append(Canned(429, "slow down", headers={"Retry-After": "3600"}))
    delays: list[float] = []
    policy = RetryPolicy(attempts=3, base_delay=0.01, max_delay=0.5)
    with client_for(vast, sleep=delays.append, retry=policy) as client:
        client.current_user()
    assert delays == [0.5]


def test_500_forever_gives_up_after_bounded_attempts(vast: FakeVast) -> None:
    vast.failures.append(Canned(500, {"error": "boom"}, times=None))
    delays: list[float] = []
    policy = RetryPolicy(attempts=4, base_delay=1.0, max_delay=3.0)
    with client_for(vast, sleep=delays.append, retry=policy) as client:
        with pytest.raises(VastError) as raised:
            client.list_instances()
    assert "HTTP 500" in str(raised.value) and "after 4 attempts" in str(raised.value)
    assert len(vast.requests) == 4
    assert delays == [1.0, 2.0, 3.0]  # doubling, capped


def test_connection_refused_is_one_line_after_retries() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed again: nothing listens there
    with VastClient(API_KEY, f"http://127.0.0.1:{port}", retry=FAST) as client:
        with pytest.raises(VastError) as raised:
            client.list_instances()
    message = str(raised.value)
    assert "cannot reach" in message and "after 3 attempts" in message and "\n" not in message


def test_timeout_is_retried_then_reported(vast: FakeVast) -> None:
    vast.failures.append(Canned(200, {"instances": []}, delay_s=0.6, times=None))
    with client_for(vast, timeout=0.2) as client, pytest.raises(VastError) as raised:
        client.list_instances()
    assert "no answer" in str(raised.value) and "after 3 attempts" in str(raised.value)


def test_get_instance_missing_fields_and_unknown_id(vast: FakeVast) -> None:
    with client_for(vast) as client:
        sparse = client.get_instance(104)
        assert view_of(sparse).status == "loading" and ssh_addresses(sparse) == []
        with pytest.raises(VastError, match="not found"):
            client.get_instance(999)


def test_search_create_destroy_and_state_shapes(vast: FakeVast) -> None:
    with client_for(vast) as client:
        assert [o["id"] for o in client.search_offers({"limit": 3})] == [9001, 9002, 9003]
        new_id = client.create_instance(9002, {"client_id": "me", "image": "x", "disk": 10})
        client.set_state(101, "stopped")
        client.destroy_instance(103)
    assert new_id in vast.instances and 103 not in vast.instances
    assert vast.instances[101]["intended_status"] == "stopped"
    put = [r for r in vast.requests if r.method == "PUT" and "asks" in r.path][0]
    assert put.path == "/api/v0/asks/9002/" and put.body["client_id"] == "me"


def test_create_without_new_contract_is_an_error(vast: FakeVast) -> None:
    vast.failures.append(Canned(200, {"success": True}))
    with client_for(vast) as client, pytest.raises(VastError, match="new_contract"):
        client.create_instance(9001, {})


@pytest.mark.parametrize(
    "canned",
    [
        Canned(200, {"success": True, "new_contract": 1}, delay_s=0.5, times=None),
        Canned(500, {"error": "boom"}, times=None),
        Canned(503, "unavailable", times=None),
    ],
    ids=["timeout", "500", "503"],
)
def test_create_is_sent_once_when_it_may_have_gone_through(vast: FakeVast, canned) -> None:
    vast.failures.append(canned)
    with client_for(vast, timeout=0.2) as client, pytest.raises(VastError) as raised:
        client.create_instance(9002, {"client_id": "me"})
    message = str(raised.value)
    assert vast.count("PUT", "/api/v0/asks/") == 1
    assert "may have gone through" in message and "launch_vast.py status" in message
    assert "\n" not in message and API_KEY not in message


def test_create_is_retried_when_nothing_was_sent() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with VastClient(API_KEY, f"http://127.0.0.1:{port}", retry=FAST) as client:
        with pytest.raises(VastError) as raised:
            client.create_instance(9002, {})
    assert "cannot reach" in str(raised.value) and "after 3 attempts" in str(raised.value)


def test_idempotent_calls_still_retry_timeouts_and_5xx(vast: FakeVast) -> None:
    vast.failures.append(Canned(500, {"error": "boom"}, path_prefix="/api/v0/instances/101/"))
    with client_for(vast) as client:
        client.set_state(101, "stopped")  # PUT, but setting a state twice is harmless
    assert vast.count("PUT", "/api/v0/instances/101/") == 2


@pytest.mark.parametrize(
    "bad_key", ["kéy-0123456789", "key-0123\n456789", "key 0123456789", "\u200bkey0123"]
)
def test_unsendable_key_is_one_line_without_the_key(bad_key: str) -> None:
    with pytest.raises(VastKeyError) as raised:
        VastClient(bad_key, "http://127.0.0.1:1")
    message = str(raised.value)
    assert "can't be sent in an HTTP header" in message and "\n" not in message
    assert bad_key not in message and "0123" not in message


def test_key_never_in_debug_logs(vast: FakeVast, caplog: pytest.LogCaptureFixture) -> None:
    for name in ("httpx", "httpcore"):  # httpx logs each request at INFO, httpcore at DEBUG
        caplog.set_level(logging.DEBUG, logger=name)
    vast.failures.append(Canned(500, {"error": "boom"}, times=None, path_prefix="/api/v0/users"))
    with client_for(vast) as client:
        assert len(client.list_instances()) == 4
        with pytest.raises(VastError):
            client.current_user()
    with VastClient("wrong-key-abcdef123456", vast.url, retry=FAST) as client:
        with pytest.raises(VastAuthError):
            client.list_instances()
    logged = "\n".join(record.getMessage() for record in caplog.records)
    assert "HTTP Request" in logged and "send_request_headers" in logged  # both loggers spoke
    assert API_KEY not in logged and "wrong-key-abcdef123456" not in logged


def test_ssh_addresses_direct_first_then_proxy() -> None:
    instance = {
        "public_ipaddr": "203.0.113.7",
        "ports": {"22/tcp": [{"HostIp": "0.0.0.0", "HostPort": "20000"}]},
        "ssh_host": "ssh5.vast.ai",
        "ssh_port": 31101,
    }
    commands = [a.command() for a in ssh_addresses(instance)]
    assert commands == [
        "ssh -p 20000 root@203.0.113.7 -L 8080:localhost:6006",
        "ssh -p 31101 root@ssh5.vast.ai -L 8080:localhost:6006",
    ]
    assert [a.kind for a in ssh_addresses({"ssh_host": "h", "ssh_port": "9"})] == ["proxy"]
    assert ssh_addresses({"ports": None, "public_ipaddr": None}) == []


def test_view_uptime_and_cost() -> None:
    view = view_of(
        {
            "id": 1,
            "dph_total": 0.8,
            "start_date": NOW - 7200,
            "num_gpus": 2,
            "gpu_name": "RTX 4090",
            "actual_status": "running",
        },
        now=NOW,
    )
    assert view.uptime_s == 7200 and view.cost_so_far_usd == pytest.approx(1.6)
    assert view.table_row()[3] == "RTX 4090 x 2" and view.table_row()[5] == "2h00m"


def test_find_api_key_order(tmp_path: Path) -> None:
    dotenv = tmp_path / ".env"
    home = tmp_path / "home"
    (home / ".config" / "vastai").mkdir(parents=True)
    assert find_api_key({}, dotenv, home) is None
    (home / ".vast_api_key").write_text("legacy-key\n")
    assert find_api_key({}, dotenv, home) == "legacy-key"
    (home / ".config" / "vastai" / "vast_api_key").write_text("cli-key\n")
    assert find_api_key({}, dotenv, home) == "cli-key"
    xdg = tmp_path / "xdg"
    (xdg / "vastai").mkdir(parents=True)
    (xdg / "vastai" / "vast_api_key").write_text("xdg-key\n")
    assert find_api_key({"XDG_CONFIG_HOME": str(xdg)}, dotenv, home) == "xdg-key"
    dotenv.write_text("VASTAI_API_KEY=dotenv-key\n")
    assert find_api_key({}, dotenv, home) == "dotenv-key"
    assert find_api_key({"VAST_API_KEY": "cli-env-key"}, dotenv, home) == "cli-env-key"
    both = {"VASTAI_API_KEY": "env-key", "VAST_API_KEY": "cli-env-key"}
    assert find_api_key(both, dotenv, home) == "env-key"


def test_find_api_key_reads_sync_dotenv(tmp_path: Path) -> None:
    other = tmp_path / "other.env"
    other.write_text("VASTAI_API_KEY=from-other-env\n")
    home = tmp_path / "home"
    assert find_api_key({"SYNC_DOTENV": str(other)}, home=home) == "from-other-env"
    assert find_api_key({"SYNC_DOTENV": str(tmp_path / "none.env")}, home=home) is None


def test_base_url_override() -> None:
    assert resolve_base_url(None, {}) == "https://console.vast.ai"
    assert resolve_base_url(None, {"VAST_URL": "http://127.0.0.1:9/"}) == "http://127.0.0.1:9"
    assert resolve_base_url("http://x", {"VAST_URL": "http://y"}) == "http://x"


def test_hourly_rate_configured_wins(vast: FakeVast) -> None:
    env = {"CONTAINER_ID": "101", "VASTAI_API_KEY": API_KEY, "VAST_URL": vast.url}
    assert hourly_rate_here(2.5, environ=env) == 2.5
    assert vast.requests == []


def test_hourly_rate_from_the_instance(vast: FakeVast) -> None:
    env = {"CONTAINER_ID": "101", "VASTAI_API_KEY": API_KEY, "VAST_URL": vast.url}
    assert hourly_rate_here(None, environ=env) == 0.8
    assert instance_id_from_env({"VAST_CONTAINERLABEL": "C.777"}) == 777


def test_hourly_rate_in_a_container_from_the_process_environment(
    vast: FakeVast, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """As the trainer calls it: no environ argument, the container's own key and id."""
    for name in ("VASTAI_API_KEY", "VAST_API_KEY", "XDG_CONFIG_HOME", "VAST_CONTAINERLABEL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("SYNC_DOTENV", str(tmp_path / "no.env"))
    monkeypatch.setenv("CONTAINER_ID", "102")
    monkeypatch.setenv("CONTAINER_API_KEY", API_KEY)
    monkeypatch.setenv("VAST_URL", vast.url)
    assert hourly_rate_here(None) == 1.2
    (request,) = vast.requests
    assert request.path == "/api/v0/instances/102/"
    assert request.headers["Authorization"] == f"Bearer {API_KEY}"


def test_hourly_rate_off_vast_is_none_without_calls(vast: FakeVast) -> None:
    assert hourly_rate_here(None, environ={"VAST_URL": vast.url}) is None
    assert vast.requests == []


def test_hourly_rate_failure_prints_one_line_and_never_raises(
    vast: FakeVast, capsys: pytest.CaptureFixture[str]
) -> None:
    vast.failures.append(Canned(500, "down", times=None))
    env = {"CONTAINER_ID": "101", "VASTAI_API_KEY": API_KEY, "VAST_URL": vast.url}
    assert hourly_rate_here(None, environ=env, timeout_s=1.0) is None
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cost.hourly_rate_usd" in err and API_KEY not in err


def test_the_provider_of_this_machine_comes_from_the_environment(
    vast: FakeVast,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))  # no vastai CLI key file of this machine
    no_key = {"SYNC_DOTENV": str(tmp_path / "no.env")}
    assert provider_of_this_machine(no_key) is None  # off Vast.ai: no provider, no calls
    here: Provider | None = provider_of_this_machine(
        {"CONTAINER_ID": "101", "CONTAINER_API_KEY": API_KEY, "VAST_URL": vast.url}
    )
    assert isinstance(here, VastProvider) and here.this_machine_id == "101"
    assert here.hourly_rate("101") == 0.8
    with pytest.raises(CredentialsMissing, match="on Vast.ai instance 101 but no API key"):
        provider_of_this_machine({**no_key, "CONTAINER_ID": "101"})
    assert hourly_rate_here(None, environ={**no_key, "CONTAINER_ID": "101"}) is None
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no API key" in err and "cost.hourly_rate_usd" in err
