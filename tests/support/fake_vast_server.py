"""A local stand-in for console.vast.ai: real HTTP on 127.0.0.1, the documented JSON shapes.

State is plain dicts the test can edit; ``failures`` queues canned answers (status, body,
headers, delay) served before the normal handler, to script 429-then-success, 500 forever,
auth errors, the retired v0 listing, slow answers. Every request is recorded.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

API_KEY = "vast-test-key-5f3c9a1e7d2b4c68"
NOW = 1_750_000_000.0


@dataclass
class Canned:
    status: int
    body: Any  # dict -> JSON, str -> text/plain
    headers: dict[str, str] = field(default_factory=dict)
    delay_s: float = 0.0
    path_prefix: str = ""  # only requests whose path starts with this
    times: int | None = 1  # None: forever


@dataclass
class Recorded:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    body: Any
    at: float = field(default_factory=time.time)  # when it arrived


def sample_instances(ssh_port: int = 20022) -> dict[int, dict[str, Any]]:
    """Running (direct + proxy), loading (no ports), stopped, and one with most fields missing."""
    return {
        101: {
            "id": 101,
            "label": "train-a",
            "actual_status": "running",
            "intended_status": "running",
            "gpu_name": "RTX 4090",
            "num_gpus": 2,
            "gpu_ram": 24564,
            "dph_total": 0.8,
            "is_bid": False,
            "ssh_host": "ssh5.vast.ai",
            "ssh_port": 31101,
            "public_ipaddr": "203.0.113.7",
            "ports": {"22/tcp": [{"HostIp": "0.0.0.0", "HostPort": str(ssh_port)}]},
            "start_date": NOW - 2 * 3600,
            "disk_space": 100,
            "geolocation": "Norway, NO",
            "status_msg": "success, running pytorch",
            # The host's own claims (Vast.ai's units: GB/s, MB/s, Mb/s).
            "dlperf": 61.2,
            "pcie_bw": 24.6,
            "disk_bw": 2100.0,
            "inet_down": 850.0,
            "inet_up": 700.0,
        },
        102: {
            "id": 102,
            "label": "train-b",
            "actual_status": None,
            "intended_status": "running",
            "gpu_name": "A100 SXM4",
            "num_gpus": 1,
            "dph_total": 1.2,
            "is_bid": True,
            "ssh_host": "ssh2.vast.ai",
            "ssh_port": 31102,
            "public_ipaddr": "198.51.100.3",
            "start_date": None,
            "status_msg": "pulling image",
        },
        103: {
            "id": 103,
            "label": "old-run",
            "actual_status": "stopped",
            "intended_status": "stopped",
            "gpu_name": "RTX 3090",
            "num_gpus": 1,
            "dph_total": 0.05,
            "ssh_host": "ssh1.vast.ai",
            "ssh_port": 31103,
        },
        104: {"id": 104, "actual_status": "loading"},
    }


class FakeVast:
    def __init__(self) -> None:
        self.api_key = API_KEY
        self.instances: dict[int, dict[str, Any]] = sample_instances()
        # Served in this order, which is wrong both by dph_total (9002, 9001, 9003) and by
        # min_bid (9003, 9002, 9001): a client that forgets to sort shows it.
        self.offers: list[dict[str, Any]] = [
            {
                "id": 9001,
                "gpu_name": "RTX 4090",
                "num_gpus": 1,
                "dph_total": 0.55,
                "min_bid": 0.3,
                "disk_space": 200,
                "reliability2": 0.99,
                "geolocation": "US",
            },
            {
                "id": 9002,
                "gpu_name": "RTX 4090",
                "num_gpus": 1,
                "dph_total": 0.41,
                "min_bid": 0.25,
                "disk_space": 120,
                "reliability2": 0.97,
                "geolocation": "CA",
            },
            {
                "id": 9003,
                "gpu_name": "RTX 4090",
                "num_gpus": 1,
                "dph_total": 0.6,
                "min_bid": 0.2,
                "disk_space": 150,
                "reliability2": 0.98,
                "geolocation": "DE",
            },
        ]
        self.page_size = 2
        self.failures: list[Canned] = []
        self.requests: list[Recorded] = []
        self.polls_until_running = 2  # GETs of a new instance before it runs
        self.created_ports: dict[str, Any] | None = None
        self.created_ip = "192.0.2.50"  # a test points new instances at its own sshd
        self.next_id = 500
        self.rented: dict[int, int] = {}  # offer id -> the newest instance made from it
        self.lock = threading.Lock()
        self.server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        assert self.server is not None
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}"

    def count(self, method: str, path_prefix: str = "") -> int:
        return sum(
            1 for r in self.requests if r.method == method and r.path.startswith(path_prefix)
        )

    # -- request handling --------------------------------------------------------------

    def handle(self, method: str, path: str, query: dict, body: Any) -> tuple[int, Any, dict]:
        if path == "/api/v0/instances/" and method == "GET":
            # the retired listing: /api/v0/instances/?owner=me
            return 410, {"success": False, "error": "deprecated_endpoint", "msg": "use v1"}, {}
        if path == "/api/v1/instances/" and method == "GET":
            return 200, self._list_page(query), {}
        parts = [p for p in path.split("/") if p]
        if parts[:3] == ["api", "v0", "instances"] and len(parts) == 4:
            instance_id = int(parts[3])
            if instance_id not in self.instances:
                return 404, {"success": False, "error": "no_such_instance", "msg": "not found"}, {}
            if method == "GET":
                return 200, {"instances": self._advance(self.instances[instance_id])}, {}
            if method == "DELETE":
                del self.instances[instance_id]
                return 200, {"success": True}, {}
            if method == "PUT":
                state = (body or {}).get("state")
                self.instances[instance_id]["intended_status"] = state
                self.instances[instance_id]["actual_status"] = state
                return 200, {"success": True}, {}
        if path == "/api/v0/bundles/" and method == "POST":
            return 200, {"offers": [self._public(o) for o in self.offers]}, {}
        if parts[:3] == ["api", "v0", "asks"] and method == "PUT":
            new_id = self.next_id
            self.next_id += 1
            offer = next((o for o in self.offers if str(o["id"]) == parts[3]), {})
            self.instances[new_id] = {
                "id": new_id,
                "label": (body or {}).get("label"),
                "actual_status": None,
                "intended_status": "running",
                "gpu_name": "RTX 4090",
                "num_gpus": 1,
                "dph_total": 0.41,
                "is_bid": "price" in (body or {}),
                "ssh_host": "ssh9.vast.ai",
                "ssh_port": 39000,
                "public_ipaddr": self.created_ip,
                "_polls": 0,
                "status_msg": "queued",
            }
            if "_ssh_port" in offer:  # this offer's own machine: a port, or never one (None)
                port = offer["_ssh_port"]
                self.instances[new_id].update(
                    dph_total=offer.get("dph_total"),
                    _ports=None if port is None else {"22/tcp": [{"HostPort": str(port)}]},
                    _offer=offer["id"],
                )
                if port is None:  # not even the proxy: nothing answers SSH for it
                    self.instances[new_id].update(ssh_host=None, ssh_port=None)
                self.rented[offer["id"]] = new_id
            return 200, {"success": True, "new_contract": new_id}, {}
        if path == "/api/v0/users/current/":
            return 200, {"id": 1, "balance": 12.5, "email": "user@example.com"}, {}
        return 404, {"success": False, "error": "not_found", "msg": path}, {}

    def vanish(self, instance_id: int) -> None:
        """The host is gone: the API no longer knows the instance (404)."""
        with self.lock:
            self.instances.pop(instance_id, None)

    def instance_of_offer(self, offer_id: int) -> int | None:
        """The newest instance rented from ``offer_id`` (destroyed or not)."""
        with self.lock:
            return self.rented.get(offer_id)

    def _list_page(self, query: dict) -> dict[str, Any]:
        ids = sorted(self.instances)
        after = json.loads(query["after_token"][0]) if "after_token" in query else None
        if isinstance(after, str):
            after = int(after)
        limit = min(int(json.loads(query.get("limit", ["25"])[0])), self.page_size)
        remaining = [i for i in ids if after is None or i > after]
        page = remaining[:limit]
        more = len(remaining) > limit
        return {
            "instances": [self._public(self.instances[i]) for i in page],
            "next_token": str(page[-1]) if more else None,
        }

    def _advance(self, instance: dict[str, Any]) -> dict[str, Any]:
        if "_polls" in instance:
            instance["_polls"] += 1
            if instance["_polls"] >= self.polls_until_running:
                instance["actual_status"] = "running"
                instance["status_msg"] = "running"
                instance["start_date"] = time.time()
                ports = instance["_ports"] if "_ports" in instance else self.created_ports
                if ports is not None:
                    instance["ports"] = ports
            elif instance["_polls"] >= 1:
                instance["actual_status"] = "loading"
                instance["status_msg"] = "pulling image"
        return self._public(instance)

    @staticmethod
    def _public(instance: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in instance.items() if not k.startswith("_")}


def _make_handler(fake: FakeVast) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: Any) -> None:  # keep test output clean
            pass

        def _serve(self, method: str) -> None:
            url = urlsplit(self.path)
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            body = json.loads(raw) if raw else None
            query = parse_qs(url.query)
            with fake.lock:
                fake.requests.append(
                    Recorded(method, url.path, query, dict(self.headers.items()), body)
                )
                canned = next(
                    (c for c in fake.failures if url.path.startswith(c.path_prefix)), None
                )
                if canned is not None and canned.times is not None:
                    canned.times -= 1
                    if canned.times <= 0:
                        fake.failures.remove(canned)
            if canned is not None:
                if canned.delay_s:
                    time.sleep(canned.delay_s)
                status, payload, headers = canned.status, canned.body, dict(canned.headers)
            elif self.headers.get("Authorization") != f"Bearer {fake.api_key}":
                status, payload, headers = (
                    401,
                    {"success": False, "error": "auth_error", "msg": "Invalid user key"},
                    {},
                )
            else:
                with fake.lock:
                    status, payload, headers = fake.handle(method, url.path, query, body)
            data = (json.dumps(payload) if not isinstance(payload, str) else payload).encode()
            self.send_response(status)
            ctype = "text/plain" if isinstance(payload, str) else "application/json"
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(data)))
            for name, value in headers.items():
                self.send_header(name, value)
            self.end_headers()
            try:
                self.wfile.write(data)
            except (BrokenPipeError, ConnectionResetError):
                pass

        def do_GET(self) -> None:
            self._serve("GET")

        def do_PUT(self) -> None:
            self._serve("PUT")

        def do_POST(self) -> None:
            self._serve("POST")

        def do_DELETE(self) -> None:
            self._serve("DELETE")

    return Handler


def start_fake_vast() -> FakeVast:
    fake = FakeVast()
    fake.server = ThreadingHTTPServer(("127.0.0.1", 0), _make_handler(fake))
    fake.server.daemon_threads = True
    threading.Thread(
        target=fake.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
    ).start()
    return fake


@contextlib.contextmanager
def running_fake_vast() -> Iterator[FakeVast]:
    """Start the server; tests wrap this in their own fixture."""
    fake = start_fake_vast()
    try:
        yield fake
    finally:
        assert fake.server is not None
        fake.server.shutdown()
        fake.server.server_close()
