"""`scripts/launch.py --provider runpod`: status, search, create, ssh-config, stop, start,
terminate.

Everything a command prints is built here, so tests drive ``main(argv)`` against a local
HTTP server. Exit codes: 0 ok, 1 the API failed, 2 bad input, no or refused API key, an
unknown pod or a pod without a public SSH port, 3 terminate refused (outputs not proven
downloaded).
"""

from __future__ import annotations

import argparse
import base64
import json
import secrets
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from src.cloud.retry import RetryPolicy
from src.cloud.runpod.client import (
    NO_KEY_HINT,
    RunPodAuthError,
    RunPodClient,
    RunPodError,
    RunPodNotFound,
    find_api_key,
)
from src.cloud.runpod.pods import (
    STOP_WARNING,
    TABLE_COLUMNS,
    is_active,
    ssh_address,
    status_of,
    view_of,
)
from src.cloud.runpod.provider import outputs_gate
from src.cloud.ssh_config import render_host_block, write_host_block
from src.common.paths import REPO_ROOT

EXIT_OK, EXIT_API, EXIT_USAGE, EXIT_REFUSED = 0, 1, 2, 3
PROG = "launch.py --provider runpod"
LAUNCH = "python scripts/launch.py --provider runpod"
ONSTART_SCRIPT = REPO_ROOT / "setup" / "onstart.sh"
DEFAULT_IMAGE = "runpod/pytorch:2.4.0-py3.11-cuda12.4.1-devel-ubuntu22.04"
VOLUME_MOUNT = "/workspace"
AUTOSTOP_ENV = "GPU_TRAIN_KIT_AUTOSTOP_MINUTES"  # read by setup/onstart.sh
ONSTART_ENV = "GPU_TRAIN_KIT_ONSTART_B64"
# RunPod has no "onstart" field: the start command runs the kit's onstart in the background,
# then the image's own /start.sh (RunPod images start sshd with your account's key there).
START_CMD = (
    f'echo "${ONSTART_ENV}" | base64 -d > /tmp/onstart.sh; (bash /tmp/onstart.sh &); '
    "if [ -x /start.sh ]; then exec /start.sh; else exec sleep infinity; fi"
)


class UsageError(ValueError):
    """Bad input from the user: one line, exit 2."""


class NoSshPort(RunPodError):
    """The pod runs but exposes no public SSH port: one line, exit 2."""


def _console() -> Console:
    return Console(file=sys.stdout, width=200, soft_wrap=False, highlight=False)


def _print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, sort_keys=True))


# -- commands ------------------------------------------------------------------------------


def cmd_status(client: RunPodClient, args: argparse.Namespace) -> int:
    pods = client.list_pods()
    shown = [p for p in pods if args.all or is_active(p)]
    now = time.time()
    views = [view_of(p, now) for p in shown]
    if args.json:
        _print_json([v.to_json() for v in views])
        return EXIT_OK
    hidden = len(pods) - len(shown)
    if not views:
        note = f" ({hidden} not running: `status --all`)" if hidden else ""
        print(f"no {'' if args.all else 'running '}pods{note}")
        return EXIT_OK
    table = Table(*TABLE_COLUMNS, title="RunPod pods", show_lines=True)
    for view in views:
        table.add_row(*view.table_row())
    _console().print(table)
    if hidden:
        print(f"{hidden} pod(s) not running hidden; their volumes still bill: `status --all`")
    return EXIT_OK


def _price(gpu: dict[str, Any], cloud: str, spot: bool) -> float | None:
    key = f"{cloud}{'SpotPrice' if spot else 'Price'}"
    try:
        value = float(gpu.get(key))
    except (TypeError, ValueError):
        return None
    return value if value > 0 else None


def check_search_args(args: argparse.Namespace) -> None:
    if args.max_price is not None and args.max_price < 0:
        raise UsageError(f"--max-price {args.max_price:g} must be >= 0 $/h")


