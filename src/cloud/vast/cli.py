"""`scripts/launch_vast.py`: status, search, create, ssh-config, destroy, stop, start.

Everything a command prints is built here, so tests drive ``main(argv)`` against a local
HTTP server. Exit codes: 0 ok, 1 the API or SSH failed, 2 bad input or no API key, 3 destroy
refused (outputs not proven downloaded), 4 ``create --check`` found the machine wanting.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

from rich.console import Console
from rich.table import Table

from src.cloud.machines import SshAddress
from src.cloud.retry import RetryPolicy
from src.cloud.ssh_config import render_host_block, write_host_block
from src.cloud.vast.client import NO_KEY_HINT, VastClient, VastError, VastKeyError, find_api_key
from src.cloud.vast.instances import TABLE_COLUMNS, is_active, ssh_addresses, status_of, view_of
from src.cloud.vast.provider import outputs_gate
from src.common.paths import REPO_ROOT

EXIT_OK, EXIT_API, EXIT_USAGE, EXIT_REFUSED, EXIT_CHECK_FAILED = 0, 1, 2, 3, 4
REMOTE_TRAIN = REPO_ROOT / "scripts" / "remote_train.py"
ONSTART_SCRIPT = REPO_ROOT / "setup" / "onstart.sh"
DEFAULT_IMAGE = "pytorch/pytorch:2.4.0-cuda12.4-cudnn9-devel"
AUTOSTOP_ENV = "GPU_TRAIN_KIT_AUTOSTOP_MINUTES"  # read by setup/onstart.sh


class UsageError(ValueError):
    """Bad input from the user: one line, exit 2."""


def _console(stream: TextIO | None = None) -> Console:
    return Console(file=stream or sys.stdout, width=200, soft_wrap=False, highlight=False)


def _print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, sort_keys=True))


# -- commands ------------------------------------------------------------------------------


def cmd_status(client: VastClient, args: argparse.Namespace) -> int:
    instances = client.list_instances()
    now = time.time()
    shown = [i for i in instances if args.all or is_active(i)]
    views = [view_of(i, now) for i in shown]
    if args.json:
        _print_json([view.to_json() for view in views])
        return EXIT_OK
    hidden = len(instances) - len(shown)
    if not views:
        note = f" ({hidden} not running: `status --all`)" if hidden else ""
        print(f"no {'' if args.all else 'running '}instances{note}")
        return EXIT_OK
    table = Table(*TABLE_COLUMNS, title="Vast.ai instances", show_lines=True)
    for view in views:
        table.add_row(*view.table_row())
    _console().print(table)
    if hidden:
        print(
            f"{hidden} instance(s) not running (stopped, exited or offline) hidden; "
            "their disks still bill: `status --all`"
        )
    return EXIT_OK


def check_search_args(args: argparse.Namespace) -> None:
    """UsageError (one line, exit 2) for values the API would accept and answer nonsense to."""
    if args.limit < 1:
        raise UsageError(f"--limit {args.limit} must be at least 1 (e.g. --limit 20)")
    if args.num_gpus < 1:
        raise UsageError(f"--num-gpus {args.num_gpus} must be at least 1")
    if args.max_price is not None and args.max_price < 0:
        raise UsageError(f"--max-price {args.max_price:g} must be >= 0 $/h (e.g. --max-price 0.6)")


def build_offer_query(args: argparse.Namespace) -> dict[str, Any]:
    """The JSON query of POST /api/v0/bundles/ for the search flags.

    With --interruptible the price you pay is your bid, at least the offer's ``min_bid``: so
    --max-price filters and the server orders by ``min_bid`` (``dph_total`` is the on-demand
    price, which a bid offer may far exceed).
    """
    price_field = "min_bid" if args.interruptible else "dph_total"
    query: dict[str, Any] = {
        "rentable": {"eq": True},
        "rented": {"eq": False},
        "verified": {"eq": True},
        "num_gpus": {"eq": args.num_gpus},
        "order": [[price_field, "asc"]],
        "type": "bid" if args.interruptible else "on-demand",
        "limit": args.limit,
    }
    if args.gpu:
        query["gpu_name"] = {"eq": args.gpu}
    if args.max_price is not None:
        query[price_field] = {"lte": args.max_price}
    if args.min_disk is not None:
        query["disk_space"] = {"gte": args.min_disk}
    if args.min_reliability is not None:
        query["reliability2"] = {"gte": args.min_reliability}
    return query


def offer_price(offer: dict[str, Any], interruptible: bool) -> float:
    key = "min_bid" if interruptible and offer.get("min_bid") is not None else "dph_total"
    try:
        return float(offer.get(key))
    except (TypeError, ValueError):
        return float("inf")


def cmd_search(client: VastClient, args: argparse.Namespace) -> int:
    check_search_args(args)
    offers = client.search_offers(build_offer_query(args))
    offers.sort(key=lambda offer: offer_price(offer, args.interruptible))
    if args.json:
        _print_json(offers)
        return EXIT_OK
    if not offers:
        print("no offers match: loosen --max-price, --min-disk or --min-reliability")
        return EXIT_OK
    kind = "interruptible (min bid)" if args.interruptible else "on-demand"
    table = Table("offer id", "GPU", "$/h", "disk GB", "reliability", "location", title=f"{kind}")
    for offer in offers:
        price = offer_price(offer, args.interruptible)
        reliability = offer.get("reliability2", offer.get("reliability"))
        table.add_row(
            str(offer.get("id", "-")),
            f"{offer.get('gpu_name', '?')} x {offer.get('num_gpus', '?')}",
            "-" if price == float("inf") else f"{price:.3f}",
            f"{float(offer.get('disk_space') or 0):.0f}",
            "-" if reliability is None else f"{float(reliability):.3f}",
            str(offer.get("geolocation") or "-"),
        )
    _console().print(table)
    print("rent one: python scripts/launch_vast.py create OFFER_ID --disk GB [--wait]")
    return EXIT_OK


def create_payload(args: argparse.Namespace) -> dict[str, Any]:
    payload: dict[str, Any] = {
        "client_id": "me",
        "image": args.image,
        "disk": args.disk,
        "label": args.label,
        "onstart": ONSTART_SCRIPT.read_text(),
        "runtype": "ssh_direc ssh_proxy",
        "env": {},
    }
    if args.repo_dir:
        payload["env"]["GPU_TRAIN_KIT_DIR"] = args.repo_dir
    if args.autostop is not None:  # setup/onstart.sh starts scripts/autostop.py with it
        payload["env"][AUTOSTOP_ENV] = f"{args.autostop:g}"
    if args.bid is not None:
        payload["price"] = args.bid  # without it a bid offer is rented on-demand
    return payload


def wait_until_running(
    client: VastClient,
    instance_id: int,
    timeout_s: float,
    poll_s: float,
    sleep: Callable[[float], None] = time.sleep,
) -> dict[str, Any]:
    """Poll until running with an SSH address; print each status change; VastError on timeout."""
    start = time.monotonic()
    last_seen = None
    while True:
        instance = client.get_instance(instance_id)
        status = status_of(instance)
        if status == "running" and ssh_addresses(instance):
            return instance
        message = instance.get("status_msg") or ""
        if (status, message) != last_seen:
            elapsed = time.monotonic() - start
            print(f"[{elapsed:5.0f} s] instance {instance_id}: {status} {message}".rstrip())
            last_seen = (status, message)
        if time.monotonic() - start + poll_s > timeout_s:
            raise VastError(
                f"instance {instance_id} not running with SSH after {timeout_s:g} s "
                f"(status {status}); it may still bill: check `status` or `destroy {instance_id}`"
            )
        sleep(poll_s)


def cmd_create(client: VastClient, args: argparse.Namespace) -> int:
    if args.disk <= 0:
        raise UsageError(f"--disk {args.disk} must be a positive number of GB (e.g. --disk 100)")
    if args.autostop is not None and args.autostop <= 0:
        raise UsageError(f"--autostop {args.autostop:g} must be minutes > 0 (e.g. --autostop 20)")
    if args.min_gpu_efficiency is not None and not 0 < args.min_gpu_efficiency <= 1:
        raise UsageError(
            f"--min-gpu-efficiency {args.min_gpu_efficiency:g} must be in (0, 1], e.g. 0.8"
        )
    try:
        args.check_args = shlex.split(args.check_args or "")
    except ValueError as error:
        raise UsageError(f"--check-args: {error}") from None
    args.check = args.check or args.min_gpu_efficiency is not None
    args.wait = args.wait or args.check  # a check needs the instance up
    instance_id = client.create_instance(args.offer_id, create_payload(args))
    kind = f"interruptible at a bid of ${args.bid:.3f}/h" if args.bid is not None else "on-demand"
    print(f"created instance {instance_id} from offer {args.offer_id} ({kind})")
    if args.autostop is not None:
        print(
            f"autostop: the instance stops itself after {args.autostop:g} idle minutes, once "
            "the repo is on it (setup/onstart.sh; log /workspace/onstart.log)"
        )
    if not args.wait:
        print("follow it with: python scripts/launch_vast.py status  (or create --wait)")
        return EXIT_OK
    instance = wait_until_running(client, instance_id, args.timeout, args.poll_interval)
    view = view_of(instance)
    print(f"instance {instance_id} is running")
    for address in view.ssh:
        print(f"  {address.kind}: {address.command()}")
    print(f"  VS Code: python scripts/launch_vast.py ssh-config {instance_id}")
    if args.check:
        return check_new_instance(instance_id, view.ssh[0], args)
    return EXIT_OK


def check_new_instance(instance_id: int, address: SshAddress, args: argparse.Namespace) -> int:
    """``remote_train.py ADDRESS --check`` on the new instance (code synced, installed,
    measured); below the floor, the line that releases it: nothing trained there yet, so
    there is nothing to download before destroying it."""
    command = [
        sys.executable,
        str(REMOTE_TRAIN),
        f"{address.user}@{address.host}",
        "-p",
        str(address.port),
        "--check",
        *(
            ["--min-gpu-efficiency", f"{args.min_gpu_efficiency:g}"]
            if args.min_gpu_efficiency is not None
            else []
        ),
        *args.check_args,
    ]
    print(f"checking instance {instance_id}: {shlex.join(command[1:])}", flush=True)
    code = subprocess.run(command).returncode
    if code == 0:
        return EXIT_OK
    print(
        f"launch_vast: instance {instance_id} failed its check (remote_train exit {code}); it "
        "still bills, and nothing has trained there, so nothing needs downloading: release "
        f"it with python scripts/launch_vast.py destroy {instance_id}",
        file=sys.stderr,
    )
    return EXIT_CHECK_FAILED


def cmd_ssh_config(client: VastClient, args: argparse.Namespace) -> int:
    instance = client.get_instance(args.instance_id)
    addresses = ssh_addresses(instance)
    if args.proxy:
        addresses = [a for a in addresses if a.kind == "proxy"]
    if not addresses:
        raise VastError(
            f"instance {args.instance_id} has no SSH address yet (status {status_of(instance)}): "
            "wait until it is running (`create --wait` or `status`)"
        )
    address = addresses[0]
    alias = args.alias or f"vastai-{args.instance_id}"
    try:
        block = render_host_block(alias, address.host, address.port, args.identity_file)
    except ValueError as error:
        raise UsageError(f"--alias: {error}") from None
    config_path = Path(args.config).expanduser()
    outcome = write_host_block(config_path, alias, block)
    print(f"{outcome} Host {alias} ({address.kind} {address.host}:{address.port}) in {config_path}")
    print(f"connect: ssh {alias}   (VS Code: Remote-SSH: Connect to Host... -> {alias})")
    return EXIT_OK


def _confirm_typed_id(instance_id: int, stdin: TextIO) -> bool:
    if not stdin.isatty():
        print(
            "launch_vast: --force needs a terminal to type the instance id; refusing",
            file=sys.stderr,
        )
        return False
    print(f"type the instance id ({instance_id}) to destroy it and its disk: ", end="", flush=True)
    answer = stdin.readline().strip()
    return answer == str(instance_id)


def cmd_destroy(client: VastClient, args: argparse.Namespace) -> int:
    instance = client.get_instance(args.instance_id)
    gate = outputs_gate(instance, remote_root=args.remote_dir)
    if gate.allowed:
        print(f"outputs of instance {args.instance_id} are downloaded: {gate.reason}")
    else:
        print(f"launch_vast: destroy refused: {gate.reason}", file=sys.stderr)
        if not args.force:
            return EXIT_REFUSED
        if not _confirm_typed_id(args.instance_id, sys.stdin):
            print("launch_vast: destroy cancelled, nothing was deleted", file=sys.stderr)
            return EXIT_REFUSED
    client.destroy_instance(args.instance_id)
    print(f"destroyed instance {args.instance_id}")
    return EXIT_OK


def cmd_set_state(client: VastClient, args: argparse.Namespace) -> int:
    state = "stopped" if args.command == "stop" else "running"
    client.set_state(args.instance_id, state)
    if state == "stopped":
        print(f"stopping instance {args.instance_id}: the GPU is released, the disk keeps billing")
    else:
        print(
            f"starting instance {args.instance_id} (the same GPU must be free; `status` shows it)"
        )
    return EXIT_OK


# -- argument parsing ------------------------------------------------------------------------


def add_search_arguments(search: argparse.ArgumentParser) -> None:
    """The offer filter of `search`, which `remote_train --rent QUERY` takes as well."""
    search.add_argument("--gpu", help='GPU name as Vast.ai spells it, e.g. "RTX 4090"')
    search.add_argument("--num-gpus", type=int, default=1)
    search.add_argument(
        "--max-price", type=float, help="max $/h (with --interruptible: max min_bid)"
    )
    search.add_argument("--min-disk", type=float, help="min disk GB")
    search.add_argument("--min-reliability", type=float, help="0..1, e.g. 0.98")
    search.add_argument("--interruptible", action="store_true", help="bid (spot) offers")
    search.add_argument("--limit", type=int, default=20, help="at most this many offers")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="launch_vast.py", description="Manage Vast.ai instances (docs/vast_and_sync.md)."
    )
    parser.add_argument("--url", help="API base URL (default: VAST_URL or https://console.vast.ai)")
    parser.add_argument("--retries", type=int, default=4, help="tries per API call (default 4)")
    parser.add_argument("--retry-delay", type=float, default=1.0, help="first backoff wait, s")
    parser.add_argument("--http-timeout", type=float, default=20.0, help="per request, s")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    status = sub.add_parser("status", help="your instances: status, $/h, cost so far, SSH")
    status.add_argument("--all", action="store_true", help="include stopped/exited instances")
    status.add_argument("--json", action="store_true", help="machine-readable output")

    search = sub.add_parser("search", help="offers sorted by price")
    add_search_arguments(search)
    search.add_argument("--json", action="store_true", help="the offers as JSON (all fields)")

    create = sub.add_parser("create", help="rent an offer")
    create.add_argument("offer_id", type=int)
    create.add_argument("--image", default=DEFAULT_IMAGE)
    create.add_argument("--disk", type=float, default=50.0, help="GB (fixed once created)")
    create.add_argument("--label", default="gpu-train-kit")
    create.add_argument("--bid", type=float, help="$/h bid: rents interruptible (else on-demand)")
    create.add_argument("--repo-dir", help="where the repo lives on the instance (onstart)")
    create.add_argument("--wait", action="store_true", help="poll until running with SSH")
    create.add_argument(
        "--autostop",
        type=float,
        metavar="MINUTES",
        help="stop the instance after this many idle GPU minutes (scripts/autostop.py)",
    )
    create.add_argument(
        "--check",
        action="store_true",
        help="once running: sync, install and measure it (remote_train.py --check); implies --wait",
    )
    create.add_argument(
        "--min-gpu-efficiency",
        type=float,
        metavar="F",
        help="with --check: fail (exit 4) when a GPU delivers less than F of its bf16 peak",
    )
    create.add_argument(
        "--check-args",
        help="more options for remote_train.py --check, e.g. --check-args='--python python3.11'",
    )
    create.add_argument("--timeout", type=float, default=900.0, help="--wait gives up (s)")
    create.add_argument("--poll-interval", type=float, default=10.0, help=argparse.SUPPRESS)

    ssh_config = sub.add_parser("ssh-config", help="write a Host entry to ~/.ssh/config")
    ssh_config.add_argument("instance_id", type=int)
    ssh_config.add_argument("--alias", help="Host name (default vastai-ID)")
    ssh_config.add_argument("--identity-file", default="~/.ssh/id_ed25519")
    ssh_config.add_argument("--config", default="~/.ssh/config", help=argparse.SUPPRESS)
    ssh_config.add_argument("--proxy", action="store_true", help="use the proxy address")

    destroy = sub.add_parser("destroy", help="delete an instance once its outputs are verified")
    destroy.add_argument("instance_id", type=int)
    destroy.add_argument("--force", action="store_true", help="skip the check; type the id")
    destroy.add_argument(
        "--remote-dir",
        help="outputs root that must be synced (default: SYNC_REMOTE_DIR or /workspace/persistent)",
    )

    for name, text in (("stop", "stop (disk kept, still billed)"), ("start", "start again")):
        sub.add_parser(name, help=text).add_argument("instance_id", type=int)
    return parser


COMMANDS: dict[str, Callable[[VastClient, argparse.Namespace], int]] = {
    "status": cmd_status,
    "search": cmd_search,
    "create": cmd_create,
    "ssh-config": cmd_ssh_config,
    "destroy": cmd_destroy,
    "stop": cmd_set_state,
    "start": cmd_set_state,
}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    key = find_api_key()
    if not key:
        print(f"launch_vast: {NO_KEY_HINT}", file=sys.stderr)
        return EXIT_USAGE
    try:
        if args.retries < 1 or args.retry_delay < 0 or args.http_timeout <= 0:
            raise UsageError("--retries must be >= 1, --retry-delay >= 0, --http-timeout > 0")
        retry = RetryPolicy(args.retries, args.retry_delay, max(args.retry_delay, 10.0))
        with VastClient(key, args.url, timeout=args.http_timeout, retry=retry) as client:
            return COMMANDS[args.command](client, args)
    except (UsageError, VastKeyError) as error:
        print(f"launch_vast: {error}", file=sys.stderr)
        return EXIT_USAGE
    except VastError as error:
        print(f"launch_vast: {str(error).replace(key, '***')}", file=sys.stderr)
        return EXIT_API


if __name__ == "__main__":
    sys.exit(main())
