"""An httpx client for RunPod's REST API (``https://rest.runpod.io/v1``).

Why httpx and not the ``runpod`` package: that SDK is built around serverless workers and
pulls in aiohttp, boto3, fastapi and friends, which a training environment does not want;
the REST API is a handful of JSON calls, the same client style as ``src/cloud/vast``, and a
local HTTP server (``tests/support/fake_runpod_server.py``) tests it for real.

The facts used (RunPod's REST v1 reference): ``Authorization: Bearer KEY``; ``GET /pods``
answers a JSON array, ``GET /pods/{podId}`` one pod (``desiredStatus`` RUNNING, EXITED or
TERMINATED; ``costPerHr`` may be a string; ``publicIp`` and ``portMappings`` such as
``{"22": 10341}`` while running); ``POST /pods`` creates; ``POST /pods/{podId}/stop`` and
``/start``; ``DELETE /pods/{podId}`` terminates. GPU types and their prices are not in REST
v1: ``gpu_types`` asks the GraphQL API (``gpuTypes``), read-only.

Reads are retried with a bounded backoff on 429 and 5xx. Creating and terminating are not
retried blindly: after a timeout or 5xx the state is read first (a pod with the unique name
we gave it; the pod gone), because the first request may have gone through. The key lives
only in the request header: it is scrubbed from every error and never put in a URL.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import httpx

from src.cloud.api_client import (
    HEADER_SAFE_KEY,
    BearerApiClient,
    key_from_settings,
    resolve_url,
)
from src.cloud.provider import CloudError
from src.cloud.retry import GaveUp, MaybeSent, RetryPolicy

DEFAULT_BASE_URL = "https://rest.runpod.io/v1"
DEFAULT_GRAPHQL_URL = "https://api.runpod.io/graphql"
KEY_ENV = "RUNPOD_API_KEY"
URL_ENV = "RUNPOD_REST_URL"  # tests point these at 127.0.0.1
GRAPHQL_URL_ENV = "RUNPOD_GRAPHQL_URL"
NO_KEY_HINT = f"no RunPod API key: set {KEY_ENV} in the environment or .env"
GPU_TYPES_QUERY = (
    "query GpuTypes { gpuTypes { id displayName memoryInGb secureCloud communityCloud "
    "securePrice communityPrice secureSpotPrice communitySpotPrice } }"
)


class RunPodError(CloudError):
    """One line saying what failed and what to do; never contains the API key."""


class RunPodAuthError(RunPodError):
    """The key was refused (401/403) or is unusable as given."""


class RunPodNotFound(RunPodError):
    """The pod does not exist (any more)."""


class RunPodMaybeDone(RunPodError):
    """A create or terminate may have gone through: the state must be read before retrying."""


def find_api_key(
    environ: Mapping[str, str] | None = None, dotenv_path: Path | None = None
) -> str | None:
    """The key from the environment (a pod has its own injected), then ``.env``."""
    return key_from_settings((KEY_ENV,), KEY_ENV, environ, dotenv_path)


def _detail(body: Any) -> str:
    if isinstance(body, dict):
        parts = [str(body.get(k) or "") for k in ("error", "message")]
        return " ".join(p for p in parts if p)
    if isinstance(body, list) and body and isinstance(body[0], dict):  # some errors are lists
        return str(body[0].get("error") or body[0].get("message") or "")
    return ""


class RunPodClient(BearerApiClient):
    """Calls the API; every method returns parsed JSON or raises a one-line ``RunPodError``."""

    def __init__(
        self,
        api_key: str,
        base_url: str | None = None,
        graphql_url: str | None = None,
        timeout: float = 20.0,
        retry: RetryPolicy | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if not api_key:
            raise RunPodAuthError(NO_KEY_HINT)
        if not HEADER_SAFE_KEY.fullmatch(api_key):
            raise RunPodAuthError(
                f"{KEY_ENV} contains characters that can't be sent in an HTTP header: "
                "check for stray spaces, newlines or non-ASCII characters"
            )
        self.base_url = resolve_url(base_url, URL_ENV, DEFAULT_BASE_URL)
        self.graphql_url = resolve_url(graphql_url, GRAPHQL_URL_ENV, DEFAULT_GRAPHQL_URL)
        super().__init__(api_key, timeout=timeout, retry=retry, sleep=sleep)

    def request(
        self,
        method: str,
        path: str,
        params: Mapping[str, Any] | None = None,
        json_body: Any = None,
        idempotent: bool = True,
        url: str | None = None,
    ) -> Any:
        """One API call with retries. ``idempotent=False``: a timeout, a broken connection or
        a 5xx raises ``RunPodMaybeDone`` at once (only "no connection" and 429 are retried)."""
        target = url or f"{self.base_url}{path}"
        what = f"{method} {path}"
        try:
            response = self._send(
                method,
                target,
                where=target,
                params=params,
                json_body=json_body,
                idempotent=idempotent,
            )
        except MaybeSent as error:
            raise RunPodMaybeDone(self._scrub(f"RunPod API {what}: {error.problem}")) from None
        except GaveUp as error:
            raise RunPodError(
                self._scrub(
                    f"RunPod API {what}: {error.problem} after {self.retry.attempts} attempts; "
                    f"check your network or {URL_ENV}, or try again later"
                )
            ) from None
        return self._check(what, response)

    def _check(self, what: str, response: httpx.Response) -> Any:
        try:
            body = response.json()
        except ValueError:
            body = None
        detail = self._scrub(_detail(body)[:200])
        status = response.status_code
        if status in (401, 403):
            raise RunPodAuthError(
                f"RunPod API {what}: the API key was refused (HTTP {status} {detail}".rstrip()
                + f"); check {KEY_ENV} in the environment or .env"
            )
        if status == 404:
            raise RunPodNotFound(f"RunPod API {what}: not found (HTTP 404 {detail})".rstrip())
        if status >= 400:
            raise RunPodError(f"RunPod API {what}: HTTP {status} {detail}".rstrip())
        if body is None and response.content:
            raise RunPodError(f"RunPod API {what}: answer is not JSON (HTTP {status})")
        return body

    # -- pods -----------------------------------------------------------------------------

    def list_pods(self) -> list[dict[str, Any]]:
        body = self.request("GET", "/pods")
        if not isinstance(body, list):
            raise RunPodError(
                "RunPod API GET /pods: the answer is not a list of pods; "
                "refusing to report zero pods"
            )
        return [pod for pod in body if isinstance(pod, dict)]

    def get_pod(self, pod_id: str, include_machine: bool = False) -> dict[str, Any]:
        params = {"includeMachine": "true"} if include_machine else None
        try:
            body = self.request("GET", f"/pods/{pod_id}", params=params)
        except RunPodNotFound:
            raise RunPodNotFound(
                f"pod {pod_id} not found: check the id with `status --all`"
            ) from None
        if not isinstance(body, dict) or not body.get("id"):
            raise RunPodNotFound(f"pod {pod_id} not found: check the id with `status --all`")
        return body

    def create_pod(self, payload: Mapping[str, Any]) -> dict[str, Any]:
        """POST /pods once. If the answer is lost, the pod is looked up by its name (make it
        unique): found, it is returned; not found, ``RunPodMaybeDone`` says to check status."""
        try:
            body = self.request("POST", "/pods", json_body=dict(payload), idempotent=False)
        except RunPodMaybeDone as error:
            name = payload.get("name")
            try:
                found = [p for p in self.list_pods() if name and p.get("name") == name]
            except RunPodError:
                found = []
            if found:
                return found[0]
            raise RunPodMaybeDone(
                f"{error}; no pod named {name!r} yet, but it may still appear: check "
                "`status --all` before creating again, so you don't rent twice"
            ) from None
        if not isinstance(body, dict) or not body.get("id"):
            raise RunPodError(
                "RunPod API POST /pods: no pod id in the answer; check `status --all` "
                "before creating again"
            )
        return body

    def terminate_pod(self, pod_id: str) -> None:
        """DELETE /pods/{id}. A lost answer is never retried blindly: the pod is read; gone
        (404 or TERMINATED) is success; still there, the DELETE is sent once more."""
        for attempt in range(2):
            try:
                self.request("DELETE", f"/pods/{pod_id}", idempotent=False)
                return
            except RunPodMaybeDone as error:
                try:
                    pod = self.get_pod(pod_id)
                except RunPodNotFound:
                    return
                if str(pod.get("desiredStatus") or "").upper() == "TERMINATED":
                    return
                if attempt == 1:
                    raise RunPodError(
                        f"{error}; pod {pod_id} is still there ({pod.get('desiredStatus')}): "
                        "try `terminate` again later"
                    ) from None

    def stop_pod(self, pod_id: str) -> None:
        self.request("POST", f"/pods/{pod_id}/stop")

    def start_pod(self, pod_id: str) -> None:
        self.request("POST", f"/pods/{pod_id}/start")

    # -- GPU types (GraphQL: REST v1 has no price list) ----------------------------------

    def gpu_types(self) -> list[dict[str, Any]]:
        body = self.request(
            "POST", "/graphql", json_body={"query": GPU_TYPES_QUERY}, url=self.graphql_url
        )
        if isinstance(body, dict) and body.get("errors"):
            message = _detail(body["errors"]) or "query failed"
            if "auth" in message.lower() or "unauthori" in message.lower():
                raise RunPodAuthError(
                    f"RunPod API gpuTypes: the API key was refused ({message[:200]}); "
                    f"check {KEY_ENV}"
                )
            raise RunPodError(self._scrub(f"RunPod API gpuTypes: {message[:200]}"))
        types = (body.get("data") or {}).get("gpuTypes") if isinstance(body, dict) else None
        if not isinstance(types, list):
            raise RunPodError("RunPod API gpuTypes: no gpuTypes list in the answer")
        return [t for t in types if isinstance(t, dict)]