def matching_gpus(
    gpu_types: list[dict[str, Any]], args: argparse.Namespace
) -> list[tuple[float, str, dict[str, Any]]]:
    """(price, cloud, GPU type) for each GPU type and cloud the filter lets through, cheapest
    first."""
    clouds = ["secure", "community"] if args.cloud == "all" else [args.cloud]
    rows = []
    for gpu in gpu_types:
        name = str(gpu.get("displayName") or gpu.get("id") or "?")
        if args.gpu and args.gpu.lower() not in f"{name} {gpu.get('id', '')}".lower():
            continue
        if args.min_vram and float(gpu.get("memoryInGb") or 0) < args.min_vram:
            continue
        for cloud in clouds:
            if gpu.get(f"{cloud}Cloud") is False:
                continue
            price = _price(gpu, cloud, args.spot)
            if price is None or (args.max_price is not None and price > args.max_price):
                continue
            rows.append((price, cloud, gpu))
    rows.sort(key=lambda row: row[0])
    return rows


def cmd_search(client: RunPodClient, args: argparse.Namespace) -> int:
    check_search_args(args)
    rows = matching_gpus(client.gpu_types(), args)
    if args.json:
        _print_json([{"price": p, "cloud": c, **g} for p, c, g in rows])
        return EXIT_OK
    if not rows:
        print("no GPU types match: loosen --gpu, --max-price or --min-vram")
        return EXIT_OK
    title = "spot (interruptible) $/h per GPU" if args.spot else "on-demand $/h per GPU"
    table = Table("GPU type id (for create)", "name", "VRAM GB", "cloud", "$/h", title=title)
    for price, cloud, gpu in rows:
        table.add_row(
            str(gpu.get("id", "-")),
            str(gpu.get("displayName") or "-"),
            f"{float(gpu.get('memoryInGb') or 0):.0f}",
            cloud,
            f"{price:.3f}",
        )
    _console().print(table)
    print(f'rent one: {LAUNCH} create "GPU TYPE ID" --volume-gb 100 [--spot] [--wait]')
    return EXIT_OK


def create_payload(args: argparse.Namespace) -> dict[str, Any]:
    """POST /pods body: the kit's onstart rides in the environment; 22/tcp is exposed so the
    pod gets a public SSH port; the volume is mounted at /workspace (what survives a stop)."""
    env = {ONSTART_ENV: base64.b64encode(ONSTART_SCRIPT.read_bytes()).decode()}
    if args.repo_dir:
        env["GPU_TRAIN_KIT_DIR"] = args.repo_dir
    if args.autostop is not None:
        env[AUTOSTOP_ENV] = f"{args.autostop:g}"
    return {
        "name": args.name or f"gpu-train-kit-{secrets.token_hex(3)}",  # unique: see create_pod
        "imageName": args.image,
        "computeType": "GPU",
        "gpuTypeIds": [args.gpu_type],
        "gpuCount": args.gpu_count,
        "cloudType": args.cloud.upper(),
        "interruptible": bool(args.spot),
        "containerDiskInGb": args.container_disk_gb,
        "volumeInGb": args.volume_gb,
        "volumeMountPath": VOLUME_MOUNT,
        "ports": ["22/tcp", "8888/http"],
        "supportPublicIp": True,
        "env": env,
        "dockerStartCmd": ["bash", "-c", START_CMD],
    }


def wait_until_ssh(
    client: RunPodClient,
    pod_id: str,
    timeout_s: float,
    poll_s: float,
    sleep: Callable[[float], None] = time.sleep,
) -> dict[str, Any]:
    """Poll until the pod runs with a public SSH port; RunPodError on timeout."""
    start = time.monotonic()
    last = None
    while True:
        pod = client.get_pod(pod_id)
        status = status_of(pod)
        if status == "RUNNING" and ssh_address(pod):
            return pod
        seen = (status, bool(pod.get("publicIp")))
        if seen != last:
            elapsed = time.monotonic() - start
            print(f"[{elapsed:5.0f} s] pod {pod_id}: {status}, no SSH port yet")
            last = seen
        if time.monotonic() - start + poll_s > timeout_s:
            raise RunPodError(
                f"pod {pod_id} has no public SSH port after {timeout_s:g} s (status {status}); "
                f"it may still bill: check `status` or `terminate {pod_id}`"
            )
        sleep(poll_s)


