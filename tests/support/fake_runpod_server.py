"""A local stand-in for rest.runpod.io/v1 (and the one GraphQL read): real HTTP on 127.0.0.1,
the shapes of RunPod's REST reference.

Pods are plain dicts the test can edit (``desiredStatus`` RUNNING/EXITED/TERMINATED,
``costPerHr`` as the string the reference shows, ``publicIp`` + ``portMappings`` {"22": port}
while running). ``failures`` queues canned answers (429 then success, 500 forever, slow
answers); every request is recorded. Errors answer ``{"error": ..., "status": N}``.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

API_KEY = "rpa_TESTKEY7f3c9a1e7d2b4c68ABCDEF"


def iso(seconds_ago: float) -> str:
    moment = datetime.fromtimestamp(time.time() - seconds_ago, tz=UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


@dataclass
class Canned:
    status: int
    body: Any
    headers: dict[str, str] = field(default_factory=dict)
    delay_s: float = 0.0
    method: str = ""  # only this method ("" any)
    path_prefix: str = ""
    times: int | None = 1  # None: forever


@dataclass
class Recorded:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    body: Any


def gpu(type_id: str, name: str, count: int, secure: float, community: float) -> dict[str, Any]:
    return {
        "id": type_id,
        "count": count,
        "displayName": name,
        "securePrice": secure,
        "communityPrice": community,
        "secureSpotPrice": round(secure * 0.5, 2),
        "communitySpotPrice": round(community * 0.5, 2),
    }


def sample_pods() -> dict[str, dict[str, Any]]:
    """Running with SSH, running without a public port, stopped (EXITED)."""
    return {
        "abc123xyz": {
            "id": "abc123xyz",
            "name": "train-a",
            "desiredStatus": "RUNNING",
            "costPerHr": "0.74",
            "adjustedCostPerHr": 0.74,
            "gpu": gpu("NVIDIA GeForce RTX 4090", "RTX 4090", 2, 0.37, 0.34),
            "containerDiskInGb": 30,
            "volumeInGb": 100,
            "volumeMountPath": "/workspace",
            "interruptible": False,
            "lastStartedAt": iso(2 * 3600),
            "publicIp": "203.0.113.7",
            "portMappings": {"22": 10341},
            "ports": ["22/tcp", "8888/http"],
            "machineId": "s194cr8pls2z",
            "machine": {"diskThroughputMBps": 1800, "maxDownloadSpeedMbps": 900},
            "image": "runpod/pytorch:2.4.0-py3.11-cuda12.4.1-devel-ubuntu22.04",
            "env": {},
        },
        "noport456": {
            "id": "noport456",
            "name": "http-only",
            "desiredStatus": "RUNNING",
            "costPerHr": "1.19",
            "gpu": gpu("NVIDIA A100 80GB PCIe", "A100 PCIe", 1, 1.19, 1.19),
            "containerDiskInGb": 20,
            "volumeInGb": 50,
            "interruptible": True,
            "lastStartedAt": iso(600),
            "publicIp": "",
            "portMappings": {},
            "ports": ["8888/http"],
        },
        "stopped789": {
            "id": "stopped789",
            "name": "old-run",
            "desiredStatus": "EXITED",
            "costPerHr": "0.44",
            "gpu": gpu("NVIDIA RTX A5000", "RTX A5000", 1, 0.27, 0.16),
            "containerDiskInGb": 20,
            "volumeInGb": 80,
            "interruptible": False,
            "lastStartedAt": iso(86400),
            "publicIp": None,
            "portMappings": None,
        },
    }


GPU_TYPES = [  # served unsorted: a client that forgets to sort shows it
    {
        "id": "NVIDIA H100 80GB HBM3",
        "displayName": "H100 SXM",
        "memoryInGb": 80,
        "secureCloud": True,
        "communityCloud": True,
        "securePrice": 2.99,
        "communityPrice": 2.69,
        "secureSpotPrice": 1.75,
        "communitySpotPrice": 1.45,
    },
    {
        "id": "NVIDIA GeForce RTX 4090",
        "displayName": "RTX 4090",
        "memoryInGb": 24,
        "secureCloud": True,
        "communityCloud": True,
        "securePrice": 0.69,
        "communityPrice": 0.34,
        "secureSpotPrice": 0.35,
        "communitySpotPrice": 0.2,
    },
    {
        "id": "NVIDIA RTX A5000",
        "displayName": "RTX A5000",
        "memoryInGb": 24,
        "secureCloud": False,
        "communityCloud": True,
        "securePrice": 0,
        "communityPrice": 0.16,
        "secureSpotPrice": 0,
        "communitySpotPrice": 0.11,
    },
]


class FakeRunPod:
    def __init__(self) -> None:
        self.api_key = API_KEY
        self.pods: dict[str, dict[str, Any]] = sample_pods()
        self.gpu_types = [dict(t) for t in GPU_TYPES]
        self.failures: list[Canned] = []
        self.requests: list[Recorded] = []
        self.polls_until_running = 2
        self.new_pod_ssh: tuple[str, int] = ("192.0.2.50", 40022)
        self.next_id = 1
        self.lock = threading.Lock()
        self.server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        assert self.server is not None
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}/v1"

    @property
    def graphql_url(self) -> str:
        return self.url.removesuffix("/v1") + "/graphql"

    def count(self, method: str, path_prefix: str = "") -> int:
        return sum(
            1 for r in self.requests if r.method == method and r.path.startswith(path_prefix)
        )

    def handle(self, method: str, path: str, query: dict, body: Any) -> tuple[int, Any]:
        if path == "/graphql" and method == "POST":
            if "gpuTypes" not in str((body or {}).get("query")):
                return 200, {"errors": [{"message": "unsupported query"}]}
            return 200, {"data": {"gpuTypes": [dict(t) for t in self.gpu_types]}}
        parts = [p for p in path.split("/") if p]
        if parts[:2] != ["v1", "pods"]:
            return 404, {"error": "not found", "status": 404}
        if len(parts) == 2:
            if method == "GET":
                return 200, [self._public(p) for p in self.pods.values()]
            if method == "POST":
                return self._create(body or {})
        pod_id = parts[2] if len(parts) > 2 else ""
        pod = self.pods.get(pod_id)
        if pod is None:
            return 404, {"error": "pod not found", "status": 404}
        if len(parts) == 3 and method == "GET":
            return 200, self._advance(pod, "includeMachine" in query)
        if len(parts) == 3 and method == "DELETE":
            del self.pods[pod_id]
            return 200, None
        if len(parts) == 4 and method == "POST" and parts[3] in ("stop", "start"):
            running = parts[3] == "start"
            pod["desiredStatus"] = "RUNNING" if running else "EXITED"
            if not running:
                pod["publicIp"], pod["portMappings"] = None, None
            return 200, None
        return 404, {"error": "not found", "status": 404}

    def _create(self, body: dict[str, Any]) -> tuple[int, Any]:
        if not body.get("imageName") or not body.get("gpuTypeIds"):
            return 400, {"error": "imageName and gpuTypeIds are required", "status": 400}
        known = {t["id"]: t for t in self.gpu_types}
        type_id = body["gpuTypeIds"][0]
        if type_id not in known:
            return 400, {"error": f"invalid gpuTypeIds: {type_id}", "status": 400}
        price = known[type_id][
            "securePrice" if body.get("cloudType") != "COMMUNITY" else "communityPrice"
        ]
        pod_id = f"new{self.next_id:06d}"
        self.next_id += 1
        count = int(body.get("gpuCount") or 1)
        self.pods[pod_id] = {
            "id": pod_id,
            "name": body.get("name"),
            "desiredStatus": "RUNNING",
            "costPerHr": f"{price * count:.2f}",
            "gpu": {"id": type_id, "count": count, "displayName": known[type_id]["displayName"]},
            "containerDiskInGb": body.get("containerDiskInGb"),
            "volumeInGb": body.get("volumeInGb"),
            "volumeMountPath": body.get("volumeMountPath"),
            "interruptible": bool(body.get("interruptible")),
            "env": body.get("env") or {},
            "ports": body.get("ports") or [],
            "publicIp": None,
            "portMappings": None,
            "lastStartedAt": iso(0),
            "_polls": 0,
            "_body": body,
        }
        return 201, self._public(self.pods[pod_id])

    def _advance(self, pod: dict[str, Any], include_machine: bool) -> dict[str, Any]:
        if "_polls" in pod:
            pod["_polls"] += 1
            if pod["_polls"] >= self.polls_until_running and "22/tcp" in pod["ports"]:
                pod["publicIp"], port = self.new_pod_ssh
                pod["portMappings"] = {"22": port}
        shown = self._public(pod)
        if not include_machine:
            shown.pop("machine", None)
        return shown

    @staticmethod
    def _public(pod: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in pod.items() if not k.startswith("_")}


def _make_handler(fake: FakeRunPod) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: Any) -> None:
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
                    (
                        c
                        for c in fake.failures
                        if url.path.startswith(c.path_prefix) and c.method in ("", method)
                    ),
                    None,
                )
                if canned is not None and canned.times is not None:
                    canned.times -= 1
                    if canned.times <= 0:
                        fake.failures.remove(canned)
            headers: dict[str, str] = {}
            if canned is not None:
                if canned.delay_s:
                    time.sleep(canned.delay_s)
                status, payload, headers = canned.status, canned.body, dict(canned.headers)
            elif self.headers.get("Authorization") != f"Bearer {fake.api_key}":
                status, payload = 401, {"error": "Unauthorized", "status": 401}
            else:
                with fake.lock:
                    status, payload = fake.handle(method, url.path, query, body)
            data = b"" if payload is None else json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
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

        def do_POST(self) -> None:
            self._serve("POST")

        def do_DELETE(self) -> None:
            self._serve("DELETE")

    return Handler


@contextlib.contextmanager
def running_fake_runpod() -> Iterator[FakeRunPod]:
    fake = FakeRunPod()
    fake.server = ThreadingHTTPServer(("127.0.0.1", 0), _make_handler(fake))
    fake.server.daemon_threads = True
    threading.Thread(
        target=fake.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
    ).start()
    try:
        yield fake
    finally:
        fake.server.shutdown()
        fake.server.server_close()