def cmd_create(client: RunPodClient, args: argparse.Namespace) -> int:
    if args.volume_gb <= 0:
        raise UsageError(f"--volume-gb {args.volume_gb} must be a positive number of GB")
    if args.container_disk_gb <= 0 or args.gpu_count < 1:
        raise UsageError("--container-disk-gb must be > 0 and --gpu-count >= 1")
    if args.autostop is not None and args.autostop <= 0:
        raise UsageError(f"--autostop {args.autostop:g} must be minutes > 0 (e.g. --autostop 20)")
    pod = client.create_pod(create_payload(args))
    pod_id = str(pod["id"])
    kind = "spot (interruptible)" if args.spot else "on-demand"
    print(
        f"created pod {pod_id} ({args.gpu_type} x {args.gpu_count}, {args.cloud} cloud, {kind}); "
        f"volume {args.volume_gb} GB at {VOLUME_MOUNT}: keep outputs there"
    )
    if args.autostop is not None:
        print(f"autostop: the pod stops itself after {args.autostop:g} idle minutes")
    if not args.wait:
        print(f"follow it with: {LAUNCH} status  (or create --wait)")
        return EXIT_OK
    pod = wait_until_ssh(client, pod_id, args.timeout, args.poll_interval)
    address = ssh_address(pod)
    assert address is not None
    print(f"pod {pod_id} is running: {address.command()}")
    print(f"  VS Code: {LAUNCH} ssh-config {pod_id}")
    return EXIT_OK


def _running_address(client: RunPodClient, pod_id: str):
    pod = client.get_pod(pod_id)
    address = ssh_address(pod) if is_active(pod) else None
    if address is None:
        raise NoSshPort(
            f"pod {pod_id} has no public SSH port (status {status_of(pod)}): start it, and "
            "create pods with 22/tcp exposed on a machine with a public IP"
        )
    return address


def cmd_ssh_config(client: RunPodClient, args: argparse.Namespace) -> int:
    address = _running_address(client, args.pod_id)
    alias = args.alias or f"runpod-{args.pod_id}"
    try:
        block = render_host_block(alias, address.host, address.port, args.identity_file)
    except ValueError as error:
        raise UsageError(f"--alias: {error}") from None
    config_path = Path(args.config).expanduser()
    outcome = write_host_block(config_path, alias, block)
    print(f"{outcome} Host {alias} ({address.host}:{address.port}) in {config_path}")
    print(f"connect: ssh {alias}   (VS Code: Remote-SSH: Connect to Host... -> {alias})")
    return EXIT_OK


def cmd_stop(client: RunPodClient, args: argparse.Namespace) -> int:
    client.get_pod(args.pod_id)  # an unknown id is one clear line, not a bare 404
    client.stop_pod(args.pod_id)
    print(f"stopping pod {args.pod_id}: {STOP_WARNING}")
    return EXIT_OK


def cmd_start(client: RunPodClient, args: argparse.Namespace) -> int:
    client.get_pod(args.pod_id)
    client.start_pod(args.pod_id)
    print(f"starting pod {args.pod_id} (the same GPU must be free on its machine; `status`)")
    return EXIT_OK


def cmd_terminate(client: RunPodClient, args: argparse.Namespace) -> int:
    pod = client.get_pod(args.pod_id)
    gate = outputs_gate(pod, remote_root=args.remote_dir)
    if not gate.allowed:
        print(f"launch: terminate refused: {gate.reason}", file=sys.stderr)
        return EXIT_REFUSED
    print(f"outputs of pod {args.pod_id} are downloaded: {gate.reason}")
    client.terminate_pod(args.pod_id)
    print(f"terminated pod {args.pod_id} (its volume is deleted with it)")
    return EXIT_OK


# -- argument parsing ------------------------------------------------------------------------


def add_search_arguments(search: argparse.ArgumentParser) -> None:
    """The filter of `search`, which `remote_train --rent --provider runpod` takes as well."""
    search.add_argument("--gpu", help='part of the name, e.g. "4090"')
    search.add_argument("--cloud", choices=["secure", "community", "all"], default="all")
    search.add_argument("--spot", action="store_true", help="spot (interruptible) prices")
    search.add_argument("--max-price", type=float, help="max $/h per GPU")
    search.add_argument("--min-vram", type=float, help="min GPU memory, GB")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="Manage RunPod pods (docs/runpod.md).")
    parser.add_argument("--url", help="REST base URL (default: RUNPOD_REST_URL or rest.runpod.io)")
    parser.add_argument("--retries", type=int, default=4, help="tries per API read (default 4)")
    parser.add_argument("--retry-delay", type=float, default=1.0, help="first backoff wait, s")
    parser.add_argument("--http-timeout", type=float, default=20.0, help="per request, s")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    status = sub.add_parser("status", help="your pods: GPU, $/h, uptime, cost, volume, SSH")
    status.add_argument("--all", action="store_true", help="include stopped pods")
    status.add_argument("--json", action="store_true", help="machine-readable output")

    search = sub.add_parser("search", help="GPU types with $/h (secure/community, spot)")
    add_search_arguments(search)
    search.add_argument("--json", action="store_true")

    create = sub.add_parser("create", help="create a pod")
    create.add_argument("gpu_type", help='GPU type id from `search` ("NVIDIA GeForce RTX 4090")')
    create.add_argument("--image", default=DEFAULT_IMAGE)
    create.add_argument("--volume-gb", type=int, default=50, help="volume at /workspace (kept)")
    create.add_argument("--container-disk-gb", type=int, default=30, help="lost on stop")
    create.add_argument("--gpu-count", type=int, default=1)
    create.add_argument("--cloud", choices=["secure", "community"], default="secure")
    create.add_argument("--spot", action="store_true", help="interruptible (may be preempted)")
    create.add_argument("--name", help="pod name (default gpu-train-kit-XXXXXX, unique)")
    create.add_argument("--repo-dir", help="where the repo lives on the pod (onstart)")
    create.add_argument("--autostop", type=float, metavar="MINUTES", help="stop when idle")
    create.add_argument("--wait", action="store_true", help="poll until SSH answers")
    create.add_argument("--timeout", type=float, default=900.0, help="--wait gives up (s)")
    create.add_argument("--poll-interval", type=float, default=10.0, help=argparse.SUPPRESS)

    ssh_config = sub.add_parser("ssh-config", help="write a Host entry to ~/.ssh/config")
    ssh_config.add_argument("pod_id")
    ssh_config.add_argument("--alias", help="Host name (default runpod-ID)")
    ssh_config.add_argument("--identity-file", default="~/.ssh/id_ed25519")
    ssh_config.add_argument("--config", default="~/.ssh/config", help=argparse.SUPPRESS)

    for name, text in (
        ("stop", "stop: GPU released, container disk lost, /workspace volume kept (billed)"),
        ("start", "start a stopped pod again"),
    ):
        sub.add_parser(name, help=text).add_argument("pod_id")
    terminate = sub.add_parser("terminate", help="delete a pod once its outputs are verified")
    terminate.add_argument("pod_id")
    terminate.add_argument(
        "--remote-dir",
        help="outputs root that must be synced (default: SYNC_REMOTE_DIR or /workspace/persistent)",
    )
    return parser


COMMANDS: dict[str, Callable[[RunPodClient, argparse.Namespace], int]] = {
    "status": cmd_status,
    "search": cmd_search,
    "create": cmd_create,
    "ssh-config": cmd_ssh_config,
    "stop": cmd_stop,
    "start": cmd_start,
    "terminate": cmd_terminate,
}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    key = find_api_key()
    if not key:
        print(f"launch: {NO_KEY_HINT}", file=sys.stderr)
        return EXIT_USAGE
    try:
        if args.retries < 1 or args.retry_delay < 0 or args.http_timeout <= 0:
            raise UsageError("--retries must be >= 1, --retry-delay >= 0, --http-timeout > 0")
        retry = RetryPolicy(args.retries, args.retry_delay, max(args.retry_delay, 10.0))
        with RunPodClient(key, args.url, timeout=args.http_timeout, retry=retry) as client:
            return COMMANDS[args.command](client, args)
    except (UsageError, RunPodAuthError, RunPodNotFound, NoSshPort) as error:
        print(f"launch: {str(error).replace(key, '***')}", file=sys.stderr)
        return EXIT_USAGE
    except RunPodError as error:
        print(f"launch: {str(error).replace(key, '***')}", file=sys.stderr)
        return EXIT_API
